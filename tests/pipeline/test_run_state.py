"""Recovery asks Airflow for the state of the runs holding items: the real Task SDK call, in dag.test()."""

from __future__ import annotations

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.airflow


def test_a_task_reads_dag_run_states_through_the_task_sdk(airflow_db):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "tests" / "dags" / "run_state_dags.py"))
    assert not bag.import_errors, bag.import_errors
    run = bag.dags["cb_run_state_probe"].test()
    assert run.state == "success"
    answer = run.get_task_instance("probe").xcom_pull(task_ids="probe")
    # A live run is "running" (left alone); a run Airflow does not know gives None (left alone too).
    assert answer == {"own": "running", "missing": None}
