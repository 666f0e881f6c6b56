"""The query layer itself (``claude_batch.ops``).

Ledgers made before requeues, what requeue moves, prompt versions.
"""

from __future__ import annotations

from datetime import datetime

import pytest
from claude_batch.ops import NoLedger, Ops, OpsError, UnknownWorkload, WorkloadRef, to_jsonable
from claude_batch.warehouse import Warehouse


@pytest.fixture(params=["duckdb", "postgres"])
def warehouse(request):
    if request.param == "duckdb":
        import duckdb

        conn = duckdb.connect()
    else:
        import psycopg2

        conn = psycopg2.connect(request.getfixturevalue("postgres_dsn"))
    yield Warehouse(conn)
    conn.close()


def execute(warehouse: Warehouse, sql: str, params=()) -> None:
    d = warehouse.dialect
    with d.transaction(warehouse.conn) as cursor:
        d.execute(cursor, sql.replace("?", d.placeholder), list(params))


def rows(warehouse: Warehouse, sql: str, params=()) -> list[tuple]:
    return warehouse._fetchall(sql.replace("?", warehouse.dialect.placeholder), list(params))


def add_item(
    warehouse, key, status, *, version="pv_aaaa000000000000", run_id="run-1", error=None, workload="w"
):
    execute(
        warehouse,
        "INSERT INTO claude_batch_ledger (workload, record_key, prompt_version, custom_id, status, attempts, "
        "invalid_answers, last_error, run_id, updated_at, claimed_at, dag_id) "
        "VALUES (?, ?, ?, ?, ?, 3, 1, ?, ?, ?, ?, ?)",
        [
            workload,
            key,
            version,
            key,
            status,
            error,
            run_id,
            datetime(2026, 3, 1, 12),
            datetime(2026, 3, 1, 11),
            "dag",
        ],
    )


def test_a_ledger_made_before_requeues_gains_the_columns_and_is_read_as_it_is(warehouse):
    # The ledger as the previous release made it: no requeued_by / requeued_at.
    execute(
        warehouse,
        """CREATE TABLE claude_batch_ledger (workload TEXT NOT NULL, record_key TEXT NOT NULL,
        prompt_version TEXT NOT NULL, custom_id TEXT, status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        invalid_answers INTEGER NOT NULL DEFAULT 0, last_error TEXT, batch_id TEXT, run_id TEXT,
        updated_at TIMESTAMP NOT NULL, claimed_at TIMESTAMP, dag_id TEXT,
        PRIMARY KEY (workload, record_key, prompt_version))""",
    )
    add_item(warehouse, "k1", "dead", error="out of attempts")
    ops = Ops(warehouse)
    (counts,) = ops.ledger_counts()  # read without changing the table
    assert counts.counts["dead"] == 1 and counts.requeued == 0
    result = Ops(warehouse).requeue("w", keys=["k1"], by="someone")  # adds the columns, then moves the item
    assert result.requeued == 1
    assert rows(
        warehouse,
        "SELECT status, attempts, invalid_answers, requeued_by, last_error FROM claude_batch_ledger",
    ) == [("retry", 0, 0, "someone", "out of attempts")]
    warehouse.ensure_tables()  # and again: nothing to add
    assert Ops(warehouse).ledger_counts()[0].requeued == 1


def test_requeue_moves_only_dead_and_invalid_items_of_the_prompt_version(warehouse):
    warehouse.ensure_tables()
    add_item(warehouse, "dead-1", "dead", error="invalid_request_error: too long")
    add_item(warehouse, "invalid-1", "invalid", error="not valid JSON")
    add_item(warehouse, "held", "submitted", run_id="run-live")
    add_item(warehouse, "done", "succeeded")
    add_item(warehouse, "old-dead", "dead", version="pv_bbbb000000000000", error="too long")
    ops = Ops(warehouse)
    # The current version is the one updated last (no run history yet); an older one by prefix.
    assert ops.prompt_versions("w")[0] in ("pv_aaaa000000000000", "pv_bbbb000000000000")
    assert ops.resolve_prompt_version("w", "pv_a") == "pv_aaaa000000000000"
    with pytest.raises(OpsError, match="ambiguous"):
        ops.resolve_prompt_version("w", "pv_")
    moved = warehouse.requeue(
        WorkloadRef("w", "pv_aaaa000000000000"), ["dead-1", "invalid-1", "held", "done"], by="t"
    )
    assert moved == 2
    statuses = dict(rows(warehouse, "SELECT record_key, status FROM claude_batch_ledger"))
    assert statuses == {
        "dead-1": "retry",
        "invalid-1": "retry",
        "held": "submitted",
        "done": "succeeded",
        "old-dead": "dead",
    }
    # By reason: only the prompt version asked for.
    result = ops.requeue("w", reason="TOO LONG", prompt_version="pv_b")
    assert (result.requeued, result.keys) == (1, ["old-dead"])
    with pytest.raises(OpsError, match="exactly one"):
        ops.requeue("w", reason="x", all_dead=True)
    with pytest.raises(UnknownWorkload, match="known: w"):
        ops.requeue("v", all_dead=True)


def test_a_warehouse_without_the_tables_is_named(warehouse):
    with pytest.raises(NoLedger, match="no claude_batch_ledger table"):
        Ops(warehouse).status()


def test_results_become_json_ready_data():
    from claude_batch.ops import SkippedKey

    assert to_jsonable(
        {"at": datetime(2026, 3, 1, 12, 30), "keys": (SkippedKey("k", None, None, "why"),)}
    ) == {
        "at": "2026-03-01T12:30:00Z",
        "keys": [{"record_key": "k", "status": None, "run_id": None, "why": "why"}],
    }
