"""Learn the status of many batches with few API calls: the shared poller.

The batch endpoints allow only a few thousand requests a minute per organisation, so a
thousand triggers must not each call ``retrieve``. Every trigger on one event loop subscribes
to one :class:`BatchPoller` per connection; a round reads ``list`` pages (1,000 batches per
call, newest first) until every watched batch is seen, and retrieves only the few that are
older than the pages it read. One client, one connection pool, one call per round for up to
1,000 batches. Plain asyncio; the trigger is the thin Airflow shell around it.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import anthropic
from anthropic.types.messages import MessageBatch

from claude_batch.hooks import LIST_PAGE_LIMIT

log = logging.getLogger(__name__)

DEFAULT_MAX_LIST_PAGES = 5
RETRIEVE_CONCURRENCY = 8


@dataclass(frozen=True)
class BatchSnapshot:
    """A batch's status in primitives, so it can travel in a TriggerEvent and XCom."""

    id: str
    processing_status: str
    processing: int
    succeeded: int
    errored: int
    canceled: int
    expired: int
    created_at: str
    expires_at: str
    ended_at: str | None = None
    cancel_initiated_at: str | None = None

    @classmethod
    def from_batch(cls, batch: MessageBatch) -> BatchSnapshot:
        counts = batch.request_counts
        return cls(
            id=batch.id,
            processing_status=batch.processing_status,
            processing=counts.processing,
            succeeded=counts.succeeded,
            errored=counts.errored,
            canceled=counts.canceled,
            expired=counts.expired,
            created_at=batch.created_at.isoformat(),
            expires_at=batch.expires_at.isoformat(),
            ended_at=batch.ended_at.isoformat() if batch.ended_at else None,
            cancel_initiated_at=batch.cancel_initiated_at.isoformat() if batch.cancel_initiated_at else None,
        )

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> BatchSnapshot:
        """From the API's JSON (a ``list`` page item), without building SDK models."""
        counts = data["request_counts"]
        return cls(
            id=data["id"],
            processing_status=data["processing_status"],
            processing=counts["processing"],
            succeeded=counts["succeeded"],
            errored=counts["errored"],
            canceled=counts["canceled"],
            expired=counts["expired"],
            created_at=data["created_at"],
            expires_at=data["expires_at"],
            ended_at=data.get("ended_at"),
            cancel_initiated_at=data.get("cancel_initiated_at"),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BatchSnapshot:
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def ended(self) -> bool:
        return self.processing_status == "ended"

    @property
    def total(self) -> int:
        return self.processing + self.succeeded + self.errored + self.canceled + self.expired

    @property
    def outcome(self) -> str:
        """``in_progress``, ``succeeded`` (all), ``canceled`` (none ran), ``expired`` (none ran), or ``partial``."""
        if not self.ended:
            return "in_progress"
        if self.succeeded == self.total:
            return "succeeded"
        if self.canceled == self.total:
            return "canceled"
        if self.expired == self.total:
            return "expired"
        return "partial"

    def progress_line(self, now: datetime) -> str:
        """One log line: status, counts, age and time left before expiry."""
        created = datetime.fromisoformat(self.created_at)
        expires = datetime.fromisoformat(self.expires_at)
        return (
            f"batch {self.id}: {self.processing_status} ({self.outcome}); processing={self.processing:,} "
            f"succeeded={self.succeeded:,} errored={self.errored:,} canceled={self.canceled:,} "
            f"expired={self.expired:,}; age {_human(now - created)}, expires in {_human(expires - now)}"
        )


def _human(delta) -> str:
    seconds = int(max(delta.total_seconds(), 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class PollRound:
    """The outcome of one round: snapshots of the batches found, or the error that stopped it."""

    def __init__(
        self,
        snapshots: dict[str, BatchSnapshot],
        error: BaseException | None,
        api_calls: int,
        missing: frozenset[str] = frozenset(),
    ) -> None:
        self.snapshots = snapshots
        self.error = error
        self.api_calls = api_calls
        # Batches the API answered 404 for: deleted, or never existed in this workspace.
        self.missing = missing


class Subscription:
    """One trigger's interest in some batches; receives every round that covers them.

    :param poller: the shared poller.
    :param batch_ids: the batches to watch.
    :param min_interval: the first polling interval (seconds).
    :param max_interval: the ceiling the interval backs off to.
    :param backoff: the factor applied to the interval after each round.
    """

    def __init__(
        self,
        poller: BatchPoller,
        batch_ids: list[str],
        min_interval: float,
        max_interval: float,
        backoff: float = 1.5,
    ) -> None:
        self.poller = poller
        self.batch_ids = set(batch_ids)
        self.interval = min_interval
        self.max_interval = max_interval
        self.backoff = backoff
        self._rounds: asyncio.Queue[PollRound] = asyncio.Queue()

    def _deliver(self, found: PollRound) -> None:
        # Look up this subscription's few ids, not every snapshot: O(mine), not O(all) per round.
        everything = found.snapshots
        mine = {key: everything[key] for key in self.batch_ids if key in everything}
        self._rounds.put_nowait(PollRound(mine, found.error, found.api_calls, found.missing & self.batch_ids))
        self.interval = min(self.interval * self.backoff, self.max_interval)

    async def next_round(self) -> PollRound:
        """Wait for the next round that covers this subscription's batches."""
        return await self._rounds.get()

    def newest(self, found: PollRound) -> PollRound:
        """``found``, or the newest round already queued behind it (a slow consumer skips stale ones)."""
        while not self._rounds.empty():
            found = self._rounds.get_nowait()
        return found

    def forget(self, batch_ids: set[str]) -> None:
        """Stop watching batches that need no more polling (they have ended)."""
        self.batch_ids -= batch_ids

    def __enter__(self) -> Subscription:
        self.poller._add(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.poller._remove(self)


class BatchPoller:
    """Polls the union of every subscription's batches, one round at a time.

    :param get_client: returns the shared ``AsyncAnthropic`` for the connection.
    :param max_list_pages: list pages read per round before falling back to ``retrieve``.
    :param jitter: the fraction by which each round's interval is randomly stretched or shrunk.
    """

    def __init__(
        self,
        get_client: Callable[[], Awaitable[anthropic.AsyncAnthropic]],
        max_list_pages: int = DEFAULT_MAX_LIST_PAGES,
        jitter: float = 0.1,
    ) -> None:
        self._get_client = get_client
        self.max_list_pages = max_list_pages
        self.jitter = jitter
        self._subscriptions: list[Subscription] = []
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._last_round = float("-inf")
        # created_at of batches seen before: a list round may stop once it pages past the oldest.
        self._created_at: dict[str, datetime] = {}
        self.rounds = 0
        self.api_calls = 0

    def subscribe(self, batch_ids: list[str], min_interval: float, max_interval: float) -> Subscription:
        """A subscription to use as a context manager (``with poller.subscribe(...) as sub``)."""
        return Subscription(self, batch_ids, min_interval, max_interval)

    def _add(self, subscription: Subscription) -> None:
        self._subscriptions.append(subscription)
        if self._task is None or self._task.done():
            # A context of its own: a task copies its creator's, and the first trigger's log
            # context would take every later round's HTTP lines into that trigger's task log.
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="claude-batch-poller", context=contextvars.Context()
            )
        self._wake.set()

    def _remove(self, subscription: Subscription) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)
        self._wake.set()

    async def _run(self) -> None:
        while self._subscriptions:
            interval = min(sub.interval for sub in self._subscriptions)
            interval *= 1 + random.uniform(-self.jitter, self.jitter)
            wait = self._last_round + interval - time.monotonic()
            if wait > 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=wait)
                    continue  # the set of subscriptions changed: recompute the wait
                except TimeoutError:
                    pass
            subscribers = list(self._subscriptions)
            watched = set().union(*(sub.batch_ids for sub in subscribers))
            self._last_round = time.monotonic()
            if not watched:
                continue
            found = await self.poll_once(watched)
            for sub in subscribers:
                sub._deliver(found)

    async def poll_once(self, batch_ids: set[str]) -> PollRound:
        """One round: page through ``list`` until every batch is seen, then retrieve the rest."""
        remaining = set(batch_ids)
        snapshots: dict[str, BatchSnapshot] = {}
        calls = 0
        missing: set[str] = set()
        try:
            client = await self._get_client()
            oldest = min((self._created_at[i] for i in remaining if i in self._created_at), default=None)
            after_id: str | None = None
            for _ in range(self.max_list_pages):
                page = await self._list_page(client, after_id)
                calls += 1
                items = page["data"]
                for item in items:
                    if item["id"] in remaining:
                        remaining.discard(item["id"])
                        snapshot = BatchSnapshot.from_api(item)
                        snapshots[snapshot.id] = snapshot
                        self._created_at[snapshot.id] = datetime.fromisoformat(snapshot.created_at)
                if not remaining or not page.get("has_more") or not items:
                    break
                if oldest is not None and datetime.fromisoformat(items[-1]["created_at"]) < oldest:
                    break  # paged past every batch we know; the rest are older or gone
                after_id = items[-1]["id"]
                await asyncio.sleep(0)  # let other coroutines run between pages
            if remaining:
                calls += len(remaining)
                snapshots.update(await self._retrieve_each(client, remaining, missing))
            error = None
        except Exception as exc:  # delivered to the triggers, which decide whether to give up
            error = exc
        self.rounds += 1
        self.api_calls += calls
        return PollRound(snapshots, error, calls, frozenset(missing))

    @staticmethod
    async def _list_page(client: anthropic.AsyncAnthropic, after_id: str | None) -> dict[str, Any]:
        """One ``list`` page as plain JSON, through the SDK (auth, retries) but not its models.

        Building SDK models for 1,000 batches costs about 0.2 ms each on the event loop, which
        would stall every other trigger; plain JSON and five fields per batch cost a fraction.
        """
        query: dict[str, Any] = {"limit": LIST_PAGE_LIMIT}
        if after_id:
            query["after_id"] = after_id
        return await client.get("/v1/messages/batches", options={"params": query}, cast_to=dict[str, Any])

    async def _retrieve_each(
        self, client: anthropic.AsyncAnthropic, batch_ids: set[str], missing: set[str]
    ) -> dict[str, BatchSnapshot]:
        limit = asyncio.Semaphore(RETRIEVE_CONCURRENCY)
        found: dict[str, BatchSnapshot] = {}

        async def one(batch_id: str) -> None:
            async with limit:
                try:
                    batch = await client.messages.batches.retrieve(batch_id)
                except anthropic.NotFoundError:
                    missing.add(batch_id)
                    return
            self._created_at[batch_id] = batch.created_at
            found[batch_id] = BatchSnapshot.from_batch(batch)

        await asyncio.gather(*(one(batch_id) for batch_id in batch_ids))
        return found


_pollers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, BatchPoller]] = (
    weakref.WeakKeyDictionary()
)


def shared_poller(conn_id: str) -> BatchPoller:
    """The one poller for ``conn_id`` on the running event loop."""
    from claude_batch.hooks import shared_async_client

    pollers = _pollers.setdefault(asyncio.get_running_loop(), {})
    if conn_id not in pollers:
        pollers[conn_id] = BatchPoller(lambda: shared_async_client(conn_id))
    return pollers[conn_id]
