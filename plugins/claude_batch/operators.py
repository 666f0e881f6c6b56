"""ClaudeBatchOperator: submit one staged shard (or a small list) as one batch, exactly once."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any, cast
from urllib.parse import urlsplit

from airflow.sdk import BaseOperator, BaseOperatorLink, Context
from airflow.sdk.exceptions import AirflowFailException

from claude_batch.batch_queue import (
    DEFAULT_QUEUE_RECHECK_INTERVAL,
    DEFAULT_QUEUE_WAIT_TIMEOUT,
    DEFER_TIMEOUT_SLACK,
    QueueAwareApi,
    QueueNeverFits,
    QueueRefused,
    QueueRoomTrigger,
    QueueWait,
    effective_limit,
    human_seconds,
    parse_deadline,
)
from claude_batch.hooks import ClaudeBatchHook
from claude_batch.sensors import apply_completion_policy, handle_trigger_event
from claude_batch.snapshots import BatchSnapshot
from claude_batch.storage import ObjectStore, RunLayout, recorded_shard_sha256
from claude_batch.submission import BatchSubmitter, InlineRequests, RequestSource, StoredShard
from claude_batch.triggers import ClaudeBatchTrigger
from claude_batch.waiting import (
    DEFAULT_MAX_POLL_INTERVAL,
    DEFAULT_MIN_POLL_INTERVAL,
    DEFAULT_QUEUE_POLL_INTERVAL,
    age_seconds,
    poll_until,
)

# Where the real API's batches are shown; CLAUDE_BATCH_CONSOLE_URL (a format string with
# {batch_id}) overrides it, e.g. for another workspace or a gateway's own console.
CONSOLE_URL_ENV = "CLAUDE_BATCH_CONSOLE_URL"
CONSOLE_BATCH_URL = "https://platform.claude.com/workspaces/default/batches/{batch_id}"
REAL_API_HOSTS = frozenset({"api.anthropic.com"})
WAIT_MODES = ("defer", "poll", "none")
# The queue budget when the operator is not given one (e.g. set on the workers of a deployment).
QUEUE_BUDGET_ENV = "CLAUDE_BATCH_QUEUE_BUDGET"


class ClaudeConsoleBatchLink(BaseOperatorLink):
    """Opens the submitted batch in the Claude Console (URL stored at execution time).

    The submit task stores the URL (:func:`console_url`) as it learns the batch id, per map
    index, so each mapped submit links to its own batch. Airflow's UI shows no button when the
    URL is empty: a connection to the emulator or a gateway has no Claude Console.
    """

    name = "Claude Console"

    def get_link(self, operator: BaseOperator, *, ti_key) -> str:
        from airflow.sdk.execution_time.xcom import XCom

        return XCom.get_value(key=self.xcom_key, ti_key=ti_key) or ""


def console_url(batch_id: str, api_base_url: Any) -> str | None:
    """The batch's page in the Claude Console, or None when the connection is not the real API.

    :param api_base_url: the client's base URL (the connection's host, or the SDK's default).
    """
    explicit = os.environ.get(CONSOLE_URL_ENV, "").strip()
    if explicit:
        return explicit.format(batch_id=batch_id)
    host = urlsplit(str(api_base_url)).hostname if api_base_url else None
    if host is None or host.lower() in REAL_API_HOSTS:
        return CONSOLE_BATCH_URL.format(batch_id=batch_id)
    return None  # the emulator, a gateway: their batches are not in the Claude Console


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
    :param queue_budget: the most requests in processing (across every batch of the workspace,
        so every run and DAG of the deployment shares it) that this submit may bring the queue
        to; before creating, the queue is read from the API and the task defers while
        ``processing + this shard`` would exceed it. ``None``: the ``CLAUDE_BATCH_QUEUE_BUDGET``
        environment variable if set, else no budget (only the API's own queue-full 429 defers).
    :param queue_wait_timeout: seconds, from the first refusal, to keep waiting for queue room
        before failing (``None``: no limit but ``queue_deadline``). Default 20 hours.
    :param queue_deadline: an absolute time (datetime or ISO string; naive is UTC) after which
        the wait for queue room fails. Templated. The earlier of this and the timeout wins.
    :param queue_poll_interval: seconds between the waiting trigger's queue readings.
    :param queue_recheck_interval: the longest one deferral lasts when no room is seen (the task
        then tries to submit again itself); never shorter than the API's ``retry-after``.
    """

    template_fields: Sequence[str] = ("shard", "storage_root", "conn_id", "queue_deadline")
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
        queue_budget: int | None = None,
        queue_wait_timeout: float | None = DEFAULT_QUEUE_WAIT_TIMEOUT,
        queue_deadline: datetime | str | None = None,
        queue_poll_interval: float = DEFAULT_QUEUE_POLL_INTERVAL,
        queue_recheck_interval: float = DEFAULT_QUEUE_RECHECK_INTERVAL,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if (shard is None) == (requests is None):
            raise ValueError("Give exactly one of `shard` and `requests`.")
        if wait not in WAIT_MODES:
            raise ValueError(f"wait must be one of {WAIT_MODES}, not {wait!r}")
        if queue_budget is not None and queue_budget < 1:
            raise ValueError(
                f"queue_budget must be a positive number of requests or None, not {queue_budget!r}"
            )
        if queue_wait_timeout is not None and queue_wait_timeout < 0:
            raise ValueError("queue_wait_timeout must be >= 0 seconds or None")
        if queue_poll_interval <= 0 or queue_recheck_interval <= 0:
            raise ValueError("queue_poll_interval and queue_recheck_interval must be > 0 seconds")
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
        self.queue_budget = queue_budget
        self.queue_wait_timeout = queue_wait_timeout
        self.queue_deadline = queue_deadline
        self.queue_poll_interval = queue_poll_interval
        self.queue_recheck_interval = max(queue_recheck_interval, queue_poll_interval)
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

    def _state_relpath(self, context: Context, store: ObjectStore) -> str:
        ti = context["ti"]
        layout = RunLayout(store, ti.dag_id, context["run_id"])
        return layout.submission_state(ti.task_id, getattr(ti, "map_index", -1))

    def execute(self, context: Context) -> Any:
        return self._submit_and_wait(context, QueueWait())

    def execute_after_queue_wait(
        self, context: Context, event: dict[str, Any] | None = None, queue_wait: dict[str, Any] | None = None
    ) -> Any:
        """Resume after a wait for queue room: submit again (and wait, as ``wait`` says)."""
        event = event or {}
        wait = QueueWait.from_dict(event.get("queue_wait") or queue_wait)
        processing = event.get("processing")
        held = "unknown" if processing is None else f"{processing:,}"
        if event.get("status") == "error":
            self.log.warning(
                "The wait for queue room ended with an error (%s); submitting again, "
                "which says what is wrong.",
                event.get("message"),
            )
        else:
            self.log.info(
                "Queue wait over (%s, %s requests in processing) after %s and %d deferral(s); "
                "submitting again.",
                event.get("status", "resumed"),
                held,
                human_seconds(wait.waited_seconds()),
                wait.deferrals,
            )
        return self._submit_and_wait(context, wait)

    def _submit_and_wait(self, context: Context, wait: QueueWait) -> Any:
        store = self._store()
        relpath = self._state_relpath(context, store)
        api = QueueAwareApi(
            self.hook,
            budget=queue_budget_from_env(self.queue_budget),
            api_limit=wait.api_limit,
            log=self.log.info,
        )
        try:
            if wait.needed is not None and (store.read_json_or_none(relpath) or {}).get("phase") == "refused":
                # Resumed, and certainly nothing created yet: look before scanning the shard and
                # sending it into a full queue again. (A kept intent goes to the submitter, which
                # first asks the API whether the earlier ambiguous send created the batch.)
                refused = api.check_room(wait.needed)
                if refused is not None:
                    self._defer_for_queue(refused, wait, api, store.uri(relpath))
            # A cast: RequestSource declares ``description`` a plain attribute, which the sources'
            # read-only properties do not match for mypy (the fix belongs in submission.py).
            source = cast(
                RequestSource,
                StoredShard(store, self.shard, recorded_shard_sha256(store, self.shard))
                if self.shard is not None
                else InlineRequests(self.requests or []),
            )
            submitter = BatchSubmitter(api, store, relpath)
            try:
                result = submitter.submit(source, log=self.log.info)
            except QueueRefused as refused:
                release_refused_intent(submitter, refused.reason, self.log.warning, refused)
                self._defer_for_queue(refused, wait, api, submitter.state_uri)
            except QueueNeverFits:
                release_refused_intent(submitter, "never_fits", self.log.warning)
                raise
        except QueueNeverFits as exc:
            raise AirflowFailException(str(exc)) from exc
        if wait.deferrals:
            self.log.info(
                "Submitted after waiting %s for room in the processing queue (%d deferral(s)).",
                human_seconds(wait.waited_seconds()),
                wait.deferrals,
            )
        self.batch_id = result.batch_id
        context["ti"].xcom_push(key="batch_id", value=result.batch_id)
        link = console_url(result.batch_id, self._api_base_url())
        if link:
            context["ti"].xcom_push(key=ClaudeConsoleBatchLink().xcom_key, value=link)
        else:
            self.log.info("No Claude Console link: connection %r points at %s, not the Claude API.",
                          self.conn_id, self._api_base_url())  # fmt: skip
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

    def _defer_for_queue(
        self, refused: QueueRefused, wait: QueueWait, api: QueueAwareApi, state_uri: str
    ) -> None:
        """Defer until the queue has room (holding no worker slot), or fail past the deadline."""
        now = _utcnow()
        if wait.started_at is None:
            wait.started_at = now.isoformat()
            candidates = [parse_deadline(self.queue_deadline)]
            if self.queue_wait_timeout is not None:
                candidates.append(now + timedelta(seconds=self.queue_wait_timeout))
            known = [moment for moment in candidates if moment is not None]
            wait.deadline = min(known).isoformat() if known else None
        wait.needed = refused.needed
        wait.processing = refused.processing
        wait.reason = refused.reason
        if refused.reason == "api" and refused.limit is not None:
            wait.api_limit = refused.limit
        limit = effective_limit(api.budget, wait.api_limit)
        if limit is not None and refused.needed > limit:
            raise AirflowFailException(
                f"A batch of {refused.needed:,} requests can never fit in the processing queue "
                f"({limit:,} requests). Stage smaller shards."
            )
        deadline = parse_deadline(wait.deadline)
        if deadline is not None and now >= deadline:
            raise AirflowFailException(
                queue_timeout_message(
                    refused, wait, deadline, state_uri, self.queue_wait_timeout, self.queue_deadline
                )
            )
        wake = now + timedelta(seconds=max(refused.retry_after or 0.0, self.queue_recheck_interval))
        if deadline is not None:
            wake = min(wake, deadline)
        wait.deferrals += 1
        trigger = QueueRoomTrigger(
            conn_id=self.conn_id,
            needed=refused.needed,
            wake_at=wake.isoformat(),
            limit=limit,
            baseline=None if limit is not None else refused.processing,
            poll_interval=self.queue_poll_interval,
            queue_wait=wait.to_dict(),
        )
        self.log.info(
            "No room: %s. Nothing was created. Deferring (no worker slot held) until the queue has room, "
            "re-checking by %s; deferral %d, waiting %s so far, giving up at %s.",
            refused.describe(),
            wake.isoformat(timespec="seconds"),
            wait.deferrals,
            human_seconds(wait.waited_seconds(now)),
            deadline.isoformat(timespec="seconds") if deadline else "never",
        )
        self.defer(
            trigger=trigger,
            method_name="execute_after_queue_wait",
            kwargs={"queue_wait": wait.to_dict()},
            timeout=timedelta(seconds=(wake - now).total_seconds() + DEFER_TIMEOUT_SLACK),
        )

    def _api_base_url(self) -> Any:
        try:
            return self.hook.conn.base_url
        except Exception:  # no client (a broken connection): the submit already said why
            return None

    def _wait_in_place(self, batch_id: str) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            snapshot = BatchSnapshot.from_batch(self.hook.retrieve_batch(batch_id))
            self.log.info("%s", snapshot.progress_line(_utcnow()))
            if snapshot.ended:
                return apply_completion_policy([snapshot], self.fail_on_partial, self.log)
            if self.batch_timeout is not None and age_seconds(snapshot.created_at) > self.batch_timeout:
                self.hook.cancel_batch(batch_id)
                raise TimeoutError(
                    f"Batch {batch_id} did not end within {self.batch_timeout:.0f} s; cancelled."
                )
            return None

        return poll_until(check, self.min_poll_interval, self.max_poll_interval)

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


