"""Submit and wait through dag.test(): the real task runner, deferral and the trigger inline."""

from __future__ import annotations

import pytest
from claude_batch.storage import safe_segment

pytestmark = pytest.mark.airflow


@pytest.fixture
def dagbag_dag(airflow_db, anthropic_conn, aws_conn, s3_store, monkeypatch):
    monkeypatch.setenv("CLAUDE_BATCH_STORAGE_ROOT", s3_store.root)
    from airflow.dag_processing.dagbag import DagBag

    from tests.conftest import REPO

    bag = DagBag(dag_folder=str(REPO / "tests" / "dags" / "batchcore_dags.py"))
    assert not bag.import_errors, bag.import_errors
    return bag.dags


def test_submit_then_deferred_sensor_with_a_forced_retry(dagbag_dag, anthropic_conn, s3_store):
    anthropic_conn.configure(processing_seconds=20.0)
    run = dagbag_dag["cb_submit_wait"].test()
    assert run.state == "success", run.state
    stats = anthropic_conn.stats()
    assert stats["batches_created"] == 1 and stats["requests_received"] == 25
    states = s3_store.list(f"cb_submit_wait/{safe_segment(run.run_id)}/state")
    assert len(states) == 1
    assert s3_store.read_json(states[0])["phase"] == "submitted"


def test_operator_defers_and_reports(dagbag_dag, anthropic_conn):
    anthropic_conn.configure(processing_seconds=20.0)
    run = dagbag_dag["cb_operator_defer"].test()
    assert run.state == "success"
    assert anthropic_conn.stats()["batches_created"] == 1
