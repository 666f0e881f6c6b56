"""The fault matrix's audit: what the tables and the emulator say after a scenario's runs.

:func:`audit` counts records lost, duplicates in the results table, batches and records billed
twice (from every batch the emulator holds), and whether every run's accounting check held
right after its load.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anthropic
from claude_batch.paging import iter_list_pages, list_params

from tests.reliability.parts import WORKLOAD, Stack, query

if TYPE_CHECKING:
    from tests.reliability.harness import RunRecord


@dataclass
class Audit:
    """One line of the fault matrix."""

    fault: str
    warehouse: str
    rows: int
    runs: int
    records_lost: int
    duplicates: int
    batches_billed_twice: int
    records_billed_twice: int
    accounting_ok: bool
    faults_injected: int
    failed_attempts: int
    seconds: float = 0.0
    notes: dict[str, Any] = field(default_factory=dict)


def _all_batches(client: anthropic.Anthropic) -> list[Any]:
    """Every batch the emulator holds, newest first (paged as the package pages ``list``)."""
    pages = iter_list_pages(lambda after_id: client.messages.batches.list(**list_params(after_id)), 10_000)
    return [batch for page in pages for batch in page.data]


def billed_custom_ids(emulator: Any, api_key: str) -> tuple[Counter[str], int]:
    """How often each custom_id succeeded (was billed), over every batch the emulator holds."""
    client = anthropic.Anthropic(api_key=api_key, base_url=emulator.base_url, max_retries=0)
    billed: Counter[str] = Counter()
    batches = _all_batches(client)
    for batch in batches:
        if batch.processing_status != "ended":
            raise AssertionError(f"batch {batch.id} is still {batch.processing_status} at the audit")
        for line in client.messages.batches.results(batch.id):
            if line.result.type == "succeeded":
                billed[line.custom_id] += 1
    return billed, len(batches)


def audit(
    stack: Stack,
    emulator: Any,
    api_key: str,
    fault: str,
    rows: int,
    records: list[RunRecord],
    other_faults: int = 0,
) -> Audit:
    """Count losses, duplicates and double billing after the runs; check every run's accounting."""
    emulator.configure(faults={})  # the audit reads with no faults
    stats = emulator.stats()
    billed, batches_listed = billed_custom_ids(emulator, api_key)
    submissions = sum(record.shards for record in records)
    # Checked by each run right after its load (a later run moves the items it retries).
    accounting_ok = all(record.accounting and record.accounting["ok"] for record in records if record.shards)
    source = {key for (key,) in query(stack, "SELECT id FROM tickets")}
    ledger = dict(
        query(stack, f"SELECT record_key, status FROM claude_batch_ledger WHERE workload = '{WORKLOAD.name}'")
    )
    result_rows = query(stack, f"SELECT record_key FROM {WORKLOAD.results_table}")
    in_results = Counter(key for (key,) in result_rows)
    done = {key for key in source if ledger.get(key) == "succeeded" and in_results.get(key) == 1}
    dead = {key for key in source if ledger.get(key) == "dead"}
    return Audit(
        fault=fault,
        warehouse=stack.dialect,
        rows=rows,
        runs=len(records),
        records_lost=len(source - done - dead),
        duplicates=len(result_rows) - len(in_results) + sum(1 for key in in_results if key not in source),
        batches_billed_twice=max(stats["batches_created"] - submissions, 0),
        records_billed_twice=sum(1 for count in billed.values() if count > 1),
        accounting_ok=accounting_ok,
        faults_injected=other_faults
        + sum(count for kind, count in stats["faults_injected"].items() if kind != "latency"),
        failed_attempts=sum(len(record.failed_attempts) for record in records),
        notes={
            "batches_created": stats["batches_created"],
            "batches_listed": batches_listed,
            "shard_submissions": submissions,
            "requests_received": stats["requests_received"],
            "succeeded": len(done),
            "dead": len(dead),
            "ledger": dict(Counter(ledger.values())),
            "faults": stats["faults_injected"],
            "failed": [attempt for record in records for attempt in record.failed_attempts],
            "accounting": {record.run_id: record.accounting for record in records},
            "batch_ids": {record.run_id: record.batch_ids for record in records},
        },
    )
