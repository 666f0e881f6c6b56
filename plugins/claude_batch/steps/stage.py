"""Step 1, ``stage``: take back what runs that are over still hold, then stage this run's rows.

:func:`run_recover` first (see :mod:`claude_batch.recovery`), then :func:`run_stage`: the
source is checked, the rows extracted, staged as request shards with a manifest and estimated.
No ledger row changes here: the gate claims the items. Idempotent for its DAG run: a run that
staged this prompt version keeps its manifest (the task table: ``docs/architecture.md``,
section 1).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any, cast

import pyarrow as pa

from claude_batch.caching import decide as decide_caching
from claude_batch.estimates import RowSample, estimate_run
from claude_batch.preflight import check_workload_source
from claude_batch.recovery import RecoveryReport, recover_stranded
from claude_batch.staging import Manifest, read_manifest, stage_requests
from claude_batch.staging.chunks import peek_rows
from claude_batch.steps.config import PipelineConfig, RunOptions, effective_workload, task_log
from claude_batch.steps.manifests import estimate_band, estimated_cost
from claude_batch.storage import RunLayout
from claude_batch.warehouse import RECORD_KEY_COLUMN, Warehouse
from claude_batch.warehouse.dialects.base import StreamedRows


def run_stage(
    config: PipelineConfig,
    warehouse: Warehouse,
    layout: RunLayout,
    options: RunOptions,
    interval: Any,
    client: Any = None,
    log: Any = None,
) -> dict[str, Any]:
    """Extract the run's rows and stage them as shards with a manifest (no ledger change yet).

    The cache setting comes from the caching policy (:func:`claude_batch.caching.decide`, on the
    evidence of the workload's earlier runs); the estimate (:func:`claude_batch.estimates.estimate_run`)
    counts a sample of the staged requests with ``count_tokens`` and prices the cached prefix at
    the hit rate measured for the setting; a probe, if the policy asks for one, becomes a shard of
    its own. A run that already staged this prompt version keeps its manifest: re-staging would
    extract nothing (its items are done) and overwrite the record of what the run sent; one whose
    estimate was not written yet (a stage that died after staging) gets it now, without a sample.

    :param client: an ``anthropic.Anthropic`` client for ``count_tokens`` (None: the estimate counts
        characters).
    :param log: where the decision and the estimate are logged.
    """
    log = log or task_log()
    workload = effective_workload(config, options)
    staged = read_manifest(layout)
    if staged is not None and staged.prompt_version == workload.prompt_version:
        if staged.staged_requests and "cache_plan" not in (staged.estimate or {}):
            observations = warehouse.recent_cache_observations(workload)
            decision = decide_caching(workload, observations, config.prices)
            decision.setting, decision.probe_setting = staged.cache_setting, None
            staged = estimate_run(layout, staged, workload, decision, observations, config.prices,
                                  key_column=RECORD_KEY_COLUMN, log=log)  # fmt: skip
        return stage_summary(staged)
    # Mistakes in the source or the template fail here, naming the cause, before any row is read.
    check_workload_source(
        warehouse.source_columns(config.source), workload, config.source, dialect_name=warehouse.dialect.name
    )
    warehouse.ensure_tables(workload)
    observations = warehouse.recent_cache_observations(workload)
    decision = decide_caching(workload, observations, config.prices)
    rate = decision.hit_rate(decision.setting)
    # Record batches where the warehouse gives them (DuckDB): staging and the sample read them
    # without a dict per row.
    statement = warehouse.extract_query(workload, config.source, layout.run_id, interval)
    rows = warehouse.extract_batches(statement)
    if options.row_limit:
        rows = first_rows(rows, options.row_limit)
    sample = RowSample(seed=f"{layout.dag_id}/{layout.run_id}")
    manifest = stage_requests(
        sample.wrap(rows),
        workload,
        layout,
        key_field=RECORD_KEY_COLUMN,  # the key as the warehouse casts it to text (extract adds it)
        key_name=config.source.key_column,
        cache_setting=decision.setting,
        prices=config.prices,
        limits=config.staging_limits,
        assumed_cache_hit_rate=rate.point if rate else 0.0,
    )
    if manifest.staged_requests:
        manifest = estimate_run(layout, manifest, workload, decision, observations, config.prices,
                                sample=sample, client=client, key_column=RECORD_KEY_COLUMN,
                                log=log)  # fmt: skip
    return stage_summary(manifest)


def first_rows(rows: StreamedRows, limit: int) -> StreamedRows:
    """The first ``limit`` rows of ``rows``, counted in rows whether they come as dicts or as batches.

    :param rows: dicts, or Arrow record batches (the last one kept is cut to the limit).
    :param limit: how many rows to keep.
    """
    as_batches, iterator = peek_rows(rows)
    if not as_batches:
        return itertools.islice(cast(Iterator[dict[str, Any]], iterator), limit)
    return _first_batch_rows(cast(Iterator[pa.RecordBatch], iterator), limit)


def _first_batch_rows(batches: Iterator[pa.RecordBatch], limit: int) -> Iterator[pa.RecordBatch]:
    left = limit
    for batch in batches:
        if left <= 0:
            return
        yield batch if batch.num_rows <= left else batch.slice(0, left)
        left -= batch.num_rows


def run_recover(
    config: PipelineConfig,
    warehouse: Warehouse,
    layout: RunLayout,
    options: RunOptions,
    client: Any,
    run_state: Callable[[str, str], str | None],
    log: Any,
) -> RecoveryReport:
    """Before extracting: take back the items of runs that are over but still hold them.

    See :mod:`claude_batch.recovery`: an ended batch of such a run is collected and loaded for
    it (nothing paid twice), a shard it never submitted is released; both become extractable.
    """
    workload = effective_workload(config, options)
    warehouse.ensure_tables(workload)
    report = recover_stranded(
        workload, warehouse, layout.store, client, run_state,
        current_run_id=layout.run_id, prices=config.prices, conn_id=config.anthropic_conn_id,
    )  # fmt: skip
    if report.changed or report.waiting:
        log.info(
            "Recovered items of runs that are over: batches collected %s, items released %s, "
            "still waiting %s.",
            report.collected, report.released, report.waiting,
        )  # fmt: skip
    return report


def stage_summary(manifest: Manifest) -> dict[str, Any]:
    """What the stage staged and estimated (the ``stage`` task's XCom, the dry run's report)."""
    low, high = estimate_band(manifest)
    return {
        "extracted": manifest.extracted_rows,
        "staged": manifest.staged_requests,
        "rejected": manifest.rejected_rows,
        "shards": len(manifest.shards),
        "cache_setting": manifest.cache_setting,
        "cache_probe": ((manifest.estimate or {}).get("cache_plan") or {}).get("probe"),
        "estimated_cost_usd": estimated_cost(manifest),
        "estimated_cost_low_usd": low,
        "estimated_cost_high_usd": high,
    }
