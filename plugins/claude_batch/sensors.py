"""ClaudeBatchSensor: wait for one batch or many, deferrable by default or in poke mode."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any

from airflow.sdk import BaseSensorOperator, Context
from airflow.sdk.exceptions import AirflowException, AirflowSkipException

from claude_batch.hooks import ClaudeBatchHook
from claude_batch.poller import BatchSnapshot, _human
from claude_batch.triggers import (
    DEFAULT_BATCH_TIMEOUT,
    DEFAULT_MAX_POLL_INTERVAL,
    DEFAULT_MIN_POLL_INTERVAL,
    ON_TIMEOUT_CANCEL_AND_COLLECT,
    ON_TIMEOUT_FAIL,
    ClaudeBatchTrigger,
    check_on_timeout,
    completion_event,
    overdue_batches,
    progress_summary,
)

__all__ = [
    "DEFAULT_BATCH_TIMEOUT",
    "ON_TIMEOUT_CANCEL_AND_COLLECT",
    "ON_TIMEOUT_FAIL",
    "ClaudeBatchFailed",
    "ClaudeBatchSensor",
    "apply_completion_policy",
    "handle_trigger_event",
]


class ClaudeBatchFailed(AirflowException):
    """The batches ended in a way the task's policy does not accept."""


def apply_completion_policy(
    snapshots: list[BatchSnapshot], fail_on_partial: bool, log: Any, skip_if_all_canceled: bool = True
) -> dict[str, Any]:
    """Judge ended batches and return a summary for XCom.

    Every batch canceled before anything ran: the task is skipped. Some requests errored,
    expired or were canceled: the task succeeds and says so (the ledger retries them), or fails
    when ``fail_on_partial`` is set. Canceled and expired are reported by name, never as success.

    :param snapshots: the batches as they ended.
    :param fail_on_partial: fail instead of reporting partial failures.
    :param log: the task's logger.
    :param skip_if_all_canceled: skip when nothing ran; a pipeline that must still collect the
        canceled results (so the ledger retries them) turns this off.
    """
    summary = {
        "batch_ids": [snap.id for snap in snapshots],
        "outcomes": {snap.id: snap.outcome for snap in snapshots},
        "request_counts": {
            key: sum(getattr(snap, key) for snap in snapshots)
            for key in ("succeeded", "errored", "canceled", "expired")
        },
    }
    counts = summary["request_counts"]
    total = sum(counts.values())
    if total and counts["canceled"] == total and skip_if_all_canceled:
        raise AirflowSkipException(
            f"Every request was canceled ({total:,}) in batches {summary['batch_ids']}."
        )
    failed = total - counts["succeeded"]
    if failed:
        by_batch = {snap.id: snap.outcome for snap in snapshots if snap.outcome != "succeeded"}
        message = (
            f"{failed:,} of {total:,} requests did not succeed (errored={counts['errored']:,}, "
            f"expired={counts['expired']:,}, canceled={counts['canceled']:,}); batches: {by_batch}"
        )
        if fail_on_partial:
            raise ClaudeBatchFailed(message)
        log.warning("%s. They go back to the ledger for retry; the successful results are kept.", message)
    else:
        log.info("All %s requests succeeded in %d batch(es).", f"{total:,}", len(snapshots))
    return summary


def handle_trigger_event(
    event: dict[str, Any] | None, fail_on_partial: bool, log: Any, skip_if_all_canceled: bool = True
) -> dict[str, Any]:
    """Turn a :class:`ClaudeBatchTrigger` event into a summary or a clear failure.

    A ``success`` event may name batches canceled for their deadline (``timed_out``, under
    ``on_timeout="cancel_and_collect"``): they count as ended, the summary lists them with their
    counts under ``timed_out``, and the task is never skipped for them (their canceled requests
    must reach the ledger as retries). ``cancel_failed`` names batches whose cancel was refused.
    """
    if not event or "status" not in event:
        raise ClaudeBatchFailed(f"Unexpected trigger event: {event!r}")
    if event["status"] == "error":
        raise ClaudeBatchFailed(event["message"])
    if event["status"] == "timeout":
        raise ClaudeBatchFailed(event["message"])
    snapshots = [BatchSnapshot.from_dict(item) for item in event["batches"]]
    timed_out = {item["id"]: item for item in event.get("timed_out") or []}
    cancel_failed = list(event.get("cancel_failed") or [])
    if timed_out or cancel_failed:
        log.warning(
            "%s", event.get("message") or f"Timed out: {sorted(timed_out)}; not canceled: {cancel_failed}"
        )
    summary = apply_completion_policy(snapshots, fail_on_partial, log, skip_if_all_canceled and not timed_out)
    summary["timed_out"] = timed_out
    summary["cancel_failed"] = cancel_failed
    return summary


