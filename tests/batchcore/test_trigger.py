"""The trigger and shared poller against the emulator, on real event loops."""

from __future__ import annotations

import asyncio
import json

import pytest
from airflow.sdk.exceptions import AirflowSkipException
from airflow.sdk.module_loading import import_string
from claude_batch.hooks import ClaudeBatchHook
from claude_batch.poller import BatchSnapshot
from claude_batch.sensors import ClaudeBatchFailed, handle_trigger_event
from claude_batch.triggers import ClaudeBatchTrigger

from tests.batchcore.conftest import RecordingLog, make_requests

HOUR = 3600.0


def _create(count: int, n: int = 1) -> list[str]:
    client = ClaudeBatchHook().conn
    return [
        client.messages.batches.create(requests=make_requests(n, prefix=f"b{i}_")).id for i in range(count)
    ]


async def _first_event(trigger: ClaudeBatchTrigger, timeout: float = 30):
    return await asyncio.wait_for(anext(trigger.run()), timeout)


def test_trigger_serialises_to_primitives_and_resumes_in_a_new_process_loop(anthropic_conn):
    anthropic_conn.configure(processing_seconds=2 * HOUR)
    ids = _create(3, n=4)
    trigger = ClaudeBatchTrigger(batch_ids=ids, min_poll_interval=0.1, max_poll_interval=0.3)
    classpath, kwargs = trigger.serialize()
    assert json.loads(json.dumps(kwargs)) == kwargs
    assert kwargs["on_timeout"] == "fail" and kwargs["timeout"] is None

    async def first_triggerer():
        task = asyncio.create_task(_first_event(trigger))
        await asyncio.sleep(0.5)  # a few rounds while the batches are in progress
        task.cancel()  # the triggerer goes away
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(first_triggerer())
    anthropic_conn.advance(4 * HOUR)
    resumed = import_string(classpath)(**kwargs)
    event = asyncio.run(_first_event(resumed))
    assert event.payload["status"] == "success"
    snapshots = [BatchSnapshot.from_dict(item) for item in event.payload["batches"]]
    assert [s.id for s in snapshots] == ids
    assert all(s.outcome == "succeeded" and s.succeeded == 4 for s in snapshots)
    summary = handle_trigger_event(event.payload, fail_on_partial=False, log=RecordingLog())
    assert summary["request_counts"]["succeeded"] == 12


def test_many_triggers_share_one_list_call_per_round(anthropic_conn):
    anthropic_conn.configure(processing_seconds=HOUR)
    ids = _create(60)
    before = anthropic_conn.stats()["http_requests"]

    async def main():
        triggers = [
            ClaudeBatchTrigger(batch_ids=[i], min_poll_interval=0.2, max_poll_interval=0.2) for i in ids
        ]
        tasks = [asyncio.create_task(_first_event(t)) for t in triggers]
        # at least two rounds while nothing has ended (waiting on the count, not the clock:
        # a loaded machine may take a second to start 60 triggers)
        for _ in range(300):
            if anthropic_conn.stats()["http_requests"].get("list", 0) - before.get("list", 0) >= 2:
                break
            await asyncio.sleep(0.05)
        anthropic_conn.advance(3 * HOUR)
        return await asyncio.gather(*tasks)

    events = asyncio.run(main())
    assert all(e.payload["status"] == "success" for e in events)
    after = anthropic_conn.stats()["http_requests"]
    lists = after.get("list", 0) - before.get("list", 0)
    retrieves = after.get("retrieve", 0) - before.get("retrieve", 0)
    assert retrieves == 0
    assert 2 <= lists <= 12, lists  # one call per round for all 60, not 60 per round


