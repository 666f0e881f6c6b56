"""ClaudeBatchSensor: wait for one batch or many, deferrable by default or in poke mode.

Also the Airflow shell of the waiting policy (:mod:`claude_batch.waiting`), shared with the
operator: :func:`apply_completion_policy` and :func:`handle_trigger_event` raise the policy's
plain exceptions as :class:`ClaudeBatchFailed` (the task fails) and ``AirflowSkipException``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any

from airflow.sdk import BaseSensorOperator, Context
from airflow.sdk.exceptions import AirflowException, AirflowSkipException
from anthropic.types.messages import MessageBatch

from claude_batch.hooks import ClaudeBatchHook
from claude_batch.paging import iter_list_pages
from claude_batch.snapshots import BatchSnapshot, human_duration
from claude_batch.triggers import ClaudeBatchTrigger
from claude_batch.waiting import (
    DEFAULT_BATCH_TIMEOUT,
    DEFAULT_MAX_POLL_INTERVAL,
    DEFAULT_MIN_POLL_INTERVAL,
    ON_TIMEOUT_CANCEL_AND_COLLECT,
    ON_TIMEOUT_FAIL,
    AllRequestsCanceled,
    BatchWaitFailed,
    Logger,
    check_on_timeout,
    completion_event,
    judge_completion,
    judge_trigger_event,
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

# With this few batches, one retrieve each costs less than a list page.
RETRIEVE_EACH_UP_TO = 2
# List pages read before the batches not seen on them are retrieved one by one.
POKE_MAX_LIST_PAGES = 5


class ClaudeBatchFailed(AirflowException):
    """The batches ended in a way the task's policy does not accept."""


@contextmanager
def airflow_outcomes() -> Iterator[None]:
    """The waiting policy's plain exceptions as the task outcomes Airflow knows."""
    try:
        yield
    except AllRequestsCanceled as exc:
        raise AirflowSkipException(str(exc)) from exc
    except BatchWaitFailed as exc:
        raise ClaudeBatchFailed(str(exc)) from exc


def apply_completion_policy(
    snapshots: list[BatchSnapshot], fail_on_partial: bool, log: Logger, skip_if_all_canceled: bool = True
) -> dict[str, Any]:
    """:func:`claude_batch.waiting.judge_completion`, failing or skipping the task as Airflow does."""
    with airflow_outcomes():
        return judge_completion(snapshots, fail_on_partial, log, skip_if_all_canceled)


def handle_trigger_event(
    event: dict[str, Any] | None, fail_on_partial: bool, log: Logger, skip_if_all_canceled: bool = True
) -> dict[str, Any]:
    """:func:`claude_batch.waiting.judge_trigger_event`, failing or skipping the task as Airflow does.

    An event with an unknown status fails the task, naming the status.
    """
    with airflow_outcomes():
        return judge_trigger_event(event, fail_on_partial, log, skip_if_all_canceled)


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
        every_batch_ended = all(snap.ended for snap in snapshots)
        if every_batch_ended:
            self.log.info("%s; every batch has ended.", line)
        else:
            self.log.info(
                "%s; next check in %s.", line, human_duration(timedelta(seconds=self.poke_interval))
            )
        if every_batch_ended:
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

    def _find(self, batch_ids: list[str]) -> list[MessageBatch]:
        """The batches, learned from ``list`` pages where possible (few ids: one retrieve each)."""
        if len(batch_ids) <= RETRIEVE_EACH_UP_TO:
            return [self.hook.retrieve_batch(batch_id) for batch_id in batch_ids]
        wanted = set(batch_ids)
        found: dict[str, MessageBatch] = {}
        for page in iter_list_pages(self.hook.list_page, POKE_MAX_LIST_PAGES):
            found.update({batch.id: batch for batch in page.data if batch.id in wanted})
            if len(found) == len(wanted):
                break
        for batch_id in wanted - found.keys():
            found[batch_id] = self.hook.retrieve_batch(batch_id)
        return [found[batch_id] for batch_id in batch_ids]

    def on_kill(self) -> None:
        for batch_id in self._ids():
            try:
                self.hook.cancel_batch(batch_id)
            except Exception as exc:
                self.log.warning("Could not cancel batch %s: %s", batch_id, exc)
