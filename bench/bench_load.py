"""Load throughput and peak memory: validated rows into DuckDB and PostgreSQL through the bulk paths.

Setup (not measured, its own process): a synthetic run of N items, as staging and validation
leave it: keys sidecars, validated Parquet parts of up to 100,000 rows (90% valid, 10% errored
or expired), and the ledger rows of every item as ``pending``. Measured, in a fresh
interpreter: ``Warehouse.load_run`` (one transaction: the valid rows upserted into the results
table, every item's ledger row moved by one set-based statement; PostgreSQL streams the Parquet
batch by batch through COPY, DuckDB reads it itself), then ``check_accounting``, then the same
load again (a re-run: every result row overwritten in place, nothing duplicated, the ledger
unchanged). Peak MB is the process's peak resident memory above its level before the load;
client CPU s is this process's CPU time for the first load (DuckDB's work included, the
PostgreSQL server's not). DuckDB uses a database file; PostgreSQL a fresh schema of the local
``test`` database (skipped when it is not running). Sizes: 10,000 and 100,000 rows
(``BENCH_SCALE=full``: 100,000 and 1,000,000). Run: ``python -m bench.bench_load``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid

from bench.common import (
    current_rss_mb,
    markdown_table,
    peak_rss_mb,
    postgres_up,
    row_counts,
    run_isolated,
    write_results,
)

PART_ROWS = 100_000
POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
RUN_ID = "load"


def workload():
    from bench.bench_staging import workload as staging_workload

    return staging_workload()


def _connect(target: str, where: str):
    if target == "duckdb":
        import duckdb

        return duckdb.connect(where)
    import psycopg2

    return psycopg2.connect(f"{POSTGRES}?options=-csearch_path%3D{where}")


def prepare(target: str, where: str, root: str, count: int) -> dict:
    """Write the synthetic run to ``root`` and its pending ledger rows to the warehouse."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from claude_batch.staging import SHARD_KEYS_SCHEMA, Manifest, ShardManifest
    from claude_batch.storage import ObjectStore, RunLayout
    from claude_batch.validation import validated_path, validated_schema
    from claude_batch.warehouse import Warehouse

    spec = workload()
    layout = RunLayout(ObjectStore(root), "bench", RUN_ID)
    schema = validated_schema(spec)
    shards = []
    categories = ["billing", "bug", "feature_request", "shipping", "other"]
    for part, start in enumerate(range(0, count, PART_ROWS)):
        size = min(PART_ROWS, count - start)
        keys = [f"T{i:09d}" for i in range(start, start + size)]
        status = [
            "valid" if i % 10 else ("errored" if i % 20 else "expired") for i in range(start, start + size)
        ]
        valid = [s == "valid" for s in status]
        with layout.store.open(f"{layout.prefix}/requests/part-{part:05d}.keys.parquet", "wb") as handle:
            pq.write_table(
                pa.table(
                    {
                        "custom_id": keys,
                        "record_key": keys,
                        "row_number": list(range(start + 1, start + size + 1)),
                        "model": [spec.model] * size,
                    },
                    schema=SHARD_KEYS_SCHEMA,
                ),
                handle,
            )
        columns = {
            "custom_id": keys,
            "record_key": keys,
            "prompt_version": [spec.prompt_version] * size,
            "batch_id": [f"msgbatch_{part}"] * size,
            "model": ["claude-haiku-4-5-20251001" if v else None for v in valid],
            "outcome": ["succeeded" if v else s for v, s in zip(valid, status, strict=True)],
            "status": status,
            "reason_code": [None if v else s for v, s in zip(valid, status, strict=True)],
            "reason": [None if v else f"the request {s}" for v, s in zip(valid, status, strict=True)],
            "error_type": [None if s != "errored" else "overloaded_error" for s in status],
            "stop_reason": ["end_turn" if v else None for v in valid],
            "raw_text": [None] * size,
            "output_json": [
                f'{{"category":"{categories[i % 5]}","priority":{1 + i % 5},"summary":"Ticket {i} summary",'
                f'"needs_refund":{"true" if i % 3 else "false"}}}'
                if v
                else None
                for i, v in zip(range(start, start + size), valid, strict=True)
            ],
            "input_tokens": [420] * size,
            "output_tokens": [38] * size,
            "cache_creation_input_tokens": [0] * size,
            "cache_read_input_tokens": [0] * size,
            "cost_usd": [0.0003] * size,
            "category": [
                categories[i % 5] if v else None
                for i, v in zip(range(start, start + size), valid, strict=True)
            ],
            "priority": [
                1 + i % 5 if v else None for i, v in zip(range(start, start + size), valid, strict=True)
            ],
            "summary": [
                f"Ticket {i} summary" if v else None
                for i, v in zip(range(start, start + size), valid, strict=True)
            ],
            "needs_refund": [
                bool(i % 3) if v else None for i, v in zip(range(start, start + size), valid, strict=True)
            ],
            "escalate": [
                (1 + i % 5) >= 4 if v else None
                for i, v in zip(range(start, start + size), valid, strict=True)
            ],
        }
        with layout.store.open(validated_path(layout, part), "wb") as handle:
            pq.write_table(pa.table(columns, schema=schema), handle, row_group_size=50_000)
        shards.append(
            ShardManifest(
                part,
                f"requests/part-{part:05d}.jsonl",
                f"requests/part-{part:05d}.keys.parquet",
                size,
                0,
                "",
                {spec.model: size},
            )
        )
    manifest = Manifest(
        workload=spec.name,
        prompt_version=spec.prompt_version,
        dag_id="bench",
        run_id=RUN_ID,
        cache_setting="off",
        key_field="ticket_id",
        models=[spec.model],
        extracted_rows=count,
        staged_requests=count,
        rejected_rows=0,
        rejected_by_reason={},
        rejects="requests/rejects.jsonl",
        shards=shards,
        limits={},
        estimate={},
        created_at="2026-01-01T00:00:00+00:00",
    )
    layout.store.write_json(layout.manifest, manifest.to_dict())
    conn = _connect(target, where)
    warehouse = Warehouse(conn)
    warehouse.ensure_tables(spec)
    warehouse.claim_staged(spec, layout, manifest)
    conn.close()
    return {"parts": len(shards)}


