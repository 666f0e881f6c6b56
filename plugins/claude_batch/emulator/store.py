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
applied lazily, at the next request or clock change, so nothing runs in the background.
"""

from __future__ import annotations

import heapq
import math
import random
import threading
import time
from array import array
from bisect import bisect_left, bisect_right
from collections import Counter, deque
from collections.abc import Iterator
from typing import Any

import orjson

from .config import EmulatorConfig
from .errors import ERROR_TYPE_BY_STATUS, ApiError, error_body, invalid_request, not_found
from .faults import ENDPOINTS, FaultInjector
from .ids import derived_id, random_id, rfc3339
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
)
from .tokens import TemplateShape, analyse_prompt, template_shape
from .validation import ItemError, check_item, params_error

# What becomes of a request that gets processed (decided at create time).
FATE_SUCCEEDED = 0
FATE_INVALID = 1  # bad params: errored, invalid_request_error
FATE_EXPIRED = 2  # injected: expired
FATE_ERRORED = 3  # injected: errored with batch.error_types[fate - FATE_ERRORED]

CACHE_TTL_SECONDS = {"5m": 300.0, "1h": 3600.0}
BATCH_ENDPOINTS = frozenset({"create", "retrieve", "list", "cancel", "delete", "results"})
STATUSES = ("in_progress", "canceling", "ended")
_NO_TEMPLATE = -1


class TooLarge(ValueError):
    """The batch is over a size limit: HTTP 413 request_too_large."""


class EmulatedClock:
    """Wall-clock time scaled by ``time_scale``, plus any explicit jumps forward."""

    def __init__(self, time_scale: float, start: float | None = None) -> None:
        self._lock = threading.Lock()
        self._anchor_real = time.monotonic()
        self._anchor_emulated = time.time() if start is None else start
        self._scale = time_scale

    def now(self) -> float:
        with self._lock:
            return self._anchor_emulated + (time.monotonic() - self._anchor_real) * self._scale

    @property
    def time_scale(self) -> float:
        return self._scale

    def set_time_scale(self, time_scale: float) -> None:
        with self._lock:
            real = time.monotonic()
            self._anchor_emulated += (real - self._anchor_real) * self._scale
            self._anchor_real = real
            self._scale = time_scale

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("emulated time only moves forward")
        with self._lock:
            self._anchor_emulated += seconds


class Batch:
    """One batch: its compact per-request data and its lifecycle in emulated time."""

    __slots__ = (
        "id", "seq", "config", "size", "created_at", "expires_at", "duration", "ready_at", "end_at",
        "status", "cancel_initiated_at", "ended_at", "done_fraction", "counts",
        "custom_ids", "templates", "template_ids", "messages", "invalid", "completion", "fates",
        "error_types", "fate_counts", "cache_codes", "input_tokens", "cache_tokens", "cache_1h_tokens",
        "created_at_text", "expires_at_text", "stall_fraction",
    )  # fmt: skip

    def processing_counts(self) -> dict[str, int]:
        if self.counts is not None:
            return self.counts
        return {"processing": self.size, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}

    def unfinished_result(self) -> str:
        return "canceled" if self.cancel_initiated_at is not None else "expired"


class BatchBuilder:
    """Takes the request items of one create, in order, and turns them into a Batch."""

    def __init__(self, store: BatchStore, number: int) -> None:
        self.config = store.config
        self.now = store.clock.now()
        self._prompt_cache = store.prompt_cache
        self._rng = random.Random(f"{store.seed}:batch:{number}")
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
        self._template_id_by_bytes: dict[bytes, int] = {}
        self.custom_ids: list[str] = []
        self.templates: list[bytes] = []
        self.template_ids = array("i")
        self.messages: list[bytes] = []
        self.invalid: dict[int, str] = {}
        self.completion = array("f")
        self.fates = bytearray()
        self.fate_counts: Counter[int] = Counter()
        self.cache_codes = bytearray()
        self.input_tokens = array("I")
        self.cache_tokens = array("I")
        self.cache_1h_tokens = array("I")
        self.cache_writes: dict[bytes, float] = {}  # prefixes this batch writes, with their TTL
        self._hit_rate = self.config.cache_hit_rate
        self._template_shapes: dict[int, TemplateShape] = {}
        self._min_cacheable_by_model: dict[str, int] = {}

    def _min_cacheable(self, model: str) -> int:
        minimum = self._min_cacheable_by_model.get(model)
        if minimum is None:
            minimum = self.config.min_cacheable_for(self.config.resolve_model(model))
            self._min_cacheable_by_model[model] = minimum
        return minimum

    @property
    def size(self) -> int:
        return len(self.custom_ids)

    def add(self, item: Any) -> None:
        index = self.size
        if index >= self.config.max_requests_per_batch:
            raise TooLarge(
                f"requests: a batch may hold at most {self.config.max_requests_per_batch} requests"
            )
        custom_id, params = check_item(index, item)
        first = self._first_index_by_custom_id.setdefault(custom_id, index)
        if first != index:
            raise ItemError(
                f"requests.{index}.custom_id: duplicate custom_id {custom_id!r} (also used by requests.{first}); "
                "custom_id must be unique within a batch"
            )
        # Three draws per request, always, so outcomes do not shift when one request changes.
        finish_point, fault_roll, cache_roll = self._rng.random(), self._rng.random(), self._rng.random()
        self.custom_ids.append(custom_id)
        self.completion.append(max(finish_point, 1e-6))

        problem = params_error(params, in_batch=True)
        stored = None if problem else self._store_params(params)
        if stored is None:
            self.invalid[index] = problem or "params: integer or number out of range"
            self._append_outcome(FATE_INVALID, _NO_TEMPLATE, b"", 0, CACHE_NONE, 0, 0)
            return
        template_id, messages_bytes = stored
        if fault_roll < self._errored_rate:
            fate = FATE_ERRORED + int(fault_roll / self._errored_rate * len(self.error_types)) % len(self.error_types)
        elif fault_roll < self._errored_rate + self._expired_rate:
            fate = FATE_EXPIRED
        else:
            fate = FATE_SUCCEEDED
        template = self._template_shapes.get(template_id)
        if template is None:
            template = self._template_shapes[template_id] = template_shape(params)
        shape = analyse_prompt(params, template)
        cache_code = CACHE_NONE
        if fate == FATE_SUCCEEDED and shape.cache_key is not None:
            if shape.cache_prefix_tokens >= self._min_cacheable(params["model"]):
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
            template_id,
            messages_bytes,
            shape.total_tokens,
            cache_code,
            shape.cache_prefix_tokens,
            shape.cache_1h_tokens,
        )

    def _store_params(self, params: dict) -> tuple[int, bytes] | None:
        """Keep params compactly: the non-message part once per batch, the messages as bytes."""
        try:
            template = orjson.dumps({key: value for key, value in params.items() if key != "messages"})
            # orjson's result sits in an oversized (8 KB) allocation; an exact copy keeps 100k of them small.
            messages_bytes = bytes(memoryview(orjson.dumps(params["messages"])))
        except (TypeError, orjson.JSONEncodeError):
            return None
        template_id = self._template_id_by_bytes.get(template)
        if template_id is None:
            template = bytes(memoryview(template))
            template_id = len(self.templates)
            self._template_id_by_bytes[template] = template_id
            self.templates.append(template)
        return template_id, messages_bytes

    def _append_outcome(
        self, fate: int, template_id: int, messages_bytes: bytes, tokens: int, cache_code: int, prefix: int, one_hour: int
    ) -> None:
        self.fates.append(fate)
        self.fate_counts[fate] += 1
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
        self._reset_state()

    # ---- lifecycle ----------------------------------------------------------------------------
    def _reset_state(self) -> None:
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
        """Forget every batch, zero the counters, restore the start configuration without faults."""
        with self._lock:
            self.config = self.initial_config.updated(faults={})
            self.clock.set_time_scale(self.config.time_scale)
            self._reset_state()

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
                        headers={"retry-after": str(math.ceil(wait)), "retry-after-ms": str(int(wait * 1000))},
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
            batch.duration = builder.duration
            batch.stall_fraction = builder.stall_fraction
            batch.ready_at = math.inf if builder.stalled else now + builder.duration
            batch.end_at = min(batch.ready_at, batch.expires_at)
            batch.status = "in_progress"
            batch.cancel_initiated_at = batch.ended_at = None
            batch.done_fraction = 0.0
            batch.counts = None
            batch.created_at_text = rfc3339(batch.created_at)
            batch.expires_at_text = rfc3339(batch.expires_at)
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
                "request_counts": {"processing": batch.size, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0},
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
                raise invalid_request(f"Message Batch {batch_id} has already ended and can no longer be canceled.")
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
        archive_at = batch.created_at + batch.config.archive_seconds
        ended = batch.status == "ended"
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": batch.status,
            "request_counts": dict(batch.processing_counts()),
            "ended_at": rfc3339(batch.ended_at) if ended else None,
            "created_at": batch.created_at_text,
            "expires_at": batch.expires_at_text,
            "archived_at": rfc3339(archive_at) if now >= archive_at else None,
            "cancel_initiated_at": None if batch.cancel_initiated_at is None else rfc3339(batch.cancel_initiated_at),
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

    def result_lines(self, batch: Batch) -> Iterator[bytes]:
        """One JSON line (without newline) per request, in request order, built on demand."""
        responder = self.responder
        config = batch.config
        unfinished = orjson.dumps({"type": batch.unfinished_result()})
        expired = b'{"type":"expired"}'
        parsed_templates: dict[int, dict] = {}
        completion, fates = batch.completion, batch.fates
        done = batch.done_fraction
        for index in range(batch.size):
            custom_id = batch.custom_ids[index]
            prefix = b'{"custom_id":"' + custom_id.encode() + b'","result":'
            if completion[index] > done:
                yield prefix + unfinished + b"}"
                continue
            fate = fates[index]
            if fate == FATE_SUCCEEDED:
                result = self._succeeded_result(batch, index, custom_id, parsed_templates, responder, config)
            elif fate == FATE_EXPIRED:
                yield prefix + expired + b"}"
                continue
            elif fate == FATE_INVALID:
                result = _errored(batch, index, "invalid_request_error", batch.invalid[index])
            else:
                error_type = batch.error_types[fate - FATE_ERRORED]
                result = _errored(batch, index, error_type, _BATCH_ERROR_MESSAGES.get(error_type, error_type))
            yield prefix + orjson.dumps(result) + b"}"

    def _succeeded_result(
        self,
        batch: Batch,
        index: int,
        custom_id: str,
        parsed_templates: dict[int, dict],
        responder: Responder,
        config: EmulatorConfig,
    ) -> dict:
        template_id = batch.template_ids[index]
        template = parsed_templates.get(template_id)
        if template is None:
            template = parsed_templates[template_id] = orjson.loads(batch.templates[template_id])
        params = dict(template)
        params["messages"] = orjson.loads(batch.messages[index])
        context = ResponseContext(
            custom_id=custom_id,
            batch_id=batch.id,
            request_index=index,
            service_tier="batch",
            model=config.resolve_model(params["model"]),
            input_tokens=batch.input_tokens[index],
            message_id=derived_id("msg_", batch.id, index),
        )
        usage = base_usage(
            total_tokens=batch.input_tokens[index],
            cache_outcome=batch.cache_codes[index],
            cache_prefix_tokens=batch.cache_tokens[index],
            cache_1h_tokens=batch.cache_1h_tokens[index],
            service_tier="batch",
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
                "time_scale": self.clock.time_scale,
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

