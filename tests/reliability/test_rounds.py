"""A run goes round: what times out, expires or fails transiently is resent in the same run.

Against an emulator at wall-clock speed, so a batch's ``created_at`` and the wait's clock agree
and a timeout of a few seconds is real. Round 1 meets the fault; rounds 2 and 3 (as the DAG's
``requeue_N`` tasks) resend the run's ``retry`` items until each is final. Nothing is billed
twice and no batch is left running or uncollected.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from datetime import datetime

import anthropic
import pytest
from claude_batch.emulator import EmulatorServer

from tests.conftest import EMULATOR_API_KEY
from tests.reliability.conftest import ROWS
from tests.reliability.harness import (
    RUN_1,
    RUN_2,
    Faults,
    PipelineRun,
    _all_batches,
    billed_custom_ids,
    query,
)

TIMEOUT = 3.0


@pytest.fixture
def wall_clock(monkeypatch):
    """An emulator at wall-clock speed as ``anthropic_default`` (batches take 1 s unless stalled).

    Request it after the stack fixture, whose ``anthropic_conn`` points at the session's emulator.
    """
    with EmulatorServer(
        api_key=EMULATOR_API_KEY, time_scale=1.0, processing_seconds=1.0, cancel_seconds=0.3
    ) as emu:
        monkeypatch.setenv(
            "AIRFLOW_CONN_ANTHROPIC_DEFAULT",
            json.dumps({"conn_type": "anthropic", "host": emu.base_url, "password": EMULATOR_API_KEY}),
        )
        yield emu


def ledger(stack) -> dict[str, int]:
    return dict(query(stack, "SELECT status, COUNT(*) FROM claude_batch_ledger GROUP BY status"))


def batches(emu) -> list:
    return _all_batches(anthropic.Anthropic(api_key=EMULATOR_API_KEY, base_url=emu.base_url, max_retries=0))


def check_paid_once(emu) -> None:
    billed, _ = billed_custom_ids(emu, EMULATOR_API_KEY)  # also asserts every batch has ended
    assert sum(1 for count in billed.values() if count > 1) == 0
    assert len(billed) == ROWS


def faults_in_round_1(emu, batch_faults: dict, gap_seconds: float = 0.0) -> Faults:
    """The fault for round 1's batches only; submits ``gap_seconds`` apart; later rounds are clean."""
    emu.configure(faults={"batch": batch_faults})
    faults = Faults()

    def after_submit(index: int, batch_id: str) -> None:
        if index == 0 and gap_seconds:
            time.sleep(gap_seconds)

    faults.after_submit = after_submit
    faults.before_round = lambda number: emu.configure(faults={})
    return faults


