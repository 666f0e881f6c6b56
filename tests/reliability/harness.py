"""One pipeline run at the plain-Python step level, with faults, task retries and an audit.

The fault matrix (``tests/reliability/test_fault_matrix.py``, CI size) and its full-size bench
(``bench/bench_fault_matrix.py``) share this module. A run calls the pipeline's own steps in
data-flow order, each the way its Airflow task would:

    stage -> gate -> submit (ClaudeBatchOperator.execute, one per shard) -> wait (the real
    ClaudeBatchTrigger) -> collect (one per shard) -> load

against real parts: a DuckDB file or PostgreSQL, S3 on a moto server, the Claude emulator over
HTTP. Each step is retried like a task (a failed attempt is followed by another, up to
``TASK_RETRIES``); a step can instead have its first attempt run in a forked worker process
that SIGKILLs itself at a chosen point (``tests/reliability/worker.py``).

:func:`audit` then counts what the table reports: records lost, duplicates in the results
table, batches and records billed twice (from every batch the emulator holds), and whether the
accounting check holds for every run.

Beside this module: the parts a run talks to (``parts.py``: ``Stack``, the workload, the
source rows), the faults injected under the pipeline (``injected_faults.py``: SQL statements
and S3 calls) and the audit (``audit.py``). Their names stay importable from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from claude_batch.pipeline import (
    NothingToSubmit,
    RunOptions,
    run_collect,
    run_gate,
    run_load,
    run_record_batches,
    run_recover,
    run_requeue,
    run_stage,
)
from claude_batch.staging import read_manifest

# The run's parts, its faults and its audit live beside this module; the names the tests and
# benches take from here stay importable from here (``X as X``: re-exported).
from tests.reliability.audit import Audit as Audit
from tests.reliability.audit import _all_batches as _all_batches
from tests.reliability.audit import audit
from tests.reliability.audit import billed_custom_ids as billed_custom_ids
from tests.reliability.injected_faults import S3_READS as S3_READS
from tests.reliability.injected_faults import S3_WRITES as S3_WRITES
from tests.reliability.injected_faults import StatementFault as StatementFault
from tests.reliability.injected_faults import s3_call_faults as s3_call_faults
from tests.reliability.injected_faults import statement_faults as statement_faults
from tests.reliability.injected_faults import terminate_backend as terminate_backend
from tests.reliability.parts import DAG_ID as DAG_ID
from tests.reliability.parts import DAY, WORKLOAD, Stack
from tests.reliability.parts import SOURCE as SOURCE
from tests.reliability.parts import fill_source as fill_source
from tests.reliability.parts import query as query

TASK_RETRIES = 3
RUN_1 = (DAY, DAY + timedelta(days=1))  # the rows' own day
RUN_2 = (DAY + timedelta(days=1), DAY + timedelta(days=2))  # no new rows: only the items due for retry
log = logging.getLogger("claude_batch.reliability")

RESULTS_UPSERT = rf'INSERT INTO "?{WORKLOAD.results_table}"?'
# A write of the load to either table (the order of the two differs by dialect and version).
LOAD_WRITE = rf'(INSERT INTO|UPDATE) "?(claude_batch_ledger|{WORKLOAD.results_table})"?'


# -- the steps, as their tasks run them ------------------------------------------------------


class _TaskInstance:
    """What ClaudeBatchOperator.execute reads from its context's ``ti``."""

    def __init__(self, run_id: str, task_id: str, map_index: int) -> None:
        self.dag_id, self.run_id, self.task_id, self.map_index = DAG_ID, run_id, task_id, map_index
        self.xcom: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = value


def _hook():
    from claude_batch.hooks import ClaudeBatchHook

    return ClaudeBatchHook(conn_id="anthropic_default")


# Airflow's view of the runs a test stands for: run_id -> DAG run state ("running" when absent).
RUN_STATES: dict[str, str] = {}


