"""The fault matrix: each scenario makes one thing go wrong in run 1, then audits runs 1 and 2.

A scenario is ``fn(stack, emulator, api_key, rows) -> Audit``. Faults come from the emulator's
fault injection (HTTP errors, cut result streams, errored / expired / stalled requests), from
the API itself (a cancel), from one level under the pipeline (s3fs's S3 calls; the SQL
statements of the warehouse connection, or its PostgreSQL backend terminated) and from worker
processes killed with SIGKILL at step boundaries. Nothing here needs pytest, so the bench runs
the same scenarios.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Callable
from typing import Any

from tests.reliability.harness import (
    LOAD_WRITE,
    RESULTS_UPSERT,
    S3_READS,
    S3_WRITES,
    WORKLOAD,
    Audit,
    Faults,
    KillPoint,
    Stack,
    StatementFault,
    query,
    run_scenario,
    s3_call_faults,
    statement_faults,
    terminate_backend,
)

HTTP_ENDPOINTS = ("create", "retrieve", "list", "results")
Scenario = Callable[[Stack, Any, str, int], Audit]


class InjectedFault(OSError):
    """An S3 or warehouse failure injected by the fault matrix."""


def http_faults(status: int, rate: float = 0.3) -> dict:
    """HTTP ``status`` at ``rate`` on every endpoint the pipeline calls, each with its own dice."""
    return {
        "http": [
            {"endpoint": endpoint, "status": status, "rate": rate, "retry_after": 0.05}
            for endpoint in HTTP_ENDPOINTS
        ]
    }


def _emulator_scenario(fault: str, emulator_faults: dict) -> Scenario:
    def scenario(stack: Stack, emulator: Any, api_key: str, rows: int) -> Audit:
        return run_scenario(stack, emulator, api_key, fault, rows, emulator_faults=emulator_faults)

    scenario.__name__ = fault
    return scenario


def expired_with_partial_results(stack: Stack, emulator: Any, api_key: str, rows: int) -> Audit:
    """Every batch stalls part-way and runs into its 24-hour expiry: part succeeded, the rest expired."""

    def past_expiry() -> None:
        emulator.advance(25 * 3600)

    return run_scenario(
        stack,
        emulator,
        api_key,
        "batches expire with partial results",
        rows,
        emulator_faults={"batch": {"stall_rate": 1.0}},
        faults=Faults(before_wait=past_expiry),
    )


def canceled_midway(stack: Stack, emulator: Any, api_key: str, rows: int) -> Audit:
    """Batch 1 is canceled halfway through processing (from the Console, or by a timeout)."""
    import anthropic

    client = anthropic.Anthropic(api_key=api_key, base_url=emulator.base_url)
    faults = Faults()

    def cancel_second(index: int, batch_id: str) -> None:
        if index == 1:
            emulator.advance(300)  # batches 0 and 1 are about half done
            client.messages.batches.cancel(batch_id)
            faults.injected += 1

    def end_all() -> None:
        emulator.advance(1200)
        emulator.configure(processing_seconds=processing)  # run 2's batches take the usual time

    processing = emulator.config()["processing_seconds"]
    emulator.configure(processing_seconds=600.0)
    faults.after_submit = cancel_second
    faults.before_wait = end_all
    try:
        return run_scenario(stack, emulator, api_key, "a batch canceled midway", rows, faults=faults)
    finally:
        emulator.configure(processing_seconds=processing)


# -- S3 faults: the Nth matching S3 call fails, once ------------------------------------------


def failing_s3_calls(methods: set[str], nth: int, faults: Faults):
    """Within the block, the ``nth`` S3 call whose method is in ``methods`` fails (once)."""

    def fail(method: str, kwargs: dict) -> None:
        faults.injected += 1
        raise InjectedFault(errno.EIO, f"injected S3 failure on {method} {kwargs.get('Key', '')}")

    return s3_call_faults(methods, nth, fail)


def s3_errors_in_staging(stack: Stack, emulator: Any, api_key: str, rows: int) -> Audit:
    """The third S3 write of staging fails (a shard or keys object): the stage task is retried."""
    faults = Faults()

    def during(step: str, index: int, attempt: int):
        if step == "stage" and attempt == 0:
            return failing_s3_calls(S3_WRITES, 3, faults)
        return contextlib.nullcontext()

    faults.during = during
    return run_scenario(stack, emulator, api_key, "S3 errors during staging", rows, faults=faults)


def s3_errors_in_collect(stack: Stack, emulator: Any, api_key: str, rows: int) -> Audit:
    """Collect of shard 0: its first results write fails; of shard 1: its second S3 read fails."""
    faults = Faults()

    def during(step: str, index: int, attempt: int):
        if step == "collect" and attempt == 0 and index == 0:
            return failing_s3_calls(S3_WRITES, 1, faults)
        if step == "collect" and attempt == 0 and index == 1:
            return failing_s3_calls(S3_READS, 2, faults)
        return contextlib.nullcontext()

    faults.during = during
    return run_scenario(stack, emulator, api_key, "S3 errors during collection", rows, faults=faults)


# -- the warehouse failing during a load --------------------------------------------------------


def assert_nothing_loaded(stack: Stack, run_id: str) -> dict[str, int]:
    """After a failed load: no result row of the run, and every ledger item still ``submitted``."""
    results = query(stack, f"SELECT COUNT(*) FROM {WORKLOAD.results_table} WHERE run_id = '{run_id}'")[0][0]
    ledger = dict(
        query(
            stack,
            f"SELECT status, COUNT(*) FROM claude_batch_ledger WHERE run_id = '{run_id}' GROUP BY status",
        )
    )
    if results or set(ledger) != {"submitted"}:
        raise AssertionError(
            f"a failed load of {run_id} left work behind: {results} result rows, ledger {ledger}"
        )
    return ledger


def _check_failed_loads(stack: Stack, checked: list[dict[str, int]]):
    def after_failure(step: str, attempt: int, exc: BaseException) -> None:
        if step == "load":
            checked.append(assert_nothing_loaded(stack, "run-1"))

    return after_failure


def _raise(faults: Faults, what: str):
    def action(sql: str, conn: Any) -> None:
        faults.injected += 1
        raise InjectedFault(errno.EIO, f"injected warehouse failure: {what}")

    return action


def warehouse_fails_during_load(stack: Stack, emulator: Any, api_key: str, rows: int) -> Audit:
    """Load attempt 1 fails at its second write (the first one done, inside the transaction),
    attempt 2 at its commit (after the results upsert), attempt 3 completes. On PostgreSQL,
    attempt 1's backend is terminated by another session instead (the server went away)."""
    faults = Faults()
    checked: list[dict[str, int]] = []
    faults.after_failure = _check_failed_loads(stack, checked)

    def during(step: str, index: int, attempt: int):
        if step != "load" or attempt > 1:
            return contextlib.nullcontext()
        if attempt == 0 and stack.dialect == "postgres":
            kill_backend = terminate_backend(stack.warehouse_url)

            def terminate(sql: str, conn: Any) -> None:
                faults.injected += 1
                kill_backend(sql, conn)

            return statement_faults(StatementFault(LOAD_WRITE, terminate, after=LOAD_WRITE))
        if attempt == 0:
            action = _raise(faults, "the second write of the load")
            return statement_faults(StatementFault(LOAD_WRITE, action, after=LOAD_WRITE))
        return statement_faults(
            StatementFault("^COMMIT$", _raise(faults, "the commit"), after=RESULTS_UPSERT)
        )

    faults.during = during
    result = run_scenario(stack, emulator, api_key, "warehouse fails during the load", rows, faults=faults)
    result.notes["failed_loads_left_nothing"] = len(checked)
    return result


