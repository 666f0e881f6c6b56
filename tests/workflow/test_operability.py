"""A UI that explains itself, and runs that say what they did.

- the trigger form's Params have titles, descriptions and sections;
- ``claude_batch_dag`` lays its tasks out at the DAG's top level (``claude_batch_pipeline`` keeps
  its TaskGroup in a DAG of your own);
- the Claude Console link: on every mapped submit task, as the API server computes it; hidden
  when the connection points at the emulator;
- a run's note (its cost; a dry run says so; a failure says where and why), the results Asset
  event's ``extra``, and a progress line for every poll round of the wait;
- a failed run's alert reaching an SMTP server.

One successful dag.test() covers the note, the Asset extra, the links and the progress lines.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import pytest

from tests.conftest import REPO
from tests.smtp import FakeSmtpServer
from tests.workflow.conftest import END, task_states

DAY = datetime(2026, 11, 10, tzinfo=UTC)
INVOICE_RUN = (END - timedelta(hours=4)).replace(tzinfo=UTC)


def run_row(dag_id: str, run_id: str):
    from airflow.models import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        run = session.scalar(select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
        return {"note": run.note, "state": run.state}


# --- the trigger form ------------------------------------------------------------------------


def test_params_have_titles_descriptions_and_sections():
    from airflow.dag_processing.dagbag import DagBag
    from airflow.serialization.serialized_objects import DagSerialization
    from claude_batch.pipeline import PARAM_SECTIONS

    bag = DagBag(dag_folder=str(REPO / "dags"))
    for dag in bag.dags.values():
        # As the API server hands them to the UI's form: serialized, then read back.
        params = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag)).params
        form = {name: params.get_param(name).dump() for name in params}
        for name, param in form.items():
            schema = param["schema"]
            assert schema["title"] and schema["title"] != name, name
            assert not re.search(r"\b[a-z]+_[a-z_]+\b", schema["title"]), (
                name,
                schema["title"],
            )  # no snake_case
            assert param["description"] and len(param["description"]) > 20, name
        # What to send comes first, in the form's default section (the one it opens); then the
        # other sections in order, each once (shown collapsed, as an accordion).
        sections = [param["schema"].get("section") for param in form.values()]
        assert sections[:4] == [None] * 4 and list(form)[:4] == [
            "model",
            "row_limit",
            "window_start",
            "window_end",
        ]
        assert list(dict.fromkeys(sections[4:])) == list(PARAM_SECTIONS), sections
        assert {
            name for name, param in form.items() if param["schema"].get("section") == "Cost and dry run"
        } == {"dry_run", "budget_usd"}
        assert form["model"]["schema"]["values_display"][dag.params["model"]].startswith("Claude ")
    triage = bag.dags["support_ticket_triage"]
    assert triage.params.get_param("window_end").dump()["schema"]["title"] == "To date (exclusive)"


# --- the layout ------------------------------------------------------------------------------


def test_claude_batch_dag_lays_its_tasks_out_at_the_top_level_and_the_pipeline_keeps_its_group():
    from airflow.sdk import DAG
    from claude_batch.pipeline import PipelineConfig, SourceSpec, claude_batch_pipeline

    from tests.dags.pipeline_dags import TINY_TRIAGE
    from tests.dags.pipeline_dags import dag as built

    ids = set(built.task_ids)
    assert {"stage", "gate", "pilot", "pilot_decide", "pilot_approval", "submit", "record", "wait", "collect",
            "load", "requeue_2", "load_3", "report"} <= ids, ids  # fmt: skip
    assert not [task_id for task_id in ids if "." in task_id]
    assert not built.task_group.children.keys() - ids  # no group in between
    assert built.get_task("pilot_approval").decision_task_id == "pilot_decide"

    config = PipelineConfig(
        workload=TINY_TRIAGE,
        source=SourceSpec(table="tickets", key_column="ticket_id", interval_column="created_at"),
    )
    with DAG("cb_own", schedule=None, start_date=datetime(2026, 11, 1, tzinfo=UTC)) as own:
        group = claude_batch_pipeline(config, group_id="triage")
    assert group.group_id == "triage" and set(own.task_group.children) == {"triage"}
    assert {task_id.split(".", 1)[0] for task_id in own.task_ids} == {"triage"}
    assert own.get_task("triage.pilot_approval").decision_task_id == "triage.pilot_decide"


# --- the Console link ------------------------------------------------------------------------


def test_the_console_link_points_at_the_console_only_for_the_real_api(monkeypatch):
    from claude_batch.operators import console_url

    monkeypatch.delenv("CLAUDE_BATCH_CONSOLE_URL", raising=False)
    console = "https://platform.claude.com/workspaces/default/batches/msgbatch_1"
    assert console_url("msgbatch_1", "https://api.anthropic.com") == console
    assert console_url("msgbatch_1", "https://api.anthropic.com/") == console
    assert console_url("msgbatch_1", None) == console  # no host: the SDK's default, the real API
    assert console_url("msgbatch_1", "http://127.0.0.1:8765") is None  # the emulator: no button
    assert console_url("msgbatch_1", "https://llm-gateway.internal.example.com") is None
    monkeypatch.setenv("CLAUDE_BATCH_CONSOLE_URL", "https://console.example.com/b/{batch_id}")
    assert console_url("msgbatch_1", "http://127.0.0.1:8765") == "https://console.example.com/b/msgbatch_1"


# --- whole runs ------------------------------------------------------------------------------


@pytest.fixture
def tiny_warehouse(tmp_path, monkeypatch):
    import duckdb

    path = tmp_path / "warehouse.duckdb"
    with duckdb.connect(str(path)) as conn:
        conn.execute("CREATE TABLE tickets (ticket_id VARCHAR, body VARCHAR, created_at TIMESTAMP)")
        texts = ["I was charged twice for my invoice, refund please"] * 30 + ["The app crashes on start"] * 30
        conn.executemany(
            "INSERT INTO tickets VALUES (?, ?, ?)",
            [
                (f"T-{i:04d}", text, DAY.replace(tzinfo=None) + timedelta(minutes=9 * i))
                for i, text in enumerate(texts)
            ],
        )
    monkeypatch.setenv(
        "AIRFLOW_CONN_CLAUDE_BATCH_WAREHOUSE", json.dumps({"conn_type": "duckdb", "host": str(path)})
    )
    return path


@pytest.mark.airflow
def test_a_run_leaves_its_cost_as_note_and_asset_extra_links_each_submit_and_logs_every_poll_round(
    airflow_db, anthropic_conn, aws_conn, s3_store, tiny_warehouse, monkeypatch, capfd
):
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models import TaskInstance
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.serialization.serialized_objects import DagSerialization
    from airflow.utils.session import create_session
    from sqlalchemy import select

    monkeypatch.setenv("CLAUDE_BATCH_STORAGE_ROOT", s3_store.root)
    # The emulator has no console: with CLAUDE_BATCH_CONSOLE_URL the link shows where batches are.
    monkeypatch.setenv("CLAUDE_BATCH_CONSOLE_URL", "https://console.example.com/batches/{batch_id}")
    anthropic_conn.configure(processing_seconds=480.0)  # 8 wall seconds: many poll rounds
    dag = DagBag(dag_folder=str(REPO / "tests" / "dags" / "pipeline_dags.py")).dags["cb_tiny_triage"]

    run = dag.test(logical_date=DAY + timedelta(days=1))
    output = capfd.readouterr().out
    assert run.state == "success", task_states(run)

    # The note: outcome and cost, in the runs list.
    note = run_row(dag.dag_id, run.run_id)["note"]
    assert note.startswith("**Cost** $"), note
    assert "60 succeeded (of 60 extracted)" in note and "**Batches** 2" in note and "real-time" in note, note

    # The results Asset event carries the run's figures.
    with create_session() as session:
        events = session.scalars(
            select(AssetEvent)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .where(
                AssetModel.name == "claude_batch.tiny_triage_results", AssetEvent.source_run_id == run.run_id
            )
        ).all()
        extras = [event.extra for event in events]
        tis = session.scalars(
            select(TaskInstance).where(TaskInstance.dag_id == dag.dag_id, TaskInstance.run_id == run.run_id,
                                       TaskInstance.task_id == "submit").order_by(TaskInstance.map_index)
        ).all()  # fmt: skip
        # Each mapped submit's link, as the API server's extra-links route computes it.
        served = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag)).get_task("submit")
        assert served.extra_links == ["Claude Console"]
        links = [served.get_extra_links(ti, "Claude Console") for ti in tis]
        batch_ids = [ti.xcom_pull(task_ids="submit", key="batch_id", map_indexes=ti.map_index) for ti in tis]
    (extra,) = extras  # round 1's load (no later round ran)
    assert extra["run_id"] == run.run_id and extra["round"] == 1 and extra["ledger"] == {"succeeded": 60}
    assert extra["cost_usd"] > 0 and extra["input_tokens"] > 0 and extra["output_tokens"] > 0
    assert extra["results_upserted"] == 60 and extra["workload"] == "tiny_triage" and extra["extracted"] == 60
    assert [ti.map_index for ti in tis] == [0, 1] and all(batch_ids)
    assert links == [f"https://console.example.com/batches/{batch_id}" for batch_id in batch_ids]

    # The wait logs a line every poll round: counts, age, time to expiry, next check.
    rounds = [line for line in output.splitlines() if "Poll round " in line]
    assert len(rounds) >= 3, rounds
    numbers = [int(re.search(r"Poll round (\d+):", line).group(1)) for line in rounds]
    assert numbers == list(range(1, len(rounds) + 1)), numbers
    for line in rounds[:-1]:
        assert "requests processing=" in line and "age " in line and "expires in" in line, line
        assert re.search(r"next check in \dm\d\ds", line), line
    assert "every batch has ended" in rounds[-1] and "succeeded=60" in rounds[-1], rounds[-1]


@pytest.fixture
def smtp(monkeypatch):
    with FakeSmtpServer() as server:
        monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", json.dumps(server.connection()))
        monkeypatch.setenv("CLAUDE_BATCH_ALERT_EMAIL", "oncall@example.com")  # the default notifier e-mails
        yield server


@pytest.mark.airflow
def test_a_failed_run_alerts_by_mail_and_its_note_says_where_and_why(workflow_dags, anthropic_conn, smtp):
    dag = workflow_dags["invoice_approval"]
    run = dag.test(logical_date=INVOICE_RUN, run_conf={"budget_usd": 0.0001})
    assert run.state == "failed"

    (mail,) = smtp.mailbox.wait_for(1)
    assert mail.recipients == ["oncall@example.com"]
    assert mail.subject == f"claude-batch: invoice_approval run failed ({run.run_id})"
    assert "Failed task: gate (try 1)" in mail.body
    note = run_row(dag.dag_id, run.run_id)["note"]
    assert note.startswith("**FAILED** at gate\n**Refused** The estimated cost $"), note
    assert "over this run's budget $0.0001" in note and "nothing was submitted" in note


@pytest.mark.airflow
def test_a_dry_run_says_so_in_its_note(workflow_dags, anthropic_conn):
    dag = workflow_dags["invoice_approval"]
    run = dag.test(logical_date=INVOICE_RUN, run_conf={"dry_run": True})
    assert run.state == "success"
    note = run_row(dag.dag_id, run.run_id)["note"]
    assert note.startswith("**Dry run** nothing was submitted. 5 requests staged in 1 shard(s)"), note
    assert "estimated cost $" in note and "on claude-sonnet-4-6" in note
    assert anthropic_conn.stats()["batches_created"] == 0


def test_a_note_written_by_a_person_is_kept():
    from claude_batch.notes import SEPARATOR, compose

    assert compose(None, "**Cost** $1") == "**Cost** $1"
    assert compose("**Staged** 5 requests", "**Cost** $1") == "**Cost** $1"  # ours: replaced
    kept = compose("Re-run after the VAT fix (Ann)", "**Cost** $1")
    assert kept == f"Re-run after the VAT fix (Ann){SEPARATOR}**Cost** $1"
    assert compose(kept, "**Cost** $2") == f"Re-run after the VAT fix (Ann){SEPARATOR}**Cost** $2"
    assert len(compose("x" * 2000, "**Cost** $1")) <= 1000
