"""ClaudeBatchOperator: submit one staged shard (or a small list) as one batch, exactly once."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any

from airflow.sdk import BaseOperator, BaseOperatorLink, Context

from claude_batch.hooks import ClaudeBatchHook
from claude_batch.poller import BatchSnapshot
from claude_batch.sensors import apply_completion_policy, handle_trigger_event
from claude_batch.storage import ObjectStore, safe_segment
from claude_batch.submission import BatchSubmitter, InlineRequests, RequestSource, StoredShard
from claude_batch.triggers import DEFAULT_MAX_POLL_INTERVAL, DEFAULT_MIN_POLL_INTERVAL, ClaudeBatchTrigger

CONSOLE_BATCH_URL = os.environ.get(
    "CLAUDE_BATCH_CONSOLE_URL", "https://platform.claude.com/workspaces/default/batches/{batch_id}"
)
WAIT_MODES = ("defer", "poll", "none")


class ClaudeConsoleBatchLink(BaseOperatorLink):
    """Opens the submitted batch in the Claude Console (URL stored at execution time)."""

    name = "Claude Console"

    def get_link(self, operator: BaseOperator, *, ti_key) -> str:
        from airflow.sdk.execution_time.xcom import XCom

        return XCom.get_value(key=self.xcom_key, ti_key=ti_key) or ""


def default_storage_root() -> str | None:
    return os.environ.get("CLAUDE_BATCH_STORAGE_ROOT")


class ClaudeBatchOperator(BaseOperator):
    """Submit one batch from a staged JSONL shard or a list of requests, never paying twice.

    Before any paid call the input is checked as the API would (count, size, custom_ids),
    naming the offending line. The batch id goes to XCom (key ``batch_id``) at once. Submission
    state lives in ``<storage_root>/<dag_id>/<run_id>/state/``, keyed by task and map index,
    so a retry, a cleared task or a re-run re-attaches to its batch.

    :param shard: the shard's path under ``storage_root`` (``requests/part-NNNNN.jsonl`` of the
        run layout, or any relative path). Templated.
    :param requests: for small jobs, the requests themselves (``{"custom_id", "params"}``).
    :param storage_root: ``s3://bucket/prefix`` or a local directory for shards and state.
        Defaults to the ``CLAUDE_BATCH_STORAGE_ROOT`` environment variable. Templated.
    :param conn_id: the ``anthropic`` connection.
    :param aws_conn_id: the ``aws`` connection for an ``s3://`` root.
    :param wait: ``defer`` (wait in the triggerer), ``poll`` (wait in this worker) or ``none``
        (return the batch id at once, e.g. for a separate ClaudeBatchSensor).
    :param batch_timeout: seconds from submission before the wait gives up and cancels.
    :param min_poll_interval: the first polling interval; backs off to ``max_poll_interval``.
    :param max_poll_interval: the ceiling of the polling interval.
    :param fail_on_partial: fail when any request errored, expired or was canceled.
    """

    template_fields: Sequence[str] = ("shard", "storage_root", "conn_id")
    operator_extra_links = (ClaudeConsoleBatchLink(),)
    ui_color = "#d4a27f"

    def __init__(
        self,
        *,
        shard: str | None = None,
        requests: list[dict[str, Any]] | None = None,
        storage_root: str | None = None,
        conn_id: str = "anthropic_default",
        aws_conn_id: str | None = "aws_default",
        wait: str = "defer",
        batch_timeout: float | None = None,
        min_poll_interval: float = DEFAULT_MIN_POLL_INTERVAL,
        max_poll_interval: float = DEFAULT_MAX_POLL_INTERVAL,
        fail_on_partial: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if (shard is None) == (requests is None):
            raise ValueError("Give exactly one of `shard` and `requests`.")
        if wait not in WAIT_MODES:
            raise ValueError(f"wait must be one of {WAIT_MODES}, not {wait!r}")
        self.shard = shard
        self.requests = requests
        self.storage_root = storage_root
        self.conn_id = conn_id
        self.aws_conn_id = aws_conn_id
        self.wait = wait
        self.batch_timeout = batch_timeout
        self.min_poll_interval = min_poll_interval
        self.max_poll_interval = max_poll_interval
        self.fail_on_partial = fail_on_partial
        self.batch_id: str | None = None

    @cached_property
    def hook(self) -> ClaudeBatchHook:
        return ClaudeBatchHook(conn_id=self.conn_id)

    def _store(self) -> ObjectStore:
        root = self.storage_root or default_storage_root()
        if not root:
            raise ValueError(
                "No storage_root: give one, or set CLAUDE_BATCH_STORAGE_ROOT. Submission state must be "
                "kept so that a retry never pays twice."
            )
        return ObjectStore.from_airflow(root, self.aws_conn_id)

    def _state_relpath(self, context: Context) -> str:
        ti = context["ti"]
        map_index = max(getattr(ti, "map_index", -1), 0)
        run = f"{safe_segment(ti.dag_id)}/{safe_segment(context['run_id'])}"
        return f"{run}/state/{safe_segment(ti.task_id)}.part-{map_index:05d}.json"

    def execute(self, context: Context) -> Any:
        store = self._store()
        source: RequestSource = (
            StoredShard(store, self.shard) if self.shard is not None else InlineRequests(self.requests or [])
        )
        submitter = BatchSubmitter(self.hook, store, self._state_relpath(context))
        result = submitter.submit(source, log=self.log.info)
        self.batch_id = result.batch_id
        context["ti"].xcom_push(key="batch_id", value=result.batch_id)
        context["ti"].xcom_push(
            key=ClaudeConsoleBatchLink().xcom_key, value=CONSOLE_BATCH_URL.format(batch_id=result.batch_id)
        )
        if self.wait == "none":
            return result.batch_id
        if self.wait == "defer":
            self.defer(
                trigger=ClaudeBatchTrigger(
                    batch_ids=[result.batch_id],
                    conn_id=self.conn_id,
                    timeout=self.batch_timeout,
                    min_poll_interval=self.min_poll_interval,
                    max_poll_interval=self.max_poll_interval,
                ),
                method_name="execute_complete",
                timeout=timedelta(seconds=self.batch_timeout + 3600) if self.batch_timeout else None,
            )
        return self._wait_in_place(result.batch_id)

    def _wait_in_place(self, batch_id: str) -> dict[str, Any]:
        interval = self.min_poll_interval
        while True:
            snapshot = BatchSnapshot.from_batch(self.hook.retrieve_batch(batch_id))
            self.log.info("%s", snapshot.progress_line(_utcnow()))
            if snapshot.ended:
                return apply_completion_policy([snapshot], self.fail_on_partial, self.log)
            if self.batch_timeout is not None and _age_seconds(snapshot.created_at) > self.batch_timeout:
                self.hook.cancel_batch(batch_id)
                raise TimeoutError(f"Batch {batch_id} did not end within {self.batch_timeout:.0f} s; cancelled.")
            time.sleep(interval)
            interval = min(interval * 1.5, self.max_poll_interval)

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> dict[str, Any]:
        return handle_trigger_event(event, self.fail_on_partial, self.log)

    def on_kill(self) -> None:
        if self.batch_id:
            self.log.info("Task killed: cancelling batch %s.", self.batch_id)
            try:
                self.hook.cancel_batch(self.batch_id)
            except Exception as exc:
                self.log.warning("Could not cancel batch %s: %s", self.batch_id, exc)



def _utcnow() -> datetime:
    return datetime.now(UTC)


def _age_seconds(created_iso: str) -> float:
    return (_utcnow() - datetime.fromisoformat(created_iso)).total_seconds()
