"""An Airflow DAG whose one task asks Airflow for DAG run states as the pipeline's recovery does."""

from __future__ import annotations

from datetime import UTC, datetime

from airflow.sdk import DAG, get_current_context, task

with DAG(
    "cb_run_state_probe", schedule=None, start_date=datetime(2026, 1, 1, tzinfo=UTC), catchup=False
) as dag:

    @task
    def probe() -> dict:
        from claude_batch.pipeline import _dag_run_state

        context = get_current_context()
        state = _dag_run_state(context)
        return {
            "own": state(context["dag"].dag_id, context["run_id"]),
            "missing": state(context["dag"].dag_id, "no_such_run"),
        }

    probe()
