"""The waiting policy, Airflow-free: how often to poll, when a batch is overdue, what ended means.

The trigger (in the triggerer), the sensor (poke mode) and the operator (its in-place wait) all
wait for batches; their decisions live here, once, so they cannot drift, and the Airflow classes
are thin shells around them (see ``docs/architecture.md``).

- Polling backs off: each round multiplies the interval by :data:`POLL_BACKOFF`, up to a ceiling
  (:func:`next_poll_interval`, :func:`poll_until` for the synchronous loops).
- Timeouts are per batch: each batch's deadline is its own ``created_at + timeout``
  (:func:`batch_deadline`). A batch past it is canceled once (:func:`overdue_batches`); a cancel
  the API dates at or after the deadline, less :data:`CANCEL_CLOCK_SLACK`, is the timeout's
  (:func:`canceled_for_timeout`), which a restarted waiter reads back from the API.
- Once every batch has ended, :func:`completion_event` says how it went (``success``, or
  ``timeout`` under ``on_timeout="fail"``), and :func:`judge_trigger_event` /
  :func:`judge_completion` turn that into a summary for XCom or a plain exception:
  :class:`BatchWaitFailed` (the task fails) or :class:`AllRequestsCanceled` (the task is
  skipped). An event whose status is not one of :data:`EVENT_STATUSES` is rejected by name.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

from claude_batch.snapshots import BatchSnapshot, human_duration

DEFAULT_MIN_POLL_INTERVAL = 30.0
DEFAULT_MAX_POLL_INTERVAL = 600.0
# The factor applied to the polling interval after each round.
POLL_BACKOFF = 1.5
DEFAULT_MAX_CONSECUTIVE_ERRORS = 10
# The production rule: a batch that has not completed 23 hours after submission is canceled, what
# it has is collected and its other requests are requeued (an hour before the API's 24 h expiry).
DEFAULT_BATCH_TIMEOUT = 23 * 3600.0
# Seconds between the readings of a trigger that waits for room in the processing queue.
DEFAULT_QUEUE_POLL_INTERVAL = 60.0
# What a timeout does to the wait, once every batch has ended: fail the task, or count the
# canceled batches as ended so that ``collect`` keeps their successes and requeues the rest.
ON_TIMEOUT_FAIL = "fail"
ON_TIMEOUT_CANCEL_AND_COLLECT = "cancel_and_collect"
ON_TIMEOUT_CHOICES = (ON_TIMEOUT_FAIL, ON_TIMEOUT_CANCEL_AND_COLLECT)
# A cancel the API dates up to this long before a batch's deadline still counts as the timeout's
# (our clock and the API's may differ a little; after a restart the API's date is all there is).
CANCEL_CLOCK_SLACK = 300.0
# The statuses of a batch trigger event: every batch ended (``success``), a batch was canceled
# for its deadline under ``on_timeout="fail"`` (``timeout``), or the batches could not be polled.
EVENT_SUCCESS = "success"
EVENT_TIMEOUT = "timeout"
EVENT_ERROR = "error"
EVENT_STATUSES = (EVENT_SUCCESS, EVENT_TIMEOUT, EVENT_ERROR)
_COUNT_KEYS = ("succeeded", "errored", "canceled", "expired")

Result = TypeVar("Result")


class BatchWaitFailed(Exception):
    """The batches ended in a way the task's policy does not accept, or could not be waited for."""


class AllRequestsCanceled(Exception):
    """Every request was canceled before it ran: nothing to collect (the task is skipped)."""


class Logger(Protocol):
    """What the policy logs through: a stdlib or an Airflow task logger."""

    def info(self, msg: Any, /, *args: Any) -> object: ...

    def warning(self, msg: Any, /, *args: Any) -> object: ...


# --- polling -----------------------------------------------------------------------------------


def next_poll_interval(interval: float, max_interval: float, backoff: float = POLL_BACKOFF) -> float:
    """The interval after a round of ``interval``: backed off, capped at ``max_interval``."""
    return min(interval * backoff, max_interval)


def poll_until(
    check: Callable[[], Result | None],
    min_interval: float,
    max_interval: float,
    sleep: Callable[[float], None] = time.sleep,
) -> Result:
    """Call ``check`` until it returns a result, sleeping a backed-off interval between calls.

    The synchronous wait loop (the operator's in-place wait); ``check`` decides, and raises to
    give up.
    """
    interval = min_interval
    while True:
        result = check()
        if result is not None:
            return result
        sleep(interval)
        interval = next_poll_interval(interval, max_interval)


# --- deadlines ---------------------------------------------------------------------------------


def check_on_timeout(on_timeout: str) -> str:
    if on_timeout not in ON_TIMEOUT_CHOICES:
        raise ValueError(f"on_timeout must be one of {ON_TIMEOUT_CHOICES}, not {on_timeout!r}")
    return on_timeout


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def iso_utc(epoch_seconds: float) -> str:
    return datetime.fromtimestamp(epoch_seconds, UTC).isoformat()


