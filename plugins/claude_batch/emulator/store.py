"""Batch state in emulated time: the clock, the batches, their outcomes and the counters.

Emulated time runs ``time_scale`` times faster than the wall clock and can be jumped forward
(``advance``). A batch is decided when it is created: for each request the builder draws, from
a generator seeded by (seed, batch number since reset), when in the processing window it
finishes and what becomes of it (succeeded, or a fault: errored / expired), and works out its
token usage and prompt-cache outcome. Only compact arrays and the params (as orjson bytes,
with the part shared by all requests stored once) are kept; result lines are produced when
they are streamed.

While a batch is ``in_progress`` every request counts as ``processing``. It ends at
``created_at + processing_seconds`` (with a little seeded jitter); or, when canceled,
``cancel_seconds`` after the cancel, with the requests not finished by the cancel ``canceled``;
or at ``expires_at`` (24 h), with the unfinished ones ``expired``. Ends are kept in a heap and
applied lazily, at the next request or clock change.

Result lines are made once per batch and kept compressed (``results_file.py``); a background
thread starts making them when the batch is created and pauses while requests are served.

Timestamps. The batch lifecycle runs on the emulated clock. The times the API reports
(``created_at``, ``expires_at``, ``ended_at``...) are on the *API clock*, which runs at wall-clock
speed, starts at the wall-clock time and moves by ``seconds / time_scale`` on ``advance``: an
emulated interval shows as that interval divided by ``time_scale``. So a client computing
``now - created_at`` or ``expires_at - now`` with its own clock gets how long the batch has
really run and how long it really has left (at ``time_scale`` 60 a new batch "expires in 24m",
as its 24 emulated hours take 24 minutes). At ``time_scale`` 1 the two clocks are the same.
"""

from __future__ import annotations

import gc
import heapq
import math
import random
import threading
import time
from array import array
from bisect import bisect_left, bisect_right
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson

from .config import EmulatorConfig
from .errors import ERROR_TYPE_BY_STATUS, ApiError, error_body, invalid_request, not_found
from .faults import ENDPOINTS, FaultInjector
from .ids import derived_id, random_id, rfc3339, rfc3339_us
from .responder import (
    CACHE_NONE,
    CACHE_READ,
    CACHE_WRITE,
    DefaultResponder,
    PromptCache,
    Responder,
    ResponderError,
    ResponseContext,
    base_usage,
    finish_message,
    requested_inference_geo,
)
from .results_file import BLOCK_LINES, STEP_LINES, ResultsFile, ResultsWorker
from .tokens import TemplateShape, analyse_prompt, template_shape
from .validation import (
    CUSTOM_ID_RE,
    ItemError,
    check_item,
    head_error,
    messages_error,
    params_error,
    tail_error,
)

# What becomes of a request that gets processed (decided at create time).
FATE_SUCCEEDED = 0
FATE_INVALID = 1  # bad params: errored, invalid_request_error
FATE_EXPIRED = 2  # injected: expired
FATE_ERRORED = 3  # injected: errored with batch.error_types[fate - FATE_ERRORED]

CACHE_TTL_SECONDS = {"5m": 300.0, "1h": 3600.0}
BATCH_ENDPOINTS = frozenset({"create", "retrieve", "list", "cancel", "delete", "results"})
STATUSES = ("in_progress", "canceling", "ended")
_NO_TEMPLATE = -1


@contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection for a short burst of allocation (a create's parse step, a few
    result lines): the objects it makes are freed by reference counting, and the collector's
    passes over a big process (an Airflow test run) would cost up to a fifth of the time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class TooManyRequests(ValueError):
    """More requests than a batch may hold (the API schema's ``requests.maxItems``): HTTP 400."""


class EmulatedClock:
    """Wall-clock time scaled by ``time_scale``, plus any explicit jumps forward.

    Also keeps the *API clock* the API's timestamps are reported on: it runs at wall-clock
    speed and moves by ``seconds / time_scale`` on ``advance`` (see the module docstring).
    """

    def __init__(self, time_scale: float, start: float | None = None) -> None:
        self._lock = threading.Lock()
        self._anchor_real = time.monotonic()
        self._anchor_emulated = time.time() if start is None else start
        self._anchor_api = self._anchor_emulated
        self._scale = time_scale

    def now(self) -> float:
        with self._lock:
            return self._anchor_emulated + (time.monotonic() - self._anchor_real) * self._scale

    def api_now(self) -> float:
        with self._lock:
            return self._anchor_api + (time.monotonic() - self._anchor_real)

    def readings(self) -> tuple[float, float, float]:
        """(emulated now, API-clock now, time_scale), read together."""
        with self._lock:
            elapsed = time.monotonic() - self._anchor_real
            return self._anchor_emulated + elapsed * self._scale, self._anchor_api + elapsed, self._scale

    @property
    def time_scale(self) -> float:
        return self._scale

    def set_time_scale(self, time_scale: float) -> None:
        with self._lock:
            real = time.monotonic()
            self._anchor_emulated += (real - self._anchor_real) * self._scale
            self._anchor_api += real - self._anchor_real
            self._anchor_real = real
            self._scale = time_scale

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("emulated time only moves forward")
        with self._lock:
            self._anchor_emulated += seconds
            self._anchor_api += seconds / self._scale

    def restart(self, time_scale: float) -> None:
        """Both clocks back to the wall-clock time (a reset: no batch is left to see the jump back)."""
        with self._lock:
            self._anchor_real = time.monotonic()
            self._anchor_emulated = self._anchor_api = time.time()
            self._scale = time_scale


