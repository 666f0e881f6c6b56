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
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import anthropic
from airflow.triggers.base import BaseTrigger, TriggerEvent

from claude_batch.hooks import explain_api_error, is_transient, shared_async_client
from claude_batch.poller import BatchSnapshot, PollRound, Subscription, _human, shared_poller

DEFAULT_MIN_POLL_INTERVAL = 30.0
DEFAULT_MAX_POLL_INTERVAL = 600.0
DEFAULT_MAX_CONSECUTIVE_ERRORS = 10
# The production rule: a batch that has not completed 23 hours after submission is canceled, what
# it has is collected and its other requests are requeued (an hour before the API's 24 h expiry).
DEFAULT_BATCH_TIMEOUT = 23 * 3600.0
# What a timeout does to the wait, once every batch has ended: fail the task, or count the
# canceled batches as ended so that ``collect`` keeps their successes and requeues the rest.
ON_TIMEOUT_FAIL = "fail"
ON_TIMEOUT_CANCEL_AND_COLLECT = "cancel_and_collect"
ON_TIMEOUT_CHOICES = (ON_TIMEOUT_FAIL, ON_TIMEOUT_CANCEL_AND_COLLECT)
# A cancel the API dates up to this long before a batch's deadline still counts as the timeout's
# (our clock and the API's may differ a little; after a restart the API's date is all there is).
CANCEL_CLOCK_SLACK = 300.0
# Cancel calls in flight at once when many batches reach their deadline together.
CANCEL_CONCURRENCY = 8


def check_on_timeout(on_timeout: str) -> str:
    if on_timeout not in ON_TIMEOUT_CHOICES:
        raise ValueError(f"on_timeout must be one of {ON_TIMEOUT_CHOICES}, not {on_timeout!r}")
    return on_timeout


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat()


def batch_deadline(snap: BatchSnapshot, timeout: float | None) -> float | None:
    """The batch's own deadline (epoch seconds): its ``created_at`` plus ``timeout``."""
    return None if timeout is None else _epoch(snap.created_at) + timeout


def overdue_batches(
    snapshots: Iterable[BatchSnapshot], timeout: float | None, now: float, skip: Iterable[str] = ()
) -> list[str]:
    """Batches still ``in_progress`` and uncanceled past their own deadline (``skip``: already asked)."""
    if timeout is None:
        return []
    skip = set(skip)
    return [
        snap.id
        for snap in snapshots
        if snap.processing_status == "in_progress"
        and snap.cancel_initiated_at is None
        and snap.id not in skip
        and batch_deadline(snap, timeout) <= now
    ]


def canceled_for_timeout(snap: BatchSnapshot, timeout: float | None) -> bool:
    """Whether the batch was canceled at (or after) its deadline, i.e. by the timeout."""
    if timeout is None or snap.cancel_initiated_at is None:
        return False
    return _epoch(snap.cancel_initiated_at) >= batch_deadline(snap, timeout) - CANCEL_CLOCK_SLACK


def completion_event(
    snapshots: list[BatchSnapshot], timeout: float | None, on_timeout: str, cancel_failed: Iterable[str] = ()
) -> dict[str, Any]:
    """The event once every batch has ended: ``success``, or ``timeout`` when the policy is ``fail``.

    ``timed_out`` lists the batches canceled for their deadline with their counts;
    ``cancel_failed`` the batches past their deadline whose cancel the API refused (they ran on,
    and were billed, until they ended or expired).
    """
    timed_out = [
        {
            "id": snap.id,
            "created_at": snap.created_at,
            "deadline": _iso(batch_deadline(snap, timeout)),
            "cancel_initiated_at": snap.cancel_initiated_at,
            "ended_at": snap.ended_at,
            **{key: getattr(snap, key) for key in ("succeeded", "errored", "canceled", "expired")},
        }
        for snap in snapshots
        if canceled_for_timeout(snap, timeout)
    ]
    refused = sorted(
        set(cancel_failed) - {snap.id for snap in snapshots if snap.cancel_initiated_at is not None}
    )
    payload: dict[str, Any] = {
        "status": "success",
        "batches": [snap.to_dict() for snap in snapshots],
        "timeout": timeout,
        "on_timeout": on_timeout,
        "timed_out": timed_out,
        "cancel_failed": refused,
    }
    if timed_out or refused:
        parts = []
        if timed_out:
            totals = {
                key: sum(item[key] for item in timed_out) for key in ("succeeded", "errored", "canceled")
            }
            parts.append(
                f"Batch(es) {_some([item['id'] for item in timed_out])} did not end within {timeout:.0f} s of "
                f"submission; cancellation was requested at each one's deadline and they have ended "
                f"(their requests: {totals})."
            )
        if refused:
            parts.append(
                f"Past the {timeout:.0f} s deadline, cancelling {_some(refused)} failed: they ran on (and were "
                "billed) until they ended or expired. Check that the connection's key may cancel batches."
            )
        payload["message"] = " ".join(parts)
        if on_timeout == ON_TIMEOUT_FAIL:
            payload["status"] = "timeout"
    return payload


