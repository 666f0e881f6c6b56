"""All batches, the clocks, the prompt cache, faults and counters: the emulator's state.

``BatchStore`` is what the HTTP app (``app.py``) calls; every method is thread-safe (one
re-entrant lock). A create is parsed into a ``BatchBuilder`` and registered by ``commit``;
the batch is then decided (``batch.py``) and kept in a ``BatchIndex`` (``batch_index.py``:
by id, in creation order, the list pages). Ends are kept in a heap and applied lazily, at the
next request or clock change (``_tick``), so a batch's state only moves when someone looks.
The real-time endpoints are in ``realtime.py``; the rate limit of batch calls in ``faults.py``.

Result lines are made once per batch and kept compressed (``result_lines.py``,
``results_file.py``); a background thread starts making them when the batch is created and
pauses while requests are served (``in_flight``, counted by the app).

Timestamps: the lifecycle runs on the emulated clock; the API reports its times on the API
clock (``clock.py``, and the README's "Time").
"""

from __future__ import annotations

import heapq
import random
import threading
from collections import Counter
from typing import Any

from .batch import CACHE_TTL_SECONDS, Batch, BatchBuilder, TooManyRequests, paused_gc
from .batch_index import BatchIndex
from .clock import EmulatedClock
from .config import EmulatorConfig
from .errors import ApiError, invalid_request, not_found
from .faults import ENDPOINTS, BatchCallWindow, FaultInjector
from .ids import random_id, rfc3339
from .realtime import count_tokens, create_message
from .responder import (
    CACHE_NONE,
    CACHE_READ,
    CACHE_WRITE,
    DefaultResponder,
    PromptCache,
    Responder,
)
from .result_lines import ResultLineMaker
from .results_file import STEP_LINES, ResultsWorker
from .tokens import PromptShape

# Names other modules import from here (moved to batch.py and clock.py, still importable here).
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
        self.result_lines = ResultLineMaker(lambda: self.responder)
        self._results_worker = ResultsWorker(
            lambda batch: self.result_lines.make_result_lines(batch, STEP_LINES), lambda: self.in_flight > 0
        )
        self._reset_state()

    # ---- lifecycle ----------------------------------------------------------------------------
    def _reset_state(self) -> None:
        self._results_worker.clear()
        for batch in getattr(self, "batches", ()):
            batch.results = None  # a maker still working on it stops
        self.batches = BatchIndex()
        self._ends: list[tuple[float, int]] = []  # heap of (end time, seq)
        self._batches_since_reset = 0
        self._queued_requests = 0
        self._batch_calls = BatchCallWindow()
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
            batch = self.batches.by_seq(seq)
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
                refusal = self._batch_calls.refusal(self._tick(), limit, self.clock.time_scale)
                if refusal is not None:
                    self.faults_injected["rate_limit"] += 1
                    raise refusal

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
            self._next_seq += 1
            emulated_now, api_now, scale = self.clock.readings()
            batch = Batch.open(
                builder,
                seq=self._next_seq,
                batch_id=random_id("msgbatch_", self._id_rng),
                now=now,
                api_created_us=round((api_now + (now - emulated_now) / scale) * 1e6),
                api_scale=scale,
            )
            for key, ttl in builder.cache_writes.items():
                self.prompt_cache.write(key, now + builder.duration + ttl, now)
            self.batches.add(batch)
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

    def describe_new(self, batch: Batch, base_url: str) -> dict:
        """The just-created batch as the create call answers it: always still in_progress."""
        with self._lock:
            return batch.to_api(batch.created_at, base_url) | {
                "processing_status": "in_progress",
                "request_counts": Batch.counts_before_any_end(batch.size),
                "ended_at": None,
                "results_url": None,
            }

    def retrieve(self, batch_id: str, base_url: str) -> dict:
        with self._lock:
            now = self._tick()
            return self.batches.get(batch_id).to_api(now, base_url)

    def cancel(self, batch_id: str, base_url: str) -> dict:
        with self._lock:
            now = self._tick()
            batch = self.batches.get(batch_id)
            if batch.status == "ended":
                raise invalid_request(
                    f"Message Batch {batch_id} has already ended and can no longer be canceled."
                )
            if batch.status == "in_progress":
                batch.cancel(now)
                self.status_counts.update(in_progress=-1, canceling=1)
                heapq.heappush(self._ends, (batch.end_at, batch.seq))
            return batch.to_api(now, base_url)

    def delete(self, batch_id: str) -> dict:
        with self._lock:
            self._tick()
            batch = self.batches.get(batch_id)
            if batch.status != "ended":
                raise invalid_request(
                    f"Message Batch {batch_id} is still {batch.status}; a batch can only be deleted "
                    "once it has ended. Cancel it first."
                )
            self.batches.remove(batch)
            batch.results = None
            self.status_counts["ended"] -= 1
            self.counters["batches_deleted"] += 1
            return {"id": batch_id, "type": "message_batch_deleted"}

    def list(self, *, limit: int, after_id: str | None, before_id: str | None, base_url: str) -> dict:
        """A page, newest first: after_id pages to older batches, before_id to newer ones."""
        with self._lock:
            now = self._tick()
            page, has_more = self.batches.page(limit=limit, after_id=after_id, before_id=before_id)
            data = [batch.to_api(now, base_url) for batch in page]
            return {
                "data": data,
                "has_more": has_more,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }

    def results_source(self, batch_id: str) -> tuple[Batch, tuple[int, bool] | None]:
        """The ended batch whose results are to be streamed, and the cut to apply (if any)."""
        with self._lock:
            now = self._tick()
            batch = self.batches.get(batch_id)
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

    # ---- real-time endpoints ------------------------------------------------------------------
    def create_message(self, params: dict) -> dict:
        """A ``POST /v1/messages`` answer (see ``realtime.py``)."""
        return create_message(self, params)

    count_tokens = staticmethod(count_tokens)  # a ``POST /v1/messages/count_tokens`` answer

    def note_message(self, shape: PromptShape, model: str) -> tuple[int, str]:
        """Count one real-time message and apply its prompt-cache use: (cache outcome, message id)."""
        with self._lock:
            now = self._tick()
            cache_code = CACHE_NONE
            cacheable_from = self.config.min_cacheable_for(model)
            if shape.cache_key is not None and shape.cache_prefix_tokens >= cacheable_from:
                cache_code = CACHE_READ if self.prompt_cache.is_warm(shape.cache_key, now) else CACHE_WRITE
                ttl = CACHE_TTL_SECONDS["1h" if shape.cache_1h_tokens else "5m"]
                self.prompt_cache.write(shape.cache_key, now + ttl, now)  # a hit refreshes the TTL too
            self.counters["messages_created"] += 1
            return cache_code, random_id("msg_", self._id_rng)

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
                "results_lines_pending": self.batches.result_lines_pending(),
                "results_stored_bytes": self.batches.results_stored_bytes(),
            }
