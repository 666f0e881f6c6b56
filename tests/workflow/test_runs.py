"""Whole runs of the repository's DAGs through dag.test(): backfill, re-run, dry run, budget, pilot.

Each dag.test() costs about ten seconds of Airflow start-up, so the runs are few and small.
"""

from __future__ import annotations

from datetime import UTC, timedelta

import pytest
from claude_batch.storage import RunLayout

from tests.workflow.conftest import END, LAST_DAY, query, task_states

pytestmark = pytest.mark.airflow
RUN_AFTER = END.replace(tzinfo=UTC) + timedelta(days=30)  # fixed, so a re-run gets the same run_id


def backfill_intervals(dag, start, end):
    """The data intervals ``airflow backfill create --from-date start --to-date end`` would create.

    Backfill asks the serialized DAG's timetable (``iter_dagrun_infos_between``); so do we.
    """
    from airflow.serialization.serialized_objects import DagSerialization

    serialized = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
    return [info.data_interval for info in serialized.iter_dagrun_infos_between(start, end)]


def test_backfill_processes_each_interval_once_and_a_rerun_changes_nothing(
    workflow_dags, anthropic_conn, warehouse, s3_store
):
    dag = workflow_dags["support_ticket_triage"]
    first_day = (END - timedelta(days=3)).replace(tzinfo=UTC)
    intervals = backfill_intervals(dag, first_day, LAST_DAY.replace(tzinfo=UTC))
    assert [(i.start, i.end - i.start) for i in intervals] == [
        (first_day + timedelta(days=n), timedelta(days=1)) for n in range(3)
    ]

    runs = []
    for interval in intervals:
        # dag.test() derives the data interval from the logical date as a manual run does: the
        # last complete interval before it, so the interval's end selects exactly that interval.
        run = dag.test(logical_date=interval.end, run_after=RUN_AFTER + timedelta(days=len(runs)))
        assert run.state == "success", task_states(run)
        assert (run.data_interval_start, run.data_interval_end) == (interval.start, interval.end)
        runs.append(run)

    stats = anthropic_conn.stats()
    assert stats["batches_created"] == 3
    ledger = query(
        warehouse, "SELECT run_id, status, count(*) FROM claude_batch_ledger GROUP BY ALL ORDER BY ALL"
    )
    for run, interval in zip(runs, intervals, strict=True):
        in_interval = query(
            warehouse,
            "SELECT count(*) FROM support_tickets WHERE created_at >= ? AND created_at < ?",
            interval.start.replace(tzinfo=None),
            interval.end.replace(tzinfo=None),
        )[0][0]
        by_status = {status: n for run_id, status, n in ledger if run_id == run.run_id}
        # Every ticket of the interval is accounted for by this run, and only by this run.
        assert sum(by_status.values()) == in_interval, (run.run_id, by_status)
        report = s3_store.read_json(RunLayout(s3_store, dag.dag_id, run.run_id).report)
        assert report["extracted"] == in_interval and report["ledger"] == by_status
    # The last day's bad rows were never sent: NULL, blank, control characters, the duplicate.
    last = {status: n for run_id, status, n in ledger if run_id == runs[-1].run_id}
    assert last["dead"] == 4
    assert stats["requests_received"] == sum(n for _, status, n in ledger if status == "succeeded")
    keys = query(warehouse, "SELECT record_key, count(*) FROM support_ticket_triage_results GROUP BY 1")
    assert all(n == 1 for _, n in keys)
    assert "TCK 9001/ü" in {key for key, _ in keys}  # sent under a hashed custom_id, joined back

    # Re-run the last run as a whole (same run_id): nothing is sent, nothing changes.
    results_before = query(warehouse, "SELECT * FROM support_ticket_triage_results ORDER BY record_key")
    ledger_before = query(warehouse, "SELECT * FROM claude_batch_ledger ORDER BY record_key")
    rerun = dag.test(logical_date=intervals[-1].end, run_after=RUN_AFTER + timedelta(days=2))
    assert rerun.run_id == runs[-1].run_id
    assert rerun.state == "success", task_states(rerun)
    assert anthropic_conn.stats()["batches_created"] == 3
    assert (
        query(warehouse, "SELECT * FROM support_ticket_triage_results ORDER BY record_key") == results_before
    )
    assert query(warehouse, "SELECT * FROM claude_batch_ledger ORDER BY record_key") == ledger_before


