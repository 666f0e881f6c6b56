"""Queue-aware submission against the emulator over HTTP.

Defer on a full queue, never sleep, never pay twice.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta

import anthropic
import httpx
import pytest
from airflow.sdk.exceptions import AirflowFailException, TaskDeferred
from claude_batch.batch_queue import QueueRoomTrigger, QueueWait, queue_usage
from claude_batch.hooks import ClaudeBatchHook, ClaudeBatchQueueFullError, is_queue_full, queue_full_error
from claude_batch.operators import ClaudeBatchOperator
from claude_batch.storage import ObjectStore
from claude_batch.submission import BatchBody, InlineRequests, scan_requests

from tests.batchcore.conftest import make_requests

STATE = "dag/manual__q/state/submit.part-00000.json"


class _TaskInstance:
    dag_id = "dag"
    task_id = "submit"
    map_index = -1
    try_number = 1

    def __init__(self) -> None:
        self.xcom: dict[str, object] = {}

    def xcom_push(self, key: str, value: object) -> None:
        self.xcom[key] = value


def _context() -> dict:
    return {"ti": _TaskInstance(), "run_id": "manual__q"}


def _operator(tmp_path, count: int = 5, **kwargs) -> ClaudeBatchOperator:
    options = {"wait": "none", "queue_poll_interval": 0.1, "queue_recheck_interval": 5.0} | kwargs
    return ClaudeBatchOperator(
        task_id="submit", requests=make_requests(count, prefix="q"), storage_root=str(tmp_path), **options
    )


def _fill_queue(emulator, size: int = 8) -> str:
    """A batch of ``size`` requests that stays in processing until the test advances time."""
    return ClaudeBatchHook().conn.messages.batches.create(requests=make_requests(size, prefix="fill")).id


def _rebuilt(trigger: QueueRoomTrigger) -> QueueRoomTrigger:
    """The trigger as the triggerer rebuilds it from its serialised kwargs."""
    from airflow.sdk._shared.module_loading import import_string

    classpath, kwargs = trigger.serialize()
    assert classpath == "claude_batch.batch_queue.QueueRoomTrigger"
    return import_string(classpath)(**kwargs)


def _first_event(trigger: QueueRoomTrigger, timeout: float = 20.0) -> dict:
    async def first() -> dict:
        async for event in trigger.run():
            return event.payload
        raise AssertionError("the trigger ended without an event")

    return asyncio.run(asyncio.wait_for(first(), timeout))


def _rate_limit_error(message: str) -> anthropic.RateLimitError:
    request = httpx.Request("POST", "https://api.anthropic.com/v1/messages/batches")
    response = httpx.Response(429, request=request, headers={"retry-after": "60", "request-id": "req_1"})
    body = {"type": "error", "error": {"type": "rate_limit_error", "message": message}}
    return anthropic.RateLimitError(message, response=response, body=body)


def test_queue_full_429_is_told_apart_from_the_request_rate_429():
    queue_full = _rate_limit_error(
        "This batch would exceed the limit of 300000 requests waiting in the processing queue "
        "(290000 are waiting)."
    )
    rate = _rate_limit_error("Number of batch API requests has exceeded the rate limit of 4000 per minute.")
    assert is_queue_full(queue_full) and not is_queue_full(rate)
    error = queue_full_error(queue_full, "anthropic_default", 100_000)
    assert (error.queue_limit, error.queued, error.retry_after) == (300_000, 290_000, 60.0)
    assert "Nothing was created" in str(error)


def test_hook_raises_queue_full_at_once_instead_of_sleeping(anthropic_conn):
    anthropic_conn.configure(max_queued_requests=10, processing_seconds=3600.0)
    _fill_queue(anthropic_conn)
    source = InlineRequests(make_requests(5))
    scan = scan_requests(source)
    started = time.monotonic()
    with pytest.raises(ClaudeBatchQueueFullError) as info:
        ClaudeBatchHook().create_batch_from_body(BatchBody(source), scan.body_bytes, 5, recover=lambda: None)
    assert time.monotonic() - started < 5  # the emulator says retry-after 60: not slept through
    assert (info.value.queue_limit, info.value.queued, info.value.retry_after) == (10, 8, 60.0)
    stats = anthropic_conn.stats()
    assert stats["http_requests"]["create"] == 2 and stats["batches_created"] == 1  # one send, not eight


def test_queue_usage_sums_processing_of_batches_not_ended(anthropic_conn):
    anthropic_conn.configure(processing_seconds=3600.0)
    client = ClaudeBatchHook().conn
    client.messages.batches.create(requests=make_requests(3, prefix="a"))
    anthropic_conn.advance(4000)  # the first ends
    client.messages.batches.create(requests=make_requests(4, prefix="b"))
    client.messages.batches.create(requests=make_requests(6, prefix="c"))
    usage = queue_usage(ClaudeBatchHook())
    assert (usage.processing, usage.batches, usage.pages, usage.complete) == (10, 2, 1, True)
    assert usage.processing == anthropic_conn.stats()["requests_processing"]


def test_refused_submit_defers_and_the_resume_creates_exactly_one_batch(anthropic_conn, tmp_path):
    anthropic_conn.configure(max_queued_requests=10, processing_seconds=3600.0)
    _fill_queue(anthropic_conn)
    with pytest.raises(TaskDeferred) as info:
        _operator(tmp_path).execute(_context())
    deferred = info.value
    assert deferred.method_name == "execute_after_queue_wait"
    trigger = deferred.trigger
    assert isinstance(trigger, QueueRoomTrigger)
    assert (trigger.needed, trigger.limit, trigger.conn_id) == (
        5,
        10,
        "anthropic_default",
    )  # the API's stated limit
    assert deferred.timeout is not None
    wait = QueueWait.from_dict(trigger.queue_wait)
    assert wait.deferrals == 1 and wait.api_limit == 10 and wait.processing == 8 and wait.deadline
    stats = anthropic_conn.stats()
    assert stats["batches_created"] == 1 and stats["faults_injected"]["queue_full"] == 1
    store = ObjectStore(str(tmp_path))
    state = store.read_json(STATE)
    assert state["phase"] == "refused" and state["batch_id"] is None  # the resume must not hunt for a batch

    # still full: the trigger only fires at its re-check time, without a create
    still_full = _rebuilt(trigger)
    still_full.wake_at = (datetime.now(UTC) + timedelta(seconds=0.5)).isoformat()
    assert _first_event(still_full)["status"] == "recheck"

    anthropic_conn.advance(4000)  # the queue drains
    event = _first_event(_rebuilt(trigger))
    assert event["status"] == "room" and event["processing"] == 0
    context = _context()
    batch_id = _operator(tmp_path).execute_after_queue_wait(context, event=event)
    assert context["ti"].xcom["batch_id"] == batch_id
    stats = anthropic_conn.stats()
    assert stats["batches_created"] == 2 and stats["http_requests"]["create"] == 3  # fill, refused, created
    assert store.read_json(STATE)["phase"] == "submitted" and store.read_json(STATE)["batch_id"] == batch_id
    # a retry or a cleared task re-attaches
    assert _operator(tmp_path).execute(_context()) == batch_id
    assert anthropic_conn.stats()["batches_created"] == 2


def test_budget_defers_before_sending_and_resumes_when_it_fits(anthropic_conn, tmp_path):
    anthropic_conn.configure(processing_seconds=3600.0)  # the API's queue has no limit here
    _fill_queue(anthropic_conn)
    with pytest.raises(TaskDeferred) as info:
        _operator(tmp_path, queue_budget=10).execute(_context())
    trigger = info.value.trigger
    assert isinstance(trigger, QueueRoomTrigger) and (trigger.needed, trigger.limit) == (5, 10)
    assert QueueWait.from_dict(trigger.queue_wait).reason == "budget"
    stats = anthropic_conn.stats()
    assert stats["http_requests"]["create"] == 1 and stats["batches_created"] == 1  # nothing was sent
    assert ObjectStore(str(tmp_path)).read_json(STATE)["refused_by"] == "budget"

    # resumed while the budget is still exceeded: defers again without scanning or sending
    with pytest.raises(TaskDeferred) as again:
        _operator(tmp_path, queue_budget=10).execute_after_queue_wait(
            _context(), event={"status": "recheck", "queue_wait": trigger.queue_wait}
        )
    assert QueueWait.from_dict(again.value.trigger.queue_wait).deferrals == 2
    assert anthropic_conn.stats()["http_requests"]["create"] == 1

    anthropic_conn.advance(4000)
    event = _first_event(_rebuilt(again.value.trigger))
    assert event["status"] == "room"
    batch_id = _operator(tmp_path, queue_budget=10).execute_after_queue_wait(_context(), event=event)
    assert ClaudeBatchHook().retrieve_batch(batch_id).request_counts.processing == 5
    assert anthropic_conn.stats()["batches_created"] == 2


def test_budget_with_room_submits_at_once(anthropic_conn, tmp_path):
    anthropic_conn.configure(processing_seconds=3600.0)
    _fill_queue(anthropic_conn)
    assert _operator(tmp_path, queue_budget=13).execute(_context())
    assert anthropic_conn.stats()["batches_created"] == 2


def test_shard_bigger_than_the_budget_fails_at_once(anthropic_conn, tmp_path):
    with pytest.raises(AirflowFailException, match="5 requests can never fit.*queue_budget is 4"):
        _operator(tmp_path, queue_budget=4).execute(_context())
    assert anthropic_conn.stats()["http_requests"]["create"] == 0
    assert ObjectStore(str(tmp_path)).read_json(STATE)["phase"] == "refused"  # a retry sends afresh


def test_an_ambiguous_send_before_the_refusal_keeps_the_intent_for_recovery(anthropic_conn, tmp_path):
    anthropic_conn.configure(max_queued_requests=10, processing_seconds=3600.0)
    _fill_queue(anthropic_conn)
    anthropic_conn.configure(faults={"http": [{"endpoint": "create", "status": 500, "times": 1}]})
    with pytest.raises(TaskDeferred) as info:
        _operator(tmp_path).execute(_context())
    # the 500 may have created the batch, so the resume must ask the API before sending
    assert ObjectStore(str(tmp_path)).read_json(STATE)["phase"] == "intent"
    assert anthropic_conn.stats()["http_requests"]["list"] >= 1
    anthropic_conn.advance(4000)
    event = _first_event(_rebuilt(info.value.trigger))
    batch_id = _operator(tmp_path).execute_after_queue_wait(_context(), event=event)
    assert ObjectStore(str(tmp_path)).read_json(STATE)["batch_id"] == batch_id
    assert anthropic_conn.stats()["batches_created"] == 2


def test_wait_past_the_deadline_fails_naming_the_queue(anthropic_conn, tmp_path):
    anthropic_conn.configure(max_queued_requests=10, processing_seconds=86_000.0)
    _fill_queue(anthropic_conn)
    with pytest.raises(TaskDeferred) as info:
        _operator(tmp_path, queue_wait_timeout=7200).execute(_context())
    # two hours later the trigger fires at the deadline, and the queue is still full
    wait = QueueWait.from_dict(info.value.trigger.queue_wait)
    wait.started_at = (datetime.now(UTC) - timedelta(hours=2, minutes=1)).isoformat()
    wait.deadline = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    with pytest.raises(AirflowFailException) as failed:
        _operator(tmp_path, queue_wait_timeout=7200).execute_after_queue_wait(
            _context(), event={"status": "recheck", "processing": 8, "queue_wait": wait.to_dict()}
        )
    message = str(failed.value)
    assert "processing queue holds 8 requests in processing" in message
    assert "5 more would exceed the API's limit of 10" in message
    assert (
        "after waiting 2h01m" in message
        and "1 deferral(s)" in message
        and "queue_wait_timeout=7,200 s" in message
    )
    assert anthropic_conn.stats()["batches_created"] == 1


def test_an_absolute_deadline_in_the_past_fails_on_the_first_refusal(anthropic_conn, tmp_path):
    anthropic_conn.configure(max_queued_requests=10, processing_seconds=3600.0)
    _fill_queue(anthropic_conn)
    with pytest.raises(
        AirflowFailException, match="Gave up waiting for room in the Claude API's processing queue"
    ):
        _operator(tmp_path, queue_deadline="2020-01-01T00:00:00").execute(_context())


@pytest.mark.airflow
def test_three_mapped_submits_on_a_small_queue_all_succeed_by_deferring(
    airflow_db, anthropic_conn, tmp_path, monkeypatch
):
    monkeypatch.setenv("CLAUDE_BATCH_STORAGE_ROOT", str(tmp_path))
    from airflow.dag_processing.dagbag import DagBag

    from tests.conftest import REPO

    bag = DagBag(dag_folder=str(REPO / "tests" / "dags" / "batchcore_queue_dags.py"))
    assert not bag.import_errors, bag.import_errors
    # Each batch of 8 takes about 6 s of wall time on a queue of 10: one at a time. (At 2 s, a
    # busy machine sometimes started the next submit after the batch had ended: no refusal.)
    anthropic_conn.configure(max_queued_requests=10, processing_seconds=360.0)
    run = bag.dags["cb_queue_submit"].test()
    assert run.state == "success", run.state
    stats = anthropic_conn.stats()
    assert stats["batches_created"] == 3 and stats["requests_received"] == 24
    assert stats["faults_injected"].get("queue_full", 0) >= 2  # the later two were refused, then waited
