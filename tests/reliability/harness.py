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
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import os
import re
import signal
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal
from unittest import mock

import anthropic
from claude_batch.pipeline import (
    NothingToSubmit,
    PipelineConfig,
    RunOptions,
    run_collect,
    run_gate,
    run_load,
    run_record_batches,
    run_recover,
    run_requeue,
    run_stage,
)
from claude_batch.staging import StagingLimits, read_manifest
from claude_batch.storage import ObjectStore, RunLayout
from claude_batch.warehouse import SourceSpec, Warehouse, dialect_for
from claude_batch.workloads import Workload
from pydantic import BaseModel, Field

from tests.services import create_tickets, moto_store

DAG_ID = "reliability_matrix"
TASK_RETRIES = 3
DAY = datetime(2026, 3, 1)
RUN_1 = (DAY, DAY + timedelta(days=1))  # the rows' own day
RUN_2 = (DAY + timedelta(days=1), DAY + timedelta(days=2))  # no new rows: only the items due for retry
log = logging.getLogger("claude_batch.reliability")


class TicketLabel(BaseModel):
    category: Literal["billing", "bug", "feature_request", "other"]
    confidence: float = Field(ge=0, le=1)


WORKLOAD = Workload(
    name="reliability",
    system_prompt="Classify the support ticket into one category and give your confidence.",
    user_template="Ticket {id}: {body}",
    model="claude-haiku-4-5",
    max_tokens=100,
    output_schema=TicketLabel,
    cache="off",
)
# The same task with a prompt long enough to cache (~1,500 tokens: Sonnet 4.6 caches from 1,024)
# and the caching policy on ``auto``: with no history, a run probes the 5-minute cache on a shard
# of its own (``claude_batch.caching``).
CACHED_WORKLOAD = dataclasses.replace(
    WORKLOAD,
    system_prompt=WORKLOAD.system_prompt + " Follow the house rules for every ticket." * 200,
    model="claude-sonnet-4-6",
    cache="auto",
)
WORKLOADS = {"plain": WORKLOAD, "cached": CACHED_WORKLOAD}
SOURCE = SourceSpec(table="tickets", key_column="id", interval_column="created_at")
BODIES = (
    "I was charged twice for invoice {i}, please refund",
    "The app crashes with an error when I open report {i}",
    "Please add a dark mode, a feature idea ({i})",
    "Where is my parcel {i}?",
)


# -- faults one level under the pipeline: SQL statements and S3 calls ----------------------------


@dataclass
class StatementFault:
    """Act when the ``nth`` statement matching ``pattern`` runs, once one matching ``after`` has.

    Statements are the SQL text a warehouse connection executes; ``COMMIT`` stands for a
    commit however the driver does it. Matching SQL text, not the warehouse module's methods,
    keeps the fault where it is when that module is refactored.

    :param pattern: a regular expression searched in each statement.
    :param action: called with the statement instead of running it (it raises, or kills).
    :param after: only statements after one matching this count.
    :param nth: act on this matching statement (1 = the first).
    """

    pattern: str
    action: Callable[[str, Any], None]
    after: str | None = None
    nth: int = 1
    seen: int = 0
    armed: bool = False

    def before(self, sql: str, conn: Any) -> None:
        if self.after is not None and not self.armed:
            self.armed = re.search(self.after, sql) is not None
            return
        if re.search(self.pattern, sql):
            self.seen += 1
            if self.seen == self.nth:
                self.action(sql, conn)


_statement_faults: list[StatementFault] = []


@contextlib.contextmanager
def statement_faults(*faults: StatementFault) -> Iterator[None]:
    """Within the block, warehouse connections opened through :class:`Stack` carry ``faults``."""
    _statement_faults.extend(faults)
    try:
        yield
    finally:
        for fault in faults:
            _statement_faults.remove(fault)


def _before(sql: str, conn: Any) -> None:
    for fault in list(_statement_faults):
        fault.before(sql, conn)


class _Proxy:
    """Delegates everything to the wrapped DB-API object (attribute writes too)."""

    def __init__(self, inner: Any) -> None:
        object.__setattr__(self, "_inner", inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._inner, name, value)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._inner.__exit__(*exc_info)


class _DuckDBConnection(_Proxy):
    def execute(self, sql: str, *args: Any, **kwargs: Any) -> Any:
        _before(sql, self._inner)
        return self._inner.execute(sql, *args, **kwargs)


