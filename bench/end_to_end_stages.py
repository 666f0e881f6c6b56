"""One measured night's stages, each run in a fresh interpreter as its Airflow task would be.

``bench/bench_end_to_end.py`` drives them (through ``bench.common.run_isolated``, by their names
in that module, which re-exports them): :class:`Setup` says where the night lives (JSON-able:
each stage process rebuilds it), each ``measure_*`` runs one task's work under :class:`_Meter`
(wall, CPU and peak memory, imports excluded) and each ``floor_*`` the least the same work can
cost on this machine.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime

import httpx

from bench.common import (
    API_KEY,
    cpu_seconds,
    current_rss_mb,
    peak_rss_mb,
)

POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
DAG_ID = "bench_end_to_end"
INTERVAL = ("2026-01-01T00:00:00", "2026-01-02T00:00:00")  # ticket_rows' day
WORKER_SLOTS = 4
QUEUE_POLL_SECONDS = 1.0  # 1 minute of emulated time
WALL_LIMIT = 3600.0


@dataclass(frozen=True)
class Setup:
    """Where one measured night lives (JSON-able: every stage process rebuilds it)."""

    warehouse: str  # "duckdb" or "postgres"
    where: str  # the DuckDB file or the PostgreSQL schema
    store_root: str
    s3_endpoint: str
    emulator_url: str
    shard_size: int
    run_id: str

    def connect(self):
        if self.warehouse == "duckdb":
            import duckdb

            return duckdb.connect(self.where)
        import psycopg2

        return psycopg2.connect(f"{POSTGRES}?options=-csearch_path%3D{self.where}")

    def config(self):
        from claude_batch.pipeline import PipelineConfig
        from claude_batch.staging import StagingLimits
        from claude_batch.warehouse import SourceSpec

        from bench.bench_staging import workload

        return PipelineConfig(
            workload=workload(),
            source=SourceSpec(
                table="tickets",
                key_column="ticket_id",
                columns=("ticket_id", "customer", "subject", "body"),
                interval_column="created_at",
            ),
            storage_root=self.store_root,
            staging_limits=StagingLimits(max_requests_per_shard=self.shard_size),
            min_poll_interval=0.5,
            max_poll_interval=2.0,
            queue_poll_interval=QUEUE_POLL_SECONDS,
        )

    def layout(self):
        from claude_batch.storage import ObjectStore, RunLayout

        return RunLayout(ObjectStore.from_airflow(self.store_root, "aws_default"), DAG_ID, self.run_id)

    def environment(self) -> dict[str, str]:
        """The Airflow connections a task of this night reads (environment connections)."""
        warehouse = (
            {"conn_type": "duckdb", "host": self.where}
            if self.warehouse == "duckdb"
            else {
                "conn_type": "postgres", "host": "127.0.0.1", "port": 5432, "login": "postgres",
                "schema": "test", "extra": {"options": f"-csearch_path={self.where}"},
            }
        )  # fmt: skip
        return {
            "AIRFLOW_CONN_ANTHROPIC_DEFAULT": json.dumps(
                {
                    "conn_type": "anthropic",
                    "host": self.emulator_url,
                    "password": API_KEY,
                    "extra": {"anthropic_client_kwargs": {"timeout": 600}},
                }
            ),  # fmt: skip
            "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(
                {
                    "conn_type": "aws",
                    "login": "testing",
                    "password": "testing",
                    "extra": {"endpoint_url": self.s3_endpoint, "region_name": "us-east-1"},
                }
            ),  # fmt: skip
            "AIRFLOW_CONN_CLAUDE_BATCH_WAREHOUSE": json.dumps(warehouse),
            "CLAUDE_BATCH_STORAGE_ROOT": self.store_root,
        }


# -- measuring one stage in its own process -------------------------------------------------------


class _Meter:
    """Wall, CPU and peak memory of what runs inside it, imports excluded."""

    def __enter__(self) -> _Meter:
        import gc

        gc.collect()
        self.baseline = current_rss_mb()
        _reset_peak()
        self.started, self.cpu_started = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.wall = time.perf_counter() - self.started
        self.cpu = cpu_seconds() - self.cpu_started
        self.peak = peak_rss_mb() - self.baseline

    def result(self, **extra: object) -> dict:
        return {"wall": self.wall, "cpu": self.cpu, "peak_mb": self.peak, **extra}


def _reset_peak() -> None:
    """Reset this process's peak RSS (VmHWM) to its current RSS, so imports do not count."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:  # not Linux, or not allowed: the peak then includes the imports
        pass


