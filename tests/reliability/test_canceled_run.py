"""A run whose every batch is canceled before anything ran must still account for its items.

Batches get canceled from the Console, by a batch timeout or by an operator's on_kill. When
every request of a run was canceled, the wait sensor used to skip; collect, load and the
accounting check were skipped with it, the DAG run ended ``success`` and the items stayed
``pending`` for a run that would never load them, so no later run extracted them again: lost
without a word (fixed in fd6fcc4: the pipeline's wait no longer skips). This keeps it fixed.
Canceled items now go round in the same run (rounds 2 and 3) until they are out of attempts.
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta

import duckdb
import pytest

from tests.reliability.corpus import DAG_ID, REPO

pytestmark = pytest.mark.airflow
# Not the corpus run's day: dag.test() clears the task instances (and XComs) of its logical date,
# and tests/security reads the corpus run's.
DAY = datetime(2026, 11, 20)


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
    monkeypatch.setenv(
        "AIRFLOW_CONN_CLAUDE_BATCH_WAREHOUSE", json.dumps({"conn_type": "duckdb", "host": str(path)})
    )
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
            for batch in list(store.batches):
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
    # Canceled items go round: rounds 2 and 3 resend them (and are canceled again), 2 shards a round.
    assert anthropic_conn.stats()["batches_created"] == 6
    conn = duckdb.connect(str(warehouse))  # the run's own connection may still be open in this process
    try:
        ledger = dict(conn.execute("SELECT status, COUNT(*) FROM claude_batch_ledger GROUP BY 1").fetchall())
        reasons = {
            reason
            for (reason,) in conn.execute("SELECT DISTINCT last_error FROM claude_batch_ledger").fetchall()
        }
    finally:
        conn.close()
    assert run.state == "success"
    assert ledger == {"dead": 30}, ledger  # every item has an outcome: canceled three times, out of attempts
    assert reasons == {"the request was canceled before it ran"}
