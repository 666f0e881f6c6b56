"""The claim: an item belongs to one live run; record keys of every SQL type mean one item.

Over DuckDB and PostgreSQL. On PostgreSQL two connections claim overlapping items at the same
moment (the server runs both statements concurrently; row locks decide), and every item ends
with exactly one of them.
"""

from __future__ import annotations

import itertools
import threading

import psycopg2
import pytest
from claude_batch.staging import read_manifest, restrict_to_claimed, stage_requests
from claude_batch.storage import RunLayout
from claude_batch.validation import validate_part
from claude_batch.warehouse import RECORD_KEY_COLUMN, SourceSpec, Warehouse

from tests.datapath.conftest import INTERVAL, make_workload, query, ticket_rows
from tests.datapath.helpers import errored, succeeded, write_results_part
from tests.services import create_tickets

GOOD = '{"category": "billing", "total_amount": 12, "summary": "charged twice"}'
SOURCE = SourceSpec(key_column="id", table="tickets", interval_column="created_at")


def stage(warehouse, workload, store, run_id, source=SOURCE, interval=INTERVAL, limit=None):
    layout = RunLayout(store, "invoices_dag", run_id)
    rows = itertools.islice(warehouse.extract(workload, source, run_id, interval, chunk_rows=50), limit)
    manifest = stage_requests(rows, workload, layout, key_field=RECORD_KEY_COLUMN, cache_setting="off")
    return layout, manifest


def execute(conn, sql: str, params=()) -> None:
    if type(conn).__module__.split(".")[0] in ("duckdb", "_duckdb"):
        conn.execute(sql, list(params))
        return
    with conn.cursor() as cur:
        cur.execute(sql.replace("?", "%s"), params)
    conn.commit()


def staged_keys(layout, manifest) -> set[str]:
    from claude_batch.staging import read_shard_keys

    return {
        key
        for shard in manifest.shards
        for key in read_shard_keys(layout, shard).column("record_key").to_pylist()
    }


def finish(warehouse, workload, layout, manifest, outcome_for):
    for shard in manifest.shards:
        write_results_part(layout, manifest, shard.part, outcome_for)
        validate_part(workload, layout, shard.part)
    load = warehouse.load_run(workload, layout, manifest)
    return load, warehouse.check_accounting(workload, manifest, layout=layout)


def test_the_second_run_to_claim_drops_what_the_first_holds_and_names_it(setup):
    warehouse, workload, store = setup
    create_tickets(warehouse.conn, ticket_rows(30))
    layout_a, manifest_a = stage(warehouse, workload, store, "run-a")
    layout_b, manifest_b = stage(warehouse, workload, store, "run-b")  # before A's gate: both staged all 30
    assert manifest_a.staged_requests == manifest_b.staged_requests == 30
    claim_a = warehouse.claim_staged(workload, layout_a, manifest_a)
    claim_b = warehouse.claim_staged(workload, layout_b, manifest_b)
    assert (claim_a.claimed, claim_a.complete) == (30, True)
    assert claim_b.claimed == 0 and claim_b.holders == {"run-a": 30}
    assert "30 by run-a" in claim_b.describe_holders()
    restricted = restrict_to_claimed(layout_b, manifest_b, claim_b.not_claimed)
    assert (restricted.shards, restricted.extracted_rows, restricted.staged_requests) == ([], 0, 0)
    assert read_manifest(layout_b) == restricted
    # A claims again (a retried gate): still all its own.
    assert warehouse.claim_staged(workload, layout_a, manifest_a).claimed == 30
    assert dict(query(warehouse.conn, "SELECT run_id, COUNT(*) FROM claude_batch_ledger GROUP BY 1")) == {
        "run-a": 30
    }


