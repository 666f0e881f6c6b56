"""Submit and wait through dag.test(): the real task runner, deferral and the trigger inline."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from airflow.sdk import DAG
from claude_batch.operators import ClaudeBatchOperator
from claude_batch.sensors import ClaudeBatchSensor

from tests.batchcore.conftest import make_requests

pytestmark = pytest.mark.airflow


class FailsOnceAfterSubmitting(ClaudeBatchOperator):
    """Submits, then dies on its first try: the retry must re-attach, not pay again."""

    def execute(self, context):
        batch_id = super().execute(context)
        if context["ti"].try_number == 1:
            raise RuntimeError("worker lost after the paid call")
        return batch_id


def test_submit_then_deferred_sensor_with_a_forced_retry(airflow_db, anthropic_conn, aws_conn, s3_store):
    anthropic_conn.configure(processing_seconds=20.0)
    bucket_root = s3_store.root
    with DAG("cb_submit_wait", schedule=None, start_date=datetime(2026, 1, 1), catchup=False) as dag:
        submit = FailsOnceAfterSubmitting(
            task_id="submit",
            requests=make_requests(25),
            storage_root=bucket_root,
            wait="none",
            retries=1,
            retry_delay=timedelta(seconds=0),
        )
        ClaudeBatchSensor(
            task_id="wait", batch_ids=submit.output, min_poll_interval=0.2, max_poll_interval=0.5
        )
    run = dag.test()
    assert run.state == "success", run.state
    stats = anthropic_conn.stats()
    assert stats["batches_created"] == 1 and stats["requests_received"] == 25
    states = s3_store.list(f"cb_submit_wait/{_safe(run.run_id)}/state")
    assert len(states) == 1
    assert s3_store.read_json(states[0])["phase"] == "submitted"


def test_operator_defers_and_reports(airflow_db, anthropic_conn, aws_conn, s3_store):
    anthropic_conn.configure(processing_seconds=20.0)
    with DAG("cb_operator_defer", schedule=None, start_date=datetime(2026, 1, 1), catchup=False) as dag:
        ClaudeBatchOperator(
            task_id="submit_and_wait", requests=make_requests(8), storage_root=s3_store.root, min_poll_interval=0.2
        )
    run = dag.test()
    assert run.state == "success"
    assert anthropic_conn.stats()["batches_created"] == 1


def _safe(run_id: str) -> str:
    from claude_batch.storage import safe_segment

    return safe_segment(run_id)