@pytest.mark.services
@pytest.mark.parametrize("warehouse", ["duckdb", "postgres"])
def test_batches_past_their_timeout_are_canceled_collected_and_their_rest_resent(warehouse, request):
    stack = request.getfixturevalue(f"{warehouse}_stack")
    wall_clock = request.getfixturevalue("wall_clock")  # after the stack: its connection wins
    # Every round-1 batch stalls partway; the two are submitted 1.5 s apart.
    faults = faults_in_round_1(wall_clock, {"stall_rate": 1.0}, gap_seconds=1.5)
    run = PipelineRun(stack, "night-1", RUN_1, faults, rounds=3, wait_options={"batch_timeout": TIMEOUT})
    run.run()
    first, *later = [wait["batches"] for wait in run.record.waits]
    assert len(first) == 2 and len(later) == 1  # one follow-up round was enough
    for snapshot in first:
        # Each canceled at its own deadline (not both at the first one's), with answers kept.
        created, canceled = (
            datetime.fromisoformat(snapshot[k]) for k in ("created_at", "cancel_initiated_at")
        )
        assert (canceled - created).total_seconds() >= TIMEOUT
        assert snapshot["succeeded"] > 0 and snapshot["canceled"] > 0
    assert (
        abs(
            (
                datetime.fromisoformat(first[1]["cancel_initiated_at"])
                - datetime.fromisoformat(first[0]["cancel_initiated_at"])
            ).total_seconds()
        )
        >= 1.0
    )
    canceled = sum(snapshot["canceled"] for snapshot in first)
    rounds = run.record.load["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["by_status"].get("canceled") == canceled and rounds[1]["sent"] == canceled
    assert ledger(stack) == {"succeeded": ROWS}
    assert run.record.accounting["ok"]
    assert wall_clock.stats()["requests_received"] == ROWS + canceled
    assert {b.processing_status for b in batches(wall_clock)} == {"ended"}
    check_paid_once(wall_clock)


@pytest.mark.services
@pytest.mark.parametrize("warehouse", ["duckdb", "postgres"])
def test_expired_items_are_resent_in_the_same_run(warehouse, request):
    stack = request.getfixturevalue(f"{warehouse}_stack")
    wall_clock = request.getfixturevalue("wall_clock")
    faults = faults_in_round_1(wall_clock, {"expired_rate": 0.1})
    run = PipelineRun(stack, "night-1", RUN_1, faults, rounds=3, wait_options={"batch_timeout": 60.0})
    run.run()
    rounds = run.record.load["rounds"]
    expired = rounds[0]["by_status"]["expired"]
    assert 0.05 * ROWS < expired < 0.15 * ROWS
    assert [r["round"] for r in rounds] == [1, 2] and rounds[1]["sent"] == expired
    assert ledger(stack) == {"succeeded": ROWS}
    attempts = Counter(a for (a,) in query(stack, "SELECT attempts FROM claude_batch_ledger"))
    assert attempts == {1: ROWS - expired, 2: expired}
    check_paid_once(wall_clock)
    # The next night has nothing left to do: no expired items wait for it.
    next_night = PipelineRun(stack, "night-2", RUN_2, rounds=3)
    next_night.run()
    assert next_night.record.shards == 0


@pytest.mark.services
def test_a_run_goes_round_until_its_items_are_out_of_attempts(postgres_stack, wall_clock):
    """Transient errors every round: each item is sent at most three times, then ``dead``."""
    stack = postgres_stack
    wall_clock.configure(faults={"batch": {"errored_rate": 0.5, "error_types": ["overloaded_error"]}})
    run = PipelineRun(stack, "night-1", RUN_1, rounds=3, wait_options={"batch_timeout": 60.0})
    run.run()
    rounds = run.record.load["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    statuses = ledger(stack)
    assert set(statuses) == {"succeeded", "dead"} and sum(statuses.values()) == ROWS
    attempts = Counter(a for (a,) in query(stack, "SELECT attempts FROM claude_batch_ledger"))
    assert max(attempts) == 3
    sent = wall_clock.stats()["requests_received"]
    assert sent == sum(r["sent"] for r in rounds)
    billed, _ = billed_custom_ids(wall_clock, EMULATOR_API_KEY)
    assert max(billed.values()) == 1 and len(billed) == statuses["succeeded"]


@pytest.mark.services
def test_no_round_starts_past_the_runs_deadline(duckdb_stack, emulator):
    """Past ``run_deadline_hours`` the retries are left to the next run instead of a new round."""
    import dataclasses

    from claude_batch.pipeline import RunOptions, run_requeue

    from tests.reliability.harness import log

    stack = duckdb_stack
    emulator.configure(faults={"batch": {"expired_rate": 0.2}})
    PipelineRun(stack, "night-1", RUN_1).run()
    left = ledger(stack)["retry"]
    late = dataclasses.replace(stack.config(), run_deadline_hours=0.0)
    with stack.warehouse() as warehouse:
        assert run_requeue(late, warehouse, stack.layout("night-1").in_round(2), RunOptions(), log) == []
    assert ledger(stack)["retry"] == left  # untouched: the next night takes them
    emulator.configure(faults={})
    PipelineRun(stack, "night-2", RUN_2).run()
    assert ledger(stack) == {"succeeded": ROWS}
