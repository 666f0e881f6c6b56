"""A DAG for the queue-aware submit test (dag.test() runs only DAGs found in a bundle).

Three mapped submits of 8 requests each on an emulator whose queue holds 10: only one fits at
a time, so the second and third are refused, defer, and submit when the queue drains.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG
from claude_batch.operators import ClaudeBatchOperator


def _requests(count: int, prefix: str) -> list[dict]:
    return [
        {
            "custom_id": f"{prefix}{i}",
            "params": {
                "model": "claude-haiku-4-5",
                "max_tokens": 32,
                "messages": [{"role": "user", "content": f"My invoice was charged twice #{i}"}],
            },
        }
        for i in range(count)
    ]


with DAG("cb_queue_submit", schedule=None, start_date=datetime(2026, 1, 1), catchup=False):
    ClaudeBatchOperator.partial(
        task_id="submit",
        wait="none",
        queue_poll_interval=0.2,
        queue_recheck_interval=10.0,
        queue_wait_timeout=120.0,
    ).expand(requests=[_requests(8, f"m{i}_") for i in range(3)])
