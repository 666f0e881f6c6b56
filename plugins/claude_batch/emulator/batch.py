"""One batch: what a create decided for each request, and its lifecycle in emulated time.

A batch is decided when it is created: for each request ``BatchBuilder`` draws, from a
generator seeded by (seed, batch number since reset), when in the processing window it
finishes and what becomes of it (succeeded, or a fault: errored / expired), and works out its
token usage and prompt-cache outcome. Only compact arrays and the params (as orjson bytes,
with the part shared by all requests stored once, a *template*) are kept; result lines are
made from them later (``result_lines.py``).

While a batch is ``in_progress`` every request counts as ``processing``. When it ends
(``Batch.settle``) how far processing got is fixed once (``done_fraction``): the requests that
finish past it are ``canceled`` (a cancel) or ``expired`` (the 24-hour expiry, or a stall), and
the counts never change again. Its timestamps are reported on the API clock (``clock.py``).
"""

from __future__ import annotations

import gc
import math
import random
from array import array
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import orjson

from .config import EmulatorConfig
from .ids import rfc3339_us
from .responder import CACHE_NONE, CACHE_READ, CACHE_WRITE
from .results_file import ResultsFile
from .tokens import TemplateShape, analyse_prompt, template_shape, uncached_message_tokens
from .validation import (
    CUSTOM_ID_RE,
    ItemError,
    check_item,
    head_error,
    messages_error,
    params_error,
    tail_error,
)

if TYPE_CHECKING:
    from .store import BatchStore

# What becomes of a request that gets processed (decided at create time).
FATE_SUCCEEDED = 0
FATE_INVALID = 1  # bad params: errored, invalid_request_error
FATE_EXPIRED = 2  # injected: expired
FATE_ERRORED = 3  # injected: errored with batch.error_types[fate - FATE_ERRORED]

CACHE_TTL_SECONDS = {"5m": 300.0, "1h": 3600.0}
_NO_TEMPLATE = -1
_MISSING: Any = object()  # a request without messages


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


_RESULT_TYPE_BY_FATE: dict[int, str] = {
    FATE_SUCCEEDED: "succeeded",
    FATE_INVALID: "errored",
    FATE_EXPIRED: "expired",
}