class _PostgresCursor(_Proxy):
    def execute(self, sql: str, *args: Any, **kwargs: Any) -> Any:
        _before(sql, self._inner.connection)
        return self._inner.execute(sql, *args, **kwargs)

    def copy_expert(self, sql: str, *args: Any, **kwargs: Any) -> Any:
        _before(sql, self._inner.connection)
        return self._inner.copy_expert(sql, *args, **kwargs)


class _PostgresConnection(_Proxy):
    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        return _PostgresCursor(self._inner.cursor(*args, **kwargs))

    def commit(self) -> None:
        _before("COMMIT", self._inner)
        self._inner.commit()


def terminate_backend(dsn: str) -> Callable[[str, Any], None]:
    """An action: another session terminates this connection's PostgreSQL backend (a lost server)."""

    def action(sql: str, conn: Any) -> None:
        import psycopg2

        admin = psycopg2.connect(dsn)
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s)", (conn.get_backend_pid(),))
        admin.close()

    return action


@contextlib.contextmanager
def s3_call_faults(methods: set[str], nth: int, action: Callable[[str, dict], None]) -> Iterator[None]:
    """Within the block, the ``nth`` S3 call whose method is in ``methods`` runs ``action`` first.

    s3fs sends every S3 request through ``S3FileSystem._call_s3`` (and ``call_s3``, its sync
    wrapper, made at class creation: both are patched).
    """
    import s3fs
    from fsspec.asyn import sync_wrapper

    original = s3fs.S3FileSystem._call_s3
    seen = {"n": 0}

    async def call_s3(self, method, *args, **kwargs):
        if method in methods:
            seen["n"] += 1
            if seen["n"] == nth:
                action(method, kwargs)
        return await original(self, method, *args, **kwargs)

    with (
        mock.patch.object(s3fs.S3FileSystem, "_call_s3", call_s3),
        mock.patch.object(s3fs.S3FileSystem, "call_s3", sync_wrapper(call_s3)),
    ):
        yield


S3_WRITES = {"put_object", "create_multipart_upload", "upload_part", "complete_multipart_upload"}
S3_READS = {"get_object", "head_object"}
RESULTS_UPSERT = rf'INSERT INTO "?{WORKLOAD.results_table}"?'
# A write of the load to either table (the order of the two differs by dialect and version).
LOAD_WRITE = rf'(INSERT INTO|UPDATE) "?(claude_batch_ledger|{WORKLOAD.results_table})"?'


# -- the stack: where a run's parts live (JSON-able, so a worker process can rebuild it) --------


@dataclass(frozen=True)
class Stack:
    """The parts one run talks to.

    :param store_root: ``s3://bucket/prefix`` on the moto server.
    :param s3_endpoint: the moto server's URL.
    :param warehouse_url: ``duckdb:///path/to/file.duckdb`` or a ``postgresql://`` DSN.
    :param shard_size: requests per shard.
    """

    store_root: str
    s3_endpoint: str
    warehouse_url: str
    shard_size: int
    workload_name: str = "plain"  # a key of WORKLOADS

    @property
    def workload(self) -> Workload:
        return WORKLOADS[self.workload_name]

    @property
    def dialect(self) -> str:
        return "duckdb" if self.warehouse_url.startswith("duckdb://") else "postgres"

    def store(self) -> ObjectStore:
        return moto_store(self.store_root, self.s3_endpoint)

    def layout(self, run_id: str) -> RunLayout:
        return RunLayout(self.store(), DAG_ID, run_id)

    def config(self) -> PipelineConfig:
        return PipelineConfig(
            workload=self.workload,
            source=SOURCE,
            storage_root=self.store_root,
            staging_limits=StagingLimits(max_requests_per_shard=self.shard_size),
        )

    def connect(self) -> Any:
        """A new DB-API connection, as each task attempt opens its own."""
        if self.dialect == "duckdb":
            import duckdb

            return duckdb.connect(self.warehouse_url.removeprefix("duckdb://"))
        import psycopg2

        return psycopg2.connect(self.warehouse_url)

    @contextlib.contextmanager
    def warehouse(self) -> Iterator[Warehouse]:
        """The warehouse on a new connection, which carries the active :func:`statement_faults`."""
        conn = self.connect()
        dialect = dialect_for(conn)
        wrapped = (_DuckDBConnection if self.dialect == "duckdb" else _PostgresConnection)(conn)
        try:
            yield Warehouse(wrapped, dialect)
        finally:
            with contextlib.suppress(Exception):
                conn.close()

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Stack:
        return cls(**json.loads(text))