def age_seconds(created_iso: str, now: datetime | None = None) -> float:
    """Seconds since ``created_iso`` (an ISO timestamp with a zone)."""
    return ((now or datetime.now(UTC)) - datetime.fromisoformat(created_iso)).total_seconds()


def deadline_at(snap: BatchSnapshot, timeout: float) -> float:
    """The batch's own deadline (epoch seconds): its ``created_at`` plus ``timeout``."""
    return epoch(snap.created_at) + timeout


def batch_deadline(snap: BatchSnapshot, timeout: float | None) -> float | None:
    """:func:`deadline_at`, or ``None`` without a timeout."""
    return None if timeout is None else deadline_at(snap, timeout)


def waiting_uncanceled(snap: BatchSnapshot) -> bool:
    """Still processing and not (yet) asked to cancel: the batches a deadline can apply to."""
    return snap.processing_status == "in_progress" and snap.cancel_initiated_at is None


def overdue_batches(
    snapshots: Iterable[BatchSnapshot], timeout: float | None, now: float, skip: Iterable[str] = ()
) -> list[str]:
    """Batches still ``in_progress`` and uncanceled past their own deadline (``skip``: already asked)."""
    if timeout is None:
        return []
    skip = set(skip)
    return [
        snap.id
        for snap in snapshots
        if waiting_uncanceled(snap) and snap.id not in skip and deadline_at(snap, timeout) <= now
    ]


def canceled_for_timeout(snap: BatchSnapshot, timeout: float | None) -> bool:
    """Whether the batch was canceled at (or after) its deadline, i.e. by the timeout."""
    if timeout is None or snap.cancel_initiated_at is None:
        return False
    return epoch(snap.cancel_initiated_at) >= deadline_at(snap, timeout) - CANCEL_CLOCK_SLACK


# --- the end of a wait -------------------------------------------------------------------------


def completion_event(
    snapshots: list[BatchSnapshot], timeout: float | None, on_timeout: str, cancel_failed: Iterable[str] = ()
) -> dict[str, Any]:
    """The event once every batch has ended: ``success``, or ``timeout`` when the policy is ``fail``.

    ``timed_out`` lists the batches canceled for their deadline with their counts;
    ``cancel_failed`` the batches past their deadline whose cancel the API refused (they ran on,
    and were billed, until they ended or expired).
    """
    timed_out = [
        {
            "id": snap.id,
            "created_at": snap.created_at,
            "deadline": iso_utc(deadline_at(snap, timeout)),
            "cancel_initiated_at": snap.cancel_initiated_at,
            "ended_at": snap.ended_at,
            **{key: getattr(snap, key) for key in _COUNT_KEYS},
        }
        for snap in snapshots
        if timeout is not None and canceled_for_timeout(snap, timeout)
    ]
    refused = sorted(
        set(cancel_failed) - {snap.id for snap in snapshots if snap.cancel_initiated_at is not None}
    )
    payload: dict[str, Any] = {
        "status": EVENT_SUCCESS,
        "batches": [snap.to_dict() for snap in snapshots],
        "timeout": timeout,
        "on_timeout": on_timeout,
        "timed_out": timed_out,
        "cancel_failed": refused,
    }
    if timed_out or refused:
        parts = []
        if timed_out:
            totals = {
                key: sum(item[key] for item in timed_out) for key in ("succeeded", "errored", "canceled")
            }
            parts.append(
                f"Batch(es) {_some([item['id'] for item in timed_out])} did not end within {timeout:.0f} s "
                f"of submission; cancellation was requested at each one's deadline and they have ended "
                f"(their requests: {totals})."
            )
        if refused:
            parts.append(
                f"Past the {timeout:.0f} s deadline, cancelling {_some(refused)} failed: they ran on "
                "(and were billed) until they ended or expired. Check that the connection's key may "
                "cancel batches."
            )
        payload["message"] = " ".join(parts)
        if on_timeout == ON_TIMEOUT_FAIL:
            payload["status"] = EVENT_TIMEOUT
    return payload


def _some(ids: list[str], shown: int = 10) -> str:
    """The ids as a list, the first ``shown`` of them when there are many."""
    return str(ids) if len(ids) <= shown else f"{ids[:shown]} and {len(ids) - shown:,} more"


