"""A run that fails after its gate strands nothing: the next run takes its items back, paying once.

The first run gets through its gate (and maybe its submits), then fails (its wait times out, a
worker dies for good): Airflow marks it ``failed``. The next run's stage asks Airflow about every
run still holding items, collects what the failed run's ended batches answered, releases what it
never sent, and extracts the rest as retries. Over DuckDB and PostgreSQL with the emulator.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest

from tests.conftest import EMULATOR_API_KEY
from tests.reliability import harness
from tests.reliability.conftest import ROWS
from tests.reliability.harness import (
    DAY,
    RUN_1,
    RUN_2,
    PipelineRun,
    billed_custom_ids,
    query,
    wait_for_batches,
)

RUN_3 = (DAY + timedelta(days=2), DAY + timedelta(days=3))


@pytest.fixture(autouse=True)
def run_states() -> Iterator[dict[str, str]]:
    harness.RUN_STATES.clear()
    yield harness.RUN_STATES
    harness.RUN_STATES.clear()


def run_until(run: PipelineRun, last_step: str) -> None:
    for step in run.steps():
        if step == last_step:
            return
    raise AssertionError(f"the run never reached {last_step}")


def billed(emulator) -> tuple[int, int]:
    counts, _ = billed_custom_ids(emulator, EMULATOR_API_KEY)
    return len(counts), sum(1 for count in counts.values() if count > 1)


def ledger(stack) -> dict[str, int]:
    return dict(query(stack, "SELECT status, COUNT(*) FROM claude_batch_ledger GROUP BY status"))


@pytest.mark.services
@pytest.mark.parametrize("warehouse", ["duckdb", "postgres"])
def test_a_run_failed_after_its_submits_has_its_batches_collected_by_the_next(
    warehouse, request, emulator, run_states
):
    stack = request.getfixturevalue(f"{warehouse}_stack")
    failed = PipelineRun(stack, "night-1", RUN_1)
    run_until(failed, "record")  # submitted and recorded, then the wait fails
    run_states["night-1"] = "failed"
    assert ledger(stack) == {"submitted": ROWS}
    wait_for_batches(failed.record.batch_ids)  # the batches end on their own, answered and billed
    next_night = PipelineRun(stack, "night-2", RUN_2)
    next_night.run()
    assert ledger(stack) == {"succeeded": ROWS}
    assert emulator.stats()["requests_received"] == ROWS  # nothing sent again
    assert billed(emulator) == (ROWS, 0)
    held = dict(query(stack, "SELECT run_id, COUNT(*) FROM claude_batch_ledger GROUP BY run_id"))
    assert held == {"night-1": ROWS}  # the answers are the failed run's own, loaded for it
    assert next_night.record.shards == 0  # nothing was left to send


@pytest.mark.services
@pytest.mark.parametrize("warehouse", ["duckdb", "postgres"])
def test_a_run_failed_before_submitting_has_its_items_released_and_sent_once(
    warehouse, request, emulator, run_states
):
    stack = request.getfixturevalue(f"{warehouse}_stack")
    run_until(PipelineRun(stack, "night-1", RUN_1), "gate")  # claimed, then the run is given up
    run_states["night-1"] = "failed"
    assert ledger(stack) == {"pending": ROWS}
    next_night = PipelineRun(stack, "night-2", RUN_2)
    next_night.run()
    assert ledger(stack) == {"succeeded": ROWS}
    assert emulator.stats()["requests_received"] == ROWS
    assert billed(emulator) == (ROWS, 0)
    assert next_night.record.accounting and next_night.record.accounting["ok"]


@pytest.mark.services
def test_a_live_run_and_a_running_batch_are_left_alone_until_they_end(postgres_stack, emulator, run_states):
    stack = postgres_stack
    emulator.configure(processing_seconds=36_000.0)  # the failed run's batches are still running
    failed = PipelineRun(stack, "night-1", RUN_1)
    run_until(failed, "record")
    # While night 1 is still running in Airflow, the next night does not touch its items.
    PipelineRun(stack, "night-2", RUN_2).run()
    assert ledger(stack) == {"submitted": ROWS}
    # Night 1 fails; its batches have not ended: still nothing is taken (they will be billed).
    run_states["night-1"] = "failed"
    PipelineRun(stack, "night-3", RUN_3).run()
    assert ledger(stack) == {"submitted": ROWS}
    emulator.advance(40_000)
    PipelineRun(stack, "night-4", (RUN_3[1], RUN_3[1] + timedelta(days=1))).run()
    assert ledger(stack) == {"succeeded": ROWS}
    assert emulator.stats()["requests_received"] == ROWS
    assert billed(emulator) == (ROWS, 0)


@pytest.mark.services
@pytest.mark.parametrize("warehouse", ["duckdb", "postgres"])
def test_a_run_failed_while_a_shard_waited_for_queue_room_has_that_shard_released(
    warehouse, request, emulator, run_states
):
    """Its first shard was created; the second was refused by the full queue (state ``refused``,
    nothing created) and deferred; then the run failed. The next night collects the first
    shard's batch and sends the second shard's items, once."""
    from airflow.sdk.exceptions import TaskDeferred

    stack = request.getfixturevalue(f"{warehouse}_stack")
    # Room for one shard of two, and batches that stay in the queue until time is advanced.
    emulator.configure(max_queued_requests=ROWS // 2 + ROWS // 4, processing_seconds=3600.0)
    failed = PipelineRun(stack, "night-1", RUN_1)
    run_until(failed, "gate")
    shards = harness.step_gate(stack, "night-1")  # the gate again (a retried task): the same shards
    created = harness.step_submit(stack, "night-1", 0, shards[0])
    with pytest.raises(TaskDeferred):
        harness.step_submit(stack, "night-1", 1, shards[1])
    # The record task waits for every submit: it never ran, so the ledger still says pending.
    assert ledger(stack) == {"pending": ROWS}
    states = [s for s in stack.store().list(stack.layout("night-1").submission_states) if s.endswith(".json")]
    assert sorted(stack.store().read_json_or_none(s)["phase"] for s in states) == ["refused", "submitted"]
    run_states["night-1"] = "failed"  # the deferred submit never resumed
    emulator.configure(max_queued_requests=None, processing_seconds=30.0)  # the fixture's, for night 2
    emulator.advance(4000)
    wait_for_batches([created])
    next_night = PipelineRun(stack, "night-2", RUN_2)
    next_night.run()
    assert ledger(stack) == {"succeeded": ROWS}
    assert emulator.stats()["requests_received"] == ROWS  # the first shard's answers were not paid again
    assert billed(emulator) == (ROWS, 0)
    assert next_night.record.shards == 1 and next_night.record.accounting["ok"]
