"""Two overlapping runs of one interval on a DuckDB warehouse, on Airflow's real components.

The project issue's acceptance test: "a full-stack test (LocalExecutor or Celery, real
scheduler and triggerer) with two overlapping runs and 4 mapped collects on a DuckDB
warehouse: no lock failure, no task retry needed".

``cb_overlap_duckdb`` (tests/dags/fullstack_overlap_dags.py) reads a DuckDB file the test seeds
with 100 tickets in one day (four shards of 25). Two runs of that day are triggered through
the REST API at once: one for the data interval (a logical date), one "manual" with the same
window in its Params. The Celery worker runs four task processes, so the two runs' stages and
gates meet at the DuckDB file in separate processes at the same time. Then: both runs
succeed, one with four mapped submits and collects, the other skipped at its gate (every item
is held by the first); no task instance failed or needed a second try; no task or component
log holds DuckDB's lock error; the emulator answered each custom_id exactly once; the DuckDB
ledger has every row succeeded, by the run that submitted.

A second, quick test is the negative control: without the product's turn-taking, a second
process opening the same DuckDB file gets exactly the error the first test looks for.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from claude_batch.paging import iter_list_pages, list_params

from tests.fullstack.stack import ARTIFACTS, AirflowStack, StackError, wait_for

pytestmark = [pytest.mark.services, pytest.mark.airflow]

# As in tests/dags/fullstack_overlap_dags.py (not imported: that builds the DAG in this process).
DAG_ID = "cb_overlap_duckdb"
WAREHOUSE_CONN_ID = "cb_overlap_duckdb_warehouse"
TASK_PREFIX = ""  # claude_batch_dag: the tasks sit at the top level
WORKLOAD = "overlap_triage"
RESULTS_TABLE = "overlap_triage_results"
SHARDS, PER_SHARD = 4, 25
ROWS = SHARDS * PER_SHARD
DAY = datetime(2026, 11, 20)
# DuckDB's words when a second process opens a file another holds ("IO Error: Could not set
# lock on file ...: Conflicting lock is held in ... (PID ...)").
LOCK_ERRORS = ("Could not set lock", "Conflicting lock")
TICKET_TEXTS = (
    "I was charged twice for my invoice, refund please",
    "The app crashes with an error on start",
    "Please add dark mode, a feature idea",
    "Cancel my subscription at the end of the month",
)


def seed_warehouse(database: Path) -> None:
    """The source table: ROWS tickets spread over DAY (the only rows in the file)."""
    from claude_batch.connections import duckdb_connection

    rows = [
        (f"O{DAY:%m%d}-{i:03d}", TICKET_TEXTS[i % len(TICKET_TEXTS)], DAY + timedelta(minutes=14 * i))
        for i in range(ROWS)
    ]
    assert rows[-1][2] < DAY + timedelta(days=1)
    with duckdb_connection(str(database)) as conn:
        conn.execute(
            "CREATE TABLE tickets (ticket_id VARCHAR PRIMARY KEY, body VARCHAR, created_at TIMESTAMP)"
        )
        conn.executemany("INSERT INTO tickets VALUES (?, ?, ?)", rows)


def _ensure_dag(stack: AirflowStack) -> None:
    """The DAG parsed (the stack's start waits only for its own DAGs) and unpaused."""
    api = stack.api
    try:
        wait_for(
            f"DAG {DAG_ID} to be parsed",
            lambda: api.http.get(f"/api/v2/dags/{DAG_ID}").status_code == 200,
            180,
            check=stack.check_alive,
        )
    except StackError as exc:
        errors = api.get("/importErrors").get("import_errors", [])
        raise StackError(f"{exc}; import errors: {[e['filename'] for e in errors]}") from exc
    api.unpause(DAG_ID)


def _all_batches(client) -> list:
    """Every batch the emulator holds, newest first (paged as the package pages ``list``)."""
    pages = iter_list_pages(lambda after_id: client.messages.batches.list(**list_params(after_id)), 10_000)
    return [batch for page in pages for batch in page.data]


def _moment(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


def _overlapping(first: list[dict], second: list[dict]) -> list[tuple[str, str]]:
    """Pairs of task instances, one of each run, whose start-to-end spans overlap."""
    pairs = []
    for a in first:
        for b in second:
            a0, a1, b0, b1 = (
                _moment(a["start_date"]),
                _moment(a["end_date"]),
                _moment(b["start_date"]),
                _moment(b["end_date"]),
            )
            if None not in (a0, a1, b0, b1) and a0 < b1 and b0 < a1:
                pairs.append((_label(a), _label(b)))
    return pairs


def _ran(ti: dict) -> bool:
    """The task ran on a worker (one the scheduler skipped has no host)."""
    return bool(ti["hostname"])


def _label(ti: dict) -> str:
    name = ti["task_id"].removeprefix(TASK_PREFIX)
    return name + (f"[{ti['map_index']}]" if ti["map_index"] >= 0 else "")


def _dag_logs(stack: AirflowStack) -> Path:
    return Path(stack.env["AIRFLOW_HOME"]) / "logs" / f"dag_id={DAG_ID}"


def _task_logs(stack: AirflowStack) -> list[Path]:
    return sorted(_dag_logs(stack).rglob("*.log"))


def _run_logs(stack: AirflowStack, run_id: str) -> list[Path]:
    return [p for p in _task_logs(stack) if f"run_id={run_id}" in p.parts]


def test_two_overlapping_runs_share_a_duckdb_warehouse_without_lock_errors(fullstack: AirflowStack, tmp_path):
    from claude_batch.connections import duckdb_connection

    stack, api, emulator = fullstack, fullstack.api, fullstack.emulator
    database = tmp_path / "overlap-warehouse.duckdb"
    seed_warehouse(database)
    # As an operator adds it in the UI: a duckdb connection naming the file (the tasks look it
    # up through the execution API, which falls back from the env connections to these).
    api.request(
        "POST",
        "/connections",
        json={
            "connection_id": WAREHOUSE_CONN_ID,
            "conn_type": "duckdb",
            "host": str(database),
            "description": "full-stack overlap test: a DuckDB warehouse file",
        },
    )
    _ensure_dag(stack)

    import anthropic

    from tests.conftest import EMULATOR_API_KEY

    client = anthropic.Anthropic(api_key=EMULATOR_API_KEY, base_url=emulator.base_url, max_retries=0)
    batches_before = {batch.id for batch in _all_batches(client)}
    stats_before = emulator.stats()
    emulator.configure(processing_seconds=60.0)  # one wall-clock second at the stack's 60x

    with stack.phase("overlap: two runs of one interval on DuckDB until both end"):
        # Both at once: the scheduled interval (logical date = the interval's end, as a manual
        # trigger of a daily DAG infers it) and a manual run with the same window in its Params.
        interval_run = api.trigger(
            DAG_ID,
            conf={},
            logical_date=f"{DAY + timedelta(days=1):%Y-%m-%d}T00:00:00+00:00",
            note="overlap test: the interval",
        )
        window_run = api.trigger(
            DAG_ID,
            conf={"window_start": f"{DAY:%Y-%m-%d}", "window_end": f"{DAY + timedelta(days=1):%Y-%m-%d}"},
            logical_date=None,
            note="overlap test: the same window, manual",
        )
        assert (interval_run["data_interval_start"][:10], interval_run["data_interval_end"][:10]) == (
            f"{DAY:%Y-%m-%d}",
            f"{DAY + timedelta(days=1):%Y-%m-%d}",
        ), interval_run
        run_ids = [interval_run["dag_run_id"], window_run["dag_run_id"]]
        finished = {run_id: stack.wait_for_run(DAG_ID, run_id, timeout=300) for run_id in run_ids}

    tis = {run_id: api.task_instances(DAG_ID, run_id) for run_id in run_ids}
    summary: dict = {
        "runs": {
            run_id: {
                "state": finished[run_id]["state"],
                "tasks": {_label(ti): [ti["state"], ti["try_number"]] for ti in tis[run_id]},
            }
            for run_id in run_ids
        }
    }
    assert {run["state"] for run in finished.values()} == {"success"}, {
        run_id: stack.describe_run(DAG_ID, run_id) for run_id in run_ids
    }

    # No task failed, none needed a second try: every task that ran (on a worker) did so once;
    # tasks the scheduler skipped without running have try 0.
    for run_id in run_ids:
        for ti in tis[run_id]:
            assert ti["state"] in ("success", "skipped"), (
                run_id,
                _label(ti),
                stack.describe_run(DAG_ID, run_id),
            )
            assert ti["try_number"] == (1 if _ran(ti) else 0), (run_id, _label(ti), ti["try_number"])
    attempts = {p: re.match(r"attempt=(\d+)\.", p.name) for p in _task_logs(stack)}
    retried = [p for p, attempt in attempts.items() if attempt and attempt[1] != "1"]
    assert retried == [], f"task logs of a second attempt: {retried}"

    # One run submitted all four shards; the other found every item held and skipped at its gate.
    def mapped(run_id: str, task: str) -> list[dict]:
        return [ti for ti in tis[run_id] if ti["task_id"] == f"{TASK_PREFIX}{task}" and ti["map_index"] >= 0]

    submitting = [run_id for run_id in run_ids if mapped(run_id, "submit")]
    assert len(submitting) == 1, summary
    winner = submitting[0]
    (loser,) = [run_id for run_id in run_ids if run_id != winner]
    for task in ("submit", "collect"):
        assert [ti["state"] for ti in mapped(winner, task)] == ["success"] * SHARDS, (task, summary)
    states = {_label(ti): ti["state"] for ti in tis[loser]}
    assert states.pop("stage") == "success" and states.pop("gate") == "skipped", summary
    assert set(states.values()) == {"skipped"}, summary  # everything after the gate
    gate_log = "\n".join(
        p.read_text(errors="replace")
        for p in _run_logs(stack, loser)
        if f"task_id={TASK_PREFIX}gate" in p.parts
    )
    # The skip names the run holding the items.
    assert "has nothing of its own to submit" in gate_log and f"100 by {winner}" in gate_log, gate_log[-2000:]
    summary["winner"], summary["loser"] = winner, loser
    summary["loser_gate"] = (
        "could not claim (held by the other run)"
        if "could not claim" in gate_log
        else "staged nothing (extracted 0)"
    )

    # The two runs really met: task processes of both ran at the same time.
    ran = {run_id: [ti for ti in tis[run_id] if _ran(ti)] for run_id in run_ids}
    overlaps = _overlapping(ran[winner], ran[loser])
    summary["overlapping_tasks"] = overlaps
    summary["pids"] = {run_id: {_label(ti): ti["pid"] for ti in ran[run_id]} for run_id in run_ids}
    assert overlaps, f"the runs did not overlap: {summary}"

    # DuckDB's lock error appears in no task log and no component log.
    logs = _task_logs(stack) + sorted(ARTIFACTS.glob("*.log"))
    lock_errors = [
        (str(p), line.strip()[:300])
        for p in logs
        for line in p.read_text(errors="replace").splitlines()
        if any(error in line for error in LOCK_ERRORS)
    ]
    assert lock_errors == [], lock_errors
    waits = [
        p for p in _task_logs(stack) if "Waiting for the DuckDB warehouse" in p.read_text(errors="replace")
    ]
    summary["tasks_that_waited_their_turn"] = [str(p.relative_to(_dag_logs(stack))) for p in waits]

    # The emulator: four new batches, 100 requests, each custom_id answered (billed) once.
    stats = emulator.stats()
    new_batches = [batch for batch in _all_batches(client) if batch.id not in batches_before]
    assert len(new_batches) == SHARDS, [batch.id for batch in new_batches]
    assert stats["requests_received"] - stats_before["requests_received"] == ROWS
    billed: Counter[str] = Counter()
    for batch in new_batches:
        assert batch.processing_status == "ended", batch
        for line in client.messages.batches.results(batch.id):
            assert line.result.type == "succeeded", line
            billed[line.custom_id] += 1
    assert len(billed) == ROWS and set(billed.values()) == {1}, billed.most_common(3)

    # The ledger and results, read after the runs (with the product's turn-taking, as a task would).
    with duckdb_connection(str(database), timeout=60) as conn:
        ledger = conn.execute(
            "SELECT record_key, custom_id, status, run_id, attempts FROM claude_batch_ledger WHERE workload "
            "= ?",
            [WORKLOAD],
        ).fetchall()
        results = conn.execute(f"SELECT record_key, batch_id FROM {RESULTS_TABLE}").fetchall()
    assert len(ledger) == ROWS
    assert Counter(status for _, _, status, _, _ in ledger) == {"succeeded": ROWS}
    assert {run for _, _, _, run, _ in ledger} == {winner}
    assert {custom_id for _, custom_id, _, _, _ in ledger} == set(billed)
    assert len(results) == ROWS and len({key for key, _ in results}) == ROWS
    assert {batch for _, batch in results} == {batch.id for batch in new_batches}
    report = api.xcom(DAG_ID, winner, f"{TASK_PREFIX}report")
    assert report["extracted"] == ROWS and report["batches"] == SHARDS, report
    summary["billed"] = {
        "custom_ids": len(billed),
        "max_per_custom_id": max(billed.values()),
        "batches": len(new_batches),
    }
    summary["ledger"] = dict(Counter(status for _, _, status, _, _ in ledger))
    summary["timings"] = stack.timings
    (ARTIFACTS / "overlap-summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(json.dumps(summary, indent=2, default=str))


# The holder: opens the file with DuckDB directly (no turn-taking) and keeps it until stdin closes.
_HOLDER = "import duckdb, sys; c = duckdb.connect(sys.argv[1]); print('open', flush=True); sys.stdin.read()"


def test_negative_control_a_second_process_opening_the_file_gets_the_lock_error(tmp_path):
    """What the full-stack test rules out, shown directly: two processes on one DuckDB file collide.

    So the words it looks for in the logs are DuckDB's real ones; and the product's connection
    waits (it does not fail) for a file another program holds, then gets it once it is free.
    """
    import duckdb
    from claude_batch.connections import duckdb_connection
    from claude_batch.warehouse import WarehouseError

    database = str(tmp_path / "contended.duckdb")
    duckdb.connect(database).close()
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, database], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(duckdb.IOException) as raw:
            duckdb.connect(database)
        assert all(error in str(raw.value) for error in LOCK_ERRORS), raw.value
        # The product's connection waits for the other program, then names the file when it gives up.
        with pytest.raises(WarehouseError, match="locked by another program"):
            with duckdb_connection(database, timeout=0.5):
                pass
    finally:
        holder.stdin.close()
        holder.wait(10)
    with duckdb_connection(database, timeout=10) as conn:
        assert conn.execute("SELECT 42").fetchone() == (42,)
