"""A night of a workload through the pipeline's steps, against the emulator, for the cost tests.

Stage (``run_stage`` with a client for ``count_tokens``), gate, submit each shard with the SDK,
record, let the emulator's clock end the batches, collect, load, report: what the tasks do, with
the submission done plainly (the submit operator's own tests cover it).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import anthropic
from claude_batch.pipeline import (
    PipelineConfig,
    RunOptions,
    build_report,
    run_collect,
    run_gate,
    run_load,
    run_record_batches,
    run_stage,
)
from claude_batch.staging import read_manifest
from claude_batch.storage import RunLayout
from claude_batch.warehouse import SourceSpec, Warehouse

from tests.batchcore.conftest import RecordingLog
from tests.conftest import EMULATOR_API_KEY
from tests.datapath.conftest import make_workload
from tests.datapath.helpers import submit_shard

DAY = dt.datetime(2026, 3, 1)
SOURCE = SourceSpec(table="tickets", key_column="id", interval_column="created_at")
# About 1,500 tokens: cacheable for Sonnet 4.6 (minimum 1,024), not for Haiku 4.5 (4,096).
PROMPT = "Classify the support ticket and extract the invoice total; follow the house rules. " * 72


def workload(cache: str = "auto", model: str = "claude-sonnet-4-6", **changes: Any):
    return make_workload(system_prompt=PROMPT, model=model, cache=cache, **changes)


def rows(count: int, day: int = 0, start: int = 0) -> list[dict]:
    """``count`` tickets on ``DAY + day``, their bodies of different lengths."""
    return [
        {
            "id": f"t{day}-{i:05d}",
            "body": f"Invoice total: ${i * 250:,}.00. I was charged twice, please refund. " * (1 + i % 5),
            "created_at": DAY + dt.timedelta(days=day, minutes=i % 600),
        }
        for i in range(start, start + count)
    ]


def interval(day: int) -> tuple[dt.datetime, dt.datetime]:
    return DAY + dt.timedelta(days=day), DAY + dt.timedelta(days=day + 1)


def client_for(emulator) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=EMULATOR_API_KEY, base_url=emulator.base_url, max_retries=0)


def config_for(work, store) -> PipelineConfig:
    return PipelineConfig(workload=work, source=SOURCE, storage_root=store.root)


def night(
    config: PipelineConfig, conn, store, emulator, day: int, *, options: RunOptions | None = None, log=None
) -> tuple[dict[str, Any], Any]:
    """One run of ``day``'s rows from stage to report; returns (report, round 1's manifest)."""
    options = options or RunOptions()
    log = log or RecordingLog()
    client = client_for(emulator)
    warehouse = Warehouse(conn)
    layout = RunLayout(store, "cost_dag", f"scheduled__day{day}")
    run_stage(config, warehouse, layout, options, interval(day), client=client, log=log)
    run_gate(config, warehouse, layout, options, client, None, log)
    manifest = read_manifest(layout)
    batch_ids = [submit_shard(client, layout, shard) for shard in manifest.shards]
    run_record_batches(config, warehouse, layout, options, batch_ids)
    emulator.advance(3600)
    collected = [
        run_collect(config, layout, options, client, shard.part, batch_id)
        for shard, batch_id in zip(manifest.shards, batch_ids, strict=True)
    ]
    loaded = run_load(config, warehouse, layout, options)
    return build_report(layout, loaded, collected, config.prices), manifest
