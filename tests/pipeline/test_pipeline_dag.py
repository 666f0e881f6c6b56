"""The whole pipeline through dag.test(): DuckDB -> S3 (moto) -> emulator -> S3 -> DuckDB."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import duckdb
import pytest
from claude_batch.storage import RunLayout, safe_segment

pytestmark = pytest.mark.airflow
DAY = datetime(2026, 11, 10, tzinfo=UTC)


@pytest.fixture
def warehouse_file(tmp_path, monkeypatch):
    path = tmp_path / "warehouse.duckdb"
    conn = duckdb.connect(str(path))
    conn.execute("CREATE TABLE tickets (ticket_id VARCHAR, body VARCHAR, created_at TIMESTAMP)")
    rows = [
        (f"T-{i:04d}", text, DAY + timedelta(minutes=7 * i))
        for i, text in enumerate(
            ["I was charged twice for my invoice, refund please"] * 40
            + ["The app crashes with an error on start"] * 40
            + ["Please add dark mode, a feature idea"] * 20
        )
    ]
    rows.append(("T-NULL", None, DAY + timedelta(hours=1)))
    conn.executemany("INSERT INTO tickets VALUES (?, ?, ?)", rows)
    conn.close()
    monkeypatch.setenv(
        "AIRFLOW_CONN_CLAUDE_BATCH_WAREHOUSE", json.dumps({"conn_type": "duckdb", "host": str(path)})
    )
    return path


@pytest.fixture
def tiny_dag(airflow_db, anthropic_conn, aws_conn, s3_store, warehouse_file, monkeypatch):
    monkeypatch.setenv("CLAUDE_BATCH_STORAGE_ROOT", s3_store.root)
    from airflow.dag_processing.dagbag import DagBag

    from tests.conftest import REPO

    bag = DagBag(dag_folder=str(REPO / "tests" / "dags" / "pipeline_dags.py"))
    assert not bag.import_errors, bag.import_errors
    return bag.dags["cb_tiny_triage"]


def test_nightly_run_end_to_end(tiny_dag, anthropic_conn, s3_store, warehouse_file):
    anthropic_conn.configure(processing_seconds=60.0)
    run = tiny_dag.test(logical_date=DAY + timedelta(days=1))  # the interval ending then: DAY
    assert run.state == "success", run.state
    stats = anthropic_conn.stats()
    assert stats["batches_created"] == 3 and stats["requests_received"] == 100  # 40 + 40 + 20
    conn = duckdb.connect(str(warehouse_file), read_only=True)
    results = conn.execute(
        "SELECT category, count(*) FROM tiny_triage_results GROUP BY 1 ORDER BY 1"
    ).fetchall()
    ledger = dict(conn.execute("SELECT status, count(*) FROM claude_batch_ledger GROUP BY 1").fetchall())
    conn.close()
    assert sum(n for _, n in results) == ledger["succeeded"]
    assert ledger.get("dead") == 1  # the NULL ticket, with its reason
    assert sum(ledger.values()) == 101
    report = s3_store.read_json(RunLayout(s3_store, "cb_tiny_triage", run.run_id).report)
    assert report["extracted"] == 101 and report["batches"] == 3
    assert report["cost_usd"] > 0 and report["realtime_cost_usd"] == pytest.approx(2 * report["cost_usd"])
    assert safe_segment(run.run_id)


def test_every_stage_that_can_meet_a_transient_fault_is_retried(tiny_dag):
    """Stage, gate, submit, collect and load are idempotent for their run, so Airflow retries them."""
    retries = {task.task_id.split(".")[-1]: task.retries for task in tiny_dag.tasks}
    for stage in ("stage", "gate", "submit", "collect", "load"):
        assert retries[stage] >= 2, (stage, retries)