INVOICE_RUN = (END - timedelta(hours=4)).replace(tzinfo=UTC)  # the 8 pm run: invoices received 4 pm to 8 pm


def ledger_rows(warehouse, workload: str) -> int:
    return query(warehouse, "SELECT count(*) FROM claude_batch_ledger WHERE workload = ?", workload)[0][0]


def test_a_dry_run_stages_and_estimates_but_submits_nothing(
    workflow_dags, anthropic_conn, warehouse, s3_store
):
    dag = workflow_dags["invoice_approval"]
    run = dag.test(logical_date=INVOICE_RUN, run_conf={"dry_run": True})
    assert run.state == "success"
    states = task_states(run)
    assert states["stage"] == "success" and states["gate"] == "skipped" and states["submit"] == "skipped"
    stats = anthropic_conn.stats()
    assert stats["batches_created"] == 0 and stats["requests_received"] == 0
    report = s3_store.read_json(RunLayout(s3_store, dag.dag_id, run.run_id).report)
    assert report["dry_run"] is True and report["staged"] == 5
    assert report["estimated_cost_usd"] > 0
    assert ledger_rows(warehouse, "invoice_approval") == 0  # nothing is pending: the items stay new


def test_the_budget_guard_stops_the_run_before_anything_is_sent(
    workflow_dags, anthropic_conn, warehouse, capfd
):
    dag = workflow_dags["invoice_approval"]
    run = dag.test(logical_date=INVOICE_RUN, run_conf={"budget_usd": 0.0001})
    assert run.state == "failed"
    states = task_states(run)
    assert (
        states["stage"] == "success" and states["gate"] == "failed" and states["submit"] == "upstream_failed"
    )
    assert "over this run's budget $0.0001; nothing was submitted" in capfd.readouterr().out
    assert anthropic_conn.stats()["batches_created"] == 0
    assert ledger_rows(warehouse, "invoice_approval") == 0


def test_a_failing_pilot_stops_the_run_after_its_sample(workflow_dags, anthropic_conn, warehouse, capfd):
    # Every answer errors, so the pilot's pass rate is 0%.
    anthropic_conn.configure(faults={"batch": {"errored_rate": 1.0, "error_types": ["overloaded_error"]}})
    dag = workflow_dags["invoice_approval"]
    run = dag.test(logical_date=INVOICE_RUN, run_conf={"pilot_size": 2, "pilot_min_pass_rate": 0.5})
    assert run.state == "failed"
    states = task_states(run)
    # The pilot went through its own round, deferred wait included; the decision stopped the run.
    assert all(
        states[f"pilot_{task}"] == "success" for task in ("submit", "record", "wait", "collect", "load")
    ), states
    assert states["gate"] == "success" and states["pilot_decide"] == "failed", states
    assert states["pilot_approval"] == "upstream_failed" and states["submit"] == "upstream_failed", states
    assert (
        "The pilot's validation pass rate is 0% (0 of 2), under the threshold 50%; "
        "nothing else was submitted. "
        "Failures: {'overloaded_error': 2}" in capfd.readouterr().out
    )
    stats = anthropic_conn.stats()
    assert stats["batches_created"] == 1 and stats["requests_received"] == 2  # the pilot, nothing else
    # The pilot's items have their outcome (a transient error: retry, as any round leaves them);
    # the run's other claimed items are given back: retry, held by no run, for the next run to take.
    ledger = query(
        warehouse,
        "SELECT status, run_id, attempts, COUNT(*) FROM claude_batch_ledger WHERE workload = ? "
        "GROUP BY ALL ORDER BY ALL",
        "invoice_approval",
    )
    assert ledger == [("retry", run.run_id, 1, 2), ("retry", None, 0, 3)]


