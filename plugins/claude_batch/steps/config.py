"""What a pipeline is configured with and what one run asks for: the steps' shared inputs.

``PipelineConfig`` is fixed when the DAG file is parsed; ``RunOptions`` are one run's Params
(validated by Airflow's trigger form first, see :mod:`claude_batch.pipeline_params`).
:func:`effective_workload` and :func:`run_interval` turn the two into what a step sends and
which rows it reads. Nothing here touches S3, the warehouse or the API.

The wait's and the queue's defaults come from :mod:`claude_batch.triggers` and
:mod:`claude_batch.batch_queue`, which import Airflow (their trigger classes).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from claude_batch.costs import PriceTable, default_prices
from claude_batch.preflight import check_model
from claude_batch.staging import StagingLimits
from claude_batch.waiting import DEFAULT_BATCH_TIMEOUT, DEFAULT_QUEUE_POLL_INTERVAL
from claude_batch.warehouse import SourceSpec
from claude_batch.workloads import Workload

__all__ = [
    "DEFAULT_POOL",
    "PipelineConfig",
    "RunOptions",
    "SourceSpec",
    "effective_workload",
    "run_interval",
    "task_log",
]

DEFAULT_POOL = "claude_batch"


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


def task_log() -> logging.Logger:
    """The logger whose lines Airflow shows in the task's log."""
    return logging.getLogger("airflow.task")
