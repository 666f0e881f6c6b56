"""Per-batch timeouts: each batch canceled at its own deadline, the wait held until all have ended.

Against an emulator whose time runs at wall-clock speed (time_scale 1), so that a batch's
``created_at`` and the trigger's clock agree and a timeout of a couple of seconds is real.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from datetime import datetime

import pytest
from airflow.sdk.module_loading import import_string
from claude_batch.emulator import EmulatorServer
from claude_batch.hooks import ClaudeBatchHook
from claude_batch.poller import BatchSnapshot
from claude_batch.sensors import ClaudeBatchFailed, handle_trigger_event
from claude_batch.triggers import DEFAULT_BATCH_TIMEOUT, ClaudeBatchTrigger

from tests.batchcore.conftest import RecordingLog, make_requests
from tests.conftest import EMULATOR_API_KEY

HOUR = 3600.0


@pytest.fixture
def wall_clock_emulator(monkeypatch):
    """An emulator at wall-clock speed; batches take an hour unless a test says otherwise."""
    with EmulatorServer(
        api_key=EMULATOR_API_KEY, time_scale=1.0, processing_seconds=HOUR, cancel_seconds=0.3
    ) as emu:
        monkeypatch.setenv(
            "AIRFLOW_CONN_ANTHROPIC_DEFAULT",
            json.dumps({"conn_type": "anthropic", "host": emu.base_url, "password": EMULATOR_API_KEY}),
        )
        yield emu


def _create(n: int, prefix: str) -> str:
    return ClaudeBatchHook().conn.messages.batches.create(requests=make_requests(n, prefix=prefix)).id


def _at(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _trigger(ids: list[str], timeout: float, on_timeout: str = "cancel_and_collect") -> ClaudeBatchTrigger:
    return ClaudeBatchTrigger(
        batch_ids=ids, timeout=timeout, on_timeout=on_timeout, min_poll_interval=0.2, max_poll_interval=0.3
    )


async def _event(trigger: ClaudeBatchTrigger, within: float = 30.0):
    return await asyncio.wait_for(anext(trigger.run()), within)


def test_default_timeout_is_23_hours_and_the_option_round_trips():
    assert DEFAULT_BATCH_TIMEOUT == 23 * 3600
    trigger = _trigger(["msgbatch_a", "msgbatch_b"], DEFAULT_BATCH_TIMEOUT)
    classpath, kwargs = trigger.serialize()
    assert json.loads(json.dumps(kwargs)) == kwargs
    assert kwargs["on_timeout"] == "cancel_and_collect" and kwargs["timeout"] == DEFAULT_BATCH_TIMEOUT
    assert import_string(classpath)(**kwargs).serialize() == (classpath, kwargs)
    with pytest.raises(ValueError, match="on_timeout"):
        ClaudeBatchTrigger(batch_ids=["msgbatch_a"], on_timeout="ignore")


def test_each_batch_is_canceled_at_its_own_deadline_and_the_wait_collects_all(wall_clock_emulator):
    emu, timeout = wall_clock_emulator, 3.5  # the first deadline falls after the last submission
    ids = []
    for i in range(3):  # three batches submitted about 1.5 s apart
        if i:
            time.sleep(1.5)
        ids.append(_create(3, prefix=f"t{i}_"))
    trigger = _trigger(ids, timeout)
    trigger._log = log = RecordingLog()  # the trigger's logger, read back below
    event = asyncio.run(_event(trigger))
    payload = event.payload
    assert payload["status"] == "success" and payload["cancel_failed"] == []
    assert [item["id"] for item in payload["timed_out"]] == ids
    batches = [ClaudeBatchHook().retrieve_batch(batch_id) for batch_id in ids]
    cancels = [batch.cancel_initiated_at.timestamp() for batch in batches]
    for batch, canceled_at in zip(batches, cancels, strict=True):
        deadline = batch.created_at.timestamp() + timeout
        assert deadline <= canceled_at < deadline + 1.0, (batch.id, canceled_at - deadline)
    # canceled one by one, in the order of their deadlines: never all at the first one's
    assert cancels[0] + 1.0 < cancels[1] and cancels[1] + 1.0 < cancels[2]
    assert all(batch.processing_status == "ended" and batch.request_counts.canceled == 3 for batch in batches)
    assert emu.stats()["batches_by_status"] == {"in_progress": 0, "canceling": 0, "ended": 3}
    assert all(item["canceled"] == 3 and item["succeeded"] == 0 for item in payload["timed_out"])

    # the sensor succeeds (not skipped, although every request was canceled) so that collect runs
    summary = handle_trigger_event(payload, fail_on_partial=False, log=RecordingLog())
    assert sorted(summary["timed_out"]) == sorted(ids) and summary["request_counts"]["canceled"] == 9

    # one line per round for the whole wait, with the nearest deadline while one is ahead
    rounds = [line for line in log.lines if line.startswith("Poll round ") and ": 3 batches:" in line]
    assert len(rounds) >= 12
    assert any("next deadline in" in line and ids[0] in line for line in rounds)
    assert any("next deadline in" in line and ids[2] in line for line in rounds)
    assert "canceled for timeout: 3" in rounds[-1] and "3 ended" in rounds[-1]


def test_a_stalled_batch_is_canceled_and_keeps_its_partial_successes(wall_clock_emulator):
    # every batch stalls partway (seed 0: at 84 % of its 2 s window) and would run on to expiry
    emu = wall_clock_emulator
    emu.configure(processing_seconds=2.0, faults={"batch": {"stall_rate": 1.0}})
    batch_id = _create(20, prefix="s_")
    time.sleep(2.5)
    assert ClaudeBatchHook().retrieve_batch(batch_id).processing_status == "in_progress"
    event = asyncio.run(_event(_trigger([batch_id], timeout=3.0)))
    assert event.payload["status"] == "success"
    (snap,) = [BatchSnapshot.from_dict(item) for item in event.payload["batches"]]
    assert snap.outcome == "partial" and snap.succeeded > 0 and snap.canceled > 0
    assert snap.succeeded + snap.canceled == 20
    assert _at(snap.cancel_initiated_at) >= _at(snap.created_at) + 3.0
    types = Counter(line.result.type for line in ClaudeBatchHook().conn.messages.batches.results(batch_id))
    assert types == {"succeeded": snap.succeeded, "canceled": snap.canceled}
    summary = handle_trigger_event(event.payload, fail_on_partial=False, log=RecordingLog())
    assert summary["timed_out"][batch_id]["succeeded"] == snap.succeeded
    assert summary["timed_out"][batch_id]["canceled"] == snap.canceled
    with pytest.raises(ClaudeBatchFailed, match="canceled="):  # fail_on_partial still applies
        handle_trigger_event(event.payload, fail_on_partial=True, log=RecordingLog())


def test_fail_mode_waits_for_every_batch_then_fails(wall_clock_emulator):
    emu = wall_clock_emulator
    slow = _create(2, prefix="slow_")
    emu.configure(processing_seconds=0.5)
    quick = _create(2, prefix="quick_")
    event = asyncio.run(_event(_trigger([slow, quick], timeout=1.5, on_timeout="fail")))
    payload = event.payload
    assert payload["status"] == "timeout" and slow in payload["message"] and quick not in payload["message"]
    assert [item["id"] for item in payload["timed_out"]] == [slow]
    outcomes = {item["id"]: BatchSnapshot.from_dict(item).outcome for item in payload["batches"]}
    assert outcomes == {slow: "canceled", quick: "succeeded"}
    assert emu.stats()["batches_by_status"] == {"in_progress": 0, "canceling": 0, "ended": 2}
    with pytest.raises(ClaudeBatchFailed, match="did not end within"):
        handle_trigger_event(payload, fail_on_partial=False, log=RecordingLog())


def test_a_refused_cancel_is_retried_at_the_next_round(wall_clock_emulator):
    emu = wall_clock_emulator
    batch_id = _create(2, prefix="r_")
    # 5 refusals: one cancel call with its SDK retries fails; the next round's call gets through
    emu.configure(faults={"http": [{"endpoint": "cancel", "status": 429, "times": 5, "retry_after": 0.05}]})
    event = asyncio.run(_event(_trigger([batch_id], timeout=0.5)))
    assert event.payload["status"] == "success" and event.payload["cancel_failed"] == []
    assert [item["id"] for item in event.payload["timed_out"]] == [batch_id]
    assert emu.stats()["http_requests"]["cancel"] == 6


def test_a_resumed_trigger_knows_what_the_timeout_canceled(wall_clock_emulator):
    emu = wall_clock_emulator
    emu.configure(cancel_seconds=2.0)
    batch_id = _create(2, prefix="x_")
    classpath, kwargs = _trigger([batch_id], timeout=0.5).serialize()

    async def first_triggerer():
        task = asyncio.create_task(_event(import_string(classpath)(**kwargs)))
        while ClaudeBatchHook().retrieve_batch(batch_id).processing_status != "canceling":
            await asyncio.sleep(0.1)
        task.cancel()  # the triggerer goes away while the batch is canceling
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(first_triggerer())
    event = asyncio.run(_event(import_string(classpath)(**kwargs)))
    assert event.payload["status"] == "success"
    assert [item["id"] for item in event.payload["timed_out"]] == [batch_id]
    assert emu.stats()["http_requests"]["cancel"] == 1  # canceled once, not again after the restart