def judge_completion(
    snapshots: list[BatchSnapshot], fail_on_partial: bool, log: Logger, skip_if_all_canceled: bool = True
) -> dict[str, Any]:
    """Judge ended batches and return a summary for XCom.

    Every batch canceled before anything ran: :class:`AllRequestsCanceled` (the task is skipped).
    Some requests errored, expired or were canceled: the task succeeds and says so (the ledger
    retries them), or fails (:class:`BatchWaitFailed`) when ``fail_on_partial`` is set. Canceled
    and expired are reported by name, never as success.

    :param snapshots: the batches as they ended.
    :param fail_on_partial: fail instead of reporting partial failures.
    :param log: the task's logger.
    :param skip_if_all_canceled: skip when nothing ran; a pipeline that must still collect the
        canceled results (so the ledger retries them) turns this off.
    """
    counts = {key: sum(getattr(snap, key) for snap in snapshots) for key in _COUNT_KEYS}
    summary: dict[str, Any] = {
        "batch_ids": [snap.id for snap in snapshots],
        "outcomes": {snap.id: snap.outcome for snap in snapshots},
        "request_counts": counts,
    }
    total = sum(counts.values())
    if total and counts["canceled"] == total and skip_if_all_canceled:
        raise AllRequestsCanceled(
            f"Every request was canceled ({total:,}) in batches {summary['batch_ids']}."
        )
    failed = total - counts["succeeded"]
    if failed:
        by_batch = {snap.id: snap.outcome for snap in snapshots if snap.outcome != "succeeded"}
        message = (
            f"{failed:,} of {total:,} requests did not succeed (errored={counts['errored']:,}, "
            f"expired={counts['expired']:,}, canceled={counts['canceled']:,}); batches: {by_batch}"
        )
        if fail_on_partial:
            raise BatchWaitFailed(message)
        log.warning("%s. They go back to the ledger for retry; the successful results are kept.", message)
    else:
        log.info("All %s requests succeeded in %d batch(es).", f"{total:,}", len(snapshots))
    return summary


def judge_trigger_event(
    event: dict[str, Any] | None, fail_on_partial: bool, log: Logger, skip_if_all_canceled: bool = True
) -> dict[str, Any]:
    """Turn a batch trigger event into a summary, or :class:`BatchWaitFailed` saying why not.

    A ``success`` event may name batches canceled for their deadline (``timed_out``, under
    ``on_timeout="cancel_and_collect"``): they count as ended, the summary lists them with their
    counts under ``timed_out``, and the task is never skipped for them (their canceled requests
    must reach the ledger as retries). ``cancel_failed`` names batches whose cancel was refused.
    An event without a status, or with one not in :data:`EVENT_STATUSES`, fails naming it.
    """
    if not event or "status" not in event:
        raise BatchWaitFailed(f"Unexpected trigger event: {event!r}")
    status = event["status"]
    if status not in EVENT_STATUSES:
        raise BatchWaitFailed(f"Unknown trigger event status {status!r} (expected one of {EVENT_STATUSES}).")
    if status in (EVENT_ERROR, EVENT_TIMEOUT):
        raise BatchWaitFailed(event["message"])
    snapshots = [BatchSnapshot.from_dict(item) for item in event["batches"]]
    timed_out = {item["id"]: item for item in event.get("timed_out") or []}
    cancel_failed = list(event.get("cancel_failed") or [])
    if timed_out or cancel_failed:
        log.warning(
            "%s", event.get("message") or f"Timed out: {sorted(timed_out)}; not canceled: {cancel_failed}"
        )
    summary = judge_completion(snapshots, fail_on_partial, log, skip_if_all_canceled and not timed_out)
    summary["timed_out"] = timed_out
    summary["cancel_failed"] = cancel_failed
    return summary


# --- progress ------------------------------------------------------------------------------------


def progress_summary(snapshots: list[BatchSnapshot], timeout: float | None, now: datetime) -> str:
    """One line for the whole wait: statuses, request counts, oldest age, the nearest deadline."""
    if len(snapshots) == 1:
        head = f"batch {snapshots[0].id}: {snapshots[0].processing_status}"
    else:
        statuses = Counter(snap.processing_status for snap in snapshots)
        head = f"{len(snapshots)} batches: " + ", ".join(
            f"{statuses[status]} {status}"
            for status in ("in_progress", "canceling", "ended")
            if statuses[status]
        )
    counts = " ".join(
        f"{key}={sum(getattr(snap, key) for snap in snapshots):,}"
        for key in ("processing", "succeeded", "errored", "canceled", "expired")
    )
    oldest = min(snapshots, key=lambda snap: snap.created_at)
    line = f"{head}; requests {counts}; {'age' if len(snapshots) == 1 else 'oldest age'} {_age(oldest, now)}"
    waiting = [snap for snap in snapshots if waiting_uncanceled(snap)]
    if timeout is not None and waiting:
        nearest = min(waiting, key=lambda snap: snap.created_at)
        left = deadline_at(nearest, timeout) - now.timestamp()
        line += f"; next deadline {'in ' + human_duration(timedelta(seconds=left)) if left > 0 else 'passed'}"
        if len(snapshots) > 1:
            line += f" ({nearest.id}, age {_age(nearest, now)})"
    pending = [snap for snap in snapshots if not snap.ended]
    if pending:
        soonest = min(pending, key=lambda snap: snap.expires_at)
        line += f"; expires in {human_duration(datetime.fromisoformat(soonest.expires_at) - now)}"
    timed_out = sum(canceled_for_timeout(snap, timeout) for snap in snapshots)
    if timed_out:
        line += f"; canceled for timeout: {timed_out}"
    return line


def _age(snap: BatchSnapshot, now: datetime) -> str:
    return human_duration(now - datetime.fromisoformat(snap.created_at))
