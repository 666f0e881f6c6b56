"""Poke mode, waiting in place, and the Claude Console link, against the emulator."""

from __future__ import annotations

import json
import time

import pytest
from airflow.sdk.exceptions import TaskDeferred
from claude_batch.emulator import EmulatorServer
from claude_batch.hooks import ClaudeBatchHook
from claude_batch.operators import ClaudeBatchOperator, ClaudeConsoleBatchLink
from claude_batch.sensors import DEFAULT_BATCH_TIMEOUT, ClaudeBatchFailed, ClaudeBatchSensor

from tests.batchcore.conftest import make_requests
from tests.conftest import EMULATOR_API_KEY

HOUR = 3600.0


def test_poke_mode_learns_many_batches_from_one_list_call(anthropic_conn):
    anthropic_conn.configure(processing_seconds=HOUR)
    client = ClaudeBatchHook().conn
    ids = [client.messages.batches.create(requests=make_requests(2, prefix=f"k{i}_")).id for i in range(4)]
    sensor = ClaudeBatchSensor(task_id="wait", batch_ids=ids, deferrable=False)
    before = anthropic_conn.stats()["http_requests"]
    assert sensor.poke({}) is False
    after = anthropic_conn.stats()["http_requests"]
    assert after["list"] - before["list"] == 1 and after["retrieve"] == before["retrieve"]
    anthropic_conn.advance(3 * HOUR)
    done = sensor.poke({})
    assert done.is_done and done.xcom_value["request_counts"]["succeeded"] == 8


def test_operator_waits_in_place_and_stores_the_console_link(anthropic_conn, tmp_path):
    anthropic_conn.configure(processing_seconds=30.0)  # half a wall second at time scale 60

    class _TaskInstance:
        dag_id, task_id, map_index = "dag", "submit", -1

        def __init__(self):
            self.pushed = {}

        def xcom_push(self, key, value):
            self.pushed[key] = value

    ti = _TaskInstance()
    operator = ClaudeBatchOperator(
        task_id="submit",
        requests=make_requests(3),
        storage_root=str(tmp_path),
        wait="poll",
        min_poll_interval=0.2,
    )
    summary = operator.execute({"ti": ti, "run_id": "manual__1"})
    assert summary["request_counts"]["succeeded"] == 3
    assert ti.pushed["batch_id"].startswith("msgbatch_")
    # The connection points at the emulator, which has no Claude Console: no link (the UI shows no button).
    assert ClaudeConsoleBatchLink().xcom_key not in ti.pushed
    assert anthropic_conn.stats()["batches_created"] == 1


@pytest.fixture
def wall_clock_conn(monkeypatch):
    """An emulator at wall-clock speed (batch ages are real seconds); batches take an hour."""
    with EmulatorServer(
        api_key=EMULATOR_API_KEY, time_scale=1.0, processing_seconds=HOUR, cancel_seconds=0.3
    ) as emu:
        monkeypatch.setenv(
            "AIRFLOW_CONN_ANTHROPIC_DEFAULT",
            json.dumps({"conn_type": "anthropic", "host": emu.base_url, "password": EMULATOR_API_KEY}),
        )
        yield emu


def _poke_until_done(sensor: ClaudeBatchSensor, within: float = 15.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        done = sensor.poke({})
        if done:
            return done
        time.sleep(0.2)
    raise AssertionError("the sensor did not finish")


def test_poke_mode_cancels_each_batch_at_its_own_deadline_and_collects(wall_clock_conn):
    client = ClaudeBatchHook().conn
    first = client.messages.batches.create(requests=make_requests(2, prefix="p0_")).id
    time.sleep(1.0)
    second = client.messages.batches.create(requests=make_requests(2, prefix="p1_")).id
    sensor = ClaudeBatchSensor(
        task_id="wait",
        batch_ids=[first, second],
        deferrable=False,
        batch_timeout=1.5,
        on_timeout="cancel_and_collect",
        skip_if_all_canceled=True,  # a timeout's cancel is collected all the same, never skipped
    )
    done = _poke_until_done(sensor)
    summary = done.xcom_value
    assert sorted(summary["timed_out"]) == sorted([first, second])
    assert summary["request_counts"]["canceled"] == 4 and summary["cancel_failed"] == []
    for batch_id in (first, second):
        batch = ClaudeBatchHook().retrieve_batch(batch_id)
        lateness = (batch.cancel_initiated_at - batch.created_at).total_seconds() - 1.5
        assert batch.processing_status == "ended" and 0 <= lateness < 1.0, (batch_id, lateness)
    assert wall_clock_conn.stats()["http_requests"]["cancel"] == 2


def test_poke_mode_fail_waits_for_the_cancel_then_fails(wall_clock_conn):
    batch_id = ClaudeBatchHook().conn.messages.batches.create(requests=make_requests(2, prefix="f_")).id
    sensor = ClaudeBatchSensor(task_id="wait", batch_ids=batch_id, deferrable=False, batch_timeout=0.5)
    with pytest.raises(ClaudeBatchFailed, match="did not end within"):
        _poke_until_done(sensor)
    assert ClaudeBatchHook().retrieve_batch(batch_id).processing_status == "ended"


def test_deferred_sensor_hands_its_timeout_policy_to_the_trigger():
    sensor = ClaudeBatchSensor(
        task_id="wait",
        batch_ids=["msgbatch_a", "msgbatch_b"],
        batch_timeout=DEFAULT_BATCH_TIMEOUT,
        on_timeout="cancel_and_collect",
    )
    with pytest.raises(TaskDeferred) as info:
        sensor.execute({})
    trigger = info.value.trigger
    assert trigger.timeout == 23 * 3600 and trigger.on_timeout == "cancel_and_collect"
    assert ClaudeBatchSensor(task_id="w", batch_ids="msgbatch_a").on_timeout == "fail"
    with pytest.raises(ValueError, match="on_timeout"):
        ClaudeBatchSensor(task_id="w", batch_ids="msgbatch_a", on_timeout="collect")