def _prepare_process(setup: Setup) -> float:
    """Environment and imports a task has before its work starts; returns the import CPU time."""
    os.environ.update(setup.environment())
    import logging

    logging.disable(logging.INFO)  # a worker writes these to task logs; not what we time
    import claude_batch.pipeline  # noqa: F401
    import claude_batch.results  # noqa: F401
    import claude_batch.validation  # noqa: F401

    return cpu_seconds()


def _state(dag_id: str, run_id: str) -> str:
    return "running"


def measure_stage(setup: str) -> dict:
    """The stage task: recovery check, then extract, render and write the shards."""
    night = Setup(**json.loads(setup))
    imports = _prepare_process(night)
    from claude_batch.pipeline import RunOptions, run_recover, run_stage
    from claude_batch.warehouse import Warehouse, dialect_for

    config, layout, options = night.config(), night.layout(), RunOptions()
    interval = tuple(datetime.fromisoformat(moment) for moment in INTERVAL)
    with _Meter() as meter:
        from claude_batch.hooks import ClaudeBatchHook

        conn = night.connect()
        warehouse = Warehouse(conn, dialect_for(conn))
        run_recover(config, warehouse, layout, options, ClaudeBatchHook().conn, _state, _log())
        summary = run_stage(config, warehouse, layout, options, interval)
        conn.close()
    return meter.result(imports=imports, summary=summary)


def measure_gate(setup: str) -> dict:
    """The gate task: the claim; returns the shards to submit."""
    night = Setup(**json.loads(setup))
    imports = _prepare_process(night)
    from claude_batch.hooks import ClaudeBatchHook
    from claude_batch.pipeline import RunOptions, run_gate
    from claude_batch.warehouse import Warehouse, dialect_for

    with _Meter() as meter:
        conn = night.connect()
        hook = ClaudeBatchHook()
        shards = run_gate(
            night.config(),
            Warehouse(conn, dialect_for(conn)),
            night.layout(),
            RunOptions(),
            hook.conn,
            hook,
            _log(),
        )
        conn.close()
    return meter.result(imports=imports, shards=shards)


