"""ClaudeBatchTrigger: wait for batches in the triggerer, holding no worker slot.

Small and serialisable (a handful of primitives); all the polling is done by the process-wide
:class:`~claude_batch.poller.BatchPoller`, so a thousand of these cost one ``list`` call per
round, not a thousand ``retrieve`` calls. After a triggerer restart the trigger is rebuilt from
its kwargs and simply subscribes again: every fact it needs is on the API side (which batches
were canceled, and when, is read back from ``cancel_initiated_at``).

Timeouts are per batch: each batch's deadline is its own ``created_at + timeout``. At every
round the trigger cancels the batches past their deadline that it has not yet asked to cancel
(it also wakes at a deadline that falls between rounds), and it keeps waiting until every batch
has ended, so a wait over many batches never gives up on the first one and leaves the others
running. A canceled batch goes ``canceling`` -> ``ended``; its results then hold the requests
that finished (succeeded, errored) and the rest as ``canceled``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import anthropic
from airflow.triggers.base import BaseTrigger, TriggerEvent

from claude_batch.errors import explain_api_error, is_transient
from claude_batch.hooks import shared_async_client
from claude_batch.poller import PollRound, Subscription, shared_poller
from claude_batch.snapshots import BatchSnapshot, human_duration

# The waiting policy lives in claude_batch.waiting (shared with the sensor and the operator);
# these names are re-exported from here, their old home.
from claude_batch.waiting import (
    CANCEL_CLOCK_SLACK,
    DEFAULT_BATCH_TIMEOUT,
    DEFAULT_MAX_CONSECUTIVE_ERRORS,
    DEFAULT_MAX_POLL_INTERVAL,
    DEFAULT_MIN_POLL_INTERVAL,
    EVENT_ERROR,
    ON_TIMEOUT_CANCEL_AND_COLLECT,
    ON_TIMEOUT_CHOICES,
    ON_TIMEOUT_FAIL,
    batch_deadline,
    canceled_for_timeout,
    check_on_timeout,
    completion_event,
    deadline_at,
    iso_utc,
    overdue_batches,
    progress_summary,
    waiting_uncanceled,
)

__all__ = [
    "CANCEL_CLOCK_SLACK",
    "CANCEL_CONCURRENCY",
    "DEFAULT_BATCH_TIMEOUT",
    "DEFAULT_MAX_CONSECUTIVE_ERRORS",
    "DEFAULT_MAX_POLL_INTERVAL",
    "DEFAULT_MIN_POLL_INTERVAL",
    "ON_TIMEOUT_CANCEL_AND_COLLECT",
    "ON_TIMEOUT_CHOICES",
    "ON_TIMEOUT_FAIL",
    "ClaudeBatchTrigger",
    "batch_deadline",
    "canceled_for_timeout",
    "check_on_timeout",
    "completion_event",
    "overdue_batches",
    "progress_summary",
]

# Cancel calls in flight at once when many batches reach their deadline together.
CANCEL_CONCURRENCY = 8


class ClaudeBatchTrigger(BaseTrigger):
    """Fires once every batch has ended, or when they could not be polled.

    :param batch_ids: the batches to wait for.
    :param conn_id: the ``anthropic`` connection.
    :param timeout: seconds after each batch's own creation before the trigger cancels it
        (``None``: wait until the API ends it, at most 24 hours). The trigger still waits until
        the canceled batch has ended, and until every other batch has ended too.
    :param on_timeout: ``"fail"`` (default): once every batch has ended, a batch canceled for its
        deadline makes the event ``timeout`` (the task fails). ``"cancel_and_collect"``: the
        canceled batches count as ended, the event is ``success`` and names them in
        ``timed_out``, so that collect keeps their successes and the ledger retries the rest.
    :param min_poll_interval: the first polling interval; it backs off from here.
    :param max_poll_interval: the ceiling of the polling interval.
    :param max_consecutive_errors: failed poll rounds in a row before giving up.
    """

    def __init__(
        self,
        batch_ids: list[str],
        conn_id: str = "anthropic_default",
        timeout: float | None = None,
        min_poll_interval: float = DEFAULT_MIN_POLL_INTERVAL,
        max_poll_interval: float = DEFAULT_MAX_POLL_INTERVAL,
        max_consecutive_errors: int = DEFAULT_MAX_CONSECUTIVE_ERRORS,
        on_timeout: str = ON_TIMEOUT_FAIL,
    ) -> None:
        super().__init__()
        self.batch_ids = list(batch_ids)
        self.conn_id = conn_id
        self.timeout = timeout
        self.min_poll_interval = min_poll_interval
        self.max_poll_interval = max(max_poll_interval, min_poll_interval)
        self.max_consecutive_errors = max_consecutive_errors
        self.on_timeout = check_on_timeout(on_timeout)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "batch_ids": self.batch_ids,
                "conn_id": self.conn_id,
                "timeout": self.timeout,
                "min_poll_interval": self.min_poll_interval,
                "max_poll_interval": self.max_poll_interval,
                "max_consecutive_errors": self.max_consecutive_errors,
                "on_timeout": self.on_timeout,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        poller = shared_poller(self.conn_id)
        latest: dict[str, BatchSnapshot] = {}
        asked: set[str] = set()  # batches this run asked to cancel (or found ended when it tried)
        refused: set[str] = set()  # batches past their deadline whose cancel the API refused
        failures = 0
        rounds = 0
        with poller.subscribe(self.batch_ids, self.min_poll_interval, self.max_poll_interval) as subscription:
            while True:
                found = await self._next_round(subscription, latest, asked | refused)
                if found is not None:
                    rounds += 1
                    if found.missing:
                        yield self._error(
                            f"Batch(es) {sorted(found.missing)} not found: deleted, or in another workspace."
                        )
                        return
                    if found.error is not None:
                        failures += 1
                        fatal = not is_transient(found.error)
                        if fatal or failures >= self.max_consecutive_errors:
                            reason = explain_api_error(found.error, self.conn_id, "polling batches")
                            yield self._error(f"Gave up after {failures} failed poll round(s): {reason}")
                            return
                        self.log.warning(
                            "Polling failed (%s); round %d of %d tolerated.",
                            found.error,
                            failures,
                            self.max_consecutive_errors,
                        )
                        continue
                    failures = 0
                    latest.update(found.snapshots)
                    subscription.forget({key for key, snap in found.snapshots.items() if snap.ended})
                    if all(key in latest and latest[key].ended for key in self.batch_ids):
                        snapshots = [latest[key] for key in self.batch_ids]
                        line = progress_summary(snapshots, self.timeout, datetime.now(UTC))
                        self.log.info("Poll round %d: %s; every batch has ended.", rounds, line)
                        yield TriggerEvent(
                            completion_event(snapshots, self.timeout, self.on_timeout, refused)
                        )
                        return
                # A fresh round retries refused cancels; a wake at a deadline cancels only new ones.
                overdue = overdue_batches(
                    latest.values(),
                    self.timeout,
                    time.time(),
                    asked if found is not None else asked | refused,
                )
                if overdue:
                    not_canceled = await self._cancel(overdue, deadline_of=latest)
                    asked.update(set(overdue) - set(not_canceled))
                    refused = (refused - asked) | set(not_canceled)
                if found is not None:
                    # One line per round, whatever else the triggerer logs (the shared poller's HTTP lines).
                    self.log.info(
                        "Poll round %d: %s; next check in %s.",
                        rounds,
                        progress_summary(list(latest.values()), self.timeout, datetime.now(UTC)),
                        human_duration(timedelta(seconds=subscription.interval)),
                    )

    async def _next_round(
        self, subscription: Subscription, latest: dict[str, BatchSnapshot], skip: set[str]
    ) -> PollRound | None:
        """The next poll round, or ``None`` when a batch's deadline falls before it arrives."""
        timeout = self.timeout
        deadlines = (
            [
                deadline_at(snap, timeout)
                for snap in latest.values()
                if snap.id not in skip and waiting_uncanceled(snap)
            ]
            if timeout is not None
            else []
        )
        try:
            if not deadlines:
                found = await subscription.next_round()
            else:
                wake_in = max(min(deadlines) - time.time(), 0) + 0.001
                found = await asyncio.wait_for(subscription.next_round(), wake_in)
        except TimeoutError:
            return None
        # Rounds queue up while this trigger waits on a cancel call: act on the newest only.
        return subscription.newest(found)

    def _error(self, message: str) -> TriggerEvent:
        return TriggerEvent({"status": EVENT_ERROR, "message": message, "batch_ids": self.batch_ids})

    async def _cancel(
        self, batch_ids: list[str], deadline_of: dict[str, BatchSnapshot] | None = None
    ) -> list[str]:
        """Ask the API to cancel each batch (the SDK retries transient errors); the ids it refused."""
        client = await shared_async_client(self.conn_id)
        limit = asyncio.Semaphore(CANCEL_CONCURRENCY)

        async def one(batch_id: str) -> bool:
            snap = (deadline_of or {}).get(batch_id)
            why = (
                f" (created {snap.created_at}, deadline {iso_utc(deadline_at(snap, self.timeout))})"
                if snap is not None and self.timeout is not None
                else ""
            )
            async with limit:
                try:
                    await client.messages.batches.cancel(batch_id)
                    self.log.info("Requested cancellation of batch %s%s.", batch_id, why)
                    return True
                except anthropic.APIError as exc:
                    # The API refuses to cancel a batch that has just ended: nothing runs on then.
                    if isinstance(exc, anthropic.APIStatusError) and exc.status_code in (400, 409):
                        if await self._has_ended(client, batch_id):
                            self.log.info("Batch %s ended before it could be cancelled.", batch_id)
                            return True
                    self.log.warning(
                        "Could not cancel batch %s%s: %s. It runs on (and is billed) until it ends or "
                        "expires; cancel it in the Claude Console. Retrying at the next poll round.",
                        batch_id,
                        why,
                        exc,
                    )
                    return False

        done = await asyncio.gather(*(one(batch_id) for batch_id in batch_ids))
        return [batch_id for batch_id, ok in zip(batch_ids, done, strict=True) if not ok]

    @staticmethod
    async def _has_ended(client: anthropic.AsyncAnthropic, batch_id: str) -> bool:
        try:
            return (await client.messages.batches.retrieve(batch_id)).processing_status == "ended"
        except anthropic.APIError:
            return False

    async def on_kill(self) -> None:
        """Cancel the batches when the deferred task is killed (Airflow 3.3 calls this)."""
        await asyncio.shield(self._cancel(self.batch_ids))
