"""The pipeline builder: one call wires a workload from warehouse to warehouse.

Read this file to find the pipeline; every stage is a module of its own, called here in
data-flow order:

    stage    warehouse.extract -> staging.stage_requests            (shards + manifest on S3)
    gate     dry run / budget, then warehouse.claim_staged (ledger: pending, atomically;
             staging.restrict_to_claimed drops what another live run holds), then
             pilot.split_pilot: the first pilot_size requests become the pilot's shards
    pilot    pilot_submit, pilot_record, pilot_wait, pilot_collect, pilot_load: a round of its
             own (<run>/pilot/), then pilot_decide (the pass-rate threshold) and pilot_approval
             (a person, when the run asks): see claude_batch.pilot. Skipped without a pilot.
    submit   operators.ClaudeBatchOperator, mapped over the shards    (batch ids, exactly once)
    record   warehouse.mark_submitted for every shard, one task       (ledger: submitted)
    wait     sensors.ClaudeBatchSensor, deferred                      (no worker slot held)
    collect  results.collect_results + validation.validate_part, mapped over the shards
             (S3 and the API only: parallel collects never contend for the warehouse)
    load     warehouse.load_run -> check_accounting -> record_run      (results table + ledger)
    report   counts, cost, the real-time equivalent, cache hit rate, durations -> report.json

The ``run_*`` functions are the plain-Python steps (testable without Airflow); the tasks are thin
shells that open connections and pass run context. Every step is idempotent for its DAG run.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import anthropic
import orjson

from claude_batch import notes
from claude_batch.batch_queue import DEFAULT_QUEUE_POLL_INTERVAL
from claude_batch.caching import decide as decide_caching
from claude_batch.connections import open_warehouse
from claude_batch.costs import PriceTable, TokenTotals, apportion_tokens, default_prices, run_costs
from claude_batch.estimates import RowSample, estimate_run
from claude_batch.pilot import (
    approval_text,
    exclude_pilot,
    judge_pilot,
    pilot_layout,
    read_pilot,
    shard_paths,
    split_pilot,
    threshold_message,
    with_pilot,
)
from claude_batch.preflight import check_model, check_storage_root, check_workload_source
from claude_batch.recovery import RecoveryReport, recover_stranded
from claude_batch.results import collect_results
from claude_batch.staging import (
    Manifest,
    StagingLimits,
    read_manifest,
    restrict_to_claimed,
    stage_requests,
)
from claude_batch.storage import ObjectStore, RunLayout
from claude_batch.triggers import DEFAULT_BATCH_TIMEOUT
from claude_batch.validation import validate_part
from claude_batch.warehouse import (
    RECORD_KEY_COLUMN,
    AccountingError,
    ClaimResult,
    LoadSummary,
    SourceSpec,
    Warehouse,
)
from claude_batch.workloads import Workload

if TYPE_CHECKING:
    from claude_batch.alerts import NotifierSpec

__all__ = ["PipelineConfig", "RunOptions", "SourceSpec", "claude_batch_dag", "claude_batch_pipeline"]

DEFAULT_POOL = "claude_batch"


class BudgetExceeded(RuntimeError):
    """The run's cost estimate is over the budget it was given; nothing was submitted."""


class NothingToSubmit(RuntimeError):
    """Every item this run staged is held by another live run (or became final): the run skips."""


class PilotFailed(RuntimeError):
    """The pilot sample's validation pass rate is under the threshold; nothing else was submitted."""


@dataclass(frozen=True)
class PipelineConfig:
    """Everything a workload's pipeline needs; every knob has a default.

    :param workload: the task spec.
    :param source: where its rows live (table or trusted query, key and interval columns).
    :param warehouse_conn_id: an Airflow connection: ``duckdb`` (host = database file) or any
        common.sql connection (e.g. ``postgres``).
    :param anthropic_conn_id: the ``anthropic`` connection.
    :param aws_conn_id: the ``aws`` connection for an ``s3://`` storage root.
    :param storage_root: ``s3://bucket/prefix`` (default: ``CLAUDE_BATCH_STORAGE_ROOT``).
    :param staging_limits: requests and bytes per shard.
    :param pool: the Airflow pool bounding concurrent submissions (size it for the API's queue).
    :param allowed_models: models a UI trigger may choose (default: the workload's).
    :param min_poll_interval: the first polling interval of the wait (default
        ``CLAUDE_BATCH_MIN_POLL_SECONDS`` or 30; the demo and tests shorten it).
    :param max_poll_interval: the ceiling the polling interval backs off to.
    :param batch_timeout: seconds from each batch's submission after which the wait cancels it,
        collects what it answered and leaves the rest to the next round (default 23 hours;
        None: only the API's 24-hour expiry).
    :param max_rounds: how often a run goes round (submit, wait, collect, load): round 2 and
        later resend this run's items left ``retry`` (expired, canceled, transient errors) until
        every item is final or out of attempts (default 3; 1: no follow-up rounds).
    :param run_deadline_hours: no follow-up round starts this long after the run started (the
        items stay ``retry`` for the next run); None: no bound but ``max_rounds``.
    :param queue_budget: requests in the organisation's batch processing queue a submit may
        bring it to (all DAGs and runs share it; read from the API); None: only the API's own
        queue-full 429 (default ``CLAUDE_BATCH_QUEUE_BUDGET`` if set). A shard that does not fit
        waits deferred, holding no worker slot.
    :param queue_wait_timeout: how long a shard waits for room in the queue before its submit
        fails naming the queue (default 20 hours).
    :param queue_poll_interval: seconds between the queue readings of a shard waiting for room
        (default 60; the benchmarks shorten it, as the emulator runs in fast time).
    :param pilot_approval: the default of the ``pilot_approval`` Param: after a pilot, a person
        approves the full run (``pilot_approval`` task, Airflow's human-in-the-loop approval)
        instead of the pass-rate threshold deciding.
    :param pilot_approval_timeout: seconds to wait for that answer; past it the full run is
        rejected (its items given back). None: wait until someone answers.
    :param prices: the price table.
    """

    workload: Workload
    source: SourceSpec
    warehouse_conn_id: str = "claude_batch_warehouse"
    anthropic_conn_id: str = "anthropic_default"
    aws_conn_id: str | None = "aws_default"
    storage_root: str | None = None
    staging_limits: StagingLimits = field(default_factory=StagingLimits)
    pool: str = DEFAULT_POOL
    allowed_models: tuple[str, ...] = ()
    min_poll_interval: float = field(
        default_factory=lambda: float(os.environ.get("CLAUDE_BATCH_MIN_POLL_SECONDS", "30"))
    )
    max_poll_interval: float = 600.0
    batch_timeout: float | None = DEFAULT_BATCH_TIMEOUT
    max_rounds: int = 3
    run_deadline_hours: float | None = 20.0
    queue_budget: int | None = None
    queue_wait_timeout: float | None = 20 * 3600.0
    queue_poll_interval: float = DEFAULT_QUEUE_POLL_INTERVAL
    pilot_approval: bool = False
    pilot_approval_timeout: float | None = 24 * 3600.0
    prices: PriceTable = field(default_factory=default_prices)

    def __post_init__(self) -> None:
        if not 1 <= self.max_rounds <= 10:
            raise ValueError(f"max_rounds must be 1..10, not {self.max_rounds}")

    @property
    def models(self) -> tuple[str, ...]:
        return self.allowed_models or self.workload.models

    def root(self) -> str:
        root = self.storage_root or os.environ.get("CLAUDE_BATCH_STORAGE_ROOT")
        if not root:
            raise ValueError("No storage root: set storage_root or CLAUDE_BATCH_STORAGE_ROOT")
        return root