def measure_submit(setup: str, shards: list[str]) -> dict:
    """Every mapped submit: the operator's own code, deferrals handed to one triggerer loop."""
    import asyncio

    night = Setup(**json.loads(setup))
    imports = _prepare_process(night)
    from airflow.sdk._shared.module_loading import import_string
    from airflow.sdk.exceptions import TaskDeferred
    from claude_batch.operators import ClaudeBatchOperator

    class _TaskInstance:
        dag_id, task_id, try_number = DAG_ID, "submit", 1

        def __init__(self, map_index: int) -> None:
            self.map_index, self.run_id = map_index, night.run_id

        def xcom_push(self, key: str, value: object) -> None:
            pass

    config = night.config()

    def operator(shard: str) -> ClaudeBatchOperator:
        return ClaudeBatchOperator(
            task_id="submit", shard=shard, storage_root=night.store_root, wait="none",
            queue_budget=config.queue_budget, queue_wait_timeout=WALL_LIMIT,
            queue_poll_interval=config.queue_poll_interval,
        )  # fmt: skip

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def first_event(trigger):
        async for event in trigger.run():
            return event.payload
        return None

    slots, lock = threading.Semaphore(WORKER_SLOTS), threading.Lock()
    counts = {"deferrals": 0}
    batch_ids: dict[int, str] = {}
    errors: list[str] = []

    def run_shard(index: int, shard: str) -> None:
        event = None
        try:
            while True:
                with slots:
                    context = {"ti": _TaskInstance(index), "run_id": night.run_id}
                    try:
                        task = operator(shard)
                        if event is None:
                            batch_ids[index] = task.execute(context)
                        else:
                            batch_ids[index] = task.execute_after_queue_wait(context, event=event)
                        return
                    except TaskDeferred as deferred:
                        classpath, kwargs = deferred.trigger.serialize()
                        trigger = import_string(classpath)(**kwargs)
                        with lock:
                            counts["deferrals"] += 1
                event = asyncio.run_coroutine_threadsafe(first_event(trigger), loop).result(WALL_LIMIT)
        except Exception as exc:  # reported; the night counts as failed
            errors.append(f"shard {index}: {type(exc).__name__}: {exc}")

    with _Meter() as meter:
        threads = [threading.Thread(target=run_shard, args=item, daemon=True) for item in enumerate(shards)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WALL_LIMIT)
    loop.call_soon_threadsafe(loop.stop)
    if errors or len(batch_ids) != len(shards):
        raise RuntimeError(f"not every shard was submitted: {errors}")
    return meter.result(imports=imports, batch_ids=[batch_ids[i] for i in sorted(batch_ids)], **counts)


def measure_record(setup: str, batch_ids: list[str]) -> dict:
    night = Setup(**json.loads(setup))
    imports = _prepare_process(night)
    from claude_batch.pipeline import RunOptions, run_record_batches
    from claude_batch.warehouse import Warehouse, dialect_for

    with _Meter() as meter:
        conn = night.connect()
        run_record_batches(
            night.config(), Warehouse(conn, dialect_for(conn)), night.layout(), RunOptions(), batch_ids
        )
        conn.close()
    return meter.result(imports=imports)


def measure_wait(setup: str, batch_ids: list[str]) -> dict:
    """The deferred wait: the pipeline's trigger over every batch until its event."""
    import asyncio

    night = Setup(**json.loads(setup))
    imports = _prepare_process(night)
    from claude_batch.triggers import ClaudeBatchTrigger

    config = night.config()

    async def first_event():
        trigger = ClaudeBatchTrigger(
            batch_ids=batch_ids, min_poll_interval=config.min_poll_interval,
            max_poll_interval=config.max_poll_interval, timeout=config.batch_timeout,
            on_timeout="cancel_and_collect",
        )  # fmt: skip
        async for event in trigger.run():
            return event.payload
        return None

    with _Meter() as meter:
        payload = asyncio.run(first_event())
    if not payload or payload.get("status") != "success":
        raise RuntimeError(f"the wait ended with {payload}")
    return meter.result(imports=imports)


def measure_collect(setup: str, part: int, batch_id: str) -> dict:
    """One mapped collect task: results to S3 (JSONL + Parquet), then validated."""
    night = Setup(**json.loads(setup))
    imports = _prepare_process(night)
    from claude_batch.hooks import ClaudeBatchHook
    from claude_batch.pipeline import RunOptions, effective_workload
    from claude_batch.results import collect_results
    from claude_batch.staging import read_manifest
    from claude_batch.validation import validate_part

    config, layout = night.config(), night.layout()
    client = ClaudeBatchHook().conn
    manifest = read_manifest(layout)
    with _Meter() as collect:
        collected = collect_results(client, layout, part, batch_id, manifest=manifest, prices=config.prices)
    with _Meter() as validate:
        validated = validate_part(effective_workload(config, RunOptions()), layout, part)
    return {
        "imports": imports,
        "collect": collect.result(lines=collected.lines),
        "validate": validate.result(by_status=validated.by_status),
    }


