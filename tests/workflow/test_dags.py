"""The DAG files: they parse, pass Airflow's lint rules, schedule real data intervals, and validate Params."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pendulum
import pytest

from tests.conftest import REPO

DAG_IDS = {"support_ticket_triage", "invoice_approval", "product_descriptions"}


@pytest.fixture(scope="module")
def dags():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags"))
    assert not bag.import_errors, bag.import_errors
    return bag.dags


@pytest.fixture(scope="module")
def serialized(dags):
    """The DAGs as the scheduler and the API server see them (serialized, then read back)."""
    from airflow.serialization.serialized_objects import DagSerialization

    return {
        dag_id: DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
        for dag_id, dag in dags.items()
    }


def test_every_dag_file_parses_without_import_errors(dags):
    assert set(dags) == DAG_IDS
    assert sorted(path.name for path in (REPO / "dags").glob("*.py")) == sorted(f"{d}.py" for d in DAG_IDS)


def test_dag_files_pass_airflow_lint_rules():
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--select", "AIR", "--no-cache", str(REPO / "dags")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def interval_of(dag, run_after: datetime):
    """The data interval a manual run (UI trigger, ``airflow dags test``) at ``run_after`` gets."""
    from airflow.serialization.encoders import coerce_to_core_timetable

    return coerce_to_core_timetable(dag.timetable).infer_manual_data_interval(
        run_after=pendulum.instance(run_after)
    )


@pytest.mark.parametrize(
    ("dag_id", "length"),
    [
        ("support_ticket_triage", timedelta(days=1)),
        ("invoice_approval", timedelta(hours=4)),
        ("product_descriptions", timedelta(days=1)),
    ],
)
def test_schedules_give_runs_real_contiguous_intervals(serialized, dag_id, length):
    dag = serialized[dag_id]
    start = datetime(2026, 11, 1, tzinfo=UTC)
    intervals = [info.data_interval for info in dag.iter_dagrun_infos_between(start, start + 3 * length)]
    assert len(intervals) == 4
    assert all(i.end - i.start == length for i in intervals)
    assert all(a.end == b.start for a, b in zip(intervals, intervals[1:], strict=False))


def test_an_invoice_received_by_6pm_is_in_the_8pm_run(dags):
    received = datetime(2026, 11, 9, 17, 59, tzinfo=UTC)
    run_at = datetime(2026, 11, 9, 20, 0, tzinfo=UTC)
    interval = interval_of(dags["invoice_approval"], run_at)
    assert interval.start <= received < interval.end
    assert interval.end <= datetime(2026, 11, 10, 8, 0, tzinfo=UTC)


def test_the_demo_runs_cover_the_seeded_rows(dags, sample_data):
    from claude_batch.demo import demo_runs

    end = datetime(2026, 11, 10)
    for run in demo_runs(end):
        interval = interval_of(dags[run.dag_id], run.logical_date.replace(tzinfo=UTC))
        if run.dag_id == "invoice_approval":
            stamps = [row["received_at"] for row in sample_data.invoice_rows(end - timedelta(days=1))]
        elif run.dag_id == "product_descriptions":
            stamps = [row["updated_at"] for row in sample_data.product_rows(end - timedelta(hours=12))]
        else:
            stamps = [end - timedelta(seconds=1), end - timedelta(days=1)]
        assert all(interval.start <= s.replace(tzinfo=UTC) < interval.end for s in stamps), (
            run.dag_id,
            interval,
        )


def test_concurrency_is_bounded(dags):
    for dag in dags.values():
        assert dag.max_active_runs == 2
        submit = dag.get_task("submit")  # the tasks sit at the top level
        assert submit.pool == "claude_batch"
        load = dag.get_task("load")
        assert [asset.name for asset in load.outlets] == [f"claude_batch.{dag.dag_id}_results"]


@pytest.mark.parametrize(
    ("conf", "message"),
    [
        ({"model": "gpt-4"}, "Invalid input for param model: 'gpt-4' is not one of"),
        ({"row_limit": -1}, "Invalid input for param row_limit: -1 is less than the minimum of 0"),
        ({"row_limit": "10"}, "Invalid input for param row_limit: '10' is not of type 'integer'"),
        ({"dry_run": "yes"}, "Invalid input for param dry_run: 'yes' is not of type 'boolean'"),
        ({"pilot_size": -5}, "Invalid input for param pilot_size: -5 is less than the minimum of 0"),
        (
            {"pilot_min_pass_rate": 1.5},
            "Invalid input for param pilot_min_pass_rate: 1.5 is greater than the maximum of 1",
        ),
        ({"budget_usd": -1}, "Invalid input for param budget_usd: -1 is less than the minimum of 0"),
        (
            {"window_start": "2026-11-01'; DROP TABLE ap_invoices; --"},
            "Invalid input for param window_start:",
        ),
        ({"window_end": "2026-13-45"}, "Invalid input for param window_end: '2026-13-45' is not a 'date'"),
    ],
)
def test_bad_params_are_rejected_with_a_clear_message(serialized, conf, message):
    # The same check the REST API and the UI's trigger form run before a run is created.
    from airflow.exceptions import ParamValidationError

    for dag in serialized.values():
        with pytest.raises(ParamValidationError) as caught:
            dag.params.deep_merge(conf).validate()
        assert message in str(caught.value)


def test_good_params_are_accepted(serialized):
    values = (
        serialized["invoice_approval"]
        .params.deep_merge(
            {
                "model": "claude-haiku-4-5",
                "row_limit": 100,
                "dry_run": True,
                "budget_usd": 2.5,
                "window_start": "2026-11-01",
                "window_end": "2026-11-08",
            }
        )
        .validate()
    )
    assert values["model"] == "claude-haiku-4-5" and values["pilot_size"] == 0
    assert serialized["support_ticket_triage"].params.validate()["model"] == "claude-haiku-4-5"
