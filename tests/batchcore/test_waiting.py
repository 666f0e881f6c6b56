"""The waiting policy on its own: no API, no Airflow, except where the Airflow shell is the point."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from claude_batch.snapshots import BatchSnapshot
from claude_batch.waiting import (
    CANCEL_CLOCK_SLACK,
    DEFAULT_BATCH_TIMEOUT,
    DEFAULT_QUEUE_POLL_INTERVAL,
    EVENT_STATUSES,
    ON_TIMEOUT_CANCEL_AND_COLLECT,
    ON_TIMEOUT_FAIL,
    AllRequestsCanceled,
    BatchWaitFailed,
    canceled_for_timeout,
    check_on_timeout,
    completion_event,
    judge_completion,
    judge_trigger_event,
    next_poll_interval,
    overdue_batches,
    poll_until,
)

from tests.batchcore.conftest import RecordingLog

CREATED = datetime(2026, 1, 1, tzinfo=UTC)
TIMEOUT = 3600.0
DEADLINE = (CREATED + timedelta(seconds=TIMEOUT)).timestamp()


def snap(
    batch_id: str = "msgbatch_1",
    status: str = "in_progress",
    *,
    succeeded: int = 0,
    errored: int = 0,
    canceled: int = 0,
    expired: int = 0,
    processing: int = 0,
    cancel_after: float | None = None,
) -> BatchSnapshot:
    """A snapshot created at CREATED; ``cancel_after``: seconds after creation the cancel is dated."""
    cancel = None if cancel_after is None else (CREATED + timedelta(seconds=cancel_after)).isoformat()
    return BatchSnapshot(
        id=batch_id,
        processing_status=status,
        processing=processing,
        succeeded=succeeded,
        errored=errored,
        canceled=canceled,
        expired=expired,
        created_at=CREATED.isoformat(),
        expires_at=(CREATED + timedelta(hours=24)).isoformat(),
        ended_at=None if status != "ended" else (CREATED + timedelta(hours=1)).isoformat(),
        cancel_initiated_at=cancel,
    )


def test_the_old_homes_of_the_constants_still_export_them():
    from claude_batch import batch_queue, sensors, triggers

    assert (
        triggers.DEFAULT_BATCH_TIMEOUT
        == sensors.DEFAULT_BATCH_TIMEOUT
        == DEFAULT_BATCH_TIMEOUT
        == 23 * 3600.0
    )
    assert batch_queue.DEFAULT_QUEUE_POLL_INTERVAL == DEFAULT_QUEUE_POLL_INTERVAL == 60.0


@pytest.mark.parametrize(
    ("interval", "ceiling", "expected"),
    [(30.0, 600.0, 45.0), (500.0, 600.0, 600.0), (600.0, 600.0, 600.0), (1.0, 1.0, 1.0)],
)
def test_the_interval_backs_off_to_its_ceiling(interval, ceiling, expected):
    assert next_poll_interval(interval, ceiling) == expected


def test_poll_until_sleeps_a_backed_off_interval_between_checks():
    answers = iter([None, None, None, None, "done"])
    slept: list[float] = []
    assert poll_until(lambda: next(answers), 2.0, 4.0, sleep=slept.append) == "done"
    assert slept == [2.0, 3.0, 4.0, 4.0]


def test_poll_until_gives_up_when_the_check_raises():
    def check() -> None:
        raise TimeoutError("overdue")

    with pytest.raises(TimeoutError, match="overdue"):
        poll_until(check, 1.0, 1.0, sleep=lambda _s: None)


@pytest.mark.parametrize(
    ("batch", "timeout", "now", "skip", "overdue"),
    [
        (snap(), TIMEOUT, DEADLINE, (), True),  # at its deadline
        (snap(), TIMEOUT, DEADLINE - 1, (), False),  # a second before it
        (snap(), None, DEADLINE + 10**6, (), False),  # no timeout: never overdue
        (snap(), TIMEOUT, DEADLINE + 1, ("msgbatch_1",), False),  # already asked to cancel
        (snap(cancel_after=TIMEOUT), TIMEOUT, DEADLINE + 1, (), False),  # the API shows the cancel
        (snap(status="canceling"), TIMEOUT, DEADLINE + 1, (), False),
        (snap(status="ended", succeeded=1), TIMEOUT, DEADLINE + 1, (), False),
    ],
)
def test_overdue_batches(batch, timeout, now, skip, overdue):
    assert overdue_batches([batch], timeout, now, skip) == (["msgbatch_1"] if overdue else [])


@pytest.mark.parametrize(
    ("cancel_after", "timeout", "by_timeout"),
    [
        (None, TIMEOUT, False),  # never canceled
        (TIMEOUT, None, False),  # no timeout: a cancel is someone else's
        (TIMEOUT, TIMEOUT, True),
        (TIMEOUT - CANCEL_CLOCK_SLACK, TIMEOUT, True),  # within the clocks' slack
        (TIMEOUT - CANCEL_CLOCK_SLACK - 1, TIMEOUT, False),  # canceled well before the deadline
    ],
)
def test_canceled_for_timeout(cancel_after, timeout, by_timeout):
    batch = snap(status="ended", canceled=1, cancel_after=cancel_after)
    assert canceled_for_timeout(batch, timeout) is by_timeout


def test_on_timeout_must_be_a_known_choice():
    assert check_on_timeout(ON_TIMEOUT_FAIL) == ON_TIMEOUT_FAIL
    with pytest.raises(ValueError, match="on_timeout must be one of"):
        check_on_timeout("ignore")


@pytest.mark.parametrize(
    ("on_timeout", "status"), [(ON_TIMEOUT_FAIL, "timeout"), (ON_TIMEOUT_CANCEL_AND_COLLECT, "success")]
)
def test_completion_event_for_a_batch_canceled_at_its_deadline(on_timeout, status):
    batch = snap(status="ended", succeeded=2, canceled=3, cancel_after=TIMEOUT)
    event = completion_event([batch], TIMEOUT, on_timeout)
    assert event["status"] == status
    assert [item["id"] for item in event["timed_out"]] == ["msgbatch_1"]
    assert event["timed_out"][0]["canceled"] == 3 and "did not end within 3600 s" in event["message"]


def test_completion_event_of_batches_that_simply_ended():
    event = completion_event([snap(status="ended", succeeded=4)], TIMEOUT, ON_TIMEOUT_FAIL)
    assert event["status"] == "success" and event["timed_out"] == [] and "message" not in event


@pytest.mark.parametrize(
    ("counts", "fail_on_partial", "skip_if_all_canceled", "raises"),
    [
        ({"succeeded": 5}, True, True, None),
        ({"succeeded": 4, "errored": 1}, False, True, None),  # partial: reported, not failed
        ({"succeeded": 4, "expired": 1}, True, True, BatchWaitFailed),
        ({"canceled": 5}, False, True, AllRequestsCanceled),
        ({"canceled": 5}, False, False, None),  # the pipeline collects the canceled requests
    ],
)
def test_judge_completion(counts, fail_on_partial, skip_if_all_canceled, raises):
    batches = [snap(status="ended", **counts)]
    log = RecordingLog()
    if raises is not None:
        with pytest.raises(raises):
            judge_completion(batches, fail_on_partial, log, skip_if_all_canceled)
        return
    summary = judge_completion(batches, fail_on_partial, log, skip_if_all_canceled)
    assert summary["request_counts"] == {"succeeded": 0, "errored": 0, "canceled": 0, "expired": 0, **counts}
    assert summary["outcomes"] == {"msgbatch_1": batches[0].outcome}


@pytest.mark.parametrize(
    ("event", "message"),
    [
        (None, "Unexpected trigger event: None"),
        ({"batches": []}, "Unexpected trigger event"),
        ({"status": "error", "message": "Gave up after 10 failed poll round(s)"}, "Gave up after 10"),
        ({"status": "timeout", "message": "did not end within"}, "did not end within"),
        ({"status": "succeeded", "batches": []}, "Unknown trigger event status 'succeeded'"),
        ({"status": "recheck", "batches": []}, "Unknown trigger event status 'recheck'"),
    ],
)
def test_judge_trigger_event_fails_naming_what_it_cannot_accept(event, message):
    with pytest.raises(BatchWaitFailed, match=message.replace("(", r"\(").replace(")", r"\)")):
        judge_trigger_event(event, False, RecordingLog())


def test_every_known_status_is_accepted_or_fails_on_its_own_terms():
    assert EVENT_STATUSES == ("success", "timeout", "error")
    event = completion_event([snap(status="ended", succeeded=1)], None, ON_TIMEOUT_FAIL)
    assert judge_trigger_event(event, True, RecordingLog())["batch_ids"] == ["msgbatch_1"]


def test_the_airflow_shell_fails_an_unknown_status_and_skips_when_all_canceled():
    from airflow.sdk.exceptions import AirflowSkipException
    from claude_batch.sensors import ClaudeBatchFailed, apply_completion_policy, handle_trigger_event

    with pytest.raises(ClaudeBatchFailed, match="Unknown trigger event status 'done'"):
        handle_trigger_event({"status": "done", "batches": []}, False, RecordingLog())
    with pytest.raises(AirflowSkipException, match="Every request was canceled"):
        apply_completion_policy([snap(status="ended", canceled=2)], False, RecordingLog())


def test_the_policy_poller_and_collect_import_no_airflow():
    modules = ["waiting", "snapshots", "paging", "errors", "poller", "results", "result_rows"]
    code = (
        "import sys\n"
        + "".join(f"import claude_batch.{name}\n" for name in modules)
        + "print(sorted(m for m in sys.modules if m.startswith('airflow')))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}  # this process's path, in the child
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert result.stdout.strip() == "[]"