def measure_load(setup: str) -> dict:
    night = Setup(**json.loads(setup))
    imports = _prepare_process(night)
    from claude_batch.pipeline import RunOptions, run_load
    from claude_batch.warehouse import Warehouse, dialect_for

    with _Meter() as meter:
        conn = night.connect()
        load = run_load(
            night.config(), Warehouse(conn, dialect_for(conn)), night.layout(), RunOptions(), None
        )
        conn.close()
    return meter.result(imports=imports, load=load)


def _log():
    import logging

    return logging.getLogger("bench.end_to_end")


# -- the floors: the least the same work costs ------------------------------------------------


def floor_stage(setup: str) -> dict:
    """The warehouse's rows fetched and written as JSONL with orjson: no rendering, no hashing."""
    import orjson

    night = Setup(**json.loads(setup))
    conn = night.connect()
    sql = "SELECT ticket_id, customer, subject, body FROM tickets"
    with (
        tempfile.TemporaryDirectory() as tmp,
        open(os.path.join(tmp, "floor.jsonl"), "wb") as out,
        _Meter() as meter,
    ):
        cursor = conn.cursor(name="floor") if night.warehouse == "postgres" else conn.execute(sql)
        if night.warehouse == "postgres":
            cursor.itersize = 10_000
            cursor.execute(sql)
        while rows := cursor.fetchmany(10_000):
            for row in rows:
                out.write(
                    orjson.dumps(dict(zip(("ticket_id", "customer", "subject", "body"), row, strict=True)))
                    + b"\n"
                )
    conn.close()
    return meter.result()


def floor_results(setup: str, batch_ids: list[str]) -> dict:
    """Every batch's results downloaded with plain httpx (collect's floor), then parsed (validate's)."""
    import orjson

    night = Setup(**json.loads(setup))
    headers = {"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}
    with tempfile.TemporaryDirectory() as tmp, httpx.Client(headers=headers, timeout=600) as client:
        paths = []
        with _Meter() as download:
            for batch_id in batch_ids:
                path = os.path.join(tmp, f"{batch_id}.jsonl")
                with client.stream(
                    "GET", f"{night.emulator_url}/v1/messages/batches/{batch_id}/results"
                ) as answer:
                    answer.raise_for_status()
                    with open(path, "wb") as handle:
                        for chunk in answer.iter_bytes(1 << 20):
                            handle.write(chunk)
                paths.append(path)
        with _Meter() as parse:
            lines = 0
            for path in paths:
                with open(path, "rb") as handle:
                    for line in handle:
                        orjson.loads(line)
                        lines += 1
    return {"collect": download.result(), "validate": parse.result(lines=lines)}


def floor_load(setup: str) -> dict:
    """The validated Parquet into a scratch table through the warehouse's own bulk path."""
    import pyarrow.parquet as pq

    night = Setup(**json.loads(setup))
    os.environ.update(night.environment())
    layout = night.layout()
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for index, path in enumerate(layout.store.list(f"{layout.prefix}/validated")):
            local = os.path.join(tmp, f"part-{index}.parquet")
            with open(local, "wb") as handle:
                handle.write(layout.store.read_bytes(path))
            files.append(local)
        conn = night.connect()
        with _Meter() as meter:
            if night.warehouse == "duckdb":
                conn.execute(f"CREATE OR REPLACE TABLE floor_load AS SELECT * FROM read_parquet({files!r})")
            else:
                import pyarrow.csv as pacsv

                schema = pq.read_schema(files[0])
                with conn.cursor() as cur:
                    cur.execute("DROP TABLE IF EXISTS floor_load")
                    cur.execute(
                        "CREATE TABLE floor_load ("
                        + ", ".join(f'"{name}" TEXT' for name in schema.names)
                        + ")"
                    )
                    for local in files:
                        csv_path = local + ".csv"
                        pacsv.write_csv(pq.read_table(local), csv_path)
                        with open(csv_path, "rb") as handle:
                            cur.copy_expert(
                                "COPY floor_load FROM STDIN WITH (FORMAT csv, HEADER true)", handle
                            )
                conn.commit()
        conn.close()
    return meter.result()
