"""All batches, the clocks, the prompt cache, faults and counters: the emulator's state.

``BatchStore`` is what the HTTP app (``app.py``) calls; every method is thread-safe (one
re-entrant lock). A create is parsed into a ``BatchBuilder`` and registered by ``commit``;
the batch is then decided (``batch.py``). Ends are kept in a heap and applied lazily, at the
next request or clock change (``_tick``), so a batch's state only moves when someone looks.

Result lines are made once per batch and kept compressed (``result_lines.py``,
``results_file.py``); a background thread starts making them when the batch is created and
pauses while requests are served (``in_flight``, counted by the app).

Timestamps: the lifecycle runs on the emulated clock; the API reports its times on the API
clock (``clock.py``, and the README's "Time").
"""

from __future__ import annotations

import heapq
import math
import random
import threading
from bisect import bisect_left, bisect_right
from collections import Counter, deque
from collections.abc import Iterator
from typing import Any

from .batch import CACHE_TTL_SECONDS as CACHE_TTL_SECONDS
from .batch import Batch, BatchBuilder, TooManyRequests, paused_gc
from .clock import EmulatedClock
from .config import EmulatorConfig
from .errors import ERROR_TYPE_BY_STATUS, ApiError, invalid_request, not_found
from .faults import ENDPOINTS, FaultInjector
from .ids import random_id, rfc3339, rfc3339_us
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
from .result_lines import ResultLineMaker
from .results_file import STEP_LINES, ResultsFile, ResultsWorker
from .tokens import analyse_prompt
from .validation import params_error

# Names other modules import from here (they moved to batch.py and clock.py).
__all__ = ["Batch", "BatchBuilder", "BatchStore", "EmulatedClock", "TooManyRequests", "paused_gc"]

BATCH_ENDPOINTS = frozenset({"create", "retrieve", "list", "cancel", "delete", "results"})
STATUSES = ("in_progress", "canceling", "ended")


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
        self._result_lines = ResultLineMaker(lambda: self.responder)
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
        """End a batch (``Batch.settle``) and count it and the faults it shows."""
        self.status_counts[batch.status] -= 1
        fault_errors, fault_expiries = batch.settle()
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
                        f"Number of batch API requests has exceeded the rate limit of {limit} per minute "
                        "(emulated).",
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
                "custom_ids", "templates", "template_ids", "messages", "invalid", "completion",
                "fates", "error_types", "fate_counts", "cache_codes", "input_tokens", "cache_tokens",
                "cache_1h_tokens",
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
            return batch.to_api(batch.created_at, base_url) | {
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
            return self._get(batch_id).to_api(now, base_url)

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
            return batch.to_api(now, base_url)

    def delete(self, batch_id: str) -> dict:
        with self._lock:
            self._tick()
            batch = self._get(batch_id)
            if batch.status != "ended":
                raise invalid_request(
                    f"Message Batch {batch_id} is still {batch.status}; a batch can only be deleted "
                    "once it has ended. Cancel it first."
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
            data = [by_seq[seq].to_api(now, base_url) for seq in reversed(order[start:end])]
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

    def results_source(self, batch_id: str) -> tuple[Batch, tuple[int, bool] | None]:
        """The ended batch whose results are to be streamed, and the cut to apply (if any)."""
        with self._lock:
            now = self._tick()
            batch = self._get(batch_id)
            if batch.status != "ended":
                raise invalid_request(
                    f"Message Batch {batch_id} is still {batch.status}; results are available once it "
                    "has ended."
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
        return self._result_lines.make_result_lines(batch, STEP_LINES)

    def make_result_lines(self, batch: Batch, limit: int) -> bool:
        """Make up to ``limit`` more lines of the batch's results file; True once it is complete."""
        return self._result_lines.make_result_lines(batch, limit)

    def make_results_block(self, batch: Batch, block: int) -> None:
        """Make the results file up to the end of ``block`` (what a download waits for)."""
        self._result_lines.make_results_block(batch, block)

    def results_block(self, batch: Batch, block: int) -> tuple[bytes, int]:
        """The served bytes of one made block, and its line count."""
        return self._result_lines.results_block(batch, block)

    def result_lines(self, batch: Batch) -> Iterator[bytes]:
        """One JSON line (without newline) per request, in request order, as a download serves them."""
        return self._result_lines.result_lines(batch)

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


_STATUS_BY_ERROR_TYPE = {error_type: status for status, error_type in ERROR_TYPE_BY_STATUS.items()}
