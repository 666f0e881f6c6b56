"""Queue-aware submission: wait for room in the API's processing queue without holding a worker.

The API holds a fixed number of requests in processing per organisation (200,000 to 500,000
by tier) and refuses a create that would overflow it with HTTP 429. The queue drains as
batches end, over hours, so :class:`~claude_batch.operators.ClaudeBatchOperator` does not
sleep for it: it *defers* with a :class:`QueueRoomTrigger` and submits again when the
trigger sees room (or after a re-check interval), until a deadline.

- :func:`queue_usage` / :func:`aqueue_usage`: the requests in processing, from one paged
  ``list`` sequence (the sum of ``request_counts.processing`` of batches not yet ended,
  newest first, stopping at batches too old to be in progress).
- :class:`QueueAwareApi`: what :class:`~claude_batch.submission.BatchSubmitter` calls; before
  the create it checks an optional budget (``queue_budget``, shared by every run and DAG on the
  organisation because it is read from the API), and turns the API's queue-full 429 into
  :class:`QueueRefused`. Either way nothing was created.
- :class:`QueueRoomTrigger`: small and serialisable; reads the queue every ``poll_interval``
  (one reading shared by every such trigger on the event loop) and fires when this shard fits,
  or at ``wake_at``.
- :class:`QueueWait`: what a chain of deferrals remembers (when the wait began, the deadline,
  how many deferrals, what the API said its limit is), carried in the trigger's event.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any

import anthropic
from airflow.triggers.base import BaseTrigger, TriggerEvent
from anthropic.types.messages import MessageBatch

from claude_batch.errors import ClaudeBatchError, ClaudeBatchQueueFullError, explain_api_error, is_transient
from claude_batch.hooks import ClaudeBatchHook, shared_async_client
from claude_batch.paging import aiter_list_pages, iter_list_pages, list_params

# Its home is claude_batch.waiting (Airflow-free); re-exported here, its old place.
from claude_batch.waiting import DEFAULT_QUEUE_POLL_INTERVAL

# A batch expires 24 h after its creation, so nothing older can still be processing; the hour
# is slack for the API's clock and for batches in the middle of expiring.
IN_PROGRESS_HORIZON = timedelta(hours=25)
# 100 pages of 1,000 batches: far more batches than 25 h of any pipeline creates.
QUEUE_MAX_PAGES = 100
DEFAULT_QUEUE_WAIT_TIMEOUT = 20 * 3600.0
DEFAULT_QUEUE_RECHECK_INTERVAL = 900.0
# The deferral's own timeout is this much past the trigger's wake time (a safety net only:
# the trigger always fires by wake_at).
DEFER_TIMEOUT_SLACK = 600.0


def _now() -> datetime:
    return datetime.now(UTC)


# --- reading the queue -------------------------------------------------------------------------


@dataclass(frozen=True)
class QueueUsage:
    """Requests in processing in the workspace's batches, as one paged list read them.

    :param processing: the sum of ``request_counts.processing`` of batches not yet ended.
    :param batches: how many batches were not yet ended.
    :param pages: list pages read.
    :param complete: ``False`` when the page bound was hit first (``processing`` is then a floor).
    """

    processing: int
    batches: int
    pages: int
    complete: bool = True


class _Tally:
    """Sums one newest-first list sequence; says when older pages cannot matter."""

    def __init__(self) -> None:
        self.processing = 0
        self.batches = 0
        self.pages = 0
        self._cutoff: datetime | None = None

    def add(self, page: Any) -> bool:
        """Count one page; ``True`` while older pages may still hold batches in progress."""
        self.pages += 1
        for batch in page.data:
            if self._cutoff is None:
                # The API's clock, not ours, decides what is old (an emulator's may run ahead).
                self._cutoff = max(_now(), batch.created_at) - IN_PROGRESS_HORIZON
            if batch.created_at < self._cutoff:
                return False
            if batch.processing_status != "ended":
                self.processing += batch.request_counts.processing
                self.batches += 1
        return bool(page.has_more and page.data)

    def usage(self, complete: bool) -> QueueUsage:
        return QueueUsage(self.processing, self.batches, self.pages, complete)


def queue_usage(hook: ClaudeBatchHook, max_pages: int = QUEUE_MAX_PAGES) -> QueueUsage:
    """The requests in processing now, from one paged ``list`` sequence (newest first)."""
    tally = _Tally()
    for page in iter_list_pages(hook.list_page, max_pages):
        if not tally.add(page):
            return tally.usage(complete=True)
    return tally.usage(complete=False)


async def aqueue_usage(client: anthropic.AsyncAnthropic, max_pages: int = QUEUE_MAX_PAGES) -> QueueUsage:
    """:func:`queue_usage` with the async client (in a trigger)."""
    tally = _Tally()
    pages = aiter_list_pages(
        lambda after_id: client.messages.batches.list(**list_params(after_id)), max_pages
    )
    async with contextlib.aclosing(pages):
        async for page in pages:
            if not tally.add(page):
                return tally.usage(complete=True)
    return tally.usage(complete=False)


class _SharedGauge:
    """One queue reading at a time per connection and event loop, reused while fresh.

    It also keeps the *claims* of triggers on this loop that saw room and fired: until the
    batch its task creates shows in a reading (or the claim expires), its requests count as
    taken, so one drained batch wakes as many waiting tasks as fit, not all of them.
    """

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._reading: QueueUsage | None = None
        self._read_at = float("-inf")
        # (expires at, requests, processing in the reading it was made on, that reading's time)
        self._claims: list[tuple[float, int, int, float]] = []

    async def read(self, client: anthropic.AsyncAnthropic, max_age: float) -> QueueUsage:
        async with self._lock:
            if self._reading is None or time.monotonic() - self._read_at > max_age:
                self._reading = await aqueue_usage(client)
                self._read_at = time.monotonic()
            return self._reading

    def claimed(self) -> int:
        """Requests claimed by fired triggers whose batches the latest reading does not show yet."""
        now = time.monotonic()
        reading = self._reading
        kept = []
        for claim in self._claims:
            expires, needed, processing_then, read_then = claim
            landed = (
                reading is not None
                and self._read_at > read_then
                and reading.processing >= processing_then + needed
            )
            if expires > now and not landed:
                kept.append(claim)
        self._claims = kept
        return sum(claim[1] for claim in kept)

    def claim(self, needed: int, ttl: float) -> None:
        processing = self._reading.processing if self._reading is not None else 0
        self._claims.append((time.monotonic() + ttl, needed, processing, self._read_at))


_gauges: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, _SharedGauge]] = (
    weakref.WeakKeyDictionary()
)


def _shared_gauge(conn_id: str) -> _SharedGauge:
    gauges = _gauges.setdefault(asyncio.get_running_loop(), {})
    return gauges.setdefault(conn_id, _SharedGauge())


# --- refusing before (or instead of) a create ----------------------------------------------


class QueueRefused(Exception):
    """No room in the processing queue for this shard; nothing was created.

    :param reason: ``budget`` (our ``queue_budget`` would be exceeded) or ``api`` (the API's
        queue is full: its 429, or its stated limit checked before sending).
    :param needed: the shard's request count.
    :param processing: requests in processing when refused, if known.
    :param limit: the limit that refused it, if known.
    :param retry_after: the API's ``retry-after``, if it sent one.
    :param maybe_created_before: see :class:`~claude_batch.errors.ClaudeBatchQueueFullError`.
    """

    def __init__(
        self,
        reason: str,
        needed: int,
        processing: int | None,
        limit: int | None,
        retry_after: float | None = None,
        maybe_created_before: bool = False,
        detail: str = "",
    ) -> None:
        self.reason = reason
        self.needed = needed
        self.processing = processing
        self.limit = limit
        self.retry_after = retry_after
        self.maybe_created_before = maybe_created_before
        self.detail = detail
        super().__init__(self.describe())

    def describe(self) -> str:
        held = "an unknown number of" if self.processing is None else f"{self.processing:,}"
        if self.reason == "budget":
            whose = f"queue_budget {self.limit:,}"
        else:
            whose = "the API's limit" + ("" if self.limit is None else f" of {self.limit:,}")
        return (
            f"the processing queue holds {held} requests in processing; this shard's {self.needed:,} more "
            f"would exceed {whose}"
        )


class QueueNeverFits(ClaudeBatchError):
    """The shard alone is bigger than the queue (or the budget): waiting cannot help."""


def effective_limit(budget: int | None, api_limit: int | None) -> int | None:
    known = [value for value in (budget, api_limit) if value is not None]
    return min(known) if known else None


class QueueAwareApi:
    """The :class:`~claude_batch.submission.BatchApi` of a queue-aware submit.

    Delegates to the hook; the create first checks the queue when a limit is known (the
    ``budget``, or the limit the API stated in an earlier refusal) and raises
    :class:`QueueRefused` instead of sending, and turns the API's own queue-full 429 into
    :class:`QueueRefused`. A check and a create are not atomic: two submits may both see room,
    and the API's 429 then refuses the later one, which is handled the same way.

    :param hook: the Claude batch hook.
    :param budget: requests in processing this deployment may reach (``None``: no budget).
    :param api_limit: the API's queue limit, if a refusal stated it.
    :param log: where to say what the check saw.
    """

    def __init__(
        self,
        hook: ClaudeBatchHook,
        budget: int | None = None,
        api_limit: int | None = None,
        log: Callable[[str], None] = lambda _m: None,
    ) -> None:
        self.hook = hook
        self.budget = budget
        self.api_limit = api_limit
        self.log = log
        self.last_usage: QueueUsage | None = None

    @property
    def limit(self) -> int | None:
        return effective_limit(self.budget, self.api_limit)

    def check_room(self, needed: int) -> QueueRefused | None:
        """With a known limit, read the queue: the refusal if ``needed`` does not fit, else ``None``."""
        limit = self.limit
        if limit is None:
            return None
        reason = "budget" if self.budget == limit else "api"
        if needed > limit:
            raise QueueNeverFits(
                f"A batch of {needed:,} requests can never fit: "
                + (
                    f"queue_budget is {limit:,}."
                    if reason == "budget"
                    else f"the API's processing queue holds {limit:,}."
                )
                + " Stage smaller shards"
                + (" or raise queue_budget." if reason == "budget" else ".")
            )
        usage = queue_usage(self.hook)
        self.last_usage = usage
        if usage.processing + needed > limit:
            return QueueRefused(reason, needed, usage.processing, limit)
        self.log(
            f"Queue check: {usage.processing:,} requests in processing in {usage.batches} batches, "
            f"+{needed:,} fits within {limit:,} "
            f"({'queue_budget' if reason == 'budget' else 'the API limit'})."
        )
        return None

    def create_batch_from_body(
        self,
        body: Iterable[bytes],
        body_bytes: int,
        request_count: int,
        recover: Callable[[], MessageBatch | None],
    ) -> MessageBatch:
        refused = self.check_room(request_count)
        if refused is not None:
            raise refused
        try:
            return self.hook.create_batch_from_body(body, body_bytes, request_count, recover=recover)
        except ClaudeBatchQueueFullError as exc:
            processing = exc.queued
            if processing is None:
                try:
                    self.last_usage = queue_usage(self.hook)
                    processing = self.last_usage.processing
                except ClaudeBatchError:
                    processing = None
            raise QueueRefused(
                "api",
                request_count,
                processing,
                exc.queue_limit,
                retry_after=exc.retry_after,
                maybe_created_before=exc.maybe_created_before,
                detail=str(exc),
            ) from exc

    def batches_created_since(self, created_after: datetime) -> Iterator[MessageBatch]:
        return self.hook.batches_created_since(created_after)

    def retrieve_batch(self, batch_id: str) -> MessageBatch:
        return self.hook.retrieve_batch(batch_id)

    def cancel_batch(self, batch_id: str) -> MessageBatch:
        return self.hook.cancel_batch(batch_id)


# --- what a chain of deferrals remembers ----------------------------------------------------


@dataclass
class QueueWait:
    """The state of one task's wait for queue room, carried from deferral to deferral.

    All primitives (it travels in the trigger's kwargs and event).
    """

    started_at: str | None = None
    deadline: str | None = None
    deferrals: int = 0
    needed: int | None = None
    api_limit: int | None = None
    processing: int | None = None
    reason: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> QueueWait:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in (data or {}).items() if key in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def waited_seconds(self, now: datetime | None = None) -> float:
        if not self.started_at:
            return 0.0
        return ((now or _now()) - datetime.fromisoformat(self.started_at)).total_seconds()


def parse_deadline(value: datetime | str | None) -> datetime | None:
    """An absolute deadline (a tz-aware datetime or an ISO string; naive means UTC)."""
    if value is None or value == "":
        return None
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value).strip())
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def human_seconds(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


# --- the trigger -----------------------------------------------------------------------------


class QueueRoomTrigger(BaseTrigger):
    """Fires when the processing queue has room for ``needed`` more requests, or at ``wake_at``.

    Room is ``processing + needed <= limit`` when a limit is known (the budget, or the API's
    stated limit); otherwise ``processing <= baseline - needed`` (the queue drained by this
    shard's size since it was refused with ``baseline`` in processing). With neither, it only
    waits for ``wake_at``. The event carries ``queue_wait`` back to the task.

    :param conn_id: the ``anthropic`` connection.
    :param needed: the shard's request count.
    :param wake_at: ISO time at which to fire regardless (the re-check, or the deadline).
    :param limit: the queue limit to fit under, if known.
    :param baseline: requests in processing when the API refused the shard, if known.
    :param poll_interval: seconds between queue readings.
    :param queue_wait: the task's :class:`QueueWait`, echoed in the event.
    """

    def __init__(
        self,
        conn_id: str,
        needed: int,
        wake_at: str,
        limit: int | None = None,
        baseline: int | None = None,
        poll_interval: float = DEFAULT_QUEUE_POLL_INTERVAL,
        queue_wait: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.conn_id = conn_id
        self.needed = int(needed)
        self.wake_at = wake_at
        self.limit = limit
        self.baseline = baseline
        self.poll_interval = max(float(poll_interval), 0.05)
        self.queue_wait = dict(queue_wait or {})

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "conn_id": self.conn_id,
                "needed": self.needed,
                "wake_at": self.wake_at,
                "limit": self.limit,
                "baseline": self.baseline,
                "poll_interval": self.poll_interval,
                "queue_wait": self.queue_wait,
            },
        )

    def has_room(self, usage: QueueUsage, claimed: int = 0) -> bool:
        taken = usage.processing + claimed + self.needed
        if self.limit is not None:
            return taken <= self.limit
        if self.baseline is not None:
            return taken <= self.baseline
        return False

    @property
    def claim_ttl(self) -> float:
        """How long a fired trigger's requests stay claimed: long enough for its task to submit."""
        return max(30.0, 3 * self.poll_interval)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        wake = datetime.fromisoformat(self.wake_at).timestamp()
        watching = self.limit is not None or self.baseline is not None
        usage: QueueUsage | None = None
        if watching:
            client = await shared_async_client(self.conn_id)
            gauge = _shared_gauge(self.conn_id)
        while True:
            if watching:
                try:
                    usage = await gauge.read(client, max_age=self.poll_interval / 2)
                    if self.has_room(usage, gauge.claimed()):
                        gauge.claim(self.needed, self.claim_ttl)
                        self.log.info(
                            "Room in the processing queue: %s requests in processing, %s more fit.",
                            f"{usage.processing:,}",
                            f"{self.needed:,}",
                        )
                        yield self._event("room", usage)
                        return
                except anthropic.APIError as exc:
                    if not is_transient(exc):
                        yield self._event(
                            "error", usage, str(explain_api_error(exc, self.conn_id, "reading the queue"))
                        )
                        return
                    self.log.warning("Reading the processing queue failed (%s); trying again.", exc)
            remaining = wake - time.time()
            if remaining <= 0:
                yield self._event("recheck", usage)
                return
            await asyncio.sleep(min(self.poll_interval, remaining) if watching else remaining)

    def _event(self, status: str, usage: QueueUsage | None, message: str | None = None) -> TriggerEvent:
        payload: dict[str, Any] = {
            "status": status,
            "processing": None if usage is None else usage.processing,
            "queue_wait": self.queue_wait,
        }
        if message:
            payload["message"] = message
        return TriggerEvent(payload)