class ClaudeBatchSensor(BaseSensorOperator):
    """Wait until Claude message batches have ended.

    :param batch_ids: one batch id or a list (e.g. the ids a mapped submit returned). Templated.
    :param conn_id: the ``anthropic`` connection.
    :param deferrable: wait in the triggerer (default) instead of poking from a worker.
    :param batch_timeout: seconds from each batch's own submission (``created_at``) before it is
        cancelled (``None``: wait for the API, which expires batches at 24 hours; the pipeline uses
        :data:`DEFAULT_BATCH_TIMEOUT`, 23 hours). The wait goes on until every batch has ended.
    :param on_timeout: ``"fail"`` (default): a batch cancelled for its deadline fails the task once
        every batch has ended. ``"cancel_and_collect"``: it counts as ended; the task succeeds and
        its summary lists it under ``timed_out`` with its counts, so that collect keeps its
        successes and the ledger retries its canceled requests.
    :param min_poll_interval: the first polling interval (deferrable mode); backs off from here.
    :param max_poll_interval: the ceiling of the polling interval.
    :param fail_on_partial: fail when any request errored, expired or was canceled.
    :param skip_if_all_canceled: skip when every request was canceled (default); off, the task
        succeeds so that downstream tasks can record the canceled requests.
    """

    template_fields: Sequence[str] = ("batch_ids", "conn_id")

    def __init__(
        self,
        *,
        batch_ids: str | list[str],
        conn_id: str = "anthropic_default",
        deferrable: bool = True,
        batch_timeout: float | None = None,
        min_poll_interval: float = DEFAULT_MIN_POLL_INTERVAL,
        max_poll_interval: float = DEFAULT_MAX_POLL_INTERVAL,
        fail_on_partial: bool = False,
        skip_if_all_canceled: bool = True,
        on_timeout: str = ON_TIMEOUT_FAIL,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("poke_interval", min_poll_interval)
        super().__init__(**kwargs)
        self.batch_ids = batch_ids
        self.conn_id = conn_id
        self.deferrable = deferrable
        self.batch_timeout = batch_timeout
        self.min_poll_interval = min_poll_interval
        self.max_poll_interval = max_poll_interval
        self.fail_on_partial = fail_on_partial
        self.skip_if_all_canceled = skip_if_all_canceled
        self.on_timeout = check_on_timeout(on_timeout)
        self._cancel_failed: set[str] = set()

    @cached_property
    def hook(self) -> ClaudeBatchHook:
        return ClaudeBatchHook(conn_id=self.conn_id)

    def _ids(self) -> list[str]:
        ids = [self.batch_ids] if isinstance(self.batch_ids, str) else list(self.batch_ids or [])
        if not ids:
            raise ClaudeBatchFailed("No batch ids to wait for.")
        return ids

    def execute(self, context: Context) -> Any:
        if not self.deferrable:
            return super().execute(context)
        self.defer(
            trigger=ClaudeBatchTrigger(
                batch_ids=self._ids(),
                conn_id=self.conn_id,
                timeout=self.batch_timeout,
                min_poll_interval=self.min_poll_interval,
                max_poll_interval=self.max_poll_interval,
                on_timeout=self.on_timeout,
            ),
            method_name="execute_complete",
        )

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        return handle_trigger_event(event, self.fail_on_partial, self.log, self.skip_if_all_canceled)

    def poke(self, context: Context) -> Any:
        snapshots = [BatchSnapshot.from_batch(batch) for batch in self._find(self._ids())]
        now = datetime.now(UTC)
        line = progress_summary(snapshots, self.batch_timeout, now)
        if all(snap.ended for snap in snapshots):
            self.log.info("%s; every batch has ended.", line)
        else:
            self.log.info("%s; next check in %s.", line, _human(timedelta(seconds=self.poke_interval)))
        if all(snap.ended for snap in snapshots):
            from airflow.sdk import PokeReturnValue

            event = completion_event(snapshots, self.batch_timeout, self.on_timeout, self._cancel_failed)
            summary = handle_trigger_event(event, self.fail_on_partial, self.log, self.skip_if_all_canceled)
            return PokeReturnValue(is_done=True, xcom_value=summary)
        # Each batch past its own deadline is cancelled once (the API then shows cancel_initiated_at);
        # the sensor pokes on until every batch has ended.
        for batch_id in overdue_batches(snapshots, self.batch_timeout, now.timestamp()):
            try:
                self.hook.cancel_batch(batch_id)
                self.log.info(
                    "Batch %s passed its %.0f s deadline; requested cancellation.",
                    batch_id,
                    self.batch_timeout,
                )
                self._cancel_failed.discard(batch_id)
            except Exception as exc:
                self.log.warning(
                    "Could not cancel batch %s past its deadline: %s. Retrying at the next poke.",
                    batch_id,
                    exc,
                )
                self._cancel_failed.add(batch_id)
        return False

    def _find(self, batch_ids: list[str]):
        """The batches, learned from ``list`` pages where possible (few ids: one retrieve each)."""
        if len(batch_ids) <= 2:
            return [self.hook.retrieve_batch(batch_id) for batch_id in batch_ids]
        wanted = set(batch_ids)
        found = {}
        after_id = None
        for _ in range(5):
            page = self.hook.list_page(after_id)
            found.update({batch.id: batch for batch in page.data if batch.id in wanted})
            if len(found) == len(wanted) or not page.has_more or not page.data:
                break
            after_id = page.data[-1].id
        for batch_id in wanted - found.keys():
            found[batch_id] = self.hook.retrieve_batch(batch_id)
        return [found[batch_id] for batch_id in batch_ids]

    def on_kill(self) -> None:
        for batch_id in self._ids():
            try:
                self.hook.cancel_batch(batch_id)
            except Exception as exc:
                self.log.warning("Could not cancel batch %s: %s", batch_id, exc)
