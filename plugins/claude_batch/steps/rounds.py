"""Steps 4-9, one round: record, collect and load it; ``requeue_N`` stages the next round.

Round 1 is the run's own staging (after the pilot), round N >= 2 resends this run's items its
earlier rounds left ``retry``. Submit and wait are the operator's and the sensor's; the steps
here record the batch ids in the ledger (one task per round: one DuckDB writer), collect and
validate to S3 without touching the warehouse, and load: results table and ledger in one
transaction, then the accounting over everything the run extracted. Each load goes on from the
previous round's result, so the last one holds the run's totals.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import anthropic

from claude_batch.pilot import shard_paths, with_pilot
from claude_batch.results import collect_results
from claude_batch.staging import read_manifest, stage_requests
from claude_batch.steps.config import PipelineConfig, RunOptions, effective_workload
from claude_batch.steps.gate import claim_manifest
from claude_batch.steps.manifests import require_manifest
from claude_batch.storage import RunLayout
from claude_batch.validation import validate_part
from claude_batch.warehouse import RECORD_KEY_COLUMN, LoadSummary, Warehouse


def run_requeue(
    config: PipelineConfig,
    warehouse: Warehouse,
    layout: RunLayout,
    options: RunOptions,
    log: Any,
) -> list[str]:
    """Round ``layout.round``: stage this run's items left ``retry`` by its earlier rounds again.

    Expired, canceled (a batch past its timeout) and transiently errored items go straight into
    a follow-up batch of the same run instead of waiting for the next night. Idempotent: a
    round that staged keeps its manifest.

    No round starts ``config.run_deadline_hours`` after the run staged (its first manifest).

    :returns: the round's shard paths (empty: nothing to resend, or no time left).
    """
    workload = effective_workload(config, options)
    staged = read_manifest(layout)
    if staged is None:
        first = require_manifest(layout.in_round(1))
        age = datetime.now(UTC) - datetime.fromisoformat(first.created_at)
        if config.run_deadline_hours is not None and age > timedelta(hours=config.run_deadline_hours):
            log.info("Run %s staged %s ago, past its %sh deadline: no round %d; its retries wait "
                     "for the next run.",
                     layout.run_id, age, config.run_deadline_hours, layout.round)  # fmt: skip
            return []
        taken = warehouse.take_back_retries(workload, layout.run_id)
        staged = stage_requests(
            warehouse.extract_held(workload, config.source, layout.run_id),
            workload,
            layout,
            key_field=RECORD_KEY_COLUMN,
            key_name=config.source.key_column,
            cache_setting=first.cache_setting,
            prices=config.prices,
            limits=config.staging_limits,
        )
        staged, _ = claim_manifest(warehouse, workload, layout, staged)
        log.info("Round %d of run %s: %s item(s) back from retry, %s request(s) in %d shard(s).",
                 layout.round, layout.run_id, f"{taken:,}", f"{staged.staged_requests:,}",
                 len(staged.shards))  # fmt: skip
    return shard_paths(layout, staged)


def run_record_batches(
    config: PipelineConfig, warehouse: Warehouse, layout: RunLayout, options: RunOptions, batch_ids: list[str]
) -> int:
    """Record in the ledger which batch each shard became (its items become ``submitted``).

    One task for every shard, so a DuckDB warehouse sees one writer, not one per mapped submit.

    :param batch_ids: the submit tasks' batch ids, in shard order.
    :returns: the number of shards recorded.
    """
    workload = effective_workload(config, options)
    manifest = require_manifest(layout)
    if len(batch_ids) != len(manifest.shards):
        raise ValueError(
            f"{len(batch_ids)} batch ids for {len(manifest.shards)} shards in run {layout.run_id!r}"
        )
    for shard, batch_id in zip(manifest.shards, batch_ids, strict=True):
        warehouse.mark_submitted(workload, layout, manifest, shard.part, batch_id)
    return len(batch_ids)


def run_collect(
    config: PipelineConfig,
    layout: RunLayout,
    options: RunOptions,
    client: anthropic.Anthropic,
    part: int,
    batch_id: str,
) -> dict[str, Any]:
    """Collect the batch's results to S3 and validate them (the warehouse is not touched)."""
    workload = effective_workload(config, options)
    manifest = require_manifest(layout)
    collected = collect_results(
        client,
        layout,
        part,
        batch_id,
        manifest=manifest,
        prices=config.prices,
        conn_id=config.anthropic_conn_id,
    )
    validated = validate_part(workload, layout, part)
    batch = client.messages.batches.retrieve(batch_id)
    duration = (batch.ended_at - batch.created_at).total_seconds() if batch.ended_at else None
    return {
        "part": part,
        "batch_id": batch_id,
        "collected": collected.to_dict(),
        "validated": dataclasses.asdict(validated),
        "batch_seconds": duration,
    }


def run_load(
    config: PipelineConfig,
    warehouse: Warehouse,
    layout: RunLayout,
    options: RunOptions,
    previous: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Upsert valid rows, move the ledger, check the run's accounting and record the run.

    :param layout: the round's layout (its manifest says what it sent).
    :param previous: the earlier round's result of this step (for round 1, the pilot's
        :func:`run_pilot_load`): the run's totals go on from it.
    """
    workload = effective_workload(config, options)
    manifest = require_manifest(layout)
    first_layout = layout.in_round(1)
    # The run as a whole: round 1's manifest with its pilot's shards (the pilot's items are the run's).
    first = with_pilot(first_layout, manifest if layout.round == 1 else require_manifest(first_layout))
    load = warehouse.load_run(workload, layout, manifest)
    total = _add_loads(load, previous["load"]) if previous else load
    # Every round is checked against what the run extracted: its items are all final (retry included).
    report = warehouse.check_accounting(workload, first, layout=first_layout)
    if not report.handed_on:  # a re-run after later runs took its retries keeps the history it wrote
        warehouse.record_run(workload, first, total, report, config.prices)
    rounds = [*(previous or {}).get("rounds", []), {"round": layout.round, "sent": manifest.staged_requests,
              "by_status": dict(load.by_status)}]  # fmt: skip
    return {"load": dataclasses.asdict(total), "ledger": report.by_status, "extracted": report.extracted,
            "rounds": rounds}  # fmt: skip


def _add_loads(load: LoadSummary, earlier: Mapping[str, Any]) -> LoadSummary:
    """The run's load totals: this round's plus the earlier rounds' (``earlier``: asdict of a LoadSummary)."""
    total = dataclasses.replace(load, by_status=dict(load.by_status))
    for name in ("rows", "results_upserted", "ledger_updated", "input_tokens", "output_tokens",
                 "cache_creation_input_tokens", "cache_read_input_tokens", "cost_usd"):  # fmt: skip
        setattr(total, name, getattr(total, name) + earlier.get(name, 0))
    for status, count in (earlier.get("by_status") or {}).items():
        total.by_status[status] = total.by_status.get(status, 0) + count
    return total
