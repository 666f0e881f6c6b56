"""A whole night end to end: rows from DuckDB or PostgreSQL to loaded results, stage by stage.

Two parts, both against the emulator over HTTP (its own process, a 300,000-request processing
queue as the API's mid tiers have, batches that take ``BATCH_WALL_SECONDS`` of wall time) and S3
on a moto server:

**Stage by stage.** Every stage runs in a fresh interpreter, as its Airflow task would run in a
worker: stage (recovery check, extract, render, write shards), gate (claim), submit (every shard
through ``ClaudeBatchOperator``: four worker slots, a full queue defers the shard to
``QueueRoomTrigger`` on one triggerer loop and the resume is a fresh operator, as in Airflow),
record, wait (the pipeline's ``ClaudeBatchTrigger`` over every batch), collect and validate (one
process per shard, as the mapped tasks), load. For each: wall time, client CPU time (user +
system, all threads, imports excluded: they are measured apart), the time the stage spent not on
a CPU (waiting on the emulator, S3, the database or a core), the emulator's own CPU time over the
stage, and the process's peak memory above its RSS after imports (the peak is reset after
imports through ``/proc/self/clear_refs``). Beside each stage, its floor: the least the same
work can cost on this machine (stage: the warehouse's rows fetched and written as JSONL with
orjson; collect: the results downloaded with plain httpx; validate: every result line parsed
with orjson; load: the validated Parquet inserted into a scratch table with the warehouse's
bulk path; submit, record and wait have no client-side floor worth the name: they are HTTP and
waiting). Checks: every row loaded once, every ledger item final.

**One DAG run.** The project's DAG builder (``claude_batch_dag``) run by Airflow itself
(``dag.test()``: the real task runner, the submit's deferrals and the wait's trigger run inline)
over the largest size on DuckDB: it has to finish with every item final, unattended. The table
gives its wall time, create calls, queue-full 429s, deferrals and the peak queue use sampled
every 50 ms.

BENCH_SCALE=full: 100,000 and 1,000,000 rows; small: 10,000 and 100,000 (with a queue of 30,000
and 10,000-request shards, so the queue still fills). Run: ``python -m bench.bench_end_to_end``
(``--night duckdb 1000000``: that night alone; ``--dag-only``: the DAG run alone).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import httpx

from bench.bench_queue import _Sampler
from bench.common import (
    API_KEY,
    BIN,
    REPO,
    emulator_process,
    markdown_table,
    moto_process,
    postgres_up,
    row_counts,
    run_isolated,
    scale,
    write_results,
)

# The stages and their floors, each run in its own process by name from this module
# (``run_isolated("bench.bench_end_to_end", ...)``), live in bench/end_to_end_stages.py.
from bench.end_to_end_stages import DAG_ID as DAG_ID
from bench.end_to_end_stages import INTERVAL as INTERVAL
from bench.end_to_end_stages import POSTGRES as POSTGRES
from bench.end_to_end_stages import QUEUE_POLL_SECONDS as QUEUE_POLL_SECONDS
from bench.end_to_end_stages import WALL_LIMIT as WALL_LIMIT
from bench.end_to_end_stages import WORKER_SLOTS as WORKER_SLOTS
from bench.end_to_end_stages import Setup as Setup
from bench.end_to_end_stages import floor_load as floor_load
from bench.end_to_end_stages import floor_results as floor_results
from bench.end_to_end_stages import floor_stage as floor_stage
from bench.end_to_end_stages import measure_collect as measure_collect
from bench.end_to_end_stages import measure_gate as measure_gate
from bench.end_to_end_stages import measure_load as measure_load
from bench.end_to_end_stages import measure_record as measure_record
from bench.end_to_end_stages import measure_stage as measure_stage
from bench.end_to_end_stages import measure_submit as measure_submit
from bench.end_to_end_stages import measure_wait as measure_wait

TIME_SCALE = 60.0
BATCH_WALL_SECONDS = 10.0
# The DAG run's batches stay in the queue this long (wall clock), so that a full queue makes the
# later shards wait: with 10 s, batches end faster than the next shards are uploaded.
QUEUE_BATCH_WALL_SECONDS = 150.0


def sizes() -> tuple[tuple[int, ...], int, int]:
    """(row counts, queue size, requests per shard)."""
    if scale() == "full":
        return row_counts(), 300_000, 100_000
    return row_counts(), 30_000, 10_000


# -- one night, stage by stage -----------------------------------------------------------------


def _fill_source(night: Setup, count: int) -> None:
    """``tickets`` with ``count`` rows of bench_staging's ticket rows (not measured)."""
    import pyarrow as pa

    from bench.bench_staging import ticket_rows

    columns = ("ticket_id", "customer", "subject", "body", "created_at")
    chunks = []
    batch: dict[str, list] = {name: [] for name in columns}
    for row in ticket_rows(count):
        for name in columns:
            batch[name].append(row[name])
        if len(batch["ticket_id"]) == 100_000:
            chunks.append(pa.table(batch))
            batch = {name: [] for name in columns}
    if batch["ticket_id"]:
        chunks.append(pa.table(batch))
    table = pa.concat_tables(chunks)
    table = table.set_column(4, "created_at", table["created_at"].cast(pa.timestamp("s")))
    conn = night.connect()
    if night.warehouse == "duckdb":
        conn.register("tickets_in", table)
        conn.execute("CREATE TABLE tickets AS SELECT * FROM tickets_in")
        conn.unregister("tickets_in")
    else:
        import io

        import pyarrow.csv as pacsv

        with conn.cursor() as cur:
            cur.execute(f"CREATE SCHEMA IF NOT EXISTS {night.where}")
            cur.execute(
                "CREATE TABLE tickets (ticket_id TEXT PRIMARY KEY, customer TEXT, subject TEXT, body TEXT, "
                "created_at TIMESTAMP)"
            )
            buffer = io.BytesIO()
            pacsv.write_csv(table, buffer)
            buffer.seek(0)
            cur.copy_expert("COPY tickets FROM STDIN WITH (FORMAT csv, HEADER true)", buffer)
        conn.commit()
    conn.close()


