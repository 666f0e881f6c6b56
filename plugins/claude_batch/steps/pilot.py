"""Step 3, the pilot's steps: its shards, its load and the decision on the full run.

The pilot is round 0 under ``<run>/pilot/`` (:mod:`claude_batch.pilot` has the split, the
verdict and the approval's text); its submit, record, wait and collect are any round's. Its
load moves every pilot item on, so round 1 never sends it, and leaves the run's accounting and
history to round 1's load. Under the pass-rate threshold (no person deciding) the run's other
items are given back (``retry``, held by no run) before :class:`PilotFailed` is raised.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from claude_batch.pilot import (
    approval_text,
    judge_pilot,
    pilot_layout,
    read_pilot,
    shard_paths,
    threshold_message,
)
from claude_batch.steps.config import PipelineConfig, RunOptions, effective_workload
from claude_batch.steps.manifests import estimated_cost, require_manifest
from claude_batch.storage import RunLayout
from claude_batch.warehouse import Warehouse


class PilotFailed(RuntimeError):
    """The pilot sample's validation pass rate is under the threshold; nothing else was submitted."""


def run_pilot_shards(config: PipelineConfig, layout: RunLayout, options: RunOptions) -> list[str]:
    """The pilot's request shard paths (empty: the run has no pilot), for ``pilot_submit``."""
    pilot = read_pilot(layout, effective_workload(config, options).prompt_version)
    return shard_paths(pilot_layout(layout), pilot) if pilot is not None else []


def run_pilot_load(
    config: PipelineConfig, warehouse: Warehouse, layout: RunLayout, options: RunOptions
) -> dict[str, Any]:
    """Load the pilot's answers like a round's: valid rows upserted, every pilot item moved on.

    Its items become ``succeeded``, ``invalid``, ``retry`` or ``dead``, so round 1 never sends
    them; the run's accounting and history wait for round 1's load, which goes on from this
    result (``previous``), so the run's totals include the pilot.

    :param layout: the pilot's layout (:func:`claude_batch.pilot.pilot_layout`).
    """
    workload = effective_workload(config, options)
    manifest = require_manifest(layout)
    load = warehouse.load_run(workload, layout, manifest)
    rounds = [
        {
            "round": layout.round,
            "pilot": True,
            "sent": manifest.staged_requests,
            "by_status": dict(load.by_status),
        }
    ]
    return {"load": dataclasses.asdict(load), "rounds": rounds}


def run_pilot_decide(
    config: PipelineConfig, warehouse: Warehouse, layout: RunLayout, options: RunOptions, log: Any
) -> dict[str, Any]:
    """Judge the pilot's validated answers; stop the run under the threshold unless a person decides.

    Without ``pilot_approval``, a pass rate (valid / judged) under ``pilot_min_pass_rate`` gives
    the run's other items back (``retry``, held by no run) and raises :class:`PilotFailed`. With
    it, the decision carries the approval's subject and body (pass rate, sample answers with
    their verdicts, the full run's estimate) and the threshold is only shown.

    :param layout: round 1's layout.
    :returns: the decision (for XCom, the approval and the report).
    """
    workload = effective_workload(config, options)
    pilot = require_manifest(pilot_layout(layout))
    rest = require_manifest(layout)
    verdict = judge_pilot(pilot_layout(layout), pilot)
    threshold = options.pilot_min_pass_rate
    approval = bool(options.pilot_approval and options.pilot_size)
    log.info(
        "Pilot batch(es) %s: %d of %d answers valid (%.0f%%), threshold %.0f%%; failures %s; %s.",
        verdict.batch_ids, verdict.valid, verdict.judged, verdict.pass_rate * 100, threshold * 100,
        verdict.failures, "a person decides" if approval else "the threshold decides",
    )  # fmt: skip
    decision = {**verdict.to_dict(), "threshold": threshold, "approval": approval,
                "rest_requests": rest.staged_requests,
                "rest_estimated_cost_usd": estimated_cost(rest)}  # fmt: skip
    if approval:
        subject, body = approval_text(
            verdict, rest, workload=workload.name, run_id=layout.run_id, threshold=threshold
        )
        decision.update(subject=subject, body=body)
        return decision
    if options.pilot_size and verdict.pass_rate < threshold:
        message = threshold_message(verdict, threshold)
        run_release(config, warehouse, layout, options, f"released: {message}", log)
        raise PilotFailed(message)
    return decision


def run_release(
    config: PipelineConfig,
    warehouse: Warehouse,
    layout: RunLayout,
    options: RunOptions,
    reason: str,
    log: Any,
) -> int:
    """Give back the run's items not yet sent (a pilot that failed or was rejected); returns how many."""
    released = warehouse.release_claim(effective_workload(config, options), layout.run_id, reason)
    log.info("Released %s item(s) of run %s for later runs.", f"{released:,}", layout.run_id)
    return released