def step_stage(stack: Stack, run_id: str, interval: tuple[datetime, datetime]) -> dict[str, Any]:
    with stack.warehouse() as warehouse:
        layout = stack.layout(run_id)
        state = lambda dag_id, held_by: RUN_STATES.get(held_by, "running")  # noqa: E731
        client = _hook().conn
        run_recover(stack.config(), warehouse, layout, RunOptions(), client, state, log)
        return run_stage(stack.config(), warehouse, layout, RunOptions(), interval, client=client, log=log)


def step_gate(stack: Stack, run_id: str) -> list[str]:
    hook = _hook()
    with stack.warehouse() as warehouse:
        try:
            return run_gate(
                stack.config(), warehouse, stack.layout(run_id), RunOptions(), hook.conn, hook, log
            )
        except NothingToSubmit:  # the gate task skips: another live run holds every item
            return []


def step_submit(stack: Stack, run_id: str, index: int, shard: str, round_number: int = 1) -> str:
    """The mapped submit task: ClaudeBatchOperator.execute with the task's context."""
    from claude_batch.operators import ClaudeBatchOperator

    task_id = "submit" if round_number == 1 else f"submit_{round_number}"
    operator = ClaudeBatchOperator(
        task_id=task_id, shard=shard, storage_root=stack.store_root, aws_conn_id="aws_default", wait="none"
    )
    # The same store ObjectStore.from_airflow builds from the aws connection, without the ~1 s
    # its boto3 client costs per task on this machine.
    operator._store = stack.store
    return operator.execute({"ti": _TaskInstance(run_id, task_id, index), "run_id": run_id})


def step_collect(
    stack: Stack, run_id: str, index: int, batch_id: str, round_number: int = 1
) -> dict[str, Any]:
    layout = stack.layout(run_id).in_round(round_number)
    manifest = read_manifest(layout)
    assert manifest is not None
    return run_collect(
        stack.config(), layout, RunOptions(), _hook().conn, manifest.shards[index].part, batch_id
    )


def step_record(stack: Stack, run_id: str, batch_ids: list[str], round_number: int = 1) -> int:
    """The record task: the ledger learns each shard's batch, in one task."""
    with stack.warehouse() as warehouse:
        layout = stack.layout(run_id).in_round(round_number)
        return run_record_batches(stack.config(), warehouse, layout, RunOptions(), batch_ids)


def step_load(
    stack: Stack, run_id: str, round_number: int = 1, previous: dict | None = None
) -> dict[str, Any]:
    with stack.warehouse() as warehouse:
        layout = stack.layout(run_id).in_round(round_number)
        return run_load(stack.config(), warehouse, layout, RunOptions(), previous)


def step_requeue(stack: Stack, run_id: str, round_number: int) -> list[str]:
    """Round N's requeue task: this run's retries staged again as the round's shards."""
    with stack.warehouse() as warehouse:
        return run_requeue(
            stack.config(), warehouse, stack.layout(run_id).in_round(round_number), RunOptions(), log
        )


def wait_for_batches(
    batch_ids: list[str], timeout: float = 120.0, batch_timeout: float | None = None
) -> dict[str, Any]:
    """The deferred wait: the pipeline's ClaudeBatchTrigger, run until its event.

    :param batch_timeout: as the pipeline's wait: each batch past it is canceled and collected.
    """
    from claude_batch.triggers import ClaudeBatchTrigger

    async def first_event():
        trigger = ClaudeBatchTrigger(
            batch_ids=batch_ids, min_poll_interval=0.05, max_poll_interval=0.2,
            timeout=batch_timeout, on_timeout="cancel_and_collect",
        )  # fmt: skip
        events = trigger.run()
        try:
            return await asyncio.wait_for(anext(events), timeout)
        finally:
            await events.aclose()

    event = asyncio.run(first_event())
    if event.payload["status"] != "success":
        raise RuntimeError(f"the wait ended with {event.payload}")
    return event.payload


STEPS: dict[str, Callable[..., Any]] = {
    "stage": step_stage,
    "gate": step_gate,
    "submit": step_submit,
    "record": step_record,
    "collect": step_collect,
    "load": step_load,
    "requeue": step_requeue,
}


# -- a run with faults and retries -----------------------------------------------------------