# -- workers killed at step boundaries -------------------------------------------------------------


def _newest_batch_id(emulator: Any, api_key: str) -> str | None:
    import anthropic

    client = anthropic.Anthropic(api_key=api_key, base_url=emulator.base_url)
    page = client.messages.batches.list(limit=1)
    return page.data[0].id if page.data else None


def _kill_evidence(point: str, stack: Stack, emulator: Any, api_key: str, index: int, notes: dict[str, Any]):
    """What the killed attempt left behind, looked at before the retry."""
    layout = stack.layout("run-1")

    def after_failure(step: str, attempt: int, exc: BaseException) -> None:
        if attempt != 0:
            return
        if point == "stage:mid_write":
            notes["manifest_after_kill"] = layout.store.exists(layout.manifest)
        elif point == "submit:after_create":
            state = layout.store.read_json(f"{layout.prefix}/state/submit.part-{index:05d}.json")
            notes["state_after_kill"] = state["phase"]
            notes["paid_batch"] = _newest_batch_id(emulator, api_key)
        elif point == "collect:mid_download":
            notes["results_after_kill"] = layout.store.exists(layout.results_parquet(index))
            notes["ledger_after_kill"] = dict(
                query(
                    stack,
                    "SELECT status, COUNT(*) FROM claude_batch_ledger WHERE run_id = 'run-1' GROUP BY 1",
                )
            )
        elif point == "load:before_commit":
            notes["ledger_after_kill"] = assert_nothing_loaded(stack, "run-1")
        elif point == "load:after_commit":
            notes["ledger_after_kill"] = dict(
                query(
                    stack,
                    "SELECT status, COUNT(*) FROM claude_batch_ledger WHERE run_id = 'run-1' GROUP BY 1",
                )
            )

    return after_failure


