"""ClaudeBatchTrigger: wait for batches in the triggerer, holding no worker slot.

Small and serialisable (a handful of primitives); all the polling is done by the process-wide
:class:`~claude_batch.poller.BatchPoller`, so a thousand of these cost one ``list`` call per
round, not a thousand ``retrieve`` calls. After a triggerer restart the trigger is rebuilt from
its kwargs and simply subscribes again: every fact it needs is on the API side.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import anthropic
from airflow.triggers.base import BaseTrigger, TriggerEvent

from claude_batch.hooks import explain_api_error, is_transient, shared_async_client
from claude_batch.poller import BatchSnapshot, shared_poller

DEFAULT_MIN_POLL_INTERVAL = 30.0
DEFAULT_MAX_POLL_INTERVAL = 600.0
DEFAULT_MAX_CONSECUTIVE_ERRORS = 10
# Progress is logged when something changed, and at least this often while nothing does.
PROGRESS_LOG_EVERY = 300.0


class ClaudeBatchTrigger(BaseTrigger):
    """Fires once every batch has ended, timed out, or could not be polled.

    :param batch_ids: the batches to wait for.
    :param conn_id: the ``anthropic`` connection.
    :param timeout: seconds after each batch's creation before the wait gives up and cancels
        what has not ended (``None``: wait until the API ends it, at most 24 hours).
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
    ) -> None:
        super().__init__()
        self.batch_ids = list(batch_ids)
        self.conn_id = conn_id
        self.timeout = timeout
        self.min_poll_interval = min_poll_interval
        self.max_poll_interval = max(max_poll_interval, min_poll_interval)
        self.max_consecutive_errors = max_consecutive_errors

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
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        poller = shared_poller(self.conn_id)
        ended: dict[str, BatchSnapshot] = {}
        latest: dict[str, BatchSnapshot] = {}
        failures = 0
        last_logged: tuple[float, object] = (float("-inf"), None)
        with poller.subscribe(self.batch_ids, self.min_poll_interval, self.max_poll_interval) as subscription:
            while True:
                found = await subscription.next_round()
                if found.missing:
                    yield self._error(f"Batch(es) {sorted(found.missing)} not found: deleted, or in another workspace.")
                    return
                if found.error is not None:
                    failures += 1
                    fatal = not is_transient(found.error)
                    if fatal or failures >= self.max_consecutive_errors:
                        reason = explain_api_error(found.error, self.conn_id, "polling batches")
                        yield self._error(f"Gave up after {failures} failed poll round(s): {reason}")
                        return
                    self.log.warning("Polling failed (%s); round %d of %d tolerated.", found.error, failures, self.max_consecutive_errors)
                    continue
                failures = 0
                latest.update(found.snapshots)
                newly_ended = {key for key, snap in found.snapshots.items() if snap.ended}
                ended.update({key: found.snapshots[key] for key in newly_ended})
                subscription.forget(newly_ended)
                last_logged = self._log_progress(latest, last_logged)
                if len(ended) == len(self.batch_ids):
                    yield TriggerEvent(
                        {"status": "success", "batches": [ended[key].to_dict() for key in self.batch_ids]}
                    )
                    return
                overdue = self._overdue(latest, ended)
                if overdue:
                    not_canceled = await self._cancel(overdue)
                    outcome = (
                        f"cancelling {not_canceled} failed: cancel them in the Claude Console, or they run on "
                        "(and are billed) until they end or expire."
                        if not_canceled
                        else "cancellation was requested."
                    )
                    yield TriggerEvent(
                        {
                            "status": "timeout",
                            "message": (
                                f"Batch(es) {overdue} did not end within {self.timeout:.0f} s of submission; {outcome}"
                            ),
                            "batches": [snap.to_dict() for snap in latest.values()],
                        }
                    )
                    return

    def _overdue(self, latest: dict[str, BatchSnapshot], ended: dict[str, BatchSnapshot]) -> list[str]:
        if self.timeout is None:
            return []
        now = time.time()
        return [
            key
            for key, snap in latest.items()
            if key not in ended and datetime.fromisoformat(snap.created_at).timestamp() + self.timeout < now
        ]

    def _log_progress(
        self, latest: dict[str, BatchSnapshot], last_logged: tuple[float, object]
    ) -> tuple[float, object]:
        """Log status, counts, age and time to expiry when they changed or every few minutes."""
        snaps = list(latest.values())
        state = tuple((s.processing_status, s.succeeded, s.errored, s.canceled, s.expired) for s in snaps)
        now_mono = time.monotonic()
        if state == last_logged[1] and now_mono - last_logged[0] < PROGRESS_LOG_EVERY:
            return last_logged
        now = datetime.now(UTC)
        if len(snaps) <= 5:
            for snap in snaps:
                self.log.info("%s", snap.progress_line(now))
        else:
            done = sum(snap.ended for snap in snaps)
            totals = {
                k: sum(getattr(s, k) for s in snaps) for k in ("processing", "succeeded", "errored", "canceled", "expired")
            }
            oldest = min(snaps, key=lambda snap: snap.created_at)
            self.log.info(
                "%d of %d batches ended; requests %s; oldest: %s",
                done,
                len(self.batch_ids),
                totals,
                oldest.progress_line(now),
            )
        return now_mono, state

    def _error(self, message: str) -> TriggerEvent:
        return TriggerEvent({"status": "error", "message": message, "batch_ids": self.batch_ids})

    async def _cancel(self, batch_ids: list[str]) -> list[str]:
        """Ask the API to cancel each batch (the SDK retries transient errors); the ids it refused."""
        client = await shared_async_client(self.conn_id)
        refused = []
        for batch_id in batch_ids:
            try:
                await client.messages.batches.cancel(batch_id)
                self.log.info("Requested cancellation of batch %s.", batch_id)
            except anthropic.APIError as exc:
                # The API refuses to cancel a batch that has just ended: nothing runs on then.
                if isinstance(exc, anthropic.APIStatusError) and exc.status_code in (400, 409):
                    if await self._has_ended(client, batch_id):
                        self.log.info("Batch %s ended before it could be cancelled.", batch_id)
                        continue
                self.log.warning("Could not cancel batch %s: %s", batch_id, exc)
                refused.append(batch_id)
        return refused

    @staticmethod
    async def _has_ended(client: anthropic.AsyncAnthropic, batch_id: str) -> bool:
        try:
            return (await client.messages.batches.retrieve(batch_id)).processing_status == "ended"
        except anthropic.APIError:
            return False

    async def on_kill(self) -> None:
        """Cancel the batches when the deferred task is killed (Airflow 3.3 calls this)."""
        await asyncio.shield(self._cancel(self.batch_ids))
