"""The fault matrix at CI size: every fault, then the audit: nothing lost, duplicated or billed twice.

Each scenario makes one thing go wrong in run 1 (retrying tasks as Airflow would), then run 2,
the next night's run, retries what run 1 sent back to the ledger. The audit reads the results
table, the ledger and every batch the emulator holds. ``bench/bench_fault_matrix.py`` runs the
same scenarios at 10,000+ rows and writes the table.
"""

from __future__ import annotations

import pytest
from claude_batch.warehouse import AccountingError

from tests.conftest import EMULATOR_API_KEY
from tests.reliability.conftest import ROWS
from tests.reliability.harness import RUN_1, Audit, Faults, KillPoint, PipelineRun, run_scenario
from tests.reliability.scenarios import SCENARIOS

# Faults that must make at least one task attempt fail (and be retried).
FAILS_A_TASK = {"s3_staging", "s3_collect", "warehouse_load", "kill_stage", "kill_submit", "kill_collect",
                "kill_load", "kill_after_load"}  # fmt: skip
# Faults that send items back to the ledger for run 2 to retry.
LEAVES_RETRIES = {"errored_expired", "expired_partial", "canceled"}


def check(result: Audit, name: str) -> None:
    detail = f"{result.fault}: {result.notes}"
    assert result.records_lost == 0, detail
    assert result.duplicates == 0, detail
    assert result.batches_billed_twice == 0, detail
    assert result.records_billed_twice == 0, detail
    assert result.accounting_ok, detail
    assert result.notes["succeeded"] == ROWS, detail
    if name != "none":
        assert result.faults_injected > 0, f"the fault never happened: {detail}"
    if name in FAILS_A_TASK:
        assert result.failed_attempts > 0, detail
    retried = result.notes["requests_received"] - ROWS
    if name in LEAVES_RETRIES:
        assert retried > 0, detail  # run 2 sent exactly the items run 1 could not finish
        assert result.notes["accounting"]["run-1"]["by_status"]["retry"] == retried, detail
    else:
        assert retried == 0, detail
    check_evidence(result, name)


def check_evidence(result: Audit, name: str) -> None:
    """What each fault left behind before its retry, and that the retry picked up from there."""
    notes = result.notes
    if name == "warehouse_load":
        assert notes["failed_loads_left_nothing"] == 2  # checked after each failed attempt
    if name == "kill_load":
        assert set(notes["ledger_after_kill"]) == {"submitted"}  # the killed transaction left nothing
    if name == "kill_stage":
        assert notes["manifest_after_kill"] is False  # no manifest: the gate cannot use a half stage
    if name == "kill_submit":
        assert notes["state_after_kill"] == "intent"  # paid, but only the intent was recorded
        assert notes["batch_ids"]["run-1"][1] == notes["paid_batch"]  # the retry recovered that batch
    if name == "kill_collect":
        assert notes["results_after_kill"] is False  # a half download never looks complete
        assert set(notes["ledger_after_kill"]) == {"submitted"}
    if name == "kill_after_load":
        assert set(notes["ledger_after_kill"]) == {"succeeded"}  # committed before the kill
    if name == "canceled":
        assert notes["faults"] == {} and notes["accounting"]["run-1"]["by_status"]["succeeded"] > 0


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_fault_matrix_on_duckdb(name, duckdb_stack, emulator):
    check(SCENARIOS[name](duckdb_stack, emulator, EMULATOR_API_KEY, ROWS), name)


@pytest.mark.services
@pytest.mark.parametrize("name", ["warehouse_load", "kill_load"])
def test_fault_matrix_on_postgres(name, postgres_stack, emulator):
    check(SCENARIOS[name](postgres_stack, emulator, EMULATOR_API_KEY, ROWS), name)


# -- the audit itself can fail ---------------------------------------------------------------


def test_audit_sees_a_shard_billed_twice_when_the_state_is_lost(duckdb_stack, emulator):
    """Without the intent record (deleted after the kill), the retry pays for the shard again."""
    layout = duckdb_stack.layout("run-1")

    def forget_the_intent(step: str, attempt: int, exc: BaseException) -> None:
        layout.store.delete(f"{layout.prefix}/state/submit.part-00001.json")

    faults = Faults(kill=KillPoint("submit", "submit:after_create", 1), after_failure=forget_the_intent)
    result = run_scenario(duckdb_stack, emulator, EMULATOR_API_KEY, "state lost", ROWS, faults=faults)
    assert result.batches_billed_twice == 1
    assert result.records_billed_twice == ROWS // 2  # every request of shard 1
    assert result.duplicates == 0  # the results table's key hides it: only the billing audit shows it


def test_accounting_fails_loudly_when_a_shard_is_never_loaded(duckdb_stack, emulator):
    """A validated part lost before the load: the load's accounting check names the gap."""
    run = PipelineRun(duckdb_stack, "run-1", RUN_1)
    layout = duckdb_stack.layout("run-1")
    original = run._task

    def task(step, args, index=0):
        if step == "load":
            layout.store.delete(f"{layout.prefix}/validated/part-00001.parquet")
        return original(step, args, index)

    run._task = task
    with pytest.raises(AccountingError, match=rf"gap {ROWS // 2}.*never got an outcome"):
        run.run()