@dataclass(frozen=True)
class RunOptions:
    """What one run was asked for (the DAG's Params, validated there first).

    :param model: override the workload's model (must be one of the allowed models).
    :param row_limit: stage at most this many rows (0: no limit).
    :param dry_run: extract, stage and estimate; submit nothing.
    :param pilot_size: first send this many requests alone; stop if they validate poorly (their
        answers are kept: the full run sends only the rest).
    :param pilot_min_pass_rate: the share of valid pilot answers needed to go on.
    :param pilot_approval: after the pilot, a person decides whether the full run goes on (shown
        the pass rate, sample answers and the estimate) instead of ``pilot_min_pass_rate``.
    :param budget_usd: refuse to submit when the estimate is above this (0: no budget).
    :param window_start: overrides the data interval's start (a date), with ``window_end``.
    :param window_end: overrides the data interval's end (exclusive).
    """

    model: str | None = None
    row_limit: int = 0
    dry_run: bool = False
    pilot_size: int = 0
    pilot_min_pass_rate: float = 0.8
    pilot_approval: bool = False
    budget_usd: float = 0.0
    window_start: str | None = None
    window_end: str | None = None

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> RunOptions:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in known and v not in ("", None)})


def effective_workload(config: PipelineConfig, options: RunOptions) -> Workload:
    """The workload as this run sends it (a chosen model changes the prompt version)."""
    if not options.model or options.model == config.workload.model:
        return config.workload
    check_model(options.model, config.models)
    return dataclasses.replace(config.workload, model=options.model)


def run_interval(options: RunOptions, start: Any, end: Any) -> tuple[Any, Any] | None:
    """The rows' time window: the Params' window if given, else the run's data interval."""
    if options.window_start or options.window_end:
        if not (options.window_start and options.window_end):
            raise ValueError(
                "Give both window_start and window_end, or neither (then the data interval applies)."
            )
        window = (datetime.fromisoformat(options.window_start), datetime.fromisoformat(options.window_end))
        if window[0] >= window[1]:
            raise ValueError(
                f"window_start {options.window_start} must be before window_end {options.window_end}."
            )
        return window
    if start is None or end is None:
        return None
    return (_naive_utc(start), _naive_utc(end))


def _naive_utc(moment: Any) -> datetime:
    # Warehouse timestamps are compared as naive UTC (TIMESTAMP without time zone).
    moment = datetime.fromisoformat(str(moment)) if not isinstance(moment, datetime) else moment
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment


# --- the plain-Python steps ---------------------------------------------------------------


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
    log = log or _task_log()
    workload = effective_workload(config, options)
    staged = read_manifest(layout)
    if staged is not None and staged.prompt_version == workload.prompt_version:
        if staged.staged_requests and "cache_plan" not in (staged.estimate or {}):
            observations = warehouse.recent_cache_observations(workload)
            decision = decide_caching(workload, observations, config.prices)
            decision.setting, decision.probe_setting = staged.cache_setting, None
            staged = estimate_run(layout, staged, workload, decision, observations, config.prices,
                                  key_column=RECORD_KEY_COLUMN, log=log)  # fmt: skip
        return _stage_summary(staged)
    # Mistakes in the source or the template fail here, naming the cause, before any row is read.
    check_workload_source(
        warehouse.source_columns(config.source), workload, config.source, dialect_name=warehouse.dialect.name
    )
    warehouse.ensure_tables(workload)
    observations = warehouse.recent_cache_observations(workload)
    decision = decide_caching(workload, observations, config.prices)
    rate = decision.hit_rate(decision.setting)
    rows = warehouse.extract(workload, config.source, layout.run_id, interval)
    if options.row_limit:
        rows = itertools.islice(rows, options.row_limit)
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
        manifest = estimate_run(layout, manifest, workload, decision, observations, config.prices, sample=sample,
                                client=client, key_column=RECORD_KEY_COLUMN, log=log)  # fmt: skip
    return _stage_summary(manifest)


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
            "Recovered items of runs that are over: batches collected %s, items released %s, still waiting %s.",
            report.collected, report.released, report.waiting,
        )  # fmt: skip
    return report