def queue_budget_from_env(explicit: int | None) -> int | None:
    """The queue budget: ``explicit`` if given, else ``CLAUDE_BATCH_QUEUE_BUDGET``, else none."""
    if explicit is not None:
        return explicit
    value = os.environ.get(QUEUE_BUDGET_ENV, "").strip()
    if not value:
        return None
    budget = int(value.replace("_", "").replace(",", ""))
    if budget < 1:
        raise ValueError(f"{QUEUE_BUDGET_ENV} must be a positive number of requests, not {value!r}")
    return budget


def release_refused_intent(
    submitter: BatchSubmitter,
    refused_by: str,
    warn: Callable[..., None],
    refused: QueueRefused | None = None,
) -> None:
    """After a refusal nothing was created: mark the intent so the resume sends afresh.

    Left as ``intent``, the resume would look for a batch this attempt made among those
    created since (hours of them, after a long wait). A ``refused`` state has no batch id
    and is not an intent, so the submitter writes a new intent and creates; superseded ids
    are kept. When an earlier send of this create failed ambiguously, the intent stays, and
    the resume asks the API first, as after a crash.
    """
    if refused is not None and refused.maybe_created_before:
        warn(
            "An earlier send of this create failed ambiguously; keeping the intent in %s so the "
            "resume first asks the API whether that send created the batch.",
            submitter.state_uri,
        )
        return
    data = submitter.store.read_json_or_none(submitter.state_relpath)
    if data and data.get("phase") == "intent" and not data.get("batch_id"):
        submitter.store.write_json(
            submitter.state_relpath,
            {**data, "phase": "refused", "refused_at": _utcnow().isoformat(), "refused_by": refused_by},
        )


def queue_timeout_message(
    refused: QueueRefused,
    wait: QueueWait,
    deadline: datetime,
    state_uri: str,
    queue_wait_timeout: float | None,
    queue_deadline: datetime | str | None,
) -> str:
    """Why the wait for queue room gave up, and what to change."""
    limits = []
    if queue_wait_timeout is not None:
        limits.append(f"queue_wait_timeout={queue_wait_timeout:,.0f} s")
    if queue_deadline:
        limits.append(f"queue_deadline={queue_deadline}")
    return (
        f"Gave up waiting for room in the Claude API's processing queue: {refused.describe()}, "
        f"after waiting {human_seconds(wait.waited_seconds())} since {wait.started_at} "
        f"({wait.deferrals} deferral(s); deadline {deadline.isoformat(timespec='seconds')} from "
        f"{', '.join(limits) or 'the configuration'}). Nothing was created for this shard "
        f"({state_uri}); clearing the task submits it. Raise queue_wait_timeout, lower the other "
        "load on the organisation's queue, or raise queue_budget."
    )