def fill_source(stack: Stack, rows: int) -> None:
    """Create ``tickets(id, body, created_at)`` with ``rows`` rows on :data:`DAY`."""
    conn = stack.connect()
    try:
        create_tickets(
            conn,
            (
                {
                    "id": f"t{i:06d}",
                    "body": BODIES[i % len(BODIES)].format(i=i),
                    "created_at": DAY + timedelta(seconds=(i * 7) % 86_000),
                }
                for i in range(rows)
            ),
        )
    finally:
        conn.close()


def query(stack: Stack, sql: str) -> list[tuple]:
    conn = stack.connect()
    try:
        if stack.dialect == "duckdb":
            return conn.execute(sql).fetchall()
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()
    finally:
        conn.close()


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


# -- the audit -------------------------------------------------------------------------------


@dataclass
class Audit:
    """One line of the fault matrix."""

    fault: str
    warehouse: str
    rows: int
    runs: int
    records_lost: int
    duplicates: int
    batches_billed_twice: int
    records_billed_twice: int
    accounting_ok: bool
    faults_injected: int
    failed_attempts: int
    seconds: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)


def _all_batches(client: anthropic.Anthropic) -> list[Any]:
    batches, after_id = [], None
    while True:
        page = client.messages.batches.list(limit=1000, **({"after_id": after_id} if after_id else {}))
        batches.extend(page.data)
        if not page.has_more or not page.data:
            return batches
        after_id = page.data[-1].id


def billed_custom_ids(emulator: Any, api_key: str) -> tuple[Counter[str], int]:
    """How often each custom_id succeeded (was billed), over every batch the emulator holds."""
    client = anthropic.Anthropic(api_key=api_key, base_url=emulator.base_url, max_retries=0)
    billed: Counter[str] = Counter()
    batches = _all_batches(client)
    for batch in batches:
        if batch.processing_status != "ended":
            raise AssertionError(f"batch {batch.id} is still {batch.processing_status} at the audit")
        for line in client.messages.batches.results(batch.id):
            if line.result.type == "succeeded":
                billed[line.custom_id] += 1
    return billed, len(batches)


def audit(
    stack: Stack,
    emulator: Any,
    api_key: str,
    fault: str,
    rows: int,
    records: list[RunRecord],
    other_faults: int = 0,
) -> Audit:
    """Count losses, duplicates and double billing after the runs; check every run's accounting."""
    emulator.configure(faults={})  # the audit reads with no faults
    stats = emulator.stats()
    billed, batches_listed = billed_custom_ids(emulator, api_key)
    submissions = sum(record.shards for record in records)
    # Checked by each run right after its load (a later run moves the items it retries).
    accounting_ok = all(record.accounting and record.accounting["ok"] for record in records if record.shards)
    source = {key for (key,) in query(stack, "SELECT id FROM tickets")}
    ledger = dict(
        query(stack, f"SELECT record_key, status FROM claude_batch_ledger WHERE workload = '{WORKLOAD.name}'")
    )
    result_rows = query(stack, f"SELECT record_key FROM {WORKLOAD.results_table}")
    in_results = Counter(key for (key,) in result_rows)
    done = {key for key in source if ledger.get(key) == "succeeded" and in_results.get(key) == 1}
    dead = {key for key in source if ledger.get(key) == "dead"}
    return Audit(
        fault=fault,
        warehouse=stack.dialect,
        rows=rows,
        runs=len(records),
        records_lost=len(source - done - dead),
        duplicates=len(result_rows) - len(in_results) + sum(1 for key in in_results if key not in source),
        batches_billed_twice=max(stats["batches_created"] - submissions, 0),
        records_billed_twice=sum(1 for count in billed.values() if count > 1),
        accounting_ok=accounting_ok,
        faults_injected=other_faults
        + sum(count for kind, count in stats["faults_injected"].items() if kind != "latency"),
        failed_attempts=sum(len(record.failed_attempts) for record in records),
        notes={
            "batches_created": stats["batches_created"],
            "batches_listed": batches_listed,
            "shard_submissions": submissions,
            "requests_received": stats["requests_received"],
            "succeeded": len(done),
            "dead": len(dead),
            "ledger": dict(Counter(ledger.values())),
            "faults": stats["faults_injected"],
            "failed": [attempt for record in records for attempt in record.failed_attempts],
            "accounting": {record.run_id: record.accounting for record in records},
            "batch_ids": {record.run_id: record.batch_ids for record in records},
        },
    )


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
