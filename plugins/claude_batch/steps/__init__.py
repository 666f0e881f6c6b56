"""The pipeline's plain-Python steps, in data-flow order; :mod:`claude_batch.pipeline` runs them as tasks.

    config     PipelineConfig, RunOptions: what the pipeline and one run were asked for
    stage      run_recover, run_stage                 (shards + manifest on S3, the estimate)
    gate       run_gate: dry run, budget, the claim, the pilot's split
    pilot      run_pilot_shards, run_pilot_load, run_pilot_decide, run_release
    rounds     run_record_batches, run_collect, run_load, run_requeue (round N >= 2)
    report     build_report, write_report                   (report.json)

Each step takes the config, the run's options and a ``storage.RunLayout`` (the round's S3
prefix), plus the open warehouse or API client it needs; the Airflow shell opens those and
passes the run's context in. Every step is idempotent for its DAG run (same S3 keys, upserts,
manifests kept once written), so a retried task does the same again. The steps import no
Airflow of their own; the few defaults and helpers they take from modules that do
(``triggers``, ``batch_queue``, ``pilot``) load it with them. The shared contracts (S3 layout,
ledger states, custom_id): ``docs/architecture.md``.
"""

from claude_batch.steps.config import (
    DEFAULT_POOL,
    PipelineConfig,
    RunOptions,
    SourceSpec,
    effective_workload,
    run_interval,
    task_log,
)
from claude_batch.steps.gate import BudgetExceeded, NothingToSubmit, claim_manifest, run_gate
from claude_batch.steps.manifests import estimate_band, estimated_cost, require_manifest
from claude_batch.steps.pilot import (
    PilotFailed,
    run_pilot_decide,
    run_pilot_load,
    run_pilot_shards,
    run_release,
)
from claude_batch.steps.report import build_report, report_costs, write_report
from claude_batch.steps.rounds import run_collect, run_load, run_record_batches, run_requeue
from claude_batch.steps.stage import run_recover, run_stage, stage_summary

__all__ = [
    "DEFAULT_POOL",
    "BudgetExceeded",
    "NothingToSubmit",
    "PilotFailed",
    "PipelineConfig",
    "RunOptions",
    "SourceSpec",
    "build_report",
    "claim_manifest",
    "effective_workload",
    "estimate_band",
    "estimated_cost",
    "report_costs",
    "require_manifest",
    "run_collect",
    "run_gate",
    "run_interval",
    "run_load",
    "run_pilot_decide",
    "run_pilot_load",
    "run_pilot_shards",
    "run_record_batches",
    "run_recover",
    "run_release",
    "run_requeue",
    "run_stage",
    "stage_summary",
    "task_log",
    "write_report",
]