class Batch:
    """One batch: its compact per-request data and its lifecycle in emulated time."""

    __slots__ = (
        "id", "seq", "config", "size", "created_at", "expires_at", "duration", "ready_at", "end_at",
        "status", "cancel_initiated_at", "ended_at", "done_fraction", "counts",
        "custom_ids", "templates", "template_ids", "messages", "invalid", "completion", "fates",
        "error_types", "fate_counts", "cache_codes", "input_tokens", "cache_tokens", "cache_1h_tokens",
        "created_at_text", "expires_at_text", "stall_fraction", "api_created_us", "api_scale", "results",
    )  # fmt: skip

    id: str
    seq: int
    config: EmulatorConfig
    size: int
    # Lifecycle, in emulated seconds (ready_at: when processing would be done; end_at: the end due).
    created_at: float
    expires_at: float
    duration: float
    ready_at: float
    end_at: float
    status: str
    cancel_initiated_at: float | None
    ended_at: float | None
    done_fraction: float  # how far processing got, fixed when the batch ends
    counts: dict[str, int] | None
    stall_fraction: float
    # Per request (index = position in the create), from the builder.
    custom_ids: list[str]
    templates: list[bytes]
    template_ids: array[int]
    messages: list[bytes]
    invalid: dict[int, str]
    completion: array[float]
    fates: bytearray
    error_types: tuple[str, ...]
    fate_counts: Counter[int]
    cache_codes: bytearray
    input_tokens: array[int]
    cache_tokens: array[int]
    cache_1h_tokens: array[int]
    # On the API clock.
    created_at_text: str
    expires_at_text: str
    api_created_us: int
    api_scale: float
    results: ResultsFile | None

    @classmethod
    def open(
        cls,
        builder: BatchBuilder,
        *,
        seq: int,
        batch_id: str,
        now: float,
        api_created_us: int,
        api_scale: float,
    ) -> Batch:
        """A new in_progress batch from a fully read builder, created at emulated time ``now``
        (``api_created_us`` on the API clock, whose scale is then ``api_scale``)."""
        batch = cls()
        batch.seq = seq
        batch.id = batch_id
        batch.config = builder.config
        batch.size = builder.size
        batch.created_at = now
        batch.expires_at = now + builder.config.expiry_seconds
        batch.api_created_us = api_created_us
        batch.api_scale = api_scale
        batch.duration = builder.duration
        batch.stall_fraction = builder.stall_fraction
        batch.ready_at = math.inf if builder.stalled else now + builder.duration
        batch.end_at = min(batch.ready_at, batch.expires_at)
        batch.status = "in_progress"
        batch.cancel_initiated_at = batch.ended_at = None
        batch.done_fraction = 0.0
        batch.counts = None
        batch.created_at_text = rfc3339_us(api_created_us)
        batch.expires_at_text = rfc3339_us(
            api_created_us + round(builder.config.expiry_seconds * 1e6 / api_scale)
        )
        batch.results = ResultsFile(batch.size)
        for name in (
            "custom_ids", "templates", "template_ids", "messages", "invalid", "completion",
            "fates", "error_types", "fate_counts", "cache_codes", "input_tokens", "cache_tokens",
            "cache_1h_tokens",
        ):  # fmt: skip
            setattr(batch, name, getattr(builder, name))
        return batch

    def api_us(self, emulated: float) -> int:
        """An emulated instant of this batch's life on the API clock, in whole microseconds.

        Measured from the creation, at the time scale of the creation, so that the batch's own
        timestamps keep their emulated order and exact differences (expiry is created + 24 h/scale).
        """
        return self.api_created_us + round((emulated - self.created_at) * 1e6 / self.api_scale)

    @staticmethod
    def counts_before_any_end(size: int) -> dict[str, int]:
        return {"processing": size, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}

    def processing_counts(self) -> dict[str, int]:
        return self.counts if self.counts is not None else self.counts_before_any_end(self.size)

    def cancel(self, now: float) -> None:
        """An in_progress batch starts canceling: it ends ``cancel_seconds`` later (at the latest at
        its expiry, unless that has passed)."""
        self.cancel_initiated_at = now
        self.end_at = min(now + self.config.cancel_seconds, max(self.expires_at, now))
        self.status = "canceling"

    def unfinished_result(self) -> str:
        return "canceled" if self.cancel_initiated_at is not None else "expired"

    def settle(self) -> tuple[int, int]:
        """End the batch: fix how far processing got and count each request's outcome once.

        Returns (requests errored by an injected fault, requests expired by one).
        """
        if self.cancel_initiated_at is not None:
            reached = self.cancel_initiated_at
        else:
            reached = min(self.ready_at, self.expires_at)
        if self.duration <= 0:
            done = 1.0 if reached >= self.created_at else 0.0
        else:
            done = (reached - self.created_at) / self.duration
        done = min(done, self.stall_fraction)
        self.done_fraction = done
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        fault_errors = fault_expiries = 0
        if done >= 1.0:
            fate_counts = self.fate_counts
            for fate, count in fate_counts.items():
                counts[_RESULT_TYPE_BY_FATE.get(fate, "errored")] += count
            fault_expiries = fate_counts.get(FATE_EXPIRED, 0)
            fault_errors = sum(count for fate, count in fate_counts.items() if fate >= FATE_ERRORED)
        else:
            unfinished = self.unfinished_result()
            completion, fates = self.completion, self.fates
            for index in range(self.size):
                if completion[index] <= done:
                    fate = fates[index]
                    counts[_RESULT_TYPE_BY_FATE.get(fate, "errored")] += 1
                    fault_expiries += fate == FATE_EXPIRED
                    fault_errors += fate >= FATE_ERRORED
                else:
                    counts[unfinished] += 1
        self.counts = counts
        self.ended_at = self.end_at
        self.status = "ended"
        return fault_errors, fault_expiries

    def to_api(self, now: float, base_url: str) -> dict:
        """The batch as the API reports it, its timestamps on the API clock (see ``clock.py``)."""
        archive_seconds = self.config.archive_seconds
        ended = self.status == "ended"
        ended_at: str | None = None
        if ended and self.ended_at is not None:
            # An end by expiry is reported at exactly expires_at.
            ended_at = (
                self.expires_at_text
                if self.ended_at == self.expires_at
                else rfc3339_us(self.api_us(self.ended_at))
            )
        archived = now >= self.created_at + archive_seconds
        cancel = self.cancel_initiated_at
        return {
            "id": self.id,
            "type": "message_batch",
            "processing_status": self.status,
            "request_counts": dict(self.processing_counts()),
            "ended_at": ended_at,
            "created_at": self.created_at_text,
            "expires_at": self.expires_at_text,
            "archived_at": (
                rfc3339_us(self.api_created_us + round(archive_seconds * 1e6 / self.api_scale))
                if archived
                else None
            ),
            "cancel_initiated_at": None if cancel is None else rfc3339_us(self.api_us(cancel)),
            "results_url": f"{base_url}/v1/messages/batches/{self.id}/results" if ended else None,
        }


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

    def add_many(self, items: list) -> None:
        """``add`` each item; past ``max_requests_per_batch`` they are only counted (the create answers
        400 once the whole body is read)."""
        add = self.add
        for item in items:
            if self.extra_requests:
                self.extra_requests += 1
                continue
            try:
                add(item)
            except TooManyRequests:
                pass

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
                f"requests.{index}.custom_id: duplicate custom_id {custom_id!r} "
                f"(also used by requests.{first}); custom_id must be unique within a batch"
            )
        # Three draws per request, always, so outcomes do not shift when one request changes.
        rng = self._rng.random
        finish_point, fault_roll, cache_roll = rng(), rng(), rng()
        self.custom_ids.append(custom_id)
        self.completion.append(max(finish_point, 1e-6))

        messages = params.pop("messages", _MISSING)  # params is this item's own, freshly parsed
        template, messages_bytes, problem = self._split(params, messages)
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
        template_shape = template.shape
        message_tokens = uncached_message_tokens(messages)
        if message_tokens is not None:  # no breakpoint in the messages: the template's prefix is the prefix
            prefix = template_shape.prefix  # type: ignore[union-attr]
            total_tokens, cache_key = prefix.total_tokens + message_tokens, prefix.cache_key
            prefix_tokens, one_hour_tokens = prefix.cache_prefix_tokens, prefix.cache_1h_tokens
        else:
            shape = analyse_prompt({"messages": messages}, template_shape)
            total_tokens, cache_key = shape.total_tokens, shape.cache_key
            prefix_tokens, one_hour_tokens = shape.cache_prefix_tokens, shape.cache_1h_tokens
        self.fates.append(fate)
        self.template_ids.append(template.id)
        self.messages.append(messages_bytes)
        self.input_tokens.append(total_tokens)
        if fate == FATE_SUCCEEDED and cache_key is not None and prefix_tokens >= template.min_cacheable:
            warm = cache_key in self.cache_writes or self._prompt_cache.is_warm(cache_key, self.now)
            if warm and cache_roll < self._hit_rate:
                cache_code = CACHE_READ
            else:
                cache_code = CACHE_WRITE
                ttl = CACHE_TTL_SECONDS["1h" if one_hour_tokens else "5m"]
                self.cache_writes[cache_key] = max(ttl, self.cache_writes.get(cache_key, 0.0))
            self.cache_codes.append(cache_code)
            self.cache_tokens.append(prefix_tokens)
            self.cache_1h_tokens.append(one_hour_tokens)
        else:  # (_append_outcome, inline: this runs for every request)
            self.cache_codes.append(CACHE_NONE)
            self.cache_tokens.append(0)
            self.cache_1h_tokens.append(0)

    def count_extra(self) -> None:
        """One more request past the limit (the rest of the body is still read, to count them)."""
        self.extra_requests += 1

    def too_many_message(self) -> str:
        total = self._max_requests + self.extra_requests
        return f"requests: List should have at most {self._max_requests} items after validation, not {total}"

    def _split(self, params: dict, messages: Any) -> tuple[_Template | None, bytes, str | None]:
        """(template, messages as orjson bytes, None), or (None, b"", why the params are invalid).

        ``params`` comes without its ``messages`` (``_MISSING`` when there were none). The params
        other than messages are checked once per distinct set (most batches repeat one system
        prompt, model and schema in every request); the messages of every request.
        """
        try:
            key = orjson.dumps(params)
        except (TypeError, orjson.JSONEncodeError):
            if messages is not _MISSING:
                params["messages"] = messages
            return None, b"", params_error(params, in_batch=True)
        template = self._template_by_bytes.get(key)
        if template is None:
            template = self._new_template(key, params)
        problem = (
            template.problem_before_messages
            or (messages_error({} if messages is _MISSING else {"messages": messages}))
            or template.problem_after_messages
        )
        if problem is not None:
            return None, b"", problem
        try:
            # orjson's result sits in an oversized (8 KB) allocation; an exact copy keeps 100k of them small.
            messages_bytes = bytes(memoryview(orjson.dumps(messages)))
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