class Batch:
    """One batch: its compact per-request data and its lifecycle in emulated time."""

    __slots__ = (
        "id", "seq", "config", "size", "created_at", "expires_at", "duration", "ready_at", "end_at",
        "status", "cancel_initiated_at", "ended_at", "done_fraction", "counts",
        "custom_ids", "templates", "template_ids", "messages", "invalid", "completion", "fates",
        "error_types", "fate_counts", "cache_codes", "input_tokens", "cache_tokens", "cache_1h_tokens",
        "created_at_text", "expires_at_text", "stall_fraction", "api_created_us", "api_scale", "results",
    )  # fmt: skip

    def api_us(self, emulated: float) -> int:
        """An emulated instant of this batch's life on the API clock, in whole microseconds.

        Measured from the creation, at the time scale of the creation, so that the batch's own
        timestamps keep their emulated order and exact differences (expiry is created + 24 h/scale).
        """
        return self.api_created_us + round((emulated - self.created_at) * 1e6 / self.api_scale)

    def processing_counts(self) -> dict[str, int]:
        if self.counts is not None:
            return self.counts
        return {"processing": self.size, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}

    def unfinished_result(self) -> str:
        return "canceled" if self.cancel_initiated_at is not None else "expired"


class _Template:
    """What the requests of a batch that share their non-message params have in common."""

    __slots__ = ("id", "problem_before_messages", "problem_after_messages", "shape", "min_cacheable")

    def __init__(self, template_id: int, before: str | None, after: str | None) -> None:
        self.id = template_id
        self.problem_before_messages = before
        self.problem_after_messages = after
        self.shape: TemplateShape | None = None
        self.min_cacheable = 0


