"""Alerts reach people: the deadline alert and a failed run go through Airflow notifiers.

The mail lands in a fake SMTP server on loopback (tests/smtp.py), sent by Airflow's own SMTP
notifier over an ``smtp`` connection: asynchronously (aiosmtplib) for the deadline, which the
triggerer runs, and synchronously (smtplib) for a failure, which the DAG processor runs. The
failed run itself is in tests/workflow/test_operability.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime

import pytest
from claude_batch.alerts import (
    NotifierSpec,
    RunFailedNotifier,
    email,
    log_only,
    notifier,
    run_overdue,
)
from claude_batch.pipeline import PipelineConfig, SourceSpec, claude_batch_dag

from tests.dags.pipeline_dags import TINY_TRIAGE
from tests.smtp import FakeSmtpServer

RUN_ID = "scheduled__2026-11-10T00:00:00+00:00"


@pytest.fixture
def smtp(monkeypatch):
    """A fake SMTP server, as the ``smtp_default`` connection."""
    with FakeSmtpServer() as server:
        monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", json.dumps(server.connection()))
        yield server


def dag_with(notifiers, deadline_hours: float = 20):
    config = PipelineConfig(
        workload=TINY_TRIAGE,
        source=SourceSpec(table="tickets", key_column="ticket_id", interval_column="created_at"),
        storage_root="s3://bucket/prefix",
    )
    return claude_batch_dag(
        config, dag_id="cb_alerts", start_date=datetime(2026, 11, 1, tzinfo=UTC),
        deadline_hours=deadline_hours, notifiers=notifiers,
    )  # fmt: skip


def missed_deadline_context() -> dict:
    """What the scheduler adds to the callback's kwargs when a run misses its deadline.

    See Deadline.handle_miss.
    """
    return {
        "dag_run": {"dag_id": "cb_alerts", "dag_run_id": RUN_ID, "state": "running",
                    "queued_at": "2026-11-10T00:00:05+00:00", "logical_date": "2026-11-10T00:00:00+00:00"},
        "deadline": {"id": "0192", "deadline_time": "2026-11-10T20:00:05+00:00"},
    }  # fmt: skip


def serialized_deadline_callback(dag) -> tuple[str, dict]:
    """The deadline's callback as the scheduler reads it back from the serialized DAG."""
    from airflow.serialization.serialized_objects import DagSerialization

    data = json.loads(json.dumps(DagSerialization.serialize_dag(dag)))
    (alert,) = data["deadline"]
    callback = alert["callback"]["__data__"]
    assert alert["interval"]["__data__"] == 20 * 3600
    return callback["path"], callback["kwargs"]


def run_callback_trigger(path: str, kwargs: dict) -> list[dict]:
    """Run the callback as the triggerer does: Airflow's CallbackTrigger, kwargs plus the context."""
    from airflow.triggers.callback import CallbackTrigger

    async def events():
        trigger = CallbackTrigger(
            callback_path=path, callback_kwargs={**kwargs, "context": missed_deadline_context()}
        )
        return [event.payload async for event in trigger.run()]

    return asyncio.run(events())


def test_the_deadline_alert_reaches_an_smtp_server_through_the_triggerers_callback(smtp, caplog):
    caplog.set_level(logging.ERROR, logger="claude_batch.alerts")
    dag = dag_with([email(["oncall@example.com", "data@example.com"]), log_only()])
    path, kwargs = serialized_deadline_callback(dag)
    assert path == "claude_batch.alerts.run_overdue"

    events = run_callback_trigger(path, kwargs)

    assert [e["state"] for e in events] == ["running", "success"], events
    assert events[-1]["body"] == []  # no notifier failed
    (mail,) = smtp.mailbox.wait_for(1)
    assert mail.recipients == ["oncall@example.com", "data@example.com"]
    assert mail.sender == "airflow@example.com"  # the connection's from_email
    assert mail.subject == f"claude-batch: cb_alerts run overdue ({RUN_ID})"
    assert RUN_ID in mail.body and "2026-11-10T20:00:05+00:00" in mail.body and "tiny_triage" in mail.body
    # The log notifier said it too, in the triggerer's log.
    assert any(
        "claude-batch ALERT: claude-batch: cb_alerts run overdue" in r.getMessage() for r in caplog.records
    )


