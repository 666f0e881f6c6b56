"""DAGs for the batch-core tests (dag.test() runs only DAGs found in a bundle).

The storage root and the connections come from the environment the test sets.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG
from claude_batch.operators import ClaudeBatchOperator
from claude_batch.sensors import ClaudeBatchSensor


def make_requests(count: int, prefix: str = "r", text: str = "My invoice was charged twice") -> list[dict]:
    """Small Messages requests for the batch-core tests."""
    return [
        {
            "custom_id": f"{prefix}{i}",
            "params": {
                "model": "claude-haiku-4-5",
                "max_tokens": 32,
                "messages": [{"role": "user", "content": f"{text} #{i}"}],
            },
        }
        for i in range(count)
    ]


class FailsOnceAfterSubmitting(ClaudeBatchOperator):
    """Submits, then dies on its first try: the retry must re-attach, not pay again."""

    def execute(self, context):
        batch_id = super().execute(context)
        if context["ti"].try_number == 1:
            raise RuntimeError("worker lost after the paid call")
        return batch_id


with DAG("cb_submit_wait", schedule=None, start_date=datetime(2026, 1, 1), catchup=False):
    submit = FailsOnceAfterSubmitting(
        task_id="submit",
        requests=make_requests(25),
        wait="none",
        retries=1,
        retry_delay=timedelta(seconds=0),
    )
    ClaudeBatchSensor(task_id="wait", batch_ids=submit.output, min_poll_interval=0.2, max_poll_interval=0.5)


with DAG("cb_operator_defer", schedule=None, start_date=datetime(2026, 1, 1), catchup=False):
    ClaudeBatchOperator(task_id="submit_and_wait", requests=make_requests(8), min_poll_interval=0.2)