class BatchBuilder:
    """Takes the request items of one create, in order, and turns them into a Batch."""

    def __init__(self, store: BatchStore, number: int) -> None:
        self.config = store.config
        self.now = store.clock.now()
        self._prompt_cache = store.prompt_cache
        self._rng = random.Random(f"{store.seed}:batch:{number}")
        self._max_requests = self.config.max_requests_per_batch
        faults = self.config.faults.batch
        self._errored_rate = faults.errored_rate
        self._expired_rate = faults.expired_rate
        self.error_types = faults.error_types
        jitter = self.config.processing_jitter
        self.duration = self.config.processing_seconds * (1 + jitter * (2 * self._rng.random() - 1))
        # A stalled batch stops making progress somewhere in its window and runs into expiry.
        stall_roll, stall_point = self._rng.random(), self._rng.random()
        self.stalled = stall_roll < faults.stall_rate
        self.stall_fraction = stall_point if self.stalled else 1.0
        self._first_index_by_custom_id: dict[str, int] = {}
        # The params other than messages, as orjson bytes -> what requests sharing them have in common.
        self._template_by_bytes: dict[bytes, _Template] = {}
        self.custom_ids: list[str] = []
        self.templates: list[bytes] = []
        self.template_ids = array("i")
        self.messages: list[bytes] = []
        self.invalid: dict[int, str] = {}
        self.completion = array("f")
        self.fates = bytearray()
        self.cache_codes = bytearray()
        self.input_tokens = array("I")
        self.cache_tokens = array("I")
        self.cache_1h_tokens = array("I")
        self.cache_writes: dict[bytes, float] = {}  # prefixes this batch writes, with their TTL
        self._hit_rate = self.config.cache_hit_rate
        self.extra_requests = 0  # requests past max_requests_per_batch (counted, not kept)

    @property
    def size(self) -> int:
        return len(self.custom_ids)

    def add(self, item: Any) -> None:
        index = len(self.custom_ids)
        if index >= self._max_requests:
            self.extra_requests += 1
            raise TooManyRequests(self.too_many_message())
        # The usual item, checked inline (this runs 100,000 times per big create); check_item otherwise.
        if type(item) is dict and len(item) == 2:
            custom_id, params = item.get("custom_id"), item.get("params")
            if (
                type(custom_id) is not str
                or type(params) is not dict
                or not CUSTOM_ID_RE.fullmatch(custom_id)
            ):
                custom_id, params = check_item(index, item)
        else:
            custom_id, params = check_item(index, item)
        first = self._first_index_by_custom_id.setdefault(custom_id, index)
        if first != index:
            raise ItemError(
                f"requests.{index}.custom_id: duplicate custom_id {custom_id!r} (also used by requests.{first}); "
                "custom_id must be unique within a batch"
            )
        # Three draws per request, always, so outcomes do not shift when one request changes.
        rng = self._rng.random
        finish_point, fault_roll, cache_roll = rng(), rng(), rng()
        self.custom_ids.append(custom_id)
        self.completion.append(max(finish_point, 1e-6))

        template, messages_bytes, problem = self._split(params)
        if template is None:
            self.invalid[index] = problem or "params: integer or number out of range"
            self._append_outcome(FATE_INVALID, _NO_TEMPLATE, b"", 0, CACHE_NONE, 0, 0)
            return
        if fault_roll < self._errored_rate:
            fate = FATE_ERRORED + int(fault_roll / self._errored_rate * len(self.error_types)) % len(
                self.error_types
            )
        elif fault_roll < self._errored_rate + self._expired_rate:
            fate = FATE_EXPIRED
        else:
            fate = FATE_SUCCEEDED
        shape = analyse_prompt(params, template.shape)
        cache_code = CACHE_NONE
        if fate == FATE_SUCCEEDED and shape.cache_key is not None:
            if shape.cache_prefix_tokens >= template.min_cacheable:
                key = shape.cache_key
                warm = key in self.cache_writes or self._prompt_cache.is_warm(key, self.now)
                if warm and cache_roll < self._hit_rate:
                    cache_code = CACHE_READ
                else:
                    cache_code = CACHE_WRITE
                    ttl = CACHE_TTL_SECONDS["1h" if shape.cache_1h_tokens else "5m"]
                    self.cache_writes[key] = max(ttl, self.cache_writes.get(key, 0.0))
        self._append_outcome(
            fate,
            template.id,
            messages_bytes,
            shape.total_tokens,
            cache_code,
            shape.cache_prefix_tokens,
            shape.cache_1h_tokens,
        )

    def count_extra(self) -> None:
        """One more request past the limit (the rest of the body is still read, to count them)."""
        self.extra_requests += 1

    def too_many_message(self) -> str:
        total = self._max_requests + self.extra_requests
        return f"requests: List should have at most {self._max_requests} items after validation, not {total}"

    def _split(self, params: dict) -> tuple[_Template | None, bytes, str | None]:
        """(template, messages as orjson bytes, None), or (None, b"", why the params are invalid).

        The params other than messages are checked once per distinct set (most batches repeat
        one system prompt, model and schema in every request); the messages of every request.
        """
        try:
            key = orjson.dumps({name: value for name, value in params.items() if name != "messages"})
        except (TypeError, orjson.JSONEncodeError):
            return None, b"", params_error(params, in_batch=True)
        template = self._template_by_bytes.get(key)
        if template is None:
            template = self._new_template(key, params)
        problem = (
            template.problem_before_messages or messages_error(params) or template.problem_after_messages
        )
        if problem is not None:
            return None, b"", problem
        try:
            # orjson's result sits in an oversized (8 KB) allocation; an exact copy keeps 100k of them small.
            messages_bytes = bytes(memoryview(orjson.dumps(params["messages"])))
        except (TypeError, orjson.JSONEncodeError):
            return None, b"", None
        return template, messages_bytes, None

    def _new_template(self, key: bytes, params: dict) -> _Template:
        before, after = head_error(params), tail_error(params, in_batch=True)
        template = _Template(_NO_TEMPLATE, before, after)
        if before is None and after is None:
            template.id = len(self.templates)
            self.templates.append(bytes(memoryview(key)))
            template.shape = template_shape(params)
            template.min_cacheable = self.config.min_cacheable_for(self.config.resolve_model(params["model"]))
        self._template_by_bytes[bytes(memoryview(key))] = template
        return template

    @property
    def fate_counts(self) -> Counter[int]:
        return Counter(self.fates)

    def _append_outcome(
        self,
        fate: int,
        template_id: int,
        messages_bytes: bytes,
        tokens: int,
        cache_code: int,
        prefix: int,
        one_hour: int,
    ) -> None:
        self.fates.append(fate)
        self.template_ids.append(template_id)
        self.messages.append(messages_bytes)
        self.input_tokens.append(tokens)
        self.cache_codes.append(cache_code)
        self.cache_tokens.append(prefix if cache_code != CACHE_NONE else 0)
        self.cache_1h_tokens.append(one_hour if cache_code != CACHE_NONE else 0)


