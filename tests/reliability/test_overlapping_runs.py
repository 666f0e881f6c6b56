"""Overlapping runs of one workload never send, or pay for, the same item twice.

Airflow runs several runs of a DAG at once: a UI trigger beside the scheduled run of the same
interval, a backfill with ``max_active_runs=2``, a re-run of an older night. Here two runs'
tasks are interleaved at every step boundary (stage A, stage B, gate A, gate B, submit A ...,
and with one run some steps ahead), over the same interval and over retry items that both runs
extract, on DuckDB and on PostgreSQL, with the emulator and moto. The count that matters is
read from the emulator: how often each custom_id was answered (billed) across every batch.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from datetime import timedelta

import anthropic
import pytest

from tests.conftest import EMULATOR_API_KEY
from tests.reliability.conftest import ROWS
from tests.reliability.harness import DAY, RUN_1, PipelineRun, Stack, billed_custom_ids, query


def interleave(first: Iterator[str], second: Iterator[str], lead: int) -> list[str]:
    """Run ``lead`` steps of ``first``, then one step of each in turn until both are done."""
    order: list[str] = []
    for step in itertools.islice(first, lead):
        order.append(f"A:{step}")
    runs = {"A": first, "B": second}
    while runs:
        for name in list(runs):
            step = next(runs[name], None)
            if step is None:
                del runs[name]
            else:
                order.append(f"{name}:{step}")
    return order


def ledger(stack: Stack) -> dict[str, int]:
    return dict(query(stack, "SELECT status, COUNT(*) FROM claude_batch_ledger GROUP BY status"))


def billed_twice(emulator) -> int:
    billed, _ = billed_custom_ids(emulator, EMULATOR_API_KEY)
    return sum(1 for count in billed.values() if count > 1)


def check_every_item_once(stack: Stack, emulator, runs: list[PipelineRun], rows: int = ROWS) -> None:
    assert billed_twice(emulator) == 0
    assert ledger(stack) == {"succeeded": rows}
    total, distinct = query(stack, "SELECT COUNT(*), COUNT(DISTINCT record_key) FROM reliability_results")[0]
    assert total == distinct == rows
    for run in runs:
        if run.record.shards:
            assert run.record.accounting and run.record.accounting["ok"], run.record.accounting


# Lead 0 is the case (stage A, stage B, gate A, gate B); 1 puts B's stage after A's gate;
# 4 starts B after A's submits and record (B finds everything held by A at extract).
LEADS = [0, 1, 2, 4]


@pytest.mark.services
@pytest.mark.parametrize("lead", LEADS)
@pytest.mark.parametrize("warehouse", ["duckdb", "postgres"])
def test_two_runs_of_one_interval_interleaved_pay_once(warehouse, lead, request, emulator):
    stack = request.getfixturevalue(f"{warehouse}_stack")
    # A UI trigger beside the scheduled run of the same interval.
    scheduled = PipelineRun(stack, "scheduled__2026-03-01T00:00:00+00:00", RUN_1)
    manual = PipelineRun(stack, "manual__2026-03-01T00:00:01+00:00", RUN_1)
    order = interleave(scheduled.steps(), manual.steps(), lead)
    check_every_item_once(stack, emulator, [scheduled, manual])
    # One of them holds every item; the other stages nothing, or drops what it staged at its gate.
    sent = emulator.stats()["requests_received"]
    assert sent == ROWS, order
    assert sorted([scheduled.record.shards, manual.record.shards])[0] == 0, order


@pytest.mark.services
@pytest.mark.parametrize("lead", [0, 1])
@pytest.mark.parametrize("warehouse", ["duckdb", "postgres"])
def test_two_runs_sharing_retry_items_interleaved_pay_once(warehouse, lead, request, emulator):
    stack = request.getfixturevalue(f"{warehouse}_stack")
    emulator.configure(faults={"batch": {"errored_rate": 0.2, "error_types": ["overloaded_error"]}})
    PipelineRun(stack, "night-1", RUN_1).run()
    retries = ledger(stack).get("retry", 0)
    assert retries > 0
    emulator.configure(faults={})
    received_before = emulator.stats()["requests_received"]
    # The next two nights both extract the items due for retry (they have no rows of their own).
    night_2 = PipelineRun(stack, "night-2", (DAY + timedelta(days=1), DAY + timedelta(days=2)))
    night_3 = PipelineRun(stack, "night-3", (DAY + timedelta(days=2), DAY + timedelta(days=3)))
    order = interleave(night_2.steps(), night_3.steps(), lead)
    check_every_item_once(stack, emulator, [night_2, night_3])
    assert emulator.stats()["requests_received"] - received_before == retries, order


@pytest.mark.services
@pytest.mark.parametrize("warehouse", ["duckdb", "postgres"])
def test_a_backfill_of_three_nights_two_at_a_time_pays_once(warehouse, request, emulator):
    """``max_active_runs=2``: nights 2 and 3 overlap, night 4 starts when night 2 ends; all share retries."""
    stack = request.getfixturevalue(f"{warehouse}_stack")
    emulator.configure(faults={"batch": {"errored_rate": 0.3, "error_types": ["api_error"]}})
    PipelineRun(stack, "night-1", RUN_1).run()
    emulator.configure(faults={"batch": {"errored_rate": 0.1, "error_types": ["api_error"]}})
    nights = [
        PipelineRun(
            stack, f"backfill__night-{day}", (DAY + timedelta(days=day - 1), DAY + timedelta(days=day))
        )
        for day in (2, 3, 4)
    ]
    steps = [night.steps() for night in nights]
    active = [0, 1]
    waiting = [2]
    while active:
        for index in list(active):
            if next(steps[index], None) is None:
                active.remove(index)
                if waiting:
                    active.append(waiting.pop(0))
    emulator.configure(faults={})
    PipelineRun(stack, "night-5", (DAY + timedelta(days=4), DAY + timedelta(days=5))).run()
    PipelineRun(stack, "night-6", (DAY + timedelta(days=5), DAY + timedelta(days=6))).run()
    assert billed_twice(emulator) == 0
    statuses = ledger(stack)
    assert set(statuses) <= {"succeeded", "dead"} and sum(statuses.values()) == ROWS, statuses
    for night in nights:
        if night.record.shards:
            assert night.record.accounting and night.record.accounting["ok"], night.record.accounting


@pytest.mark.services
@pytest.mark.parametrize("warehouse", ["duckdb", "postgres"])
def test_re_running_an_older_run_after_a_later_retry_changes_nothing(warehouse, request, emulator):
    stack = request.getfixturevalue(f"{warehouse}_stack")
    emulator.configure(faults={"batch": {"errored_rate": 0.2, "error_types": ["overloaded_error"]}})
    PipelineRun(stack, "night-1", RUN_1).run()
    emulator.configure(faults={})
    PipelineRun(stack, "night-2", (DAY + timedelta(days=1), DAY + timedelta(days=2))).run()
    before_ledger = query(
        stack, "SELECT record_key, status, attempts, run_id, batch_id FROM claude_batch_ledger ORDER BY 1"
    )
    before_results = query(
        stack, "SELECT record_key, output_json, run_id FROM reliability_results ORDER BY 1"
    )
    before_runs = query(stack, "SELECT run_id, succeeded, retry, dead FROM claude_batch_runs ORDER BY 1")
    received = emulator.stats()["requests_received"]
    again = PipelineRun(stack, "night-1", RUN_1)  # every task of night 1 cleared and run again
    again.run()
    assert emulator.stats()["requests_received"] == received
    assert (
        query(
            stack, "SELECT record_key, status, attempts, run_id, batch_id FROM claude_batch_ledger ORDER BY 1"
        )
        == before_ledger
    )
    assert (
        query(stack, "SELECT record_key, output_json, run_id FROM reliability_results ORDER BY 1")
        == before_results
    )
    assert (
        query(stack, "SELECT run_id, succeeded, retry, dead FROM claude_batch_runs ORDER BY 1") == before_runs
    )
    assert ledger(stack) == {"succeeded": ROWS}


@pytest.mark.services
@pytest.mark.parametrize("lead", [0, 2])
@pytest.mark.parametrize("warehouse", ["duckdb", "postgres"])
def test_two_runs_that_both_probe_the_cache_pay_once_and_record_one_probe(warehouse, lead, request, emulator):
    """``cache="auto"`` with no history: each run plans a 5-minute probe, a shard of its own.

    Both stage (and so plan a probe) before either gate; the gate that loses drops its probe with
    the rest. Only the run that sent the probe records it as evidence, so the next run does not
    read one probe as two.
    """
    stack = dataclasses.replace(request.getfixturevalue(f"{warehouse}_stack"), workload_name="cached")
    scheduled = PipelineRun(stack, "scheduled__2026-03-01T00:00:00+00:00", RUN_1)
    manual = PipelineRun(stack, "manual__2026-03-01T00:00:01+00:00", RUN_1)
    order = interleave(scheduled.steps(), manual.steps(), lead)
    check_every_item_once(stack, emulator, [scheduled, manual])
    assert emulator.stats()["requests_received"] == ROWS, order
    winner = scheduled if scheduled.record.shards else manual
    assert sorted([scheduled.record.shards, manual.record.shards]) == [0, 3], (
        order
    )  # two shards and the probe
    probes = query(
        stack,
        "SELECT run_id, cache_setting, cache_probe_setting, answers FROM claude_batch_runs "
        "WHERE cache_probe_setting IS NOT NULL",
    )
    assert [(run_id, setting, probe) for run_id, setting, probe, _ in probes] == [
        (winner.run_id, "off", "5m")
    ], order
    assert probes[0][3] == ROWS
    # The probe's batch wrote (or read) the cached prefix on every request; the others never did.
    client = anthropic.Anthropic(api_key=EMULATOR_API_KEY, base_url=emulator.base_url, max_retries=0)
    cached = {
        batch_id: {
            (line.result.message.usage.cache_creation_input_tokens or 0)
            + (line.result.message.usage.cache_read_input_tokens or 0)
            > 0
            for line in client.messages.batches.results(batch_id)
        }
        for batch_id in winner.record.batch_ids
    }
    assert sorted(map(sorted, cached.values())) == [[False], [False], [True]], (order, cached)


NEW = 300  # night 2's own rows


def add_tickets(stack: Stack, rows: list[tuple]) -> None:
    conn = stack.connect()
    try:
        if stack.dialect == "duckdb":
            conn.executemany("INSERT INTO tickets VALUES (?, ?, ?)", rows)
        else:
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO tickets VALUES (%s, %s, %s)", rows)
            conn.commit()
    finally:
        conn.close()


@pytest.mark.services
@pytest.mark.parametrize("warehouse", ["duckdb", "postgres"])
def test_a_requeue_at_every_step_of_a_live_run_sends_each_item_once(warehouse, request, emulator):
    """``claude-batch requeue`` (``Ops.requeue``) while a run is live, at each of its step boundaries.

    Night 1 (three rounds, half the answers errored) leaves items ``dead`` (out of attempts).
    Night 2 sends rows of its own day; before each of its steps one more group of dead items is requeued,
    and a requeue of an item night 2 holds is refused. Night 3 sends what night 2 staged too late
    to take. Every item is answered once after its requeue, none twice, and all end succeeded.
    """
    from claude_batch.ops import Ops

    stack = request.getfixturevalue(f"{warehouse}_stack")
    emulator.configure(faults={"batch": {"errored_rate": 0.5, "error_types": ["overloaded_error"]}})
    PipelineRun(stack, "night-1", RUN_1, rounds=3).run()
    dead = [
        key
        for (key,) in query(
            stack, "SELECT record_key FROM claude_batch_ledger WHERE status = 'dead' ORDER BY 1"
        )
    ]
    assert len(dead) >= 100 and ledger(stack) == {"succeeded": ROWS - len(dead), "dead": len(dead)}
    add_tickets(
        stack,
        [(f"n{i:05d}", f"Where is my parcel {i}?", DAY + timedelta(days=1, minutes=i)) for i in range(NEW)],
    )
    emulator.configure(faults={})
    received = emulator.stats()["requests_received"]
    night_2 = PipelineRun(stack, "night-2", (DAY + timedelta(days=1), DAY + timedelta(days=2)))
    steps = night_2.steps()
    groups = [dead[i::10] for i in range(10)]  # more groups than night 2 has steps
    requeued_before: dict[str, int] = {}  # group's first key -> how many of night 2's steps had run
    done = refused_while_held = 0
    for group in groups:
        with stack.warehouse() as house:
            ops = Ops(house)
            result = ops.requeue("reliability", keys=group, by="ops@example.com")
            assert result.requeued == len(group) and not result.skipped, result
            held = [
                key
                for (key,) in query(
                    stack,
                    "SELECT record_key FROM claude_batch_ledger "
                    "WHERE status IN ('pending', 'submitted') ORDER BY 1 LIMIT 1",
                )
            ]
            if held:  # an item night 2 holds is not the operator's to requeue
                refused = ops.requeue("reliability", keys=held, by="ops@example.com")
                assert refused.requeued == 0 and [s.record_key for s in refused.skipped] == held, refused
                refused_while_held += 1
        requeued_before[group[0]] = done
        if next(steps, None) is not None:
            done += 1
    for _ in steps:
        pass
    night_3 = PipelineRun(stack, "night-3", (DAY + timedelta(days=2), DAY + timedelta(days=3)))
    night_3.run()
    check_every_item_once(stack, emulator, [night_2, night_3], rows=ROWS + NEW)
    assert emulator.stats()["requests_received"] - received == NEW + len(dead)
    who = query(stack, "SELECT COUNT(*) FROM claude_batch_ledger WHERE requeued_by = 'ops@example.com'")[0][0]
    assert who == len(dead)
    assert refused_while_held >= 4  # from its gate (pending) through its collect (submitted)
    assert done == 7 and sorted(set(requeued_before.values())) == list(range(8))  # every boundary, and after
    # Requeued before night 2's stage: night 2 sent them; later: night 3 did.
    sent_by = dict(query(stack, "SELECT record_key, run_id FROM claude_batch_ledger"))
    for first_key, steps_before in requeued_before.items():
        assert sent_by[first_key] == ("night-2" if steps_before == 0 else "night-3"), (
            first_key,
            steps_before,
        )