def test_a_passing_pilot_lets_the_run_go_on_without_sending_its_items_again(
    workflow_dags, anthropic_conn, warehouse, s3_store
):
    dag = workflow_dags["invoice_approval"]
    run = dag.test(logical_date=INVOICE_RUN, run_conf={"pilot_size": 2})
    states = task_states(run)
    assert run.state == "success", states
    assert states["pilot_decide"] == "success" and states["pilot_approval"] == "skipped", states
    stats = anthropic_conn.stats()
    # The pilot's 2 answers are kept: the full run sends only the other 3 (and pays for them once).
    assert stats["batches_created"] == 2 and stats["requests_received"] == 2 + 3
    rows = query(
        warehouse,
        "SELECT record_key, department, amount, approval_required FROM invoice_approval_results ORDER BY 1",
    )
    # The accounts-payable example: approval above 200,000.
    assert rows == [
        ("INV-001", "IT", 124_500.0, False),
        ("INV-002", "HR", 45_000.0, False),
        ("INV-003", "Admin", 285_000.0, True),
        ("INV-004", "Marketing", 78_000.0, False),
        ("INV-005", "Finance", 850_000.0, True),
    ]
    ledger = query(warehouse,
                   "SELECT status, attempts, COUNT(*) FROM claude_batch_ledger "
                   "WHERE workload = ? GROUP BY ALL",
                   "invoice_approval")  # fmt: skip
    assert ledger == [("succeeded", 1, 5)]  # each invoice answered once
    # The report and the run's history count the pilot: its requests, batch, tokens and cost.
    report = s3_store.read_json(RunLayout(s3_store, dag.dag_id, run.run_id).report)
    assert report["extracted"] == report["staged"] == 5 and report["ledger"] == {"succeeded": 5}
    assert report["batches"] == 2 and [(r["round"], r["sent"]) for r in report["rounds"]] == [(0, 2), (1, 3)]
    assert report["pilot"]["pass_rate"] == 1.0 and report["pilot"]["judged"] == 2
    history = query(warehouse,
                    "SELECT staged, succeeded, cost_usd, input_tokens FROM claude_batch_runs "
                    "WHERE run_id = ?",
                    run.run_id)  # fmt: skip
    assert history == [(5, 5, pytest.approx(report["cost_usd"]), report["tokens"]["input"])]
    assert report["cost_usd"] > report["pilot"]["cost_usd"] > 0


def test_a_run_goes_round_with_its_transient_failures_until_they_are_out_of_attempts(
    workflow_dags, anthropic_conn, warehouse
):
    """Every answer errors transiently: rounds 2 and 3 (requeue_N ... load_N) resend, then the items
    are dead."""
    anthropic_conn.configure(faults={"batch": {"errored_rate": 1.0, "error_types": ["overloaded_error"]}})
    dag = workflow_dags["invoice_approval"]
    run = dag.test(logical_date=INVOICE_RUN)
    states = task_states(run)
    assert run.state == "success", states
    assert all(
        states[f"{task}_{n}"] == "success" for task in ("requeue", "record", "wait", "load") for n in (2, 3)
    ), states
    stats = anthropic_conn.stats()
    assert (
        stats["batches_created"] == 3 and stats["requests_received"] == 3 * 5
    )  # each invoice sent three times
    ledger = query(warehouse,
                   "SELECT status, attempts, COUNT(*) FROM claude_batch_ledger "
                   "WHERE workload = ? GROUP BY 1, 2",
                   "invoice_approval")  # fmt: skip
    assert ledger == [("dead", 3, 5)]
    report = run.get_task_instance("report").xcom_pull(task_ids="report")
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3] and report["batches"] == 3