def _stage_summary(manifest: Manifest) -> dict[str, Any]:
    low, high = _estimate_band(manifest)
    return {
        "extracted": manifest.extracted_rows,
        "staged": manifest.staged_requests,
        "rejected": manifest.rejected_rows,
        "shards": len(manifest.shards),
        "cache_setting": manifest.cache_setting,
        "cache_probe": ((manifest.estimate or {}).get("cache_plan") or {}).get("probe"),
        "estimated_cost_usd": _estimated_cost(manifest),
        "estimated_cost_low_usd": low,
        "estimated_cost_high_usd": high,
    }


def _estimated_cost(manifest: Manifest) -> float:
    """The run's expected cost in batches (see :mod:`claude_batch.estimates`)."""
    return float((manifest.estimate or {}).get("cost_usd_expected", 0.0))


def _estimate_band(manifest: Manifest) -> tuple[float, float]:
    """(low, high) of the estimate; an estimate without a band (an older manifest) is its own band."""
    estimate = manifest.estimate or {}
    expected = _estimated_cost(manifest)
    return float(estimate.get("cost_usd_low", expected)), float(estimate.get("cost_usd_high", expected))


def _claim(
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
    manifest = _manifest(layout)
    workload = effective_workload(config, options)
    cost = _estimated_cost(manifest)
    low, high = _estimate_band(manifest)
    log.info(
        "Staged %s requests in %d shard(s) (%s rejected); estimated batch cost $%.4f, between $%.4f and $%.4f "
        "(cache %s).",
        f"{manifest.staged_requests:,}",
        len(manifest.shards),
        f"{manifest.rejected_rows:,}",
        cost,
        low,
        high,
        manifest.cache_setting,
    )
    if options.dry_run:
        write_report(layout, {"dry_run": True, "estimate": manifest.estimate, **_stage_summary(manifest)})
        return []
    # The budget refuses a run only when its estimate is over it even at the low end of its band
    # (see claude_batch.estimates); one whose band merely reaches over it goes on, with a warning.
    if options.budget_usd and low > options.budget_usd:
        raise BudgetExceeded(
            f"The estimated cost ${cost:.4f} (between ${low:.4f} and ${high:.4f}) is over this run's budget "
            f"${options.budget_usd:.4f}; nothing was submitted. Even the low end of the estimate is over it: raise "
            "the budget, lower row_limit, or choose a cheaper model."
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
    manifest, claim = _claim(warehouse, workload, layout, manifest)
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
        pilot, _ = _claim(warehouse, workload, pilot_layout(layout), pilot)
        return exclude_pilot(layout, manifest, pilot)
    if not options.pilot_size or not manifest.shards:
        return manifest
    if options.pilot_size >= manifest.staged_requests:
        log.info(
            "The pilot of %s request(s) would be the whole run (%s staged): no pilot, the run goes as a whole.",
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
    manifest = _manifest(layout)
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
    pilot = _manifest(pilot_layout(layout))
    rest = _manifest(layout)
    verdict = judge_pilot(pilot_layout(layout), pilot)
    threshold = options.pilot_min_pass_rate
    approval = bool(options.pilot_approval and options.pilot_size)
    log.info(
        "Pilot batch(es) %s: %d of %d answers valid (%.0f%%), threshold %.0f%%; failures %s; %s.",
        verdict.batch_ids, verdict.valid, verdict.judged, verdict.pass_rate * 100, threshold * 100,
        verdict.failures, "a person decides" if approval else "the threshold decides",
    )  # fmt: skip
    decision = {**verdict.to_dict(), "threshold": threshold, "approval": approval,
                "rest_requests": rest.staged_requests, "rest_estimated_cost_usd": _estimated_cost(rest)}  # fmt: skip
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
        first = _manifest(layout.in_round(1))
        age = datetime.now(UTC) - datetime.fromisoformat(first.created_at)
        if config.run_deadline_hours is not None and age > timedelta(hours=config.run_deadline_hours):
            log.info("Run %s staged %s ago, past its %sh deadline: no round %d; its retries wait for "
                     "the next run.", layout.run_id, age, config.run_deadline_hours, layout.round)  # fmt: skip
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
        staged, _ = _claim(warehouse, workload, layout, staged)
        log.info("Round %d of run %s: %s item(s) back from retry, %s request(s) in %d shard(s).", layout.round,
                 layout.run_id, f"{taken:,}", f"{staged.staged_requests:,}", len(staged.shards))  # fmt: skip
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
    manifest = _manifest(layout)
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
    manifest = _manifest(layout)
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
    manifest = _manifest(layout)
    first_layout = layout.in_round(1)
    # The run as a whole: round 1's manifest with its pilot's shards (the pilot's items are the run's).
    first = with_pilot(first_layout, manifest if layout.round == 1 else _manifest(first_layout))
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


def _tokens_by_model(layout: RunLayout, collected: list[Mapping[str, Any]]) -> dict[str, TokenTotals] | None:
    """Every billed token of the run by answering model, read from the results Parquet its collects wrote.

    None when a part cannot be read (the costs then apportion the run's totals).
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    names = [
        "model",
        "input_tokens",
        "output_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    ]
    totals: dict[str, TokenTotals] = {}
    try:
        for part in collected:
            path = (part.get("collected") or {}).get("results_parquet")
            if not path:
                return None
            with layout.store.open(path, "rb") as handle:
                table = pq.read_table(handle, columns=names)
            table = table.filter(pc.is_valid(table.column("model")))
            for row in table.group_by("model").aggregate([(name, "sum") for name in names[1:]]).to_pylist():
                found = TokenTotals(*(int(row[f"{name}_sum"] or 0) for name in names[1:]))
                totals[row["model"]] = totals.get(row["model"], TokenTotals()) + found
    except (OSError, KeyError, ValueError):
        return None
    return totals


def report_costs(
    manifest: Manifest,
    load: Mapping[str, Any],
    prices: PriceTable,
    by_model: Mapping[str, TokenTotals] | None = None,
) -> dict[str, Any]:
    """The report's cost section (the definitions: :class:`claude_batch.costs.RunCosts`).

    :param load: the run's load totals (a ``LoadSummary`` as a dict).
    :param by_model: billed tokens by model; without it a one-model run uses its totals (exact) and a
        multi-model run apportions them by its staged requests per model (``exact`` False).
    """
    total = TokenTotals(
        int(load["input_tokens"]), int(load["output_tokens"]),
        int(load["cache_creation_input_tokens"]), int(load["cache_read_input_tokens"]),
    )  # fmt: skip
    exact = True
    if not by_model:
        per_model = (manifest.estimate or {}).get("per_model") or {}
        shares = {model: entry.get("requests", 0) for model, entry in per_model.items()}
        by_model = apportion_tokens(total, shares or dict.fromkeys(manifest.models or ["unknown"], 1))
        exact = len(by_model) <= 1
    return run_costs(float(load["cost_usd"]), by_model, prices, manifest.estimate, exact=exact).to_dict()


def build_report(
    layout: RunLayout,
    loaded: Mapping[str, Any],
    collected: list[Mapping[str, Any]],
    prices: PriceTable,
    pilot: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The run report: counts per outcome, what the run cost and saved, the estimate, caching, durations.

    ``costs`` holds the definitions (:class:`claude_batch.costs.RunCosts`): the actual cost; the
    same tokens as plain real-time calls without caching (also ``realtime_cost_usd``); the same
    tokens in batches without caching; the saving from batching and the saving (or, negative, the
    loss) from caching, apart; the estimate beside the actual, with the gap. ``saving_usd`` is the
    saving against plain real-time calls: batching and caching together.

    :param pilot: the pilot's decision (``pilot_decide``), if the run had a pilot; its tokens and
        cost are in ``loaded`` already, its requests in ``staged``.
    """
    manifest = with_pilot(layout, _manifest(layout))
    load = loaded["load"]
    cost = float(load["cost_usd"])
    cache_read = int(load["cache_read_input_tokens"])
    cache_write = int(load["cache_creation_input_tokens"])
    durations = [c["batch_seconds"] for c in collected if c.get("batch_seconds") is not None]
    by_model = _tokens_by_model(layout, collected) if len(manifest.models) > 1 else None
    costs = report_costs(manifest, load, prices, by_model)
    plan = (manifest.estimate or {}).get("cache_plan") or {}
    return {
        "workload": manifest.workload,
        "dag_id": layout.dag_id,
        "run_id": layout.run_id,
        "prompt_version": manifest.prompt_version,
        "models": manifest.models,
        "cache_setting": manifest.cache_setting,
        "extracted": manifest.extracted_rows,
        "staged": manifest.staged_requests,
        "rejected": manifest.rejected_rows,
        "rejected_by_reason": manifest.rejected_by_reason,
        "ledger": loaded["ledger"],
        "batches": len(collected),
        "rounds": loaded.get("rounds", []),
        "tokens": {
            "input": int(load["input_tokens"]),
            "output": int(load["output_tokens"]),
            "cache_write": cache_write,
            "cache_read": cache_read,
        },
        "cost_usd": round(cost, 6),
        "realtime_cost_usd": costs["realtime_uncached_usd"],
        "saving_usd": costs["saving_usd"],
        "estimated_cost_usd": _estimated_cost(manifest),
        "costs": costs,
        "cache": {
            "policy": plan.get("policy"),
            "setting": manifest.cache_setting,
            "reason": plan.get("reason"),
            "probe": plan.get("probe"),
            "evidence": plan.get("evidence"),
        },
        "cache_hit_rate": round(cache_read / (cache_read + cache_write), 4)
        if cache_read + cache_write
        else None,
        "batch_seconds": {"max": max(durations), "mean": sum(durations) / len(durations)}
        if durations
        else None,
        "pilot": _pilot_summary(pilot),
        "reported_at": datetime.now(UTC).isoformat(),
    }


def _pilot_summary(decision: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not decision:
        return None
    keys = (
        "requests",
        "valid",
        "judged",
        "pass_rate",
        "threshold",
        "failures",
        "approval",
        "batch_ids",
        "cost_usd",
    )
    return {key: decision.get(key) for key in keys}


def write_report(layout: RunLayout, report: Mapping[str, Any]) -> None:
    layout.store.write_json(layout.report, dict(report))


def _manifest(layout: RunLayout) -> Manifest:
    manifest = read_manifest(layout)
    if manifest is None:
        raise FileNotFoundError(
            f"No manifest at {layout.store.uri(layout.manifest)}: the stage task has not run."
        )
    return manifest


# --- the Airflow shell ---------------------------------------------------------------------


def _context_layout(config: PipelineConfig, aws_conn_id: str | None, round_number: int = 1) -> RunLayout:
    from airflow.sdk import get_current_context

    context = get_current_context()
    store = ObjectStore.from_airflow(config.root(), aws_conn_id)
    return RunLayout(store, context["dag"].dag_id, context["run_id"], round_number)


def _context_options() -> RunOptions:
    from airflow.sdk import get_current_context

    return RunOptions.from_params(get_current_context()["params"])


def claude_batch_pipeline(config: PipelineConfig, group_id: str | None = None):
    """A TaskGroup running ``config.workload`` from warehouse to warehouse; call inside a DAG.

    :func:`claude_batch_dag` lays the same tasks out at the DAG's top level instead; in a DAG of
    your own the group keeps them apart from your tasks (and from a second workload's).

    :param config: the pipeline's settings.
    :param group_id: the group's id (default: the workload's name).
    :returns: the TaskGroup (its last task is the report).
    """
    return _pipeline_tasks(config, group_id or config.workload.name)


def _pipeline_tasks(config: PipelineConfig, group_id: str | None):
    """The pipeline's tasks: in a TaskGroup ``group_id``, or at the DAG's top level (``None``).

    :returns: the TaskGroup, or (top level) the report task.
    """
    import contextlib

    from airflow.sdk import Asset, TaskGroup, get_current_context, task
    from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

    from claude_batch.hooks import ClaudeBatchHook
    from claude_batch.operators import ClaudeBatchOperator
    from claude_batch.pilot import PilotApprovalOperator
    from claude_batch.sensors import ClaudeBatchSensor

    results_asset = Asset(
        name=f"claude_batch.{config.workload.name}_results",
        uri=f"claude-batch://{config.warehouse_conn_id}/{config.workload.results_table}",
    )

    with TaskGroup(group_id) if group_id else contextlib.nullcontext() as group:
        prefix = f"{group.group_id}." if group is not None else ""  # how the tasks find each other

        # Every stage is idempotent for its run (same S3 keys, upserts, two-phase submit state), so
        # a transient fault (S3, the warehouse, the API) is retried; decisions fail at once.
        @task(task_id="stage", retries=2, retry_delay=timedelta(seconds=30))
        def stage() -> dict[str, Any]:
            context = get_current_context()
            options = _context_options()
            interval = run_interval(
                options, context.get("data_interval_start"), context.get("data_interval_end")
            )
            layout = _context_layout(config, config.aws_conn_id)
            hook = ClaudeBatchHook(conn_id=config.anthropic_conn_id)
            try:
                with open_warehouse(config.warehouse_conn_id) as warehouse:
                    run_recover(
                        config, warehouse, layout, options, hook.conn, _dag_run_state(context), _task_log()
                    )
                    staged = run_stage(
                        config, warehouse, layout, options, interval, client=hook.conn, log=_task_log()
                    )
            except Exception as exc:
                _note(
                    context, notes.error_note("stage", exc)
                )  # the run's note says why (a retry rewrites it)
                raise
            _note(context, notes.staged_note(staged))
            return staged

        @task(task_id="gate", retries=2, retry_delay=timedelta(seconds=30))
        def gate(staged: dict[str, Any]) -> list[str]:
            options = _context_options()
            layout = _context_layout(config, config.aws_conn_id)
            hook = ClaudeBatchHook(conn_id=config.anthropic_conn_id)
            try:
                with open_warehouse(config.warehouse_conn_id) as warehouse:
                    shards = run_gate(config, warehouse, layout, options, hook.conn, hook, _task_log())
            except BudgetExceeded as exc:
                _note(get_current_context(), notes.refused_note(str(exc)))
                raise AirflowFailException(str(exc)) from exc  # a decision, not a fault: no retry
            except NothingToSubmit as exc:
                _note(get_current_context(), notes.nothing_note(str(exc)))
                raise AirflowSkipException(str(exc)) from exc
            if not shards:
                if options.dry_run:
                    _note(
                        get_current_context(),
                        notes.dry_run_note(staged, effective_workload(config, options).model),
                    )
                    reason = "dry run: estimate written to report.json"
                else:
                    reason = "nothing to submit (no rows, or the run is already complete)"
                    _note(
                        get_current_context(),
                        notes.nothing_note(f"{reason}; staged {staged['staged']:,} requests."),
                    )
                raise AirflowSkipException(f"{reason}; staged {staged['staged']:,} requests.")
            return shards

        def task_name(base: str, number: int) -> str:
            """``submit`` (round 1), ``submit_N`` (round N), ``pilot_submit`` (the pilot, round 0)."""
            return f"pilot_{base}" if number == 0 else base if number == 1 else f"{base}_{number}"

        def send(number: int, shards: Any, **submit_kwargs: Any) -> tuple[Any, Any]:
            """Submit, record, wait and collect round ``number``'s shards; returns (submit, collect outputs)."""
            submit = ClaudeBatchOperator.partial(
                task_id=task_name("submit", number),
                storage_root=config.storage_root,
                conn_id=config.anthropic_conn_id,
                aws_conn_id=config.aws_conn_id,
                wait="none",
                queue_budget=config.queue_budget,
                queue_wait_timeout=config.queue_wait_timeout,
                queue_poll_interval=config.queue_poll_interval,
                pool=config.pool,
                retries=3,
                retry_delay=timedelta(seconds=30),
                **submit_kwargs,
            ).expand(shard=shards)

            @task(task_id=task_name("record", number), retries=2, retry_delay=timedelta(seconds=30))
            def record(batch_ids: list[str]) -> int:
                layout = _context_layout(config, config.aws_conn_id, number)
                with open_warehouse(config.warehouse_conn_id) as warehouse:
                    return run_record_batches(config, warehouse, layout, _context_options(), list(batch_ids))

            wait = ClaudeBatchSensor(
                task_id=task_name("wait", number),
                batch_ids=submit.output,
                conn_id=config.anthropic_conn_id,
                min_poll_interval=config.min_poll_interval,
                max_poll_interval=config.max_poll_interval,
                batch_timeout=config.batch_timeout,
                # A batch past its timeout is canceled and collected: its answers are kept and the
                # rest goes round again, instead of failing the run and stranding the items.
                on_timeout="cancel_and_collect",
                skip_if_all_canceled=False,  # canceled requests must still reach the ledger (retry)
            )

            @task(task_id=task_name("collect", number), retries=3, retry_delay=timedelta(seconds=30))
            def collect(batch_id: str) -> dict[str, Any]:
                context = get_current_context()
                layout = _context_layout(config, config.aws_conn_id, number)
                hook = ClaudeBatchHook(conn_id=config.anthropic_conn_id)
                part = _part_of(layout, context["ti"].map_index)
                return run_collect(config, layout, _context_options(), hook.conn, part, batch_id)

            collected = collect.expand(batch_id=submit.output)
            record(submit.output) >> wait >> collected
            return submit, collected

        def one_round(number: int, shards: Any, previous: Any, **submit_kwargs: Any) -> tuple[Any, Any]:
            """Submit, record, wait, collect and load one round; returns (submit, load output)."""
            submit, collected = send(number, shards, **submit_kwargs)

            @task(task_id=f"load{'' if number == 1 else f'_{number}'}", outlets=[results_asset], retries=2,
                  retry_delay=timedelta(seconds=30))  # fmt: skip
            def load(collected: list[dict[str, Any]], previous: dict[str, Any] | None) -> dict[str, Any]:
                layout = _context_layout(config, config.aws_conn_id, number)
                if number == 1:  # round 1 goes on from the pilot's load (None: no pilot)
                    previous = get_current_context()["ti"].xcom_pull(task_ids=f"{prefix}pilot_load")
                try:
                    with open_warehouse(config.warehouse_conn_id) as warehouse:
                        result = run_load(config, warehouse, layout, _context_options(), previous)
                except AccountingError as exc:
                    _note(get_current_context(), notes.error_note(task_name("load", number), exc))
                    raise AirflowFailException(
                        str(exc)
                    ) from exc  # the gap is in the data: a retry cannot close it
                result["collected"] = [*(previous or {}).get("collected", []), *collected]
                # Downstream DAGs scheduled on the results table see what the run loaded and cost so far.
                context = get_current_context()
                context["outlet_events"][results_asset].extra = notes.cost_summary(
                    result, run_id=context["run_id"], workload=config.workload.name
                )
                return result

            return submit, load(collected, previous)

        # The pilot: a round of its own (round 0), then the decision; it all skips without a pilot.
        @task(task_id="pilot", retries=2, retry_delay=timedelta(seconds=30))
        def pilot(shards: list[str]) -> list[str]:
            pilot_shards = run_pilot_shards(
                config, _context_layout(config, config.aws_conn_id), _context_options()
            )
            if not pilot_shards:
                raise AirflowSkipException("no pilot (pilot_size 0, or as large as the run): round 1 goes on")
            return pilot_shards

        @task(task_id="pilot_load", retries=2, retry_delay=timedelta(seconds=30))
        def pilot_load(collected: list[dict[str, Any]]) -> dict[str, Any]:
            layout = _context_layout(config, config.aws_conn_id, 0)
            with open_warehouse(config.warehouse_conn_id) as warehouse:
                result = run_pilot_load(config, warehouse, layout, _context_options())
            result["collected"] = list(collected)
            return result

        @task(task_id="pilot_decide", retries=2, retry_delay=timedelta(seconds=30))
        def pilot_decide(loaded: dict[str, Any]) -> dict[str, Any]:
            layout = _context_layout(config, config.aws_conn_id)
            try:
                with open_warehouse(config.warehouse_conn_id) as warehouse:
                    return run_pilot_decide(config, warehouse, layout, _context_options(), _task_log())
            except PilotFailed as exc:
                _note(get_current_context(), notes.pilot_failed_note(str(exc)))
                raise AirflowFailException(str(exc)) from exc  # a decision, not a fault: no retry

        def release_on_reject(context: Any, reason: str) -> int:
            layout = _context_layout(config, config.aws_conn_id)
            with open_warehouse(config.warehouse_conn_id) as warehouse:
                return run_release(
                    config, warehouse, layout, _context_options(), f"released: {reason}", _task_log()
                )

        gated = gate(stage())
        _, pilot_collected = send(0, pilot(gated))
        decided = pilot_decide(pilot_load(pilot_collected))
        approval = PilotApprovalOperator(
            task_id="pilot_approval",
            decision_task_id=f"{prefix}pilot_decide",
            on_reject=release_on_reject,
            response_timeout=(
                timedelta(seconds=config.pilot_approval_timeout) if config.pilot_approval_timeout else None
            ),
        )
        decided >> approval
        # Round 1 goes on after the decision, or without it when there was no pilot (skipped);
        # it skips with the gate, and not at all when the pilot failed or was rejected.
        first_submit, loaded = one_round(1, gated, None, trigger_rule="none_failed_min_one_success")
        [decided, approval] >> first_submit
        load_tasks = [loaded]
        for number in range(2, config.max_rounds + 1):

            @task(task_id=f"requeue_{number}", retries=2, retry_delay=timedelta(seconds=30))
            def requeue(previous: dict[str, Any], number: int = number) -> list[str]:
                layout = _context_layout(config, config.aws_conn_id, number)
                with open_warehouse(config.warehouse_conn_id) as warehouse:
                    shards = run_requeue(config, warehouse, layout, _context_options(), _task_log())
                if not shards:
                    left = previous["ledger"].get("retry", 0)
                    raise AirflowSkipException(
                        f"no round {number}: "
                        + (
                            f"{left:,} item(s) left to retry by the next run"
                            if left
                            else "every item is final"
                        )
                    )
                return shards

            _, loaded = one_round(number, requeue(loaded), loaded)
            load_tasks.append(loaded)

        # The report comes after the last round that ran: later rounds skip when nothing was left.
        @task(task_id="report", trigger_rule="none_failed_min_one_success")
        def report(first: dict[str, Any]) -> dict[str, Any]:
            context = get_current_context()
            later = [
                context["ti"].xcom_pull(task_ids=task_id)
                for task_id in [f"{prefix}load_{n}" for n in range(2, config.max_rounds + 1)]
            ]
            loaded = [result for result in [first, *later] if result][-1]
            layout = _context_layout(config, config.aws_conn_id)
            decision = context["ti"].xcom_pull(task_ids=f"{prefix}pilot_decide")
            result = build_report(layout, loaded, list(loaded.get("collected", [])), config.prices, decision)
            write_report(layout, result)
            _emit_metrics(config.workload.name, result)
            _note(context, notes.report_note(result))  # the run's note, once the run ends
            log = _task_log()
            log.info("Run report: %s", orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
            return result

        report_task = report(load_tasks[0])
        for later_load in load_tasks[1:]:
            later_load >> report_task
    return group if group is not None else report_task


def _note(context: Any, text: str) -> None:
    """Say what the run did so far; its newest line becomes the run's note when it ends (:mod:`claude_batch.notes`)."""
    try:
        context["ti"].xcom_push(key=notes.NOTE_KEY, value=text)
    except Exception as exc:  # a note is never worth failing a task for
        _task_log().warning("Could not record the run's note (%s): %s", exc, text)


def _dag_run_state(context: Any) -> Callable[[str, str], str | None]:
    """``(dag_id, run_id) -> state`` from Airflow's API server (None when it cannot say)."""

    def state(dag_id: str, run_id: str) -> str | None:
        try:
            found = context["ti"].get_dagrun_state(dag_id=dag_id, run_id=run_id)
            return str(getattr(found, "value", found))  # a DagRunState enum: its value, "failed"
        except Exception as exc:  # a run Airflow no longer knows, or no answer: leave its items alone
            _task_log().warning(
                "Could not read the state of run %s of %s (%s); its items stay held.", run_id, dag_id, exc
            )
            return None

    return state


def _part_of(layout: RunLayout, map_index: int) -> int:
    """The shard part a mapped task works on (map index i is the manifest's i-th shard)."""
    return _manifest(layout).shards[max(map_index, 0)].part


def _task_log():
    import logging

    return logging.getLogger("airflow.task")


def _emit_metrics(workload: str, report: Mapping[str, Any]) -> None:
    """Counts, cost and durations as Airflow metrics (StatsD or OpenTelemetry, as configured)."""
    from airflow.sdk.observability.stats import Stats

    tags = {"workload": workload}
    for status, count in (report.get("ledger") or {}).items():
        Stats.gauge(f"claude_batch.items.{status}", count, tags=tags)
    Stats.gauge("claude_batch.cost_usd", report["cost_usd"], tags=tags)
    # The report's definitions (claude_batch.costs.RunCosts): savings against plain real-time calls.
    costs = report.get("costs") or {}
    Stats.gauge("claude_batch.saving_usd", report["saving_usd"], tags=tags)
    for name in (
        "realtime_uncached_usd",
        "batch_uncached_usd",
        "saving_from_batching_usd",
        "saving_from_caching_usd",
    ):
        if costs.get(name) is not None:
            Stats.gauge(f"claude_batch.{name}", costs[name], tags=tags)
    gap = (costs.get("estimate") or {}).get("gap_pct")
    if gap is not None:
        Stats.gauge("claude_batch.estimate_gap_pct", gap, tags=tags)
    if report.get("batch_seconds"):
        Stats.timing(
            "claude_batch.batch_duration", timedelta(seconds=report["batch_seconds"]["max"]), tags=tags
        )


# The trigger form's sections after its first, in the order the form shows them. The first
# (what to send) has no section of its own: Airflow's form opens only its default section
# ("Run Parameters") and shows the others collapsed, to be opened when wanted.
PARAM_SECTIONS = ("Cost and dry run", "Pilot run")


def run_params(config: PipelineConfig, default_row_limit: int = 0) -> dict[str, Any]:
    """The Params a UI trigger shows as a form; Airflow validates them before the run starts.

    Each has a title and a description; the cost and pilot fields have a section of the form
    each (:data:`PARAM_SECTIONS`). The keys stay the names a REST trigger's ``conf`` and
    ``airflow dags test --conf`` use.
    """
    from airflow.sdk import Param

    cost, pilot = PARAM_SECTIONS
    models = list(config.models)
    return {
        "model": Param(
            config.workload.model,
            type="string",
            enum=models,
            values_display={model: _model_title(model) for model in models},
            title="Model",
            description=f"The model every request goes to (the workload's own: {config.workload.model}). "
            "Another model is another prompt version: its rows are sent again.",
        ),
        "row_limit": Param(
            default_row_limit,
            type="integer",
            minimum=0,
            maximum=10_000_000,
            title="Row limit",
            description="Send at most this many rows of the interval (0: all of them).",
        ),
        "window_start": Param(
            None,
            type=["null", "string"],
            format="date",
            title="From date",
            description="Take the rows from this date on instead of the run's data interval (give both dates).",
        ),
        "window_end": Param(
            None,
            type=["null", "string"],
            format="date",
            title="To date (exclusive)",
            description="Take the rows before this date (with From date).",
        ),
        "dry_run": Param(
            False,
            type="boolean",
            title="Dry run",
            description="Extract the rows and estimate the cost; submit nothing. The run's note gives the estimate.",
            section=cost,
        ),
        "budget_usd": Param(
            0.0,
            type="number",
            minimum=0,
            title="Budget (USD)",
            description="Refuse to submit when the estimated cost is above this many dollars (0: no budget).",
            section=cost,
        ),
        "pilot_size": Param(
            0,
            type="integer",
            minimum=0,
            maximum=10_000,
            title="Pilot size",
            description="Send this many requests first, on their own, and go on only if they validate (0: no pilot).",
            section=pilot,
        ),
        "pilot_min_pass_rate": Param(
            0.8,
            type="number",
            minimum=0,
            maximum=1,
            title="Pilot pass rate",
            description="The share of pilot answers (0 to 1) that must pass validation for the run to go on.",
            section=pilot,
        ),
        "pilot_approval": Param(
            config.pilot_approval,
            type="boolean",
            title="A person approves the pilot",
            description="After the pilot, a person sees its answers and the full run's cost estimate and decides "
            "(instead of the pass rate).",
            section=pilot,
        ),
    }


def _model_title(model: str) -> str:
    """``claude-haiku-4-5`` -> ``Claude Haiku 4.5`` (the form's label; the value stays the id)."""
    words = model.split("-")
    if words[:1] != ["claude"]:
        return model
    name = [w.capitalize() for w in words if not w.isdigit()]
    version = [w for w in words if w.isdigit() and len(w) <= 2]  # not a snapshot's date
    return " ".join(name) + (f" {'.'.join(version)}" if version else "")


def claude_batch_dag(
    config: PipelineConfig,
    *,
    dag_id: str | None = None,
    schedule: Any = "@daily",
    start_date: datetime,
    max_active_runs: int = 2,
    deadline_hours: float | None = None,
    notifiers: Sequence[NotifierSpec] | None = None,
    tags: tuple[str, ...] = ("claude-batch",),
    **dag_kwargs: Any,
):
    """A whole DAG for one workload: Params form, schedule, bounded concurrency, alerts.

    Its tasks sit at the DAG's top level (the grid shows each as a row). A run that fails and a
    run past its deadline are told to ``notifiers``; each run's outcome and cost become its note.

    :param config: the pipeline's settings.
    :param dag_id: the DAG id (default: the workload's name).
    :param schedule: the schedule; data intervals select the rows, so backfills work.
    :param start_date: the first data interval's start.
    :param max_active_runs: runs at once (each may hold many batches).
    :param deadline_hours: alert when a run is still not done this long after it was queued
        (default ``CLAUDE_BATCH_DEADLINE_HOURS`` or 20; 0 turns the alert off). ``dag.test()`` in
        Airflow 3.3 fails on DAGs with deadline alerts, so tests and the demo set it to 0.
    :param notifiers: where the failure and deadline alerts go (:mod:`claude_batch.alerts`:
        ``email(...)``, ``notifier(AnyNotifier, ...)``); default
        :func:`~claude_batch.alerts.default_notifiers` (logged; e-mailed when
        ``CLAUDE_BATCH_ALERT_EMAIL`` is set); ``[]``: no alerts. A DAG ``on_failure_callback``
        given as well runs after the alert.
    """
    from airflow.sdk import DAG
    from airflow.sdk.definitions.deadline import AsyncCallback, DeadlineAlert, DeadlineReference

    from claude_batch.alerts import RunFailedNotifier, deadline_callback_kwargs

    # Mistakes a DAG file can hold fail when it is parsed, naming the cause.
    check_model(config.workload.model, config.models, role="the workload's model")
    if config.storage_root:
        check_storage_root(config.storage_root)

    if isinstance(schedule, str) and not schedule.startswith("@once") and schedule != "@continuous":
        # Airflow 3 turns cron strings into trigger timetables whose runs have an empty data
        # interval; the rows a run extracts are its interval, so ask for real intervals.
        from airflow.sdk.definitions.timetables.interval import CronDataIntervalTimetable

        schedule = CronDataIntervalTimetable(schedule, timezone="UTC")
    if deadline_hours is None:
        deadline_hours = float(os.environ.get("CLAUDE_BATCH_DEADLINE_HOURS", "20"))
    deadline = (
        DeadlineAlert(
            reference=DeadlineReference.DAGRUN_QUEUED_AT,
            interval=timedelta(hours=deadline_hours),
            callback=AsyncCallback(
                "claude_batch.alerts.run_overdue",
                kwargs=deadline_callback_kwargs(config.workload.name, notifiers),
            ),
        )
        if deadline_hours and (notifiers is None or notifiers)
        else None
    )
    on_failure = dag_kwargs.pop("on_failure_callback", None)
    on_failure = (
        [] if on_failure is None else list(on_failure) if isinstance(on_failure, list) else [on_failure]
    )
    if notifiers is None or notifiers:
        on_failure.insert(0, RunFailedNotifier(config.workload.name, notifiers))
    dag = DAG(
        dag_id or config.workload.name,
        schedule=schedule,
        start_date=start_date,
        catchup=False,
        max_active_runs=max_active_runs,
        params=run_params(config),
        deadline=deadline,
        on_failure_callback=on_failure or None,
        tags=list(tags),
        doc_md=config.workload.description or None,
        **dag_kwargs,
    )
    with dag:
        _pipeline_tasks(config, None)  # at the top level: the grid shows every task as its own row
    return dag