def test_a_partly_held_shard_is_rewritten_with_only_the_claimed_items(setup):
    warehouse, workload, store = setup
    create_tickets(warehouse.conn, ticket_rows(40))
    layout_b, manifest_b = stage(warehouse, workload, store, "run-b")
    # Run A staged 15 of the same items (a row limit) and claims them first.
    layout_a, manifest_a = stage(warehouse, workload, store, "run-a", limit=15)
    first = staged_keys(layout_a, manifest_a)
    assert warehouse.claim_staged(workload, layout_a, manifest_a).claimed == 15
    claim_b = warehouse.claim_staged(workload, layout_b, manifest_b)
    assert claim_b.claimed == 25 and claim_b.holders == {"run-a": 15}
    restricted = restrict_to_claimed(layout_b, manifest_b, claim_b.not_claimed)
    assert restricted.staged_requests == restricted.extracted_rows == 25
    assert staged_keys(layout_b, restricted) == set(staged_keys(layout_b, manifest_b)) - set(first)
    shard = restricted.shards[0]
    assert shard.requests.endswith(".r1.jsonl") and shard.count == 25
    # The rewritten shard is read back whole and its checksum holds.
    from claude_batch.staging import iter_shard_requests

    ids = [request["custom_id"] for request in iter_shard_requests(layout_b, shard)]
    assert len(ids) == 25 and not set(ids) & set(first)
    load, report = finish(warehouse, workload, layout_b, restricted, lambda key, cid: succeeded(cid, GOOD))
    assert report.by_status == {"succeeded": 25} and report.accounted == report.extracted == 25


def test_final_items_are_never_taken_back(setup):
    warehouse, workload, store = setup
    create_tickets(warehouse.conn, ticket_rows(10))
    layout, manifest = stage(warehouse, workload, store, "run-1")
    warehouse.claim_staged(workload, layout, manifest)
    finish(warehouse, workload, layout, manifest, lambda key, cid: succeeded(cid, GOOD))
    # A stale manifest of another run that staged the same items before run 1 claimed them.
    layout_2 = RunLayout(store, "invoices_dag", "run-2")
    stale = stage_requests(
        [{**row, RECORD_KEY_COLUMN: row["id"]} for row in ticket_rows(10)], workload, layout_2,
        key_field=RECORD_KEY_COLUMN, cache_setting="off",
    )  # fmt: skip
    claim = warehouse.claim_staged(workload, layout_2, stale)
    assert claim.claimed == 0 and claim.holders == {"succeeded (done)": 10}
    assert dict(query(warehouse.conn, "SELECT status, COUNT(*) FROM claude_batch_ledger GROUP BY 1")) == {
        "succeeded": 10
    }


@pytest.mark.services
def test_concurrent_claims_on_postgresql_split_the_items(postgres_dsn, local_store):
    """Two connections claim overlapping staged sets at once: each item goes to exactly one run."""
    workload = make_workload()
    setup_conn = psycopg2.connect(postgres_dsn)
    warehouse = Warehouse(setup_conn)
    warehouse.ensure_tables(workload)
    create_tickets(setup_conn, ticket_rows(3000))
    staged = {}
    for run_id in ("run-a", "run-b"):
        staged[run_id] = stage(warehouse, workload, local_store, run_id)
    setup_conn.close()
    barrier = threading.Barrier(2)
    claims = {}

    def claim(run_id: str) -> None:
        conn = psycopg2.connect(postgres_dsn)
        try:
            layout, manifest = staged[run_id]
            barrier.wait()
            claims[run_id] = Warehouse(conn).claim_staged(workload, layout, manifest)
        finally:
            conn.close()

    threads = [threading.Thread(target=claim, args=(run_id,)) for run_id in staged]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert set(claims) == {"run-a", "run-b"}
    assert claims["run-a"].claimed + claims["run-b"].claimed == 3000
    conn = psycopg2.connect(postgres_dsn)
    try:
        owners = dict(query(conn, "SELECT run_id, COUNT(*) FROM claude_batch_ledger GROUP BY 1"))
        kept = {
            run_id: staged_keys(
                *staged[run_id][:1], restrict_to_claimed(*staged[run_id], claims[run_id].not_claimed)
            )
            for run_id in staged
        }
    finally:
        conn.close()
    assert owners == {run_id: claims[run_id].claimed for run_id in staged if claims[run_id].claimed}
    assert not kept["run-a"] & kept["run-b"]
    assert len(kept["run-a"] | kept["run-b"]) == 3000