def _emulator_cpu() -> float:
    """CPU seconds the emulator process has used so far."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        try:
            if any("claude-batch-emulator" in part for part in child.cmdline()):
                times = child.cpu_times()
                return times.user + times.system
        except psutil.Error:
            continue
    return 0.0


def _check_night(night: Setup, count: int) -> dict:
    """Every row loaded once, every ledger item final."""
    conn = night.connect()
    statements = {
        "ledger": (
            "SELECT status, COUNT(*) FROM claude_batch_ledger "
            "WHERE workload = 'ticket_triage' GROUP BY status"
        ),
        "results": "SELECT COUNT(*), COUNT(DISTINCT record_key) FROM ticket_triage_results",
    }
    answers = {}
    for name, sql in statements.items():
        if night.warehouse == "duckdb":
            answers[name] = conn.execute(sql).fetchall()
        else:
            with conn.cursor() as cur:
                cur.execute(sql)
                answers[name] = cur.fetchall()
    conn.close()
    ledger = {status: n for status, n in answers["ledger"]}
    results, distinct = answers["results"][0]
    if sum(ledger.values()) != count or set(ledger) - {"succeeded", "invalid", "dead"}:
        raise RuntimeError(f"not every item is final: {ledger}")
    if results != distinct:
        raise RuntimeError(f"duplicated result rows: {results} rows, {distinct} keys")
    return {"ledger": ledger, "result_rows": results}


def measure_night(warehouse: str, count: int, queue: int, shard_size: int) -> tuple[list[dict], dict]:
    """One night stage by stage; returns the per-stage rows and the night's totals."""
    with (
        tempfile.TemporaryDirectory() as tmp,
        moto_process() as s3,
        emulator_process(
            time_scale=TIME_SCALE,
            processing_seconds=BATCH_WALL_SECONDS * TIME_SCALE,
            max_queued_requests=queue,
        ) as emulator,
    ):
        import boto3

        boto3.client("s3", endpoint_url=s3, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket="bench")  # fmt: skip
        schema = f"bench_e2e_{uuid.uuid4().hex[:8]}"
        night = Setup(
            warehouse=warehouse,
            where=os.path.join(tmp, "warehouse.duckdb") if warehouse == "duckdb" else schema,
            store_root="s3://bench/claude-batch",
            s3_endpoint=s3,
            emulator_url=emulator,
            shard_size=shard_size,
            run_id=f"scheduled__{INTERVAL[1]}",
        )
        _fill_source(night, count)
        try:
            return _stages(night, count)
        finally:
            if warehouse == "postgres":
                import psycopg2

                with psycopg2.connect(POSTGRES) as conn, conn.cursor() as cur:
                    cur.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def _stages(night: Setup, count: int) -> tuple[list[dict], dict]:
    setup = json.dumps(asdict(night))
    rows: list[dict] = []
    imports = 0.0

    def stage(name: str, function: str, floor: dict | None = None, **kwargs: object) -> dict:
        nonlocal imports
        emulator_before = _emulator_cpu()
        result = run_isolated("bench.bench_end_to_end", function, setup=setup, **kwargs)
        imports += result.get("imports", 0.0)
        rows.append(_row(name, result, _emulator_cpu() - emulator_before, floor))
        return result

    started = time.perf_counter()
    stage(
        "stage (extract, render, write)",
        "measure_stage",
        floor=run_isolated("bench.bench_end_to_end", "floor_stage", setup=setup),
    )
    shards = stage("gate (claim)", "measure_gate")["shards"]
    submitted = stage("submit", "measure_submit", shards=shards)
    batch_ids = submitted["batch_ids"]
    stage("record", "measure_record", batch_ids=batch_ids)
    stage("wait", "measure_wait", batch_ids=batch_ids)
    emulator_before = _emulator_cpu()
    parts = [
        run_isolated("bench.bench_end_to_end", "measure_collect", setup=setup, part=index, batch_id=batch_id)
        for index, batch_id in enumerate(batch_ids)
    ]
    emulator_collect = _emulator_cpu() - emulator_before
    imports += sum(part["imports"] for part in parts)
    floors = run_isolated("bench.bench_end_to_end", "floor_results", setup=setup, batch_ids=batch_ids)
    for name in ("collect", "validate"):
        merged = {
            "wall": sum(part[name]["wall"] for part in parts),
            "cpu": sum(part[name]["cpu"] for part in parts),
            "peak_mb": max(part[name]["peak_mb"] for part in parts),
        }
        rows.append(
            _row(
                f"{name} ({len(parts)} tasks)",
                merged,
                emulator_collect if name == "collect" else 0.0,
                floors[name],
            )
        )
    stage("load", "measure_load", floor=run_isolated("bench.bench_end_to_end", "floor_load", setup=setup))
    wall = time.perf_counter() - started
    checked = _check_night(night, count)
    cpu = sum(row["client CPU s"] for row in rows)
    floor_cpu = sum(row.get("floor CPU s") or 0.0 for row in rows)
    totals = {
        "warehouse": night.warehouse,
        "rows": count,
        "batches": len(batch_ids),
        "deferrals": submitted["deferrals"],
        "wall s": wall,
        "client CPU s": cpu,
        "client CPU us/row": cpu / count * 1e6,
        "floor CPU s": floor_cpu,
        "CPU / floors": cpu / floor_cpu if floor_cpu else None,
        "waiting s": sum(row["waiting s"] for row in rows),
        "imports CPU s": imports,
        "peak MB (max stage)": max(row["peak MB"] for row in rows),
        "final items": sum(checked["ledger"].values()),
        "result rows": checked["result_rows"],
    }
    for row in rows:
        row["warehouse"], row["rows"] = night.warehouse, count
        row["share of CPU"] = f"{row['client CPU s'] / cpu:.0%}" if cpu else ""
    return rows, totals