def test_expired_batch_is_reported_as_expired_not_success(anthropic_conn):
    anthropic_conn.configure(processing_seconds=10_000 * HOUR)  # far beyond the 24 h expiry
    (batch_id,) = _create(1, n=5)
    anthropic_conn.advance(24 * HOUR + 60)
    event = asyncio.run(_first_event(ClaudeBatchTrigger(batch_ids=[batch_id], min_poll_interval=0.1)))
    (snap,) = [BatchSnapshot.from_dict(item) for item in event.payload["batches"]]
    assert snap.outcome == "expired" and snap.expired == 5 and snap.ended_at is not None
    with pytest.raises(ClaudeBatchFailed, match="expired=5"):
        handle_trigger_event(event.payload, fail_on_partial=True, log=RecordingLog())
    log = RecordingLog()
    handle_trigger_event(event.payload, fail_on_partial=False, log=log)
    assert "did not succeed" in log.lines[0] and "expired" in log.lines[0]


def test_cancelled_batch_skips(anthropic_conn):
    anthropic_conn.configure(processing_seconds=HOUR)
    (batch_id,) = _create(1, n=3)
    ClaudeBatchHook().cancel_batch(batch_id)
    anthropic_conn.advance(3 * HOUR)
    event = asyncio.run(_first_event(ClaudeBatchTrigger(batch_ids=[batch_id], min_poll_interval=0.1)))
    assert event.payload["batches"][0]["canceled"] == 3
    with pytest.raises(AirflowSkipException, match="canceled"):
        handle_trigger_event(event.payload, fail_on_partial=False, log=RecordingLog())


def test_missing_batch_is_an_error_event(anthropic_conn):
    event = asyncio.run(
        _first_event(ClaudeBatchTrigger(batch_ids=["msgbatch_doesnotexist"], min_poll_interval=0.1))
    )
    assert event.payload["status"] == "error" and "not found" in event.payload["message"]


def test_timeout_from_submission_cancels(monkeypatch):
    # emulated time at wall-clock speed, so the batch's created_at matches our clock
    from claude_batch.emulator import EmulatorServer

    from tests.conftest import EMULATOR_API_KEY

    with EmulatorServer(
        api_key=EMULATOR_API_KEY, time_scale=1.0, processing_seconds=HOUR, cancel_seconds=0.3
    ) as emu:
        monkeypatch.setenv(
            "AIRFLOW_CONN_ANTHROPIC_DEFAULT",
            json.dumps({"conn_type": "anthropic", "host": emu.base_url, "password": EMULATOR_API_KEY}),
        )
        (batch_id,) = _create(1, n=2)
        trigger = ClaudeBatchTrigger(
            batch_ids=[batch_id], timeout=1.0, min_poll_interval=0.3, max_poll_interval=0.3
        )
        event = asyncio.run(_first_event(trigger))
        # "fail" (the default) still fails, but only once the canceled batch has ended
        assert event.payload["status"] == "timeout" and batch_id in event.payload["message"]
        assert [item["id"] for item in event.payload["timed_out"]] == [batch_id]
        assert event.payload["batches"][0]["processing_status"] == "ended"
        assert ClaudeBatchHook().retrieve_batch(batch_id).cancel_initiated_at is not None
        with pytest.raises(ClaudeBatchFailed, match="did not end within"):
            handle_trigger_event(event.payload, fail_on_partial=False, log=RecordingLog())


