"""The workload DAG on Airflow's real components: REST trigger, triggerer restart, backfill.

Everything goes through the public REST API with a JWT from the simple auth manager, as the UI
does; the scheduler hands tasks to a Celery worker through Redis, the wait runs in the
triggerer, and the results land in a PostgreSQL warehouse, which the asserts read directly.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from datetime import UTC, datetime

import pytest

from tests.fullstack.conftest import TASK_PREFIX, TICKET_DAYS, WORKLOAD_DAG, ticket_key
from tests.fullstack.stack import AirflowStack, model_family, wait_for

pytestmark = [pytest.mark.services, pytest.mark.airflow]

RESULTS_TABLE = "tiny_triage_results"
LEDGER_TABLE = "claude_batch_ledger"
# Longer than the test runs at 60x, shorter than the API's 24 h expiry: the batch stays
# in_progress until the test moves emulated time on.
HELD_BATCH_SECONDS = 36_000.0


def emulator_calls(stack: AirflowStack, *endpoints: str) -> int:
    calls = stack.emulator.stats()["http_requests"]
    return sum(calls.get(endpoint, 0) for endpoint in endpoints)


def day_rows(stack: AirflowStack, table: str, day: datetime, columns: str) -> list[tuple]:
    prefix = ticket_key(day, 0).split("-")[0] + "-%"
    return stack.warehouse_query(f"SELECT {columns} FROM {table} WHERE record_key LIKE %s", (prefix,))


def test_rest_trigger_with_params_survives_a_triggerer_restart(fullstack: AirflowStack):
    stack, api, emulator = fullstack, fullstack.api, fullstack.emulator
    day = datetime(2026, 11, 10)
    wait_task = f"{TASK_PREFIX}wait"
    before = emulator.stats()
    emulator.configure(processing_seconds=HELD_BATCH_SECONDS)

    with stack.phase("REST run: trigger until the wait is deferred"):
        # As the UI's trigger form posts it: a logical date and the Params as conf.
        run = api.trigger(
            WORKLOAD_DAG,
            conf={"model": "claude-sonnet-4-5", "window_start": "2026-11-10", "window_end": "2026-11-11"},
            logical_date=datetime.now(UTC).isoformat(),
            note="full-stack test: REST trigger",
        )
        run_id = run["dag_run_id"]
        assert run["conf"]["model"] == "claude-sonnet-4-5"
        wait_for(
            "the wait task to be deferred",
            lambda: api.task_instance(WORKLOAD_DAG, run_id, wait_task)["state"] == "deferred",
            timeout=180,
            interval=1.0,
            check=stack.check_run_alive(WORKLOAD_DAG, run_id),
        )
    submitted = emulator.stats()
    assert submitted["batches_created"] - before["batches_created"] == 2, "50 tickets in shards of 40"
    assert submitted["batches_by_status"].get("in_progress", 0) >= 2

    with stack.phase("triggerer restart: SIGTERM until the new one polls"):
        # As an orchestrator restarts it: SIGTERM, wait for the exit, start it again.
        triggerer = stack.components["triggerer"]
        exit_code = triggerer.stop(signal.SIGTERM, timeout=60)
        assert exit_code == 0, (
            f"the triggerer did not exit cleanly on SIGTERM ({exit_code}):\n{triggerer.tail()}"
        )
        assert api.task_instance(WORKLOAD_DAG, run_id, wait_task)["state"] == "deferred"
        assert emulator_calls(stack, "cancel") == 0, (
            "a triggerer shutdown must not cancel the batches it watched"
        )
        polls_before_restart = emulator_calls(stack, "list", "retrieve")
        triggerer.start()
        # The new triggerer takes the trigger over and polls the same batches again.
        wait_for(
            "the restarted triggerer to poll the batches",
            lambda: emulator_calls(stack, "list", "retrieve") > polls_before_restart + 1,
            timeout=120,
            interval=1.0,
            check=stack.check_run_alive(WORKLOAD_DAG, run_id),
        )

    with stack.phase("REST run: batches end until the run succeeds"):
        emulator.configure(processing_seconds=60.0)
        emulator.advance(HELD_BATCH_SECONDS + 600)  # both batches end now
        finished = stack.wait_for_run(WORKLOAD_DAG, run_id, timeout=180)
    assert finished["state"] == "success", stack.describe_run(WORKLOAD_DAG, run_id)

    after = emulator.stats()
    assert after["batches_created"] - before["batches_created"] == 2, "the restart must not submit again"
    assert after["requests_received"] - before["requests_received"] == TICKET_DAYS[day]
    assert emulator_calls(stack, "cancel") == 0

    results = day_rows(stack, RESULTS_TABLE, day, "record_key, model, batch_id, category")
    assert len(results) == TICKET_DAYS[day]
    # The chosen model (the Param), as the API names it back: its dated snapshot.
    assert {model_family(model) for _, model, _, _ in results} == {"claude-sonnet-4-5"}, results[:3]
    assert len({batch for _, _, batch, _ in results}) == 2
    ledger = Counter(status for (status,) in day_rows(stack, LEDGER_TABLE, day, "status"))
    assert ledger == {"succeeded": TICKET_DAYS[day]}
    # The run's own report, as the report task returned it.
    report = api.xcom(WORKLOAD_DAG, run_id, f"{TASK_PREFIX}report")
    assert report["extracted"] == TICKET_DAYS[day] and report["batches"] == 2


def test_backfill_over_three_intervals_through_the_rest_api(fullstack: AirflowStack):
    stack, api, emulator = fullstack, fullstack.api, fullstack.emulator
    days = [datetime(2026, 11, 11), datetime(2026, 11, 12), datetime(2026, 11, 13)]
    before = emulator.stats()

    backfill = api.request(
        "POST",
        "/backfills",
        json={
            "dag_id": WORKLOAD_DAG,
            "from_date": "2026-11-11T00:00:00Z",
            "to_date": "2026-11-13T00:00:00Z",
            "max_active_runs": 3,
            "reprocess_behavior": "none",
        },
    )

    def backfill_runs() -> list[dict]:
        # This is the stack's only backfill: its runs are the DAG's backfill runs.
        return api.get(f"/dags/{WORKLOAD_DAG}/dagRuns", run_type="backfill", limit=50)["dag_runs"]

    with stack.phase("backfill: three intervals until every run succeeds"):
        finished = _wait_for_backfill_runs(stack, backfill_runs)
    states = {run["dag_run_id"]: run["state"] for run in finished}
    assert set(states.values()) == {"success"}, {
        run_id: stack.describe_run(WORKLOAD_DAG, run_id)
        for run_id, state in states.items()
        if state != "success"
    }
    # One run per data interval, each a day of the range.
    intervals = sorted((run["data_interval_start"][:10], run["data_interval_end"][:10]) for run in finished)
    assert intervals == [
        ("2026-11-11", "2026-11-12"),
        ("2026-11-12", "2026-11-13"),
        ("2026-11-13", "2026-11-14"),
    ]

    after = emulator.stats()
    assert after["batches_created"] - before["batches_created"] == 3, "one batch per interval"
    assert after["requests_received"] - before["requests_received"] == sum(TICKET_DAYS[d] for d in days)
    batch_of_day = {}
    for day in days:
        results = day_rows(stack, RESULTS_TABLE, day, "record_key, model, batch_id")
        assert len(results) == TICKET_DAYS[day], f"results for {day:%Y-%m-%d}"
        assert {model_family(model) for _, model, _ in results} == {"claude-haiku-4-5"}  # the default
        batch_of_day[day] = {batch for _, _, batch in results}
        assert len(batch_of_day[day]) == 1
        ledger = Counter(status for (status,) in day_rows(stack, LEDGER_TABLE, day, "status"))
        assert ledger == {"succeeded": TICKET_DAYS[day]}
    assert len(set().union(*batch_of_day.values())) == 3, "each interval has its own batch"

    done = wait_for(
        "the backfill to be marked complete",
        lambda: (b := api.get(f"/backfills/{backfill['id']}")).get("completed_at") and b,
        60,
        interval=1.0,
        check=stack.check_alive,
    )
    assert done["completed_at"]


def _wait_for_backfill_runs(stack: AirflowStack, backfill_runs) -> list[dict]:
    runs = wait_for("the backfill's three runs", lambda: (r := backfill_runs()) and len(r) == 3 and r, 60)
    started = time.monotonic()
    return [
        stack.wait_for_run(
            WORKLOAD_DAG, run["dag_run_id"], timeout=max(240 - (time.monotonic() - started), 1)
        )
        for run in runs
    ]


def test_no_secret_in_any_component_or_celery_task_log(fullstack: AirflowStack):
    """After the runs above: the API key and the admin password appear in no log of the stack.

    Scans every component's log (API server, scheduler, DAG processor, triggerer, Celery
    worker) and every task log the worker wrote under the Airflow home. Left out: Airflow's own
    password file, and the browser driver's logs (the test harness typing the password).
    """
    from pathlib import Path

    from tests.conftest import EMULATOR_API_KEY
    from tests.fullstack.stack import ARTIFACTS
    from tests.security.scan import Findings

    scan = Findings((EMULATOR_API_KEY, fullstack.password))
    skipped = {"simple_auth_manager_passwords.json", "chromedriver.log", "chromedriver-verbose.log"}
    files = [p for p in sorted(ARTIFACTS.rglob("*")) if p.is_file() and p.name not in skipped]
    for path in files:
        scan.check(str(path), path.read_bytes())
    task_logs = [p for p in files if Path(fullstack.env["AIRFLOW_HOME"]) / "logs" in p.parents]
    assert scan.found == []
    # A scan of nothing proves nothing: the worker's task logs and every component's log were read.
    ran = {p.parent.name if p.parent.name.startswith("task_id=") else p.parent.parent.name for p in task_logs}
    assert {f"task_id={TASK_PREFIX}collect", f"task_id={TASK_PREFIX}load"} <= ran, sorted(ran)[:10]
    assert {"celery-worker.log", "scheduler.log", "triggerer.log", "api-server.log"} <= {
        p.name for p in files
    }
    assert scan.bytes > 100_000