KEY_TYPES = {
    # name: (DuckDB type, PostgreSQL type, values)
    "fixed_text": ("CHAR(8)", "CHAR(8)", ["ab", "cd ", "ef"]),
    "integer": ("BIGINT", "BIGINT", [1, 22, 333]),
    "decimal": ("DECIMAL(10,2)", "NUMERIC(10,2)", ["1.50", "2.00", "30.25"]),
    "timestamp": (
        "TIMESTAMP",
        "TIMESTAMP",
        ["2026-01-01 01:00:00", "2026-01-01 02:30:00.5", "2026-01-01 03:00:00"],
    ),
    "date": ("DATE", "DATE", ["2025-12-30", "2025-12-31", "2026-01-01"]),
    "uuid": (
        "UUID",
        "UUID",
        [
            "0b2d6ff8-7b0e-4d6a-9d7e-1b5a6d8e9f01",
            "1c3e7009-8c1f-4e7b-ae8f-2c6b7e9f0a12",
            "2d4f811a-9d20-4f8c-bf90-3d7c8fa01b23",
        ],
    ),
}


@pytest.mark.parametrize("key_type", list(KEY_TYPES))
def test_keys_of_every_sql_type_are_done_once_and_retried(setup, key_type):
    warehouse, workload, store = setup
    conn = warehouse.conn
    duck_type, pg_type, values = KEY_TYPES[key_type]
    is_duckdb = warehouse.dialect.name == "duckdb"
    execute(
        conn,
        f"CREATE TABLE keyed (id {duck_type if is_duckdb else pg_type}, body TEXT, created_at TIMESTAMP)",
    )
    for value in values:
        execute(conn, f"INSERT INTO keyed VALUES (CAST(? AS {duck_type if is_duckdb else pg_type}), ?, ?)",
              (str(value), f"Invoice total: $12 for {value}", INTERVAL[0]))  # fmt: skip
    source = SourceSpec(key_column="id", table="keyed", interval_column="created_at")
    workload = make_workload(user_template="Ticket {id}: {body}")
    warehouse.ensure_tables(workload)
    layout, manifest = stage(warehouse, workload, store, "run-1", source)
    assert manifest.staged_requests == 3
    warehouse.claim_staged(workload, layout, manifest)
    failing = sorted(staged_keys(layout, manifest))[0]
    _, report = finish(
        warehouse, workload, layout, manifest,
        lambda key, cid: errored(cid, "overloaded_error") if key == failing else succeeded(cid, GOOD),
    )  # fmt: skip
    assert report.by_status == {"succeeded": 2, "retry": 1}
    # The next run extracts exactly the item due for retry: the key compares equal to the ledger's.
    layout_2, manifest_2 = stage(
        warehouse, workload, store, "run-2", source, interval=(INTERVAL[1], INTERVAL[1])
    )
    assert staged_keys(layout_2, manifest_2) == {failing}
    warehouse.claim_staged(workload, layout_2, manifest_2)
    _, report_2 = finish(warehouse, workload, layout_2, manifest_2, lambda key, cid: succeeded(cid, GOOD))
    assert report_2.by_status == {"succeeded": 1}
    # A third run over the first interval finds every item done.
    _, manifest_3 = stage(warehouse, workload, store, "run-3", source)
    assert manifest_3.staged_requests == 0
    assert dict(query(conn, "SELECT status, COUNT(*) FROM claude_batch_ledger GROUP BY 1")) == {
        "succeeded": 3
    }
    assert query(conn, f"SELECT COUNT(*), COUNT(DISTINCT record_key) FROM {workload.results_table}")[0] == (
        3,
        3,
    )
