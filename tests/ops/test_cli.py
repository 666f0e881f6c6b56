"""The ``claude-batch`` CLI over a pipeline's warehouse, on DuckDB and PostgreSQL.

Two runs leave two items dead (a row staging refused; a row answered in prose twice); every
subcommand reads what they left, as tables and as JSON; the data engineer mends the two source
rows and requeues them (by key in this process, by reason through the installed console script);
the next run, whose data interval holds no rows at all, sends exactly those two and they succeed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from claude_batch import cli as cli_module

from tests.ops.conftest import CONTROL_KEY, GOOD_KEYS, PG_PASSWORD, PROSE_KEY, cli, cli_json, fix_row, ledger
from tests.reliability.harness import DAG_ID, RUN_1, RUN_2, WORKLOAD, PipelineRun, query

CONSOLE_SCRIPT = Path(sys.executable).parent / "claude-batch"
RUN_3 = (RUN_2[1], RUN_2[1] + timedelta(days=1))


def test_every_subcommand_then_requeue_and_the_next_run_sends_the_items(ops_stack, anthropic_conn):
    stack = ops_stack
    first = PipelineRun(stack, "night-1", RUN_1).run()
    assert first.accounting and first.accounting["ok"], first.accounting
    invalid = cli_json("dead", "--status", "invalid")
    assert [(i["record_key"], i["status"]) for i in invalid["items"]] == [(PROSE_KEY, "invalid")]
    # The next night (no rows of its own) retries the invalid answer once; prose again: dead.
    second = PipelineRun(stack, "night-2", RUN_2).run()
    assert second.accounting and second.accounting["ok"], second.accounting

    # -- status: ledger counts, nothing in flight, the last run --------------------------------
    status = cli_json("status")
    assert status["workloads"] == [WORKLOAD.name]
    (counts,) = status["ledger"]
    assert counts["prompt_version"] == WORKLOAD.prompt_version and counts["current"] is True
    assert counts["counts"] == {
        "pending": 0,
        "submitted": 0,
        "succeeded": 6,
        "invalid": 0,
        "retry": 0,
        "dead": 2,
    }
    assert status["in_flight"] == [] and status["holders"] == []
    (last,) = status["last_runs"]
    assert last["run_id"] == "night-2" and last["dag_id"] == DAG_ID and last["dead"] == 1
    code, text, _ = cli("status")
    assert code == 0
    assert "Ledger (items per status)" in text and "Batches in flight" in text and "night-2" in text
    header = next(line for line in text.splitlines() if "prompt version" in line)
    row = next(line for line in text.splitlines() if WORKLOAD.prompt_version in line)
    assert row.index(WORKLOAD.prompt_version) == header.index("prompt version")  # aligned columns

    # -- runs: outcomes, cost, the real-time equivalent, saving, cache hits, duration -----------
    latest, run = cli_json("runs", "--workload", WORKLOAD.name)
    assert (latest["run_id"], latest["extracted"], latest["dead"]) == ("night-2", 1, 1)
    assert (
        run["run_id"],
        run["extracted"],
        run["succeeded"],
        run["invalid"],
        run["dead"],
        run["rejected"],
    ) == ("night-1", 8, 6, 1, 1, 1)
    assert run["cost_usd"] > 0 and run["realtime_cost_usd"] == pytest.approx(2 * run["cost_usd"], rel=1e-3)
    assert run["saving_usd"] == pytest.approx(run["cost_usd"], rel=1e-3)
    assert run["cache_hit_rate"] is None  # the workload does not cache
    assert run["duration_seconds"] is not None and 0 <= run["duration_seconds"] < 600
    code, text, _ = cli("runs")
    assert code == 0 and "night-1" in text and "real-time" in text and "$" in text

    # -- ledger ----------------------------------------------------------------------------------
    assert cli_json(
        "ledger", "--workload", WORKLOAD.name, "--prompt-version", WORKLOAD.prompt_version[:6]
    ) == [counts]
    code, text, _ = cli("ledger")
    assert code == 0 and WORKLOAD.prompt_version in text

    # -- dead: both items with their reasons, searchable ----------------------------------------
    dead = cli_json("dead", "--workload", WORKLOAD.name)
    assert dead["total"] == 2
    items = {item["record_key"]: item for item in dead["items"]}
    assert set(items) == {PROSE_KEY, CONTROL_KEY}
    assert (
        items[CONTROL_KEY]["rejected"] is True and "control character U+001B" in items[CONTROL_KEY]["reason"]
    )
    assert items[PROSE_KEY]["rejected"] is False and "not valid JSON" in items[PROSE_KEY]["reason"]
    assert items[PROSE_KEY]["batch_id"] and items[PROSE_KEY]["run_id"] == "night-2"
    assert items[PROSE_KEY]["attempts"] == 2 and items[PROSE_KEY]["status"] == "dead"
    assert sorted(r["items"] for r in dead["reasons"]) == [1, 1]
    searched = cli_json("dead", "--search", "CONTROL character")
    assert [item["record_key"] for item in searched["items"]] == [CONTROL_KEY] and searched["total"] == 1
    assert cli_json("dead", "--search", "100%_")["total"] == 0  # the search's own wildcards are text
    code, text, _ = cli("dead", "--search", "valid json")
    assert code == 0 and PROSE_KEY in text and "not valid JSON" in text and CONTROL_KEY not in text

    # -- cost: by day and workload ----------------------------------------------------------------
    (day,) = cli_json("cost")
    assert day["workload"] == WORKLOAD.name and day["runs"] == 2
    assert day["cost_usd"] == pytest.approx(run["cost_usd"] + latest["cost_usd"]) and day["succeeded"] == 6
    code, text, _ = cli("cost", "--days", "7")
    assert code == 0 and "total" in text and WORKLOAD.name in text

    # -- requeue: mend the rows, requeue by key (this process) ---------------------------------
    fix_row(stack, CONTROL_KEY, "red alert about my invoice")
    fix_row(stack, PROSE_KEY, "Refund me now, I was charged twice")
    result = cli_json(
        "requeue", "--workload", WORKLOAD.name, "--key", CONTROL_KEY, "--key", GOOD_KEYS[0],
        "--key", "no-such-key", "--by", "ops-test",
    )  # fmt: skip
    assert (result["selected"], result["requeued"], result["keys"]) == (1, 1, [CONTROL_KEY])
    skipped = {s["record_key"]: s["why"] for s in result["skipped"]}
    assert "done" in skipped[GOOD_KEYS[0]] and "no item" in skipped["no-such-key"]
    # A dry run by reason says what it would take and changes nothing.
    dry = cli_json("requeue", "--workload", WORKLOAD.name, "--reason", "NOT VALID JSON", "--dry-run")
    assert (dry["selected"], dry["requeued"], dry["keys"]) == (1, 0, [PROSE_KEY])
    assert ledger(stack)[PROSE_KEY][0] == "dead"
    # By reason: on DuckDB through the installed console script (its JSON is clean of log lines).
    argv = ["requeue", "--workload", WORKLOAD.name, "--reason", "not valid JSON", "--json"]
    if stack.dialect == "duckdb":
        done = subprocess.run(
            [str(CONSOLE_SCRIPT), *argv],
            capture_output=True,
            text=True,
            timeout=120,
            env=os.environ.copy(),
            check=False,
        )
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
    else:
        result = cli_json(*argv[:-1])
    assert (result["requeued"], result["keys"]) == (1, [PROSE_KEY]) and result["by"].startswith("cli:")
    rows = ledger(stack)
    for key, last_run in ((CONTROL_KEY, "night-1"), (PROSE_KEY, "night-2")):
        status_, attempts, by, at, run_id, last_error = rows[key]
        assert status_ == "retry" and attempts == 0 and at is not None and run_id == last_run, rows[key]
        assert last_error  # why it was dead stays readable
    assert rows[CONTROL_KEY][2] == "ops-test" and rows[PROSE_KEY][2] == result["by"]
    assert cli_json("ledger")[0]["requeued"] == 2

    # -- the next run, over an interval with no rows, sends exactly the two -----------------------
    received = anthropic_conn.stats()["requests_received"]
    third = PipelineRun(stack, "night-3", RUN_3)
    for step in third.steps():
        if step == "gate":
            # Held open by the live run now: a requeue leaves them to it.
            held = cli_json("requeue", "--workload", WORKLOAD.name, "--key", CONTROL_KEY)
            assert held["requeued"] == 0 and "held open by run night-3" in held["skipped"][0]["why"]
        if step == "record":
            status = cli_json("status")
            (batch,) = status["in_flight"]
            assert batch["items"] == 2 and batch["run_id"] == "night-3" and batch["dag_id"] == DAG_ID
            assert 0 <= batch["age_seconds"] < 600 and 23 * 3600 < batch["expires_in_seconds"] <= 24 * 3600
            (holder,) = status["holders"]
            assert (holder["run_id"], holder["submitted"]) == ("night-3", 2)
            code, text, _ = cli("status")
            assert batch["batch_id"] in text
    assert third.record.accounting and third.record.accounting["ok"], third.record.accounting
    assert anthropic_conn.stats()["requests_received"] - received == 2
    rows = ledger(stack)
    assert rows[CONTROL_KEY][0] == rows[PROSE_KEY][0] == "succeeded"
    assert rows[CONTROL_KEY][4] == rows[PROSE_KEY][4] == "night-3"
    results = {key for (key,) in query(stack, f"SELECT record_key FROM {WORKLOAD.results_table}")}
    assert results == {*GOOD_KEYS, CONTROL_KEY, PROSE_KEY}
    counts = cli_json("ledger")[0]
    assert counts["counts"]["succeeded"] == 8 and counts["counts"]["dead"] == 0 and counts["requeued"] == 0
    runs = cli_json("runs")
    assert [r["run_id"] for r in runs] == ["night-3", "night-2", "night-1"] and runs[0]["succeeded"] == 2
    assert cli_json("dead")["total"] == 0
    # All dead: nothing left to take.
    assert cli_json("requeue", "--workload", WORKLOAD.name, "--all-dead")["requeued"] == 0


def test_bad_input_exits_2_with_a_clear_message(tmp_path, monkeypatch):
    import duckdb
    from claude_batch.warehouse import Warehouse

    path = tmp_path / "warehouse.duckdb"
    with duckdb.connect(str(path)) as conn:
        Warehouse(conn).ensure_tables()
        conn.execute(
            "INSERT INTO claude_batch_ledger (workload, record_key, prompt_version, status, updated_at) "
            "VALUES ('triage', 'k1', 'pv_0123456789abcdef', 'dead', now())"
        )
    monkeypatch.setenv(
        "AIRFLOW_CONN_CLAUDE_BATCH_WAREHOUSE", json.dumps({"conn_type": "duckdb", "host": str(path)})
    )
    code, out, err = cli("status", "--workload", "nope")
    assert code == 2 and out == ""
    assert "no workload 'nope' in this warehouse's ledger or run history (known: triage)" in err
    code, _, err = cli("requeue", "--workload", "triage", "--all-dead", "--prompt-version", "pv_nothing")
    assert code == 2 and "has no prompt version 'pv_nothing'" in err
    assert cli_json("requeue", "--workload", "triage", "--all-dead", "--prompt-version", "pv_0123",
                    "--dry-run")["keys"] == ["k1"]  # fmt: skip
    code, _, err = cli("ledger", "--conn-id", "no_such_warehouse")
    assert (
        code == 2
        and "no Airflow connection 'no_such_warehouse'" in err
        and "AIRFLOW_CONN_NO_SUCH_WAREHOUSE" in err
    )
    code, _, err = cli("dead", "--prompt-version", "pv_")
    assert code == 2 and "needs its workload" in err
    keys = tmp_path / "keys.txt"
    keys.write_text("\n\n")
    code, _, err = cli("requeue", "--workload", "triage", "--keys-file", str(keys))
    assert code == 2 and "no keys in" in err
    keys.write_text("k1\n")
    assert cli_json("requeue", "--workload", "triage", "--keys-file", str(keys))["requeued"] == 1
    with pytest.raises(SystemExit) as usage:  # argparse: one selection is required
        cli("requeue", "--workload", "triage")
    assert usage.value.code == 2
    monkeypatch.setenv(
        "AIRFLOW_CONN_ANTHROPIC_DEFAULT", json.dumps({"conn_type": "anthropic", "password": PG_PASSWORD})
    )
    code, _, err = cli("status", "--conn-id", "anthropic_default")
    assert code == 2 and "of type 'anthropic', not a warehouse" in err and PG_PASSWORD not in err


def test_a_warehouse_no_pipeline_ran_on_says_so(tmp_path, monkeypatch):
    path = tmp_path / "empty.duckdb"
    monkeypatch.setenv("AIRFLOW_CONN_EMPTY_WAREHOUSE", json.dumps({"conn_type": "duckdb", "host": str(path)}))
    code, _, err = cli("status", "--conn-id", "empty_warehouse")
    assert code == 2 and "no claude_batch_ledger table" in err


def test_an_unreachable_warehouse_exits_1_without_showing_the_password(monkeypatch):
    from tests.ops.conftest import postgres_connection

    connection = postgres_connection(
        "postgresql://postgres@127.0.0.1:1/test?options=-csearch_path%3Dx", port=1
    )
    connection["extra"]["connect_timeout"] = 2
    monkeypatch.setenv("AIRFLOW_CONN_UNREACHABLE", json.dumps(connection))
    code, out, err = cli("status", "--conn-id", "unreachable")
    assert code == 1 and "OperationalError" in err
    assert PG_PASSWORD not in out + err


def test_the_default_connection_is_the_pipelines():
    from claude_batch.pipeline import PipelineConfig

    default = PipelineConfig.__dataclass_fields__["warehouse_conn_id"].default
    assert cli_module.DEFAULT_WAREHOUSE_CONN_ID == default
    assert cli_module.build_parser().parse_args(["status"]).conn_id == default


def test_tables_align_numbers_right_and_text_left():
    text = cli_module.table(
        ["name", "items", "cost"], [["a", 5, cli_module._Right("$1.50")], ["long name", 1_234, None]]
    )
    lines = text.splitlines()
    assert lines[0] == "  name       items   cost"
    assert lines[2] == "  a              5  $1.50"
    assert lines[3] == "  long name  1,234      -"
    assert cli_module.duration(3_725) == "1h 02m" and cli_module.duration(-65) == "-1m 05s"
    assert cli_module.money(0.01234) == "$0.0123"