@dataclass(frozen=True)
class KillPoint:
    """Run the first attempt of ``step`` (map index ``index``) in a worker killed at ``point``."""

    step: str
    point: str
    index: int = 0


@dataclass
class Faults:
    """What goes wrong in one run besides the emulator's own faults.

    :param kill: a worker process killed at a step boundary (then the task's retry).
    :param after_submit: called with (shard index, batch id) after each submit (e.g. a cancel).
    :param before_wait: called before the wait (e.g. jumping emulated time past expiry).
    :param before_round: called with the round number before a follow-up round's requeue.
    :param after_failure: called with (step, attempt, exception) after a failed attempt, before
        the retry (e.g. to prove a failed load left nothing behind).
    :param during: called with (step, map index, attempt) for a context manager that wraps
        the attempt (e.g. a patch making its third S3 write fail).
    :param injected: faults injected outside the emulator (S3, warehouse, kills), counted by
        whoever injects them.
    """

    kill: KillPoint | None = None
    after_submit: Callable[[int, str], None] | None = None
    before_wait: Callable[[], None] | None = None
    before_round: Callable[[int], None] | None = None
    after_failure: Callable[[str, int, BaseException], None] | None = None
    during: Callable[[str, int, int], contextlib.AbstractContextManager[Any]] | None = None
    injected: int = 0


@dataclass
class RunRecord:
    """What one run did: its id, shards, batches and the failed task attempts."""

    run_id: str
    shards: int = 0
    batch_ids: list[str] = field(default_factory=list)
    failed_attempts: list[str] = field(default_factory=list)
    waits: list[dict[str, Any]] = field(default_factory=list)
    load: dict[str, Any] | None = None
    accounting: dict[str, Any] | None = None


def check_run_accounting(stack: Stack, run_id: str) -> dict[str, Any]:
    """The run's accounting check, right after its load: ``{"ok", "extracted", "by_status", "error"}``."""
    manifest = read_manifest(stack.layout(run_id))
    if manifest is None:
        return {"ok": False, "error": f"run {run_id} has no manifest"}
    with stack.warehouse() as warehouse:
        try:
            report = warehouse.check_accounting(stack.workload, manifest, layout=stack.layout(run_id))
        except Exception as exc:  # AccountingError names the gap
            return {"ok": False, "error": str(exc)}
    return {"ok": True, "extracted": report.extracted, "by_status": report.by_status}


class WorkerNotKilled(AssertionError):
    """The worker process finished without reaching its kill point: the scenario did not happen."""


def run_killed_worker(
    stack: Stack, kill: KillPoint, step: str, args: list[Any], timeout: float = 120.0
) -> None:
    """Run one step in a forked worker process that SIGKILLs itself at ``kill.point``.

    The child inherits the loaded modules (no import cost), opens its own connections and
    clients, and dies without cleanup: no ``finally``, no rollback, no flush of open objects.
    The parent has no warehouse connection open meanwhile (each step closes its own).
    """
    from tests.reliability.worker import arm

    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the worker
        code = 3  # finished without reaching the kill point
        try:
            arm(kill.point)
            STEPS[step](stack, *args)
        except BaseException:
            traceback.print_exc()
            code = 4
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise WorkerNotKilled(f"worker for {step} at {kill.point} hung for {timeout:.0f} s")
        time.sleep(0.02)
    if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
        raise WorkerNotKilled(
            f"worker for {step} at {kill.point} ended with status {status}, not SIGKILL (see its traceback "
            "above)"
        )


