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
import contextlib
import contextvars
import logging
import random
import time
import weakref
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import anthropic

from claude_batch.paging import aiter_list_pages, list_params, next_after_id_json

# Re-exported: BatchSnapshot lived here before it moved to claude_batch.snapshots.
from claude_batch.snapshots import BatchSnapshot, human_duration
from claude_batch.waiting import POLL_BACKOFF, next_poll_interval

__all__ = [
    "DEFAULT_MAX_LIST_PAGES",
    "RETRIEVE_CONCURRENCY",
    "BatchPoller",
    "BatchSnapshot",
    "PollRound",
    "Subscription",
    "human_duration",
    "shared_poller",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_LIST_PAGES = 5
RETRIEVE_CONCURRENCY = 8


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
        backoff: float = POLL_BACKOFF,
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
        self.interval = next_poll_interval(self.interval, self.max_interval, self.backoff)

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
            pages = aiter_list_pages(
                lambda after_id: self._list_page(client, after_id), self.max_list_pages, next_after_id_json
            )
            async with contextlib.aclosing(pages):
                async for page in pages:
                    calls += 1
                    items = page["data"]
                    for item in items:
                        if item["id"] in remaining:
                            remaining.discard(item["id"])
                            snapshot = BatchSnapshot.from_api(item)
                            snapshots[snapshot.id] = snapshot
                            self._created_at[snapshot.id] = datetime.fromisoformat(snapshot.created_at)
                    if not remaining or next_after_id_json(page) is None:
                        break
                    if oldest is not None and datetime.fromisoformat(items[-1]["created_at"]) < oldest:
                        break  # paged past every batch we know; the rest are older or gone
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
        return await client.get(
            "/v1/messages/batches", options={"params": list_params(after_id)}, cast_to=dict[str, Any]
        )

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