def _killed(point: str, step: str, index: int, label: str) -> Scenario:
    def scenario(stack: Stack, emulator: Any, api_key: str, rows: int) -> Audit:
        notes: dict[str, Any] = {}
        faults = Faults(kill=KillPoint(step, point, index))
        faults.after_failure = _kill_evidence(point, stack, emulator, api_key, index, notes)
        result = run_scenario(stack, emulator, api_key, label, rows, faults=faults)
        result.notes.update(notes)
        return result

    scenario.__name__ = label
    return scenario


SCENARIOS: dict[str, Scenario] = {
    "none": _emulator_scenario("none (baseline)", {}),
    "http_429": _emulator_scenario("HTTP 429 at 30% on create, retrieve, list, results", http_faults(429)),
    "http_500": _emulator_scenario("HTTP 500 at 30% on create, retrieve, list, results", http_faults(500)),
    "http_529": _emulator_scenario("HTTP 529 at 30% on create, retrieve, list, results", http_faults(529)),
    "results_cut": _emulator_scenario(
        "results stream cut midway (twice)", {"results_cut": {"fraction": 0.5, "times": 2, "mid_line": True}}
    ),
    "errored_expired": _emulator_scenario(
        "10% of requests errored, 5% expired", {"batch": {"errored_rate": 0.10, "expired_rate": 0.05}}
    ),
    "expired_partial": expired_with_partial_results,
    "canceled": canceled_midway,
    "s3_staging": s3_errors_in_staging,
    "s3_collect": s3_errors_in_collect,
    "warehouse_load": warehouse_fails_during_load,
    "kill_stage": _killed("stage:mid_write", "stage", 0, "worker killed mid-stage (shard half written)"),
    "kill_submit": _killed(
        "submit:after_create", "submit", 1, "worker killed after the paid create, before the state write"
    ),
    "kill_collect": _killed(
        "collect:mid_download", "collect", 1, "worker killed mid-collect (download half done)"
    ),
    "kill_load": _killed("load:before_commit", "load", 0, "worker killed mid-load (before the commit)"),
    "kill_after_load": _killed(
        "load:after_commit", "load", 0, "worker killed after the load commit, before the run record"
    ),
}