def test_the_default_notifier_emails_when_recipients_are_configured_and_always_logs(
    smtp, monkeypatch, caplog
):
    caplog.set_level(logging.WARNING, logger="claude_batch.alerts")
    path, kwargs = serialized_deadline_callback(dag_with(None))  # the default
    assert [n["path"] for n in kwargs["notifiers"]] == ["claude_batch.alerts.DefaultNotifier"]

    run_callback_trigger(path, kwargs)  # no CLAUDE_BATCH_ALERT_EMAIL: the log only
    assert smtp.mailbox.mails == []
    assert any("run overdue" in r.getMessage() for r in caplog.records)

    monkeypatch.setenv("CLAUDE_BATCH_ALERT_EMAIL", "oncall@example.com, lead@example.com")
    run_callback_trigger(path, kwargs)
    (mail,) = smtp.mailbox.wait_for(1)
    assert mail.recipients == ["oncall@example.com", "lead@example.com"] and "run overdue" in mail.subject

    monkeypatch.setenv("CLAUDE_BATCH_ALERT_SMTP_CONN_ID", "no_such_smtp")
    caplog.clear()
    run_callback_trigger(path, kwargs)
    assert len(smtp.mailbox.mails) == 1  # nothing more sent, and the log says why
    assert any("there is no 'no_such_smtp' connection" in r.getMessage() for r in caplog.records)


def test_a_run_failure_reaches_the_smtp_server_through_the_dags_failure_callback(smtp):
    dag = dag_with([email("oncall@example.com")], deadline_hours=0)
    (callback,) = dag.on_failure_callback
    assert isinstance(callback, RunFailedNotifier) and dag.deadline is None

    class FailedTI:  # what the DAG processor puts in the context: the task instance that failed
        task_id, map_index, try_number = "gate", -1, 1
        log_url = "http://airflow.example.com/dags/cb_alerts/runs/r/tasks/gate?try_number=1"

    callback(
        {"dag": dag, "run_id": RUN_ID, "reason": "task_failure", "ti": FailedTI()}
    )  # as Airflow calls it

    (mail,) = smtp.mailbox.wait_for(1)
    assert mail.subject == f"claude-batch: cb_alerts run failed ({RUN_ID})"
    assert "Failed task: gate (try 1)" in mail.body and FailedTI.log_url in mail.body


def test_a_notifier_that_cannot_send_does_not_stop_the_others(smtp, caplog):
    caplog.set_level(logging.ERROR, logger="claude_batch.alerts")
    broken = email("oncall@example.com", smtp_conn_id="missing_smtp")
    working = email("lead@example.com")
    failed = asyncio.run(
        run_overdue("tiny_triage", [broken.to_dict(), working.to_dict()], missed_deadline_context())
    )
    assert failed == [broken.path]
    (mail,) = smtp.mailbox.wait_for(1)
    assert mail.recipients == ["lead@example.com"]
    assert any("could not send" in r.getMessage() for r in caplog.records)


def test_an_alert_text_with_jinja_braces_is_sent_as_written(smtp):
    # A failure message may hold "{{": the notifier renders templates, the alert must not be one.
    from claude_batch.alerts import Alert

    spec = email("oncall@example.com")
    spec.build(Alert("failed", "run {{ failed }}", ("budget {{ 1 + 1 }} over",)))({})
    (mail,) = smtp.mailbox.wait_for(1)
    assert mail.subject == "run {{ failed }}" and "budget {{ 1 + 1 }} over" in mail.body


def test_notifier_specs_are_plain_json_and_know_the_usual_message_fields():
    from claude_batch.alerts import LogNotifier

    spec = email("a@example.com", from_email="b@example.com")
    assert NotifierSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert (spec.subject_field, spec.body_field, spec.html) == ("subject", "html_content", True)
    assert notifier(LogNotifier).body_field == "text"
    with pytest.raises(TypeError, match="plain JSON"):
        notifier(LogNotifier, something=object())
    with pytest.raises(TypeError, match="not an Airflow notifier"):
        notifier(dict)  # type: ignore[arg-type]
    # No notifiers: no deadline alert and no failure callback.
    silent = dag_with([])
    assert silent.deadline is None and not silent.on_failure_callback
