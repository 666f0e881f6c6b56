"""Step 2, ``gate``: dry run and budget, the claim, the pilot's split; nothing is sent here.

The claim is atomic (:meth:`claude_batch.warehouse.Warehouse.claim_staged`): items another live
run holds are dropped from this run's shards (``staging.restrict_to_claimed``) before anything
is paid for, so overlapping runs never send the same item (``docs/concurrency.md``). A retried
gate finds the pilot it split before and claims it again. :class:`BudgetExceeded` and
:class:`NothingToSubmit` are decisions, not faults: the Airflow shell fails or skips the task
without a retry.
"""

from __future__ import annotations

from typing import Any

from claude_batch.pilot import exclude_pilot, pilot_layout, read_pilot, shard_paths, split_pilot
from claude_batch.staging import Manifest, restrict_to_claimed
from claude_batch.steps.config import PipelineConfig, RunOptions, effective_workload
from claude_batch.steps.manifests import estimate_band, estimated_cost, require_manifest
from claude_batch.steps.report import write_report
from claude_batch.steps.stage import stage_summary
from claude_batch.storage import RunLayout
from claude_batch.warehouse import ClaimResult, Warehouse
from claude_batch.workloads import Workload


class BudgetExceeded(RuntimeError):
    """The run's cost estimate is over the budget it was given; nothing was submitted."""


class NothingToSubmit(RuntimeError):
    """Every item this run staged is held by another live run (or became final): the run skips."""


def claim_manifest(
    warehouse: Warehouse, workload: Workload, layout: RunLayout, manifest: Manifest
) -> tuple[Manifest, ClaimResult]:
    """Claim the manifest's items; what the run could not take is dropped from its shards."""
    claim = warehouse.claim_staged(workload, layout, manifest)
    if not claim.complete:
        manifest = restrict_to_claimed(layout, manifest, claim.not_claimed)
    return manifest, claim


def run_gate(
    config: PipelineConfig,
    warehouse: Warehouse,
    layout: RunLayout,
    options: RunOptions,
    client: Any,
    submit_api: Any,
    log: Any,
) -> list[str]:
    """Apply dry run and budget, claim the run's items, split off the pilot; return round 1's shards.

    The claim is atomic (see :meth:`Warehouse.claim_staged`): items another live run holds are
    dropped from this run's shards before anything is paid for, so two overlapping runs (a UI
    trigger beside the schedule, a backfill) never send the same item. With ``pilot_size``, the
    first requests move to the pilot's own shards (:func:`claude_batch.pilot.split_pilot`,
    :func:`run_pilot_shards` lists them); round 1 keeps the rest. Nothing is sent here.

    :param client: not used (the pilot is sent by its own tasks since it became a round of its
        own); kept so callers of this step need not change.
    :param submit_api: not used either, as ``client``.
    :returns: round 1's request shard paths (relative to the store root) to submit, in part order.
    """
    manifest = require_manifest(layout)
    workload = effective_workload(config, options)
    cost = estimated_cost(manifest)
    low, high = estimate_band(manifest)
    log.info(
        "Staged %s requests in %d shard(s) (%s rejected); estimated batch cost $%.4f, "
        "between $%.4f and $%.4f (cache %s).",
        f"{manifest.staged_requests:,}",
        len(manifest.shards),
        f"{manifest.rejected_rows:,}",
        cost,
        low,
        high,
        manifest.cache_setting,
    )
    if options.dry_run:
        write_report(layout, {"dry_run": True, "estimate": manifest.estimate, **stage_summary(manifest)})
        return []
    # The budget refuses a run only when its estimate is over it even at the low end of its band
    # (see claude_batch.estimates); one whose band merely reaches over it goes on, with a warning.
    if options.budget_usd and low > options.budget_usd:
        raise BudgetExceeded(
            f"The estimated cost ${cost:.4f} (between ${low:.4f} and ${high:.4f}) is over this run's "
            f"budget ${options.budget_usd:.4f}; nothing was submitted. Even the low end of the estimate "
            "is over it: raise the budget, lower row_limit, or choose a cheaper model."
        )
    if options.budget_usd and high > options.budget_usd:
        log.warning(
            "The estimate $%.4f (between $%.4f and $%.4f) may go over the budget $%.4f; the run goes on "
            "since it is under the budget at the low end.", cost, low, high, options.budget_usd,
        )  # fmt: skip
    ledger = warehouse.accounting(workload, manifest)
    if ledger.by_status and ledger.accounted == ledger.extracted == sum(ledger.by_status.values()):
        log.info(
            "Run %s already reached a final state for every item (%s); nothing to do.",
            layout.run_id,
            ledger.by_status,
        )
        return []
    staged = manifest.staged_requests
    manifest, claim = claim_manifest(warehouse, workload, layout, manifest)
    if not claim.complete:
        log.warning(
            "Run %s could not claim %s staged item(s): held by another live run or already final (%s); "
            "they were dropped from its shards. %s request(s) in %d shard(s) remain.",
            layout.run_id,
            f"{sum(len(keys) for keys in claim.not_claimed.values()):,}",
            claim.describe_holders(),
            f"{manifest.staged_requests:,}",
            len(manifest.shards),
        )
        if not manifest.shards and not claim.rejected:
            raise NothingToSubmit(
                f"run {layout.run_id} has nothing of its own to submit: its {staged:,} staged item(s) are "
                f"held by another live run or already final ({claim.describe_holders()})"
            )
    manifest = _split_pilot(config, warehouse, workload, layout, manifest, options, log)
    return shard_paths(layout, manifest)


def _split_pilot(
    config: PipelineConfig,
    warehouse: Warehouse,
    workload: Workload,
    layout: RunLayout,
    manifest: Manifest,
    options: RunOptions,
    log: Any,
) -> Manifest:
    """Round 1's manifest once the pilot is split off (as it was when the pilot exists already)."""
    pilot = read_pilot(layout, workload.prompt_version)
    if pilot is not None:
        # A retried gate (maybe one that died midway through the split) or a re-run: the pilot is
        # the one split before. Its items are claimed again as round 1's are, and kept out of round 1.
        pilot, _ = claim_manifest(warehouse, workload, pilot_layout(layout), pilot)
        return exclude_pilot(layout, manifest, pilot)
    if not options.pilot_size or not manifest.shards:
        return manifest
    if options.pilot_size >= manifest.staged_requests:
        log.info(
            "The pilot of %s request(s) would be the whole run (%s staged): no pilot, "
            "the run goes as a whole.",
            f"{options.pilot_size:,}", f"{manifest.staged_requests:,}",
        )  # fmt: skip
        return manifest
    rest, pilot = split_pilot(layout, manifest, options.pilot_size, config.staging_limits)
    log.info(
        "Pilot: %s request(s) in %d shard(s) go first, alone (%s); the other %s wait for its verdict.",
        f"{pilot.staged_requests:,}", len(pilot.shards), layout.store.uri(pilot_layout(layout).prefix),
        f"{rest.staged_requests:,}",
    )  # fmt: skip
    return rest