def _some(ids: list[str], shown: int = 10) -> str:
    """The ids as a list, the first ``shown`` of them when there are many."""
    return str(ids) if len(ids) <= shown else f"{ids[:shown]} and {len(ids) - shown:,} more"


def progress_summary(snapshots: list[BatchSnapshot], timeout: float | None, now: datetime) -> str:
    """One line for the whole wait: statuses, request counts, oldest age, the nearest deadline."""
    if len(snapshots) == 1:
        head = f"batch {snapshots[0].id}: {snapshots[0].processing_status}"
    else:
        statuses = Counter(snap.processing_status for snap in snapshots)
        head = f"{len(snapshots)} batches: " + ", ".join(
            f"{statuses[status]} {status}"
            for status in ("in_progress", "canceling", "ended")
            if statuses[status]
        )
    counts = " ".join(
        f"{key}={sum(getattr(snap, key) for snap in snapshots):,}"
        for key in ("processing", "succeeded", "errored", "canceled", "expired")
    )
    oldest = min(snapshots, key=lambda snap: snap.created_at)
    line = f"{head}; requests {counts}; {'age' if len(snapshots) == 1 else 'oldest age'} {_age(oldest, now)}"
    waiting = [s for s in snapshots if s.processing_status == "in_progress" and s.cancel_initiated_at is None]
    if timeout is not None and waiting:
        nearest = min(waiting, key=lambda snap: snap.created_at)
        left = batch_deadline(nearest, timeout) - now.timestamp()
        line += f"; next deadline {'in ' + _human(timedelta(seconds=left)) if left > 0 else 'passed'}"
        if len(snapshots) > 1:
            line += f" ({nearest.id}, age {_age(nearest, now)})"
    pending = [snap for snap in snapshots if not snap.ended]
    if pending:
        soonest = min(pending, key=lambda snap: snap.expires_at)
        line += f"; expires in {_human(datetime.fromisoformat(soonest.expires_at) - now)}"
    timed_out = sum(canceled_for_timeout(snap, timeout) for snap in snapshots)
    if timed_out:
        line += f"; canceled for timeout: {timed_out}"
    return line


def _age(snap: BatchSnapshot, now: datetime) -> str:
    return _human(now - datetime.fromisoformat(snap.created_at))


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
                        self.log.info("Poll round %d: %s; every batch has ended.", rounds,
                                      progress_summary(snapshots, self.timeout, datetime.now(UTC)))  # fmt: skip
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
                        _human(timedelta(seconds=subscription.interval)),
                    )

    async def _next_round(
        self, subscription: Subscription, latest: dict[str, BatchSnapshot], skip: set[str]
    ) -> PollRound | None:
        """The next poll round, or ``None`` when a batch's deadline falls before it arrives."""
        deadlines = [
            batch_deadline(snap, self.timeout)
            for snap in latest.values()
            if snap.id not in skip
            and snap.processing_status == "in_progress"
            and snap.cancel_initiated_at is None
        ]
        try:
            if self.timeout is None or not deadlines:
                found = await subscription.next_round()
            else:
                wake_in = max(min(deadlines) - time.time(), 0) + 0.001
                found = await asyncio.wait_for(subscription.next_round(), wake_in)
        except TimeoutError:
            return None
        # Rounds queue up while this trigger waits on a cancel call: act on the newest only.
        return subscription.newest(found)

    def _error(self, message: str) -> TriggerEvent:
        return TriggerEvent({"status": "error", "message": message, "batch_ids": self.batch_ids})

    async def _cancel(
        self, batch_ids: list[str], deadline_of: dict[str, BatchSnapshot] | None = None
    ) -> list[str]:
        """Ask the API to cancel each batch (the SDK retries transient errors); the ids it refused."""
        client = await shared_async_client(self.conn_id)
        limit = asyncio.Semaphore(CANCEL_CONCURRENCY)

        async def one(batch_id: str) -> bool:
            snap = (deadline_of or {}).get(batch_id)
            why = (
                f" (created {snap.created_at}, deadline {_iso(batch_deadline(snap, self.timeout))})"
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
                        "Could not cancel batch %s%s: %s. It runs on (and is billed) until it ends or expires; "
                        "cancel it in the Claude Console. Retrying at the next poll round.",
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