def _row(name: str, result: dict, emulator_cpu: float, floor: dict | None) -> dict:
    return {
        "stage": name,
        "wall s": result["wall"],
        "client CPU s": result["cpu"],
        "waiting s": max(result["wall"] - result["cpu"], 0.0),
        "emulator CPU s": emulator_cpu,
        "peak MB": result["peak_mb"],
        "floor CPU s": floor["cpu"] if floor else None,
        "floor wall s": floor["wall"] if floor else None,
    }


# -- one night as an Airflow DAG run -------------------------------------------------------------


def measure_dag_run(count: int, queue: int, shard_size: int) -> dict:
    """The project's DAG, run by Airflow (dag.test) over ``count`` rows on DuckDB, unattended."""
    with (
        tempfile.TemporaryDirectory() as tmp,
        moto_process() as s3,
        emulator_process(
            time_scale=TIME_SCALE,
            processing_seconds=QUEUE_BATCH_WALL_SECONDS * TIME_SCALE,
            max_queued_requests=queue,
        ) as emulator,
        httpx.Client(headers={"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}) as client,
    ):
        import boto3

        boto3.client("s3", endpoint_url=s3, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket="bench")  # fmt: skip
        night = Setup(
            warehouse="duckdb", where=os.path.join(tmp, "warehouse.duckdb"), store_root="s3://bench/claude-batch",
            s3_endpoint=s3, emulator_url=emulator, shard_size=shard_size, run_id="",
        )  # fmt: skip
        _fill_source(night, count)
        home = Path(tmp) / "airflow"
        dags = Path(tmp) / "dags"
        dags.mkdir()
        (dags / "bench_end_to_end_dag.py").write_text(_DAG_FILE.format(repo=str(REPO), shard_size=shard_size))
        env = {
            **os.environ,
            **night.environment(),
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
            "CLAUDE_BATCH_DEADLINE_HOURS": "0",  # dag.test() cannot run a DAG with a deadline alert
            "PYTHONPATH": str(REPO),
        }
        subprocess.run([str(BIN / "airflow"), "db", "migrate"], check=True, capture_output=True, env=env)
        sampler = _Sampler(emulator)
        sampler.start()
        started = time.perf_counter()
        try:
            out = subprocess.run(
                [sys.executable, "-c", _DAG_RUNNER, str(dags / "bench_end_to_end_dag.py")],
                capture_output=True, text=True, env=env, timeout=WALL_LIMIT,
            )  # fmt: skip
        finally:
            sampler.stop()
        wall = time.perf_counter() - started
        if "@@STATE@@success" not in out.stdout:
            raise RuntimeError(f"the DAG run did not succeed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
        stats = client.get(f"{emulator}/_emulator/stats").json()
        checked = _check_night(night, count)
        shutil.rmtree(home, ignore_errors=True)
    return {
        "rows": count,
        "queue": queue,
        "shards": stats["batches_created"],
        "wall s": wall,
        "create calls": stats["http_requests"]["create"],
        "429s (queue full)": stats["faults_injected"].get("queue_full", 0),
        "requests received": stats["requests_received"],
        "peak queue use": sampler.peak,
        "final items": sum(checked["ledger"].values()),
        "succeeded": checked["ledger"].get("succeeded", 0),
        "result rows": checked["result_rows"],
    }


_DAG_FILE = '''"""The bench's night: bench_staging's ticket workload through the project's DAG builder.

An Airflow DAG file (DagBag's safe mode reads only files that name airflow and a dag).
"""
import sys
from datetime import UTC, datetime

sys.path.insert(0, {repo!r})
from bench.bench_end_to_end import DAG_ID, QUEUE_POLL_SECONDS
from bench.bench_staging import workload
from claude_batch.pipeline import PipelineConfig, claude_batch_dag
from claude_batch.staging import StagingLimits
from claude_batch.warehouse import SourceSpec

dag = claude_batch_dag(
    PipelineConfig(
        workload=workload(),
        source=SourceSpec(table="tickets", key_column="ticket_id",
                          columns=("ticket_id", "customer", "subject", "body"), interval_column="created_at"),
        staging_limits=StagingLimits(max_requests_per_shard={shard_size}),
        min_poll_interval=0.5,
        max_poll_interval=2.0,
        queue_poll_interval=QUEUE_POLL_SECONDS,
    ),
    dag_id=DAG_ID,
    schedule=None,
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
)
'''

_DAG_RUNNER = """
import sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
assert not bag.import_errors, bag.import_errors
run = bag.dags["bench_end_to_end"].test(run_conf={"window_start": "2026-01-01", "window_end": "2026-01-02"})
print("@@STATE@@" + str(run.state))
"""


STAGE_COLUMNS = [
    "warehouse", "rows", "stage", "wall s", "client CPU s", "share of CPU", "waiting s", "emulator CPU s",
    "peak MB", "floor CPU s", "floor wall s",
]  # fmt: skip
TOTAL_COLUMNS = [
    "warehouse", "rows", "batches", "deferrals", "wall s", "client CPU s", "client CPU us/row", "floor CPU s",
    "CPU / floors", "waiting s", "imports CPU s", "peak MB (max stage)", "final items", "result rows",
]  # fmt: skip
DAG_COLUMNS = [
    "rows", "queue", "shards", "wall s", "create calls", "429s (queue full)", "requests received",
    "peak queue use", "final items", "succeeded", "result rows",
]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Both parts; ``--dag-only``: only the DAG run; ``--night WAREHOUSE ROWS``: one stage-by-stage night.

    The parts run alone write their tables apart (``end_to_end_dag``, ``end_to_end_<warehouse>_<rows>``).
    """
    argv = argv or []
    counts, queue, shard_size = sizes()
    if "--dag-only" in argv:
        dag_run = measure_dag_run(max(counts), queue, shard_size)
        write_results("end_to_end_dag", [dag_run], markdown_table([dag_run], DAG_COLUMNS))
        return
    if "--night" in argv:
        warehouse, count = argv[argv.index("--night") + 1], int(argv[argv.index("--night") + 2])
        rows, total = measure_night(warehouse, count, queue, shard_size)
        tables = markdown_table(rows, STAGE_COLUMNS) + "\n\n" + markdown_table([total], TOTAL_COLUMNS)
        write_results(f"end_to_end_{warehouse}_{count}", [*rows, total], tables)
        return
    warehouses = ["duckdb"] + (
        ["postgres"] if postgres_up() or os.environ.get("REQUIRE_SERVICES") == "1" else []
    )
    stage_rows, totals = [], []
    for count in counts:
        for warehouse in warehouses:
            print(f"   {warehouse}, {count:,} rows", flush=True)
            rows, total = measure_night(warehouse, count, queue, shard_size)
            stage_rows += rows
            totals.append(total)
    dag_run = measure_dag_run(max(counts), queue, shard_size)
    markdown = "\n\n".join(
        [
            f"### End to end: a night of {' and '.join(f'{c:,}' for c in counts)} rows, stage by stage",
            markdown_table(stage_rows, STAGE_COLUMNS),
            markdown_table(totals, TOTAL_COLUMNS),
            "Each stage runs in a fresh interpreter as its task would (collect and validate: one process per "
            "shard; their wall and CPU are summed, their peak is the largest). Client CPU excludes each "
            "process's imports (summed apart under imports CPU s); waiting is wall minus client CPU (the "
            "emulator, S3, the database, or a busy core); emulator CPU is the emulator process's own, over "
            "the stage (it also renders results in the background from each batch's creation). Floors: stage "
            "= the rows fetched and written as JSONL with orjson; collect = the results downloaded with "
            "plain httpx; validate = every line parsed with orjson; load = the validated Parquet "
            "bulk-inserted into a scratch table. Submit, record and wait have no client floor. The queue "
            f"holds {queue:,} requests, batches take {BATCH_WALL_SECONDS:.0f} s of wall time, shards hold "
            f"{shard_size:,} requests. Target: at most 30 us of client CPU per row at 1,000,000 rows.",
            f"### End to end: the project's DAG run by Airflow over {max(counts):,} rows, queue {queue:,}",
            markdown_table([dag_run], DAG_COLUMNS),
            "One `dag.test()` of `claude_batch_dag` on DuckDB (Airflow's task runner; deferred tasks and "
            "their triggers run inline, one at a time), default staging limits (a shard ends at 100,000 "
            f"requests or the byte limit), batches that stay {QUEUE_BATCH_WALL_SECONDS:.0f} s (wall) in the "
            "queue: shards that do not fit are refused by the emulator's queue-full 429, deferred to "
            "`QueueRoomTrigger` and resumed when batches end. Peak queue use is sampled from the emulator "
            "every 50 ms.",
        ]
    )
    write_results("end_to_end", stage_rows + totals + [dag_run], markdown)


if __name__ == "__main__":
    main(sys.argv[1:])