class BatchStore:
    """All batches, the clock, the prompt cache, faults and counters. Thread-safe."""

    def __init__(
        self,
        config: EmulatorConfig,
        *,
        seed: int = 0,
        responder: Responder | None = None,
        clock_start: float | None = None,
    ) -> None:
        self._lock = threading.RLock()
        self.seed = seed
        self.initial_config = config
        self.config = config
        self.clock = EmulatedClock(config.time_scale, clock_start)
        self.responder: Responder = responder or DefaultResponder()
        self.prompt_cache = PromptCache()
        self._id_rng = random.Random(f"{seed}:ids")  # never reset, so ids stay unique across resets
        self.request_id_rng = random.Random(f"{seed}:request-ids")
        self._next_seq = 0
        self.in_flight = 0  # HTTP requests being served (the app counts them); the results worker waits for 0
        self._production_lock = (
            threading.Lock()
        )  # one maker of result lines at a time (responders need not be thread-safe)
        self._results_worker = ResultsWorker(self._worker_step, lambda: self.in_flight > 0)
        self._reset_state()

    # ---- lifecycle ----------------------------------------------------------------------------
    def _reset_state(self) -> None:
        self._results_worker.clear()
        for batch in getattr(self, "_batch_by_seq", {}).values():
            batch.results = None  # a maker still working on it stops
        self._batches_by_id: dict[str, Batch] = {}
        self._seq_by_id: dict[str, int] = {}  # also of deleted batches, so they still work as cursors
        self._order: list[int] = []  # seqs of live batches, oldest first
        self._batch_by_seq: dict[int, Batch] = {}
        self._ends: list[tuple[float, int]] = []  # heap of (end time, seq)
        self._batches_since_reset = 0
        self._queued_requests = 0
        self._recent_batch_calls: deque[float] = deque()
        self.faults = FaultInjector(self.config.faults, self.seed)
        self.prompt_cache.clear()
        self.counters: Counter[str] = Counter()
        self.http_requests: Counter[str] = Counter({name: 0 for name in ENDPOINTS})
        self.faults_injected: Counter[str] = Counter()
        self.status_counts: Counter[str] = Counter({status: 0 for status in STATUSES})

    def reset(self) -> None:
        """Forget every batch, zero the counters, restore the start configuration without faults.

        The clocks start again from the wall-clock time, as at the start.
        """
        with self._lock:
            self.config = self.initial_config.updated(faults={})
            self.clock.restart(self.config.time_scale)
            self._reset_state()

    def close(self) -> None:
        """Stop the background results worker (the server is going away); ``open`` undoes it."""
        self._results_worker.close()

    def open(self) -> None:
        self._results_worker.reopen()

    def configure(self, **changes: Any) -> EmulatorConfig:
        with self._lock:
            if "seed" in changes:
                self.seed = int(changes.pop("seed"))
            config = self.config.updated(**changes)
            self.config = config
            self.clock.set_time_scale(config.time_scale)
            self.faults = FaultInjector(config.faults, self.seed)
            return config

    def advance(self, seconds: float) -> float:
        with self._lock:
            self.clock.advance(float(seconds))
            return self._tick()

    def now(self) -> float:
        return self.clock.now()

    def _tick(self) -> float:
        """Apply every batch end that is due; returns the current emulated time."""
        now = self.clock.now()
        ends = self._ends
        while ends and ends[0][0] <= now:
            end_at, seq = heapq.heappop(ends)
            batch = self._batch_by_seq.get(seq)
            if batch is not None and batch.status != "ended" and batch.end_at == end_at:
                self._finish(batch)
        return now

    def _finish(self, batch: Batch) -> None:
        """End a batch: fix how far processing got and count each request's outcome once."""
        if batch.cancel_initiated_at is not None:
            reached = batch.cancel_initiated_at
        else:
            reached = min(batch.ready_at, batch.expires_at)
        if batch.duration <= 0:
            done = 1.0 if reached >= batch.created_at else 0.0
        else:
            done = (reached - batch.created_at) / batch.duration
        done = min(done, batch.stall_fraction)
        batch.done_fraction = done
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        fault_errors = fault_expiries = 0
        if done >= 1.0:
            fate_counts = batch.fate_counts
            for fate, count in fate_counts.items():
                counts[_RESULT_TYPE_BY_FATE.get(fate, "errored")] += count
            fault_expiries = fate_counts.get(FATE_EXPIRED, 0)
            fault_errors = sum(count for fate, count in fate_counts.items() if fate >= FATE_ERRORED)
        else:
            unfinished = batch.unfinished_result()
            completion, fates = batch.completion, batch.fates
            for index in range(batch.size):
                if completion[index] <= done:
                    fate = fates[index]
                    counts[_RESULT_TYPE_BY_FATE.get(fate, "errored")] += 1
                    fault_expiries += fate == FATE_EXPIRED
                    fault_errors += fate >= FATE_ERRORED
                else:
                    counts[unfinished] += 1
        batch.counts = counts
        batch.ended_at = batch.end_at
        self.status_counts[batch.status] -= 1
        batch.status = "ended"
        self.status_counts["ended"] += 1
        self._queued_requests -= batch.size
        if fault_errors:
            self.faults_injected["batch_errored"] += fault_errors
        if fault_expiries:
            self.faults_injected["batch_expired"] += fault_expiries

    # ---- per-request gates ----------------------------------------------------------------------
    def count_http(self, endpoint: str) -> None:
        with self._lock:
            self.http_requests[endpoint] += 1

    def latency_for(self, endpoint: str) -> float:
        latency = self.faults.latency_for(endpoint)
        if latency > 0:
            with self._lock:
                self.faults_injected["latency"] += 1
        return latency

    def check_faults(self, endpoint: str) -> None:
        """Raise the injected HTTP fault or rate-limit error for this request, if any."""
        with self._lock:
            fault = self.faults.http_fault_for(endpoint)
            if fault is not None:
                self.faults_injected[f"http_{fault.status}"] += 1
                raise fault
            limit = self.config.batch_requests_per_minute
            if limit is not None and endpoint in BATCH_ENDPOINTS:
                now = self._tick()
                calls = self._recent_batch_calls
                while calls and calls[0] <= now - 60.0:
                    calls.popleft()
                if len(calls) >= limit:
                    self.faults_injected["rate_limit"] += 1
                    wait = max((calls[0] + 60.0 - now) / self.clock.time_scale, 0.001)
                    raise ApiError(
                        429,
                        f"Number of batch API requests has exceeded the rate limit of {limit} per minute (emulated).",
                        headers={
                            "retry-after": str(math.ceil(wait)),
                            "retry-after-ms": str(int(wait * 1000)),
                        },
                    )
                calls.append(now)

    # ---- batches ------------------------------------------------------------------------------
    def new_builder(self) -> BatchBuilder:
        with self._lock:
            self._tick()
            self._batches_since_reset += 1
            return BatchBuilder(self, self._batches_since_reset)

    def commit(self, builder: BatchBuilder) -> Batch:
        """Register a fully read batch; raises ApiError when it is empty or the queue is full."""
        if builder.size == 0:
            raise invalid_request("requests: List should have at least 1 item after validation, not 0")
        if builder.extra_requests:
            raise invalid_request(builder.too_many_message())
        with self._lock:
            now = self._tick()
            limit = self.config.max_queued_requests
            if limit is not None and self._queued_requests + builder.size > limit:
                self.faults_injected["queue_full"] += 1
                raise ApiError(
                    429,
                    f"This batch would exceed the limit of {limit} requests waiting in the processing queue "
                    f"({self._queued_requests} are waiting).",
                    headers={"retry-after": "60"},
                )
            batch = Batch()
            self._next_seq += 1
            batch.seq = self._next_seq
            batch.id = random_id("msgbatch_", self._id_rng)
            batch.config = builder.config
            batch.size = builder.size
            batch.created_at = now
            batch.expires_at = now + builder.config.expiry_seconds
            emulated_now, api_now, scale = self.clock.readings()
            batch.api_created_us = round((api_now + (now - emulated_now) / scale) * 1e6)
            batch.api_scale = scale
            batch.duration = builder.duration
            batch.stall_fraction = builder.stall_fraction
            batch.ready_at = math.inf if builder.stalled else now + builder.duration
            batch.end_at = min(batch.ready_at, batch.expires_at)
            batch.status = "in_progress"
            batch.cancel_initiated_at = batch.ended_at = None
            batch.done_fraction = 0.0
            batch.counts = None
            batch.created_at_text = rfc3339_us(batch.api_created_us)
            batch.expires_at_text = rfc3339_us(
                batch.api_created_us + round(builder.config.expiry_seconds * 1e6 / scale)
            )
            batch.results = ResultsFile(batch.size)
            for name in (
                "custom_ids", "templates", "template_ids", "messages", "invalid", "completion", "fates",
                "error_types", "fate_counts", "cache_codes", "input_tokens", "cache_tokens", "cache_1h_tokens",
            ):  # fmt: skip
                setattr(batch, name, getattr(builder, name))
            for key, ttl in builder.cache_writes.items():
                self.prompt_cache.write(key, now + builder.duration + ttl, now)

            self._batches_by_id[batch.id] = batch
            self._batch_by_seq[batch.seq] = batch
            self._seq_by_id[batch.id] = batch.seq
            self._order.append(batch.seq)
            heapq.heappush(self._ends, (batch.end_at, batch.seq))
            self._queued_requests += batch.size
            self.status_counts["in_progress"] += 1
            self.counters["batches_created"] += 1
            self.counters["requests_received"] += batch.size
            if builder.stalled:
                self.faults_injected["batch_stalled"] += 1
            if self.config.precompute_results:
                self._results_worker.submit(batch)
            return batch

    def _get(self, batch_id: str) -> Batch:
        batch = self._batches_by_id.get(batch_id)
        if batch is None:
            raise not_found(f"No Message Batch found with id {batch_id!r}.")
        return batch

    def describe_new(self, batch: Batch, base_url: str) -> dict:
        """The just-created batch as the create call answers it: always still in_progress."""
        with self._lock:
            return self._to_api(batch, batch.created_at, base_url) | {
                "processing_status": "in_progress",
                "request_counts": {
                    "processing": batch.size,
                    "succeeded": 0,
                    "errored": 0,
                    "canceled": 0,
                    "expired": 0,
                },
                "ended_at": None,
                "results_url": None,
            }

    def retrieve(self, batch_id: str, base_url: str) -> dict:
        with self._lock:
            now = self._tick()
            return self._to_api(self._get(batch_id), now, base_url)

    def cancel(self, batch_id: str, base_url: str) -> dict:
        with self._lock:
            now = self._tick()
            batch = self._get(batch_id)
            if batch.status == "ended":
                raise invalid_request(
                    f"Message Batch {batch_id} has already ended and can no longer be canceled."
                )
            if batch.status == "in_progress":
                batch.cancel_initiated_at = now
                batch.end_at = min(now + batch.config.cancel_seconds, max(batch.expires_at, now))
                batch.status = "canceling"
                self.status_counts["in_progress"] -= 1
                self.status_counts["canceling"] += 1
                heapq.heappush(self._ends, (batch.end_at, batch.seq))
            return self._to_api(batch, now, base_url)

    def delete(self, batch_id: str) -> dict:
        with self._lock:
            self._tick()
            batch = self._get(batch_id)
            if batch.status != "ended":
                raise invalid_request(
                    f"Message Batch {batch_id} is still {batch.status}; a batch can only be deleted once it has "
                    "ended. Cancel it first."
                )
            del self._batches_by_id[batch_id]
            del self._batch_by_seq[batch.seq]
            batch.results = None
            position = bisect_left(self._order, batch.seq)
            del self._order[position]
            self.status_counts["ended"] -= 1
            self.counters["batches_deleted"] += 1
            return {"id": batch_id, "type": "message_batch_deleted"}

    def list(self, *, limit: int, after_id: str | None, before_id: str | None, base_url: str) -> dict:
        """A page, newest first: after_id pages to older batches, before_id to newer ones."""
        with self._lock:
            now = self._tick()
            order = self._order
            if after_id is not None:
                end = bisect_left(order, self._cursor_seq(after_id, "after_id"))
                start = max(0, end - limit)
                has_more = start > 0
            elif before_id is not None:
                start = bisect_right(order, self._cursor_seq(before_id, "before_id"))
                end = min(len(order), start + limit)
                has_more = end < len(order)
            else:
                end = len(order)
                start = max(0, end - limit)
                has_more = start > 0
            by_seq = self._batch_by_seq
            data = [self._to_api(by_seq[seq], now, base_url) for seq in reversed(order[start:end])]
            return {
                "data": data,
                "has_more": has_more,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }

    def _cursor_seq(self, batch_id: str, name: str) -> int:
        seq = self._seq_by_id.get(batch_id)
        if seq is None:
            raise invalid_request(f"{name}: no Message Batch with id {batch_id!r}")
        return seq

    def _to_api(self, batch: Batch, now: float, base_url: str) -> dict:
        """The batch as the API reports it, its timestamps on the API clock (see the module docstring)."""
        archive_seconds = batch.config.archive_seconds
        ended = batch.status == "ended"
        if ended:
            # An end by expiry is reported at exactly expires_at.
            ended_at = (
                batch.expires_at_text
                if batch.ended_at == batch.expires_at
                else rfc3339_us(batch.api_us(batch.ended_at))
            )
        else:
            ended_at = None
        archived = now >= batch.created_at + archive_seconds
        cancel = batch.cancel_initiated_at
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": batch.status,
            "request_counts": dict(batch.processing_counts()),
            "ended_at": ended_at,
            "created_at": batch.created_at_text,
            "expires_at": batch.expires_at_text,
            "archived_at": (
                rfc3339_us(batch.api_created_us + round(archive_seconds * 1e6 / batch.api_scale))
                if archived
                else None
            ),
            "cancel_initiated_at": None if cancel is None else rfc3339_us(batch.api_us(cancel)),
            "results_url": f"{base_url}/v1/messages/batches/{batch.id}/results" if ended else None,
        }

    def results_source(self, batch_id: str) -> tuple[Batch, tuple[int, bool] | None]:
        """The ended batch whose results are to be streamed, and the cut to apply (if any)."""
        with self._lock:
            now = self._tick()
            batch = self._get(batch_id)
            if batch.status != "ended":
                raise invalid_request(
                    f"Message Batch {batch_id} is still {batch.status}; results are available once it has ended."
                )
            if now >= batch.created_at + batch.config.archive_seconds:
                raise not_found(
                    f"The results of Message Batch {batch_id} are no longer available: batches are archived "
                    "29 days after creation."
                )
            cut = self.faults.results_cut_for(batch.size)
            if cut is not None:
                self.faults_injected["results_cut"] += 1
            self.counters["results_downloads"] += 1
            return batch, cut

    def count_results_served(self, lines: int) -> None:
        with self._lock:
            self.counters["results_served"] += lines

    # ---- results files ------------------------------------------------------------------------
    def _worker_step(self, batch: Batch) -> bool:
        return self.make_result_lines(batch, STEP_LINES)

    def make_result_lines(self, batch: Batch, limit: int) -> bool:
        """Make up to ``limit`` more lines of the batch's results file; True once it is complete."""
        with self._production_lock, paused_gc():
            results = batch.results
            if results is None or results.complete:
                return True
            start, end = results.next_step(limit)
            results.add_lines(self._lines(batch, results, start, end))
            return results.complete

    def make_results_block(self, batch: Batch, block: int) -> None:
        """Make the results file up to the end of ``block`` (what a download waits for)."""
        while True:
            results = batch.results
            if results is None or len(results.blocks) > block:
                return
            self.make_result_lines(batch, BLOCK_LINES)

    def results_block(self, batch: Batch, block: int) -> tuple[bytes, int]:
        """The served bytes of one made block, and its line count.

        The stored lines are those of requests that ran to their end; the ones a cancel or the
        expiry cut short (``completion > done_fraction``) are swapped for canceled / expired.
        """
        results = batch.results
        if results is None:
            raise not_found(f"No Message Batch found with id {batch.id!r}.")
        raw = results.block(block)
        start, end = results.block_span(block)
        done = batch.done_fraction
        completion = batch.completion
        if done >= 1.0 or not any(completion[index] > done for index in range(start, end)):
            return raw, end - start
        unfinished = b'{"type":"' + batch.unfinished_result().encode() + b'"}}'
        custom_ids = batch.custom_ids
        lines = raw.split(b"\n")  # the last item is the empty text after the final newline
        for offset, index in enumerate(range(start, end)):
            if completion[index] > done:
                lines[offset] = b'{"custom_id":"' + custom_ids[index].encode() + b'","result":' + unfinished
        return b"\n".join(lines), end - start

    def result_lines(self, batch: Batch) -> Iterator[bytes]:
        """One JSON line (without newline) per request, in request order, as a download serves them."""
        results = batch.results
        for block in range(results.block_count if results is not None else 0):
            self.make_results_block(batch, block)
            data, _count = self.results_block(batch, block)
            yield from data.split(b"\n")[:-1]

    def _lines(self, batch: Batch, results: ResultsFile, start: int, end: int) -> list[bytes]:
        """The result lines (newline-terminated) of requests start..end, as if each ran to its end."""
        context = results.context
        if not context:
            context["templates"] = {}
            context["responder"] = self.responder
        responder = context["responder"]
        templates = context["templates"]
        custom_ids, fates = batch.custom_ids, batch.fates
        lines = []
        for index in range(start, end):
            fate = fates[index]
            if fate == FATE_SUCCEEDED:
                result = orjson.dumps(self._succeeded_result(batch, index, templates, responder))
            elif fate == FATE_EXPIRED:
                result = b'{"type":"expired"}'
            elif fate == FATE_INVALID:
                result = orjson.dumps(_errored(batch, index, "invalid_request_error", batch.invalid[index]))
            else:
                error_type = batch.error_types[fate - FATE_ERRORED]
                message = _BATCH_ERROR_MESSAGES.get(error_type, error_type)
                result = orjson.dumps(_errored(batch, index, error_type, message))
            # custom_id matches ^[a-zA-Z0-9_-]{1,64}$: nothing in it needs escaping.
            lines.append(b'{"custom_id":"' + custom_ids[index].encode() + b'","result":' + result + b"}\n")
        return lines

    def _succeeded_result(self, batch: Batch, index: int, templates: dict, responder: Responder) -> dict:
        template_id = batch.template_ids[index]
        template = templates.get(template_id)
        if template is None:
            template_params = orjson.loads(batch.templates[template_id])
            model = batch.config.resolve_model(template_params["model"])
            template = templates[template_id] = (
                template_params,
                model,
                requested_inference_geo(template_params),
            )
        template_params, model, inference_geo = template
        params = dict(template_params)
        params["messages"] = orjson.loads(batch.messages[index])
        context = ResponseContext(
            custom_id=batch.custom_ids[index],
            batch_id=batch.id,
            request_index=index,
            service_tier="batch",
            model=model,
            input_tokens=batch.input_tokens[index],
            message_id=derived_id("msg_", batch.id, index),
        )
        usage = base_usage(
            total_tokens=batch.input_tokens[index],
            cache_outcome=batch.cache_codes[index],
            cache_prefix_tokens=batch.cache_tokens[index],
            cache_1h_tokens=batch.cache_1h_tokens[index],
            service_tier="batch",
            inference_geo=inference_geo,
        )
        try:
            message = finish_message(responder(params, context), params, context, usage)
        except ResponderError as error:
            return _errored(batch, index, error.error_type, error.message)
        except Exception as error:  # a broken custom responder shows up in the results, not as a dead stream
            return _errored(batch, index, "api_error", f"responder failed: {error!r}")
        return {"type": "succeeded", "message": message}

    # ---- real-time endpoints ------------------------------------------------------------------
    def create_message(self, params: dict) -> dict:
        problem = params_error(params, in_batch=False)
        if problem:
            raise invalid_request(problem)
        with self._lock:
            now = self._tick()
            config = self.config
            shape = analyse_prompt(params)
            model = config.resolve_model(params["model"])
            cache_code = CACHE_NONE
            if shape.cache_key is not None and shape.cache_prefix_tokens >= config.min_cacheable_for(model):
                cache_code = CACHE_READ if self.prompt_cache.is_warm(shape.cache_key, now) else CACHE_WRITE
                ttl = CACHE_TTL_SECONDS["1h" if shape.cache_1h_tokens else "5m"]
                self.prompt_cache.write(shape.cache_key, now + ttl, now)  # a hit refreshes the TTL too
            message_id = random_id("msg_", self._id_rng)
            self.counters["messages_created"] += 1
        context = ResponseContext(
            custom_id=None,
            batch_id=None,
            request_index=None,
            service_tier="standard",
            model=model,
            input_tokens=shape.total_tokens,
            message_id=message_id,
        )
        usage = base_usage(
            total_tokens=shape.total_tokens,
            cache_outcome=cache_code,
            cache_prefix_tokens=shape.cache_prefix_tokens,
            cache_1h_tokens=shape.cache_1h_tokens,
            service_tier="standard",
            inference_geo=requested_inference_geo(params),
        )
        try:
            reply = self.responder(params, context)
        except ResponderError as error:
            status = _STATUS_BY_ERROR_TYPE.get(error.error_type, 500)
            raise ApiError(status, error.message, error_type=error.error_type) from None
        return finish_message(reply, params, context, usage)

    def count_tokens(self, params: dict) -> dict:
        problem = params_error(params, in_batch=False, count_tokens=True)
        if problem:
            raise invalid_request(problem)
        return {"input_tokens": analyse_prompt(params).total_tokens}

    # ---- admin --------------------------------------------------------------------------------
    def stats(self) -> dict:
        with self._lock:
            now = self._tick()
            return {
                "batches_created": self.counters["batches_created"],
                "batches_deleted": self.counters["batches_deleted"],
                "requests_received": self.counters["requests_received"],
                "requests_processing": self._queued_requests,
                "results_served": self.counters["results_served"],
                "results_downloads": self.counters["results_downloads"],
                "messages_created": self.counters["messages_created"],
                "faults_injected": dict(self.faults_injected),
                "http_requests": dict(self.http_requests),
                "batches_by_status": dict(self.status_counts),
                "prompt_cache_entries": len(self.prompt_cache),
                "emulated_now": rfc3339(now),
                "api_now": rfc3339(self.clock.api_now()),
                "time_scale": self.clock.time_scale,
                "results_lines_pending": sum(
                    batch.size - batch.results.next_index
                    for batch in self._batch_by_seq.values()
                    if batch.results is not None
                ),
                "results_stored_bytes": sum(
                    batch.results.stored_bytes
                    for batch in self._batch_by_seq.values()
                    if batch.results is not None
                ),
            }


_RESULT_TYPE_BY_FATE: dict[int, str] = {
    FATE_SUCCEEDED: "succeeded",
    FATE_INVALID: "errored",
    FATE_EXPIRED: "expired",
}
_BATCH_ERROR_MESSAGES = {
    "api_error": "Internal server error (emulated).",
    "overloaded_error": "Overloaded",
    "timeout_error": "Request timed out (emulated).",
    "rate_limit_error": "Rate limited (emulated).",
}
_STATUS_BY_ERROR_TYPE = {error_type: status for status, error_type in ERROR_TYPE_BY_STATUS.items()}


def _errored(batch: Batch, index: int, error_type: str, message: str) -> dict:
    request_id = derived_id("req_", batch.id, index)
    return {"type": "errored", "error": error_body(error_type, message, request_id)}
