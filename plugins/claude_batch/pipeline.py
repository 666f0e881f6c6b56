"""The pipeline builder: one call wires a workload from warehouse to warehouse.

Read this file to find the pipeline; every stage is a module of its own, called here in
data-flow order:

    stage    warehouse.extract -> staging.stage_requests            (shards + manifest on S3)
    gate     dry run / budget, then warehouse.claim_staged (ledger: pending, atomically;
             staging.restrict_to_claimed drops what another live run holds), then
             pilot.split_pilot: the first pilot_size requests become the pilot's shards
    pilot    pilot_submit, pilot_record, pilot_wait, pilot_collect, pilot_load: a round of its
             own (<run>/pilot/), then pilot_decide (the pass-rate threshold) and pilot_approval
             (a person, when the run asks): see claude_batch.pilot. Skipped without a pilot.
    submit   operators.ClaudeBatchOperator, mapped over the shards    (batch ids, exactly once)
    record   warehouse.mark_submitted for every shard, one task       (ledger: submitted)
    wait     sensors.ClaudeBatchSensor, deferred                      (no worker slot held)
    collect  results.collect_results + validation.validate_part, mapped over the shards
             (S3 and the API only: parallel collects never contend for the warehouse)
    load     warehouse.load_run -> check_accounting -> record_run      (results table + ledger)
    report   counts, cost, the real-time equivalent, cache hit rate, durations -> report.json

The ``run_*`` functions are the plain-Python steps (:mod:`claude_batch.steps`, testable without
Airflow); the tasks here are thin shells that open connections and pass run context. Every step
is idempotent for its DAG run. The steps' names (``PipelineConfig``, ``RunOptions``, ``run_stage``,
...) stay importable from here, where they were first defined; the trigger form's Params are
:mod:`claude_batch.pipeline_params`.

Reading order: :func:`claude_batch_dag` (the DAG), :func:`claude_batch_pipeline` (the TaskGroup),
:func:`_pipeline_tasks` (the tasks and their wiring), then the helpers the tasks share.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

import orjson
from airflow.sdk import DAG, Asset, TaskGroup, get_current_context, task
from airflow.sdk.definitions.deadline import AsyncCallback, DeadlineAlert, DeadlineReference
from airflow.sdk.definitions.timetables.interval import CronDataIntervalTimetable
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from claude_batch import notes
from claude_batch.alerts import NotifierSpec, RunFailedNotifier, deadline_callback_kwargs
from claude_batch.connections import open_warehouse
from claude_batch.hooks import ClaudeBatchHook
from claude_batch.operators import ClaudeBatchOperator
from claude_batch.pilot_approval import PilotApprovalOperator
from claude_batch.pipeline_metrics import emit_metrics
from claude_batch.pipeline_params import PARAM_SECTIONS as PARAM_SECTIONS
from claude_batch.pipeline_params import run_params
from claude_batch.preflight import check_model, check_storage_root
from claude_batch.sensors import ClaudeBatchSensor
from claude_batch.steps import DEFAULT_POOL as DEFAULT_POOL
from claude_batch.steps import (
    BudgetExceeded,
    NothingToSubmit,
    PilotFailed,
    PipelineConfig,
    RunOptions,
    SourceSpec,
    build_report,
    effective_workload,
    require_manifest,
    run_collect,
    run_gate,
    run_interval,
    run_load,
    run_pilot_decide,
    run_pilot_load,
    run_pilot_shards,
    run_record_batches,
    run_recover,
    run_release,
    run_requeue,
    run_stage,
    task_log,
    write_report,
)
from claude_batch.steps import report_costs as report_costs
from claude_batch.storage import ObjectStore, RunLayout
from claude_batch.warehouse import AccountingError

__all__ = ["PipelineConfig", "RunOptions", "SourceSpec", "claude_batch_dag", "claude_batch_pipeline"]

_emit_metrics = emit_metrics  # its name when it lived here (tests call it)


def claude_batch_dag(
    config: PipelineConfig,
    *,
    dag_id: str | None = None,
    schedule: Any = "@daily",
    start_date: datetime,
    max_active_runs: int = 2,
    deadline_hours: float | None = None,
    notifiers: Sequence[NotifierSpec] | None = None,
    tags: tuple[str, ...] = ("claude-batch",),
    **dag_kwargs: Any,
):
    """A whole DAG for one workload: Params form, schedule, bounded concurrency, alerts.

    Its tasks sit at the DAG's top level (the grid shows each as a row). A run that fails and a
    run past its deadline are told to ``notifiers``; each run's outcome and cost become its note.

    :param config: the pipeline's settings.
    :param dag_id: the DAG id (default: the workload's name).
    :param schedule: the schedule; data intervals select the rows, so backfills work.
    :param start_date: the first data interval's start.
    :param max_active_runs: runs at once (each may hold many batches).
    :param deadline_hours: alert when a run is still not done this long after it was queued
        (default ``CLAUDE_BATCH_DEADLINE_HOURS`` or 20; 0 turns the alert off). ``dag.test()`` in
        Airflow 3.3 fails on DAGs with deadline alerts, so tests and the demo set it to 0.
    :param notifiers: where the failure and deadline alerts go (:mod:`claude_batch.alerts`:
        ``email(...)``, ``notifier(AnyNotifier, ...)``); default
        :func:`~claude_batch.alerts.default_notifiers` (logged; e-mailed when
        ``CLAUDE_BATCH_ALERT_EMAIL`` is set); ``[]``: no alerts. A DAG ``on_failure_callback``
        given as well runs after the alert.
    """
    # Mistakes a DAG file can hold fail when it is parsed, naming the cause.
    check_model(config.workload.model, config.models, role="the workload's model")
    if config.storage_root:
        check_storage_root(config.storage_root)

    if isinstance(schedule, str) and not schedule.startswith("@once") and schedule != "@continuous":
        # Airflow 3 turns cron strings into trigger timetables whose runs have an empty data
        # interval; the rows a run extracts are its interval, so ask for real intervals.
        schedule = CronDataIntervalTimetable(schedule, timezone="UTC")
    if deadline_hours is None:
        deadline_hours = float(os.environ.get("CLAUDE_BATCH_DEADLINE_HOURS", "20"))
    deadline = (
        DeadlineAlert(
            reference=DeadlineReference.DAGRUN_QUEUED_AT,
            interval=timedelta(hours=deadline_hours),
            callback=AsyncCallback(
                "claude_batch.alerts.run_overdue",
                kwargs=deadline_callback_kwargs(config.workload.name, notifiers),
            ),
        )
        if deadline_hours and (notifiers is None or notifiers)
        else None
    )
    on_failure = dag_kwargs.pop("on_failure_callback", None)
    on_failure = (
        [] if on_failure is None else list(on_failure) if isinstance(on_failure, list) else [on_failure]
    )
    if notifiers is None or notifiers:
        on_failure.insert(0, RunFailedNotifier(config.workload.name, notifiers))
    dag = DAG(
        dag_id or config.workload.name,
        schedule=schedule,
        start_date=start_date,
        catchup=False,
        max_active_runs=max_active_runs,
        params=run_params(config),
        deadline=deadline,
        on_failure_callback=on_failure or None,
        tags=list(tags),
        doc_md=config.workload.description or None,
        **dag_kwargs,
    )
    with dag:
        _pipeline_tasks(config, None)  # at the top level: the grid shows every task as its own row
    return dag


def claude_batch_pipeline(config: PipelineConfig, group_id: str | None = None):
    """A TaskGroup running ``config.workload`` from warehouse to warehouse; call inside a DAG.

    :func:`claude_batch_dag` lays the same tasks out at the DAG's top level instead; in a DAG of
    your own the group keeps them apart from your tasks (and from a second workload's).

    :param config: the pipeline's settings.
    :param group_id: the group's id (default: the workload's name).
    :returns: the TaskGroup (its last task is the report).
    """
    return _pipeline_tasks(config, group_id or config.workload.name)


def _pipeline_tasks(config: PipelineConfig, group_id: str | None):
    """The pipeline's tasks: in a TaskGroup ``group_id``, or at the DAG's top level (``None``).

    :returns: the TaskGroup, or (top level) the report task.
    """
    results_asset = Asset(
        name=f"claude_batch.{config.workload.name}_results",
        uri=f"claude-batch://{config.warehouse_conn_id}/{config.workload.results_table}",
    )

    with TaskGroup(group_id) if group_id else contextlib.nullcontext() as group:
        prefix = f"{group.group_id}." if group is not None else ""  # how the tasks find each other

        # Every stage is idempotent for its run (same S3 keys, upserts, two-phase submit state), so
        # a transient fault (S3, the warehouse, the API) is retried; decisions fail at once.
        @task(task_id="stage", retries=2, retry_delay=timedelta(seconds=30))
        def stage() -> dict[str, Any]:
            context = get_current_context()
            options = _context_options()
            interval = run_interval(
                options, context.get("data_interval_start"), context.get("data_interval_end")
            )
            layout = _context_layout(config, config.aws_conn_id)
            hook = ClaudeBatchHook(conn_id=config.anthropic_conn_id)
            try:
                with open_warehouse(config.warehouse_conn_id) as warehouse:
                    run_recover(
                        config, warehouse, layout, options, hook.conn, _dag_run_state(context), task_log()
                    )
                    staged = run_stage(
                        config, warehouse, layout, options, interval, client=hook.conn, log=task_log()
                    )
            except Exception as exc:
                _note(
                    context, notes.error_note("stage", exc)
                )  # the run's note says why (a retry rewrites it)
                raise
            _note(context, notes.staged_note(staged))
            return staged

        @task(task_id="gate", retries=2, retry_delay=timedelta(seconds=30))
        def gate(staged: dict[str, Any]) -> list[str]:
            options = _context_options()
            layout = _context_layout(config, config.aws_conn_id)
            hook = ClaudeBatchHook(conn_id=config.anthropic_conn_id)
            try:
                with open_warehouse(config.warehouse_conn_id) as warehouse:
                    shards = run_gate(config, warehouse, layout, options, hook.conn, hook, task_log())
            except BudgetExceeded as exc:
                _note(get_current_context(), notes.refused_note(str(exc)))
                raise AirflowFailException(str(exc)) from exc  # a decision, not a fault: no retry
            except NothingToSubmit as exc:
                _note(get_current_context(), notes.nothing_note(str(exc)))
                raise AirflowSkipException(str(exc)) from exc
            if not shards:
                if options.dry_run:
                    _note(
                        get_current_context(),
                        notes.dry_run_note(staged, effective_workload(config, options).model),
                    )
                    reason = "dry run: estimate written to report.json"
                else:
                    reason = "nothing to submit (no rows, or the run is already complete)"
                    _note(
                        get_current_context(),
                        notes.nothing_note(f"{reason}; staged {staged['staged']:,} requests."),
                    )
                raise AirflowSkipException(f"{reason}; staged {staged['staged']:,} requests.")
            return shards

        def task_name(base: str, number: int) -> str:
            """``submit`` (round 1), ``submit_N`` (round N), ``pilot_submit`` (the pilot, round 0)."""
            return f"pilot_{base}" if number == 0 else base if number == 1 else f"{base}_{number}"

        def send(number: int, shards: Any, **submit_kwargs: Any) -> tuple[Any, Any]:
            """Submit, record, wait and collect round ``number``'s shards.

            :returns: (submit, collect outputs).
            """
            submit = ClaudeBatchOperator.partial(
                task_id=task_name("submit", number),
                storage_root=config.storage_root,
                conn_id=config.anthropic_conn_id,
                aws_conn_id=config.aws_conn_id,
                wait="none",
                queue_budget=config.queue_budget,
                queue_wait_timeout=config.queue_wait_timeout,
                queue_poll_interval=config.queue_poll_interval,
                pool=config.pool,
                retries=3,
                retry_delay=timedelta(seconds=30),
                **submit_kwargs,
            ).expand(shard=shards)

            @task(task_id=task_name("record", number), retries=2, retry_delay=timedelta(seconds=30))
            def record(batch_ids: list[str]) -> int:
                layout = _context_layout(config, config.aws_conn_id, number)
                with open_warehouse(config.warehouse_conn_id) as warehouse:
                    return run_record_batches(config, warehouse, layout, _context_options(), list(batch_ids))

            # An XComArg while the DAG is built, the submits' batch ids when the next tasks run.
            batch_ids: Any = submit.output
            wait = ClaudeBatchSensor(
                task_id=task_name("wait", number),
                batch_ids=batch_ids,
                conn_id=config.anthropic_conn_id,
                min_poll_interval=config.min_poll_interval,
                max_poll_interval=config.max_poll_interval,
                batch_timeout=config.batch_timeout,
                # A batch past its timeout is canceled and collected: its answers are kept and the
                # rest goes round again, instead of failing the run and stranding the items.
                on_timeout="cancel_and_collect",
                skip_if_all_canceled=False,  # canceled requests must still reach the ledger (retry)
            )

            @task(task_id=task_name("collect", number), retries=3, retry_delay=timedelta(seconds=30))
            def collect(batch_id: str) -> dict[str, Any]:
                context = get_current_context()
                layout = _context_layout(config, config.aws_conn_id, number)
                client = ClaudeBatchHook(conn_id=config.anthropic_conn_id).get_conn()
                part = _part_of(layout, context["ti"].map_index)
                return run_collect(config, layout, _context_options(), client, part, batch_id)

            collected = collect.expand(batch_id=batch_ids)
            record(batch_ids) >> wait >> collected
            return submit, collected

        def one_round(number: int, shards: Any, previous: Any, **submit_kwargs: Any) -> tuple[Any, Any]:
            """Submit, record, wait, collect and load one round; returns (submit, load output)."""
            submit, collected = send(number, shards, **submit_kwargs)

            @task(task_id=f"load{'' if number == 1 else f'_{number}'}", outlets=[results_asset], retries=2,
                  retry_delay=timedelta(seconds=30))  # fmt: skip
            def load(collected: list[dict[str, Any]], previous: dict[str, Any] | None) -> dict[str, Any]:
                layout = _context_layout(config, config.aws_conn_id, number)
                if number == 1:  # round 1 goes on from the pilot's load (None: no pilot)
                    previous = get_current_context()["ti"].xcom_pull(task_ids=f"{prefix}pilot_load")
                try:
                    with open_warehouse(config.warehouse_conn_id) as warehouse:
                        result = run_load(config, warehouse, layout, _context_options(), previous)
                except AccountingError as exc:
                    _note(get_current_context(), notes.error_note(task_name("load", number), exc))
                    raise AirflowFailException(
                        str(exc)
                    ) from exc  # the gap is in the data: a retry cannot close it
                result["collected"] = [*(previous or {}).get("collected", []), *collected]
                # Downstream DAGs scheduled on the results table see what the run loaded and cost so far.
                context = get_current_context()
                context["outlet_events"][results_asset].extra = notes.cost_summary(
                    result, run_id=context["run_id"], workload=config.workload.name
                )
                return result

            return submit, load(collected, previous)

        # The pilot: a round of its own (round 0), then the decision; it all skips without a pilot.
        @task(task_id="pilot", retries=2, retry_delay=timedelta(seconds=30))
        def pilot(shards: list[str]) -> list[str]:
            pilot_shards = run_pilot_shards(
                config, _context_layout(config, config.aws_conn_id), _context_options()
            )
            if not pilot_shards:
                raise AirflowSkipException("no pilot (pilot_size 0, or as large as the run): round 1 goes on")
            return pilot_shards

        @task(task_id="pilot_load", retries=2, retry_delay=timedelta(seconds=30))
        def pilot_load(collected: list[dict[str, Any]]) -> dict[str, Any]:
            layout = _context_layout(config, config.aws_conn_id, 0)
            with open_warehouse(config.warehouse_conn_id) as warehouse:
                result = run_pilot_load(config, warehouse, layout, _context_options())
            result["collected"] = list(collected)
            return result

        @task(task_id="pilot_decide", retries=2, retry_delay=timedelta(seconds=30))
        def pilot_decide(loaded: dict[str, Any]) -> dict[str, Any]:
            layout = _context_layout(config, config.aws_conn_id)
            try:
                with open_warehouse(config.warehouse_conn_id) as warehouse:
                    return run_pilot_decide(config, warehouse, layout, _context_options(), task_log())
            except PilotFailed as exc:
                _note(get_current_context(), notes.pilot_failed_note(str(exc)))
                raise AirflowFailException(str(exc)) from exc  # a decision, not a fault: no retry

        def release_on_reject(context: Any, reason: str) -> int:
            layout = _context_layout(config, config.aws_conn_id)
            with open_warehouse(config.warehouse_conn_id) as warehouse:
                return run_release(
                    config, warehouse, layout, _context_options(), f"released: {reason}", task_log()
                )

        # Each output is an XComArg while the DAG is built and its value when the next task runs.
        staged: Any = stage()
        gated: Any = gate(staged)
        pilot_round_shards: Any = pilot(gated)
        _, pilot_collected = send(0, pilot_round_shards)
        pilot_loaded: Any = pilot_load(pilot_collected)
        decided = pilot_decide(pilot_loaded)
        approval = PilotApprovalOperator(
            task_id="pilot_approval",
            decision_task_id=f"{prefix}pilot_decide",
            on_reject=release_on_reject,
            response_timeout=(
                timedelta(seconds=config.pilot_approval_timeout) if config.pilot_approval_timeout else None
            ),
        )
        decided >> approval
        # Round 1 goes on after the decision, or without it when there was no pilot (skipped);
        # it skips with the gate, and not at all when the pilot failed or was rejected.
        first_submit, loaded = one_round(1, gated, None, trigger_rule="none_failed_min_one_success")
        [decided, approval] >> first_submit
        load_tasks = [loaded]
        for number in range(2, config.max_rounds + 1):

            @task(task_id=f"requeue_{number}", retries=2, retry_delay=timedelta(seconds=30))
            def requeue(previous: dict[str, Any], number: int = number) -> list[str]:
                layout = _context_layout(config, config.aws_conn_id, number)
                with open_warehouse(config.warehouse_conn_id) as warehouse:
                    shards = run_requeue(config, warehouse, layout, _context_options(), task_log())
                if not shards:
                    left = previous["ledger"].get("retry", 0)
                    raise AirflowSkipException(
                        f"no round {number}: "
                        + (
                            f"{left:,} item(s) left to retry by the next run"
                            if left
                            else "every item is final"
                        )
                    )
                return shards

            _, loaded = one_round(number, requeue(loaded), loaded)
            load_tasks.append(loaded)

        # The report comes after the last round that ran: later rounds skip when nothing was left.
        @task(task_id="report", trigger_rule="none_failed_min_one_success")
        def report(first: dict[str, Any]) -> dict[str, Any]:
            context = get_current_context()
            later = [
                context["ti"].xcom_pull(task_ids=task_id)
                for task_id in [f"{prefix}load_{n}" for n in range(2, config.max_rounds + 1)]
            ]
            loaded = [result for result in [first, *later] if result][-1]
            layout = _context_layout(config, config.aws_conn_id)
            decision = context["ti"].xcom_pull(task_ids=f"{prefix}pilot_decide")
            result = build_report(layout, loaded, list(loaded.get("collected", [])), config.prices, decision)
            write_report(layout, result)
            emit_metrics(config.workload.name, result)
            _note(context, notes.report_note(result))  # the run's note, once the run ends
            log = task_log()
            log.info("Run report: %s", orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
            return result

        report_task = report(load_tasks[0])
        for later_load in load_tasks[1:]:
            later_load >> report_task
    return group if group is not None else report_task


def _context_layout(config: PipelineConfig, aws_conn_id: str | None, round_number: int = 1) -> RunLayout:
    context = get_current_context()
    store = ObjectStore.from_airflow(config.root(), aws_conn_id)
    return RunLayout(store, context["dag"].dag_id, context["run_id"], round_number)


def _context_options() -> RunOptions:
    return RunOptions.from_params(get_current_context()["params"])


def _note(context: Any, text: str) -> None:
    """Say what the run did so far; its newest line becomes the run's note when it ends.

    See :mod:`claude_batch.notes`.
    """
    try:
        context["ti"].xcom_push(key=notes.NOTE_KEY, value=text)
    except Exception as exc:  # a note is never worth failing a task for
        task_log().warning("Could not record the run's note (%s): %s", exc, text)


def _dag_run_state(context: Any) -> Callable[[str, str], str | None]:
    """``(dag_id, run_id) -> state`` from Airflow's API server (None when it cannot say)."""

    def state(dag_id: str, run_id: str) -> str | None:
        try:
            found = context["ti"].get_dagrun_state(dag_id=dag_id, run_id=run_id)
            return str(getattr(found, "value", found))  # a DagRunState enum: its value, "failed"
        except Exception as exc:  # a run Airflow no longer knows, or no answer: leave its items alone
            task_log().warning(
                "Could not read the state of run %s of %s (%s); its items stay held.", run_id, dag_id, exc
            )
            return None

    return state


def _part_of(layout: RunLayout, map_index: int | None) -> int:
    """The shard part a mapped task works on (map index i is the manifest's i-th shard)."""
    if map_index is None:
        raise TypeError("only a task mapped over the shards has a shard part")
    return require_manifest(layout).shards[max(map_index, 0)].part