class PipelineRun:
    """One DAG run's steps with task retries; ``record`` says what happened."""

    def __init__(
        self,
        stack: Stack,
        run_id: str,
        interval: tuple[datetime, datetime],
        faults: Faults | None = None,
        *,
        rounds: int = 1,
        wait_options: dict[str, Any] | None = None,
    ):
        self.stack = stack
        self.run_id = run_id
        self.interval = interval
        self.faults = faults or Faults()
        self.rounds = rounds  # 1: the fault matrix's runs leave their retries to the next run
        self.wait_options = wait_options or {}
        self.record = RunRecord(run_id)

    def _task(self, step: str, args: list[Any], index: int = 0) -> Any:
        kill = self.faults.kill
        for attempt in range(TASK_RETRIES + 1):
            if attempt:
                # A retry is a new process in Airflow: drop what the failed attempt still holds (a
                # suspended DuckDB extract kept by a traceback cycle makes a new connect spin).
                gc.collect()
            try:
                if kill is not None and attempt == 0 and kill.step == step and kill.index == index:
                    run_killed_worker(self.stack, kill, step, [self.run_id, *args])
                    self.faults.injected += 1
                    raise WorkerKilled(f"{step}[{index}] killed at {kill.point}")
                wrap = (
                    self.faults.during(step, index, attempt)
                    if self.faults.during
                    else contextlib.nullcontext()
                )
                with wrap:
                    return STEPS[step](self.stack, self.run_id, *args)
            except WorkerNotKilled:
                raise
            except Exception as exc:
                self.record.failed_attempts.append(
                    f"{step}[{index}] attempt {attempt + 1}: {type(exc).__name__}: {exc}"[:300]
                )
                if self.faults.after_failure is not None:
                    self.faults.after_failure(step, attempt, exc)
                if attempt == TASK_RETRIES:
                    raise
        raise AssertionError("unreachable")

    def run(self) -> RunRecord:
        for _step in self.steps():
            pass
        return self.record

    def steps(self) -> Iterator[str]:
        """The run's tasks one at a time: yields each task's name once it has run (to interleave runs)."""
        self._task("stage", [list(self.interval)])
        yield "stage"
        shards = self._task("gate", [])
        self.record.shards = len(shards)
        yield "gate"
        if not shards:  # the gate task skips the rest of the run
            return
        previous = None
        for number in range(1, self.rounds + 1):
            if number > 1:
                if self.faults.before_round is not None:
                    self.faults.before_round(number)
                shards = self._task("requeue", [number])
                yield f"requeue_{number}"
                if not shards:  # nothing left to resend: the round (and later ones) skip
                    return
                self.record.shards += len(shards)
            batch_ids = []
            for index, shard in enumerate(shards):
                batch_id = self._task("submit", [index, shard, number], index)
                batch_ids.append(batch_id)
                self.record.batch_ids.append(batch_id)
                if self.faults.after_submit is not None and number == 1:
                    self.faults.after_submit(index, batch_id)
                yield f"submit[{index}]" if number == 1 else f"submit_{number}[{index}]"
            self._task("record", [batch_ids, number])
            yield "record" if number == 1 else f"record_{number}"
            if self.faults.before_wait is not None and number == 1:
                self.faults.before_wait()
            self.record.waits.append(wait_for_batches(batch_ids, **self.wait_options))
            yield "wait" if number == 1 else f"wait_{number}"
            for index, batch_id in enumerate(batch_ids):
                self._task("collect", [index, batch_id, number], index)
                yield f"collect[{index}]" if number == 1 else f"collect_{number}[{index}]"
            previous = self.record.load = self._task("load", [number, previous])
            self.record.accounting = check_run_accounting(self.stack, self.run_id)
            yield "load" if number == 1 else f"load_{number}"


class WorkerKilled(RuntimeError):
    """The task's worker process died (SIGKILL); Airflow marks the attempt failed and retries."""


def run_scenario(
    stack: Stack,
    emulator: Any,
    api_key: str,
    fault: str,
    rows: int,
    *,
    emulator_faults: dict | None = None,
    faults: Faults | None = None,
    prefix: str = "",
) -> Audit:
    """Run 1 with the fault, run 2 (the next night, no faults) retrying what run 1 left; audit both."""
    started = time.perf_counter()
    if emulator_faults:
        emulator.configure(faults=emulator_faults)
    first = PipelineRun(stack, f"{prefix}run-1", RUN_1, faults).run()
    emulator.configure(faults={})
    second = PipelineRun(stack, f"{prefix}run-2", RUN_2).run()
    injected = faults.injected if faults else 0
    result = audit(stack, emulator, api_key, fault, rows, [first, second], injected)
    result.seconds = round(time.perf_counter() - started, 1)
    return result
