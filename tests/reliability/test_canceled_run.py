"""A run whose every batch is canceled before anything ran must still account for its items.

Batches get canceled from the Console, by a batch timeout or by an operator's on_kill. When
every request of a run is canceled, the wait sensor skips; collect, load and the accounting
check are skipped with it, the DAG run ends ``success`` and the items stay ``pending`` for a
run that will never load them, so no later run extracts them again: lost without a word.
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta

import duckdb
import pytest

from tests.reliability.corpus import DAG_ID, REPO

pytestmark = pytest.mark.airflow
DAY = datetime(2026, 11, 10)


@pytest.fixture
def small_corpus(tmp_path, monkeypatch, s3_store, anthropic_conn, aws_conn, airflow_db):
    path = tmp_path / "warehouse.duckdb"
    conn = duckdb.connect(str(path))
    conn.execute("CREATE TABLE corpus (ticket_id VARCHAR, body BLOB, created_at TIMESTAMP)")
    conn.executemany(
        "INSERT INTO corpus VALUES (?, ?, ?)",
        [(f"c{i}", b"I was charged twice", DAY + timedelta(minutes=i)) for i in range(30)],
    )
    conn.close()
    monkeypatch.setenv("AIRFLOW_CONN_CLAUDE_BATCH_WAREHOUSE", json.dumps({"conn_type": "duckdb", "host": str(path)}))
    monkeypatch.setenv("CLAUDE_BATCH_STORAGE_ROOT", s3_store.root)
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "tests" / "dags" / "reliability_dags.py"))
    assert not bag.import_errors, bag.import_errors
    return bag.dags[DAG_ID], path


def test_a_run_whose_batches_are_all_canceled_accounts_for_every_item(small_corpus, anthropic_conn):
    dag, warehouse = small_corpus
    anthropic_conn.configure(processing_seconds=36_000.0)  # nothing finishes before the cancel
    store = anthropic_conn.store
    stop = threading.Event()

    def cancel_every_batch() -> None:  # someone cancels each batch in the Console as soon as it appears
        while not stop.is_set():
            for batch in list(store._batches_by_id.values()):
                if batch.status == "in_progress":
                    store.cancel(batch.id, anthropic_conn.base_url)
            stop.wait(0.01)

    canceller = threading.Thread(target=cancel_every_batch, daemon=True)
    canceller.start()
    try:
        run = dag.test(logical_date=(DAY + timedelta(days=1)).replace(tzinfo=UTC))
    finally:
        stop.set()
        canceller.join(5)
    assert anthropic_conn.stats()["batches_created"] == 2
    conn = duckdb.connect(str(warehouse))  # the run's own connection may still be open in this process
    try:
        open_items = conn.execute(
            "SELECT COUNT(*) FROM claude_batch_ledger WHERE status IN ('pending', 'submitted')"
        ).fetchone()[0]
    finally:
        conn.close()
    # Either the run says it failed, or every item has an outcome (canceled -> retry).
    assert run.state == "failed" or open_items == 0, (run.state, open_items)