def measure_load(target: str, where: str, root: str) -> dict:
    """``load_run``, ``check_accounting`` and a re-run of the load, timed.

    With the peak memory above the baseline.
    """
    from claude_batch.staging import read_manifest
    from claude_batch.storage import ObjectStore, RunLayout
    from claude_batch.warehouse import Warehouse

    spec = workload()
    layout = RunLayout(ObjectStore(root), "bench", RUN_ID)
    manifest = read_manifest(layout)
    warehouse = Warehouse(_connect(target, where))
    baseline = current_rss_mb()
    started, cpu_started = time.perf_counter(), time.process_time()
    summary = warehouse.load_run(spec, layout, manifest)
    load_seconds, load_cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    peak_rss = peak_rss_mb()  # of the first load (the re-run below may raise it)
    started = time.perf_counter()
    report = warehouse.check_accounting(spec, manifest)
    check_seconds = time.perf_counter() - started
    ledger_before = warehouse.ledger_counts(spec)
    started = time.perf_counter()
    again = warehouse.load_run(spec, layout, manifest)
    reload_seconds = time.perf_counter() - started
    stored, distinct = _count_results(warehouse, spec)
    return {
        "load_seconds": load_seconds,
        "load_cpu_seconds": load_cpu_seconds,
        "check_seconds": check_seconds,
        "reload_seconds": reload_seconds,
        "rows": summary.rows,
        "upserted": summary.results_upserted,
        "accounted": report.accounted,
        "reload_ledger_moved": again.ledger_updated,
        "ledger_unchanged": warehouse.ledger_counts(spec) == ledger_before,
        "results_stored": stored,
        "results_distinct": distinct,
        "peak_mb": peak_rss - baseline,
        "rss_mb": peak_rss,
    }


def _count_results(warehouse, spec) -> tuple[int, int]:
    """Rows in the results table and distinct (record key, prompt version) pairs among them."""
    table = warehouse.dialect.quote(warehouse.results_table(spec))
    with warehouse.dialect.transaction(warehouse.conn) as cursor:
        rows = warehouse.dialect.query(
            cursor, f"SELECT COUNT(*), COUNT(DISTINCT record_key || '|' || prompt_version) FROM {table}"
        )
    return int(rows[0][0]), int(rows[0][1])


def main() -> None:
    rows = []
    targets = ["duckdb"] + (["postgres"] if postgres_up() else [])
    for target in targets:
        for count in row_counts():
            root = tempfile.mkdtemp(prefix="bench-load-")
            schema = f"bench_{uuid.uuid4().hex[:10]}"
            where = f"{root}/warehouse.duckdb" if target == "duckdb" else schema
            if target == "postgres":
                import psycopg2

                admin = psycopg2.connect(POSTGRES)
                admin.autocommit = True
                admin.cursor().execute(f"CREATE SCHEMA {schema}")
            try:
                run_isolated(
                    "bench.bench_load", "prepare", target=target, where=where, root=root, count=count
                )
                measured = run_isolated(
                    "bench.bench_load", "measure_load", target=target, where=where, root=root
                )
            finally:
                shutil.rmtree(root, ignore_errors=True)
                if target == "postgres":
                    admin.cursor().execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
                    admin.close()
            assert measured["rows"] == measured["accounted"] == count
            # The re-run duplicated nothing and moved no ledger item a second time.
            assert measured["results_stored"] == measured["results_distinct"] == measured["upserted"]
            assert measured["ledger_unchanged"] and measured["reload_ledger_moved"] == 0
            rows.append(
                {
                    "warehouse": target,
                    "rows": count,
                    "valid rows upserted": measured["upserted"],
                    "load rows/s": count / measured["load_seconds"],
                    "load s": measured["load_seconds"],
                    "client CPU s": measured["load_cpu_seconds"],
                    "accounting check s": measured["check_seconds"],
                    "re-run load s": measured["reload_seconds"],
                    "peak MB": measured["peak_mb"],
                    "peak RSS MB": measured["rss_mb"],
                    "load average": os.getloadavg()[0],
                }
            )
    markdown = (
        "### Load: validated rows upserted and the ledger moved, one transaction per run\n\n"
        + markdown_table(rows, list(rows[0]))
        + "\n\nTargets: 100,000 rows/s or more into DuckDB, 50,000 into PostgreSQL, through the bulk paths "
        "(DuckDB reading the validated Parquet itself within its load memory budget; PostgreSQL COPY from "
        "CSV that pyarrow writes batch by batch). Rows/s counts every row loaded (valid ones to the results "
        "table, all of them to the ledger). The re-run loads the same run again: every result row is "
        "overwritten in place (the benchmark checks nothing is duplicated and the ledger is unchanged). "
        "Load average: the machine's 1-minute load when the row was measured (wall-clock figures are "
        "noisy when it is high)."
    )
    write_results("load", rows, markdown)


if __name__ == "__main__":
    main()