@pytest.mark.parametrize("status", [429, 500, 529])
def test_a_timeout_cancel_survives_transient_errors_and_says_when_it_could_not_cancel(monkeypatch, status):
    from claude_batch.emulator import EmulatorServer

    from tests.conftest import EMULATOR_API_KEY

    cancel_fault = {"endpoint": "cancel", "status": status, "rate": 1.0, "times": 2, "retry_after": 0}
    with EmulatorServer(
        api_key=EMULATOR_API_KEY, time_scale=1.0, processing_seconds=HOUR, cancel_seconds=0.3
    ) as emu:
        monkeypatch.setenv(
            "AIRFLOW_CONN_ANTHROPIC_DEFAULT",
            json.dumps({"conn_type": "anthropic", "host": emu.base_url, "password": EMULATOR_API_KEY}),
        )
        first, second = _create(2, n=1)
        # Two transient errors: the SDK's retries get the cancel through.
        emu.configure(faults={"http": [cancel_fault]})
        event = asyncio.run(_first_event(_timeout_trigger(first)))
        assert (
            event.payload["status"] == "timeout" and "cancellation was requested" in event.payload["message"]
        )
        assert event.payload["cancel_failed"] == []
        assert ClaudeBatchHook().retrieve_batch(first).cancel_initiated_at is not None
        # Refused every time: the batch runs on, the trigger waits for it to end (here: it expires),
        # and the event says so by id.
        emu.configure(faults={"http": [{**cancel_fault, "times": None}]})

        async def refused_until_expiry():
            cancels = emu.stats()["http_requests"]["cancel"]
            task = asyncio.create_task(_first_event(_timeout_trigger(second)))
            while emu.stats()["http_requests"]["cancel"] == cancels:  # wait for a cancel attempt
                await asyncio.sleep(0.1)
            emu.advance(25 * HOUR)
            return await task

        event = asyncio.run(refused_until_expiry())
        assert event.payload["status"] == "timeout" and event.payload["cancel_failed"] == [second]
        assert f"cancelling ['{second}'] failed" in event.payload["message"]
        assert event.payload["timed_out"] == []
        assert event.payload["batches"][0]["processing_status"] == "ended"  # it ran on until it ended
        assert ClaudeBatchHook().retrieve_batch(second).cancel_initiated_at is None
        with pytest.raises(ClaudeBatchFailed, match="ran on"):
            handle_trigger_event(event.payload, fail_on_partial=False, log=RecordingLog())


def test_a_cancel_refused_because_the_batch_just_ended_is_not_reported_as_running_on(monkeypatch):
    from claude_batch.emulator import EmulatorServer

    from tests.conftest import EMULATOR_API_KEY

    with EmulatorServer(api_key=EMULATOR_API_KEY, processing_seconds=HOUR) as emu:
        monkeypatch.setenv(
            "AIRFLOW_CONN_ANTHROPIC_DEFAULT",
            json.dumps({"conn_type": "anthropic", "host": emu.base_url, "password": EMULATOR_API_KEY}),
        )
        (finished,) = _create(1, n=1)
        emu.advance(2 * HOUR)
        assert ClaudeBatchHook().retrieve_batch(finished).processing_status == "ended"
        emu.configure(faults={"http": [{"endpoint": "cancel", "status": 409, "rate": 1.0}]})
        refused = asyncio.run(_timeout_trigger(finished)._cancel([finished]))
        assert refused == []
        # The same refusal for a batch still running is reported by id.
        emu.configure(processing_seconds=100 * HOUR)
        (still_running,) = _create(1, n=1)
        assert asyncio.run(_timeout_trigger(still_running)._cancel([still_running])) == [still_running]


def _timeout_trigger(batch_id: str) -> ClaudeBatchTrigger:
    return ClaudeBatchTrigger(batch_ids=[batch_id], timeout=1.0, min_poll_interval=0.3, max_poll_interval=0.3)


def test_the_shared_poller_runs_in_no_triggers_log_context():
    """The poller task serves every trigger: it must not carry the context of the one that started it."""
    import contextvars

    from claude_batch.poller import BatchPoller

    trigger_log = contextvars.ContextVar("trigger_log", default=None)
    seen = []

    async def get_client():
        seen.append(trigger_log.get())  # runs inside the poller's task
        raise RuntimeError("no client needed")

    async def first_trigger():
        trigger_log.set("trigger 1's log")
        poller = BatchPoller(get_client, jitter=0.0)
        with poller.subscribe(["msgbatch_1"], 0.01, 0.01):
            await asyncio.sleep(0.1)

    asyncio.run(first_trigger())
    assert seen and set(seen) == {None}
