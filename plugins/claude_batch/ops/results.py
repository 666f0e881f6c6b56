"""The operator's answers as typed results, and the errors a question can meet.

Plain frozen dataclasses (no Airflow, no warehouse): what :class:`claude_batch.ops.Ops` returns
and what the CLI and the UI render; :func:`claude_batch.ops.to_jsonable` turns any of them into
JSON-ready data. Times are naive UTC, as the ledger stores them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

# The API's own expiry of a batch, from its creation.
BATCH_EXPIRY = timedelta(hours=24)
# Statuses an operator may requeue.
REQUEUEABLE = ("dead", "invalid")
MAX_LISTED_KEYS = 1_000


class OpsError(ValueError):
    """A question the warehouse cannot answer as asked (unknown workload, no ledger, bad input)."""


class UnknownWorkload(OpsError):
    """No ledger row and no run of that workload."""


class NoLedger(OpsError):
    """The warehouse has no claude-batch tables: no pipeline has run on this connection."""


@dataclass(frozen=True)
class WorkloadRef:
    """A workload as the ledger names it: what :meth:`Warehouse.requeue` reads of a workload."""

    name: str
    prompt_version: str


@dataclass(frozen=True)
class LedgerCounts:
    """Items of one workload and prompt version, by status (every status present, 0 when none).

    :param current: the prompt version of the workload's latest run (the one its DAG sends now).
    :param requeued: items requeued by hand and not yet answered again (``retry`` with a requeue stamp).
    """

    workload: str
    prompt_version: str
    current: bool
    counts: dict[str, int]
    total: int
    requeued: int
    last_update: datetime | None


@dataclass(frozen=True)
class BatchInFlight:
    """A batch whose items are ``submitted``: sent, not yet loaded.

    :param submitted_at: when the ledger learned the batch (the run's ``record`` task), UTC.
    :param expires_in_seconds: until the API's 24-hour expiry (negative: past it, the wait has
        not collected it yet).
    """

    workload: str
    prompt_version: str
    batch_id: str
    dag_id: str | None
    run_id: str | None
    items: int
    submitted_at: datetime | None
    age_seconds: float | None
    expires_in_seconds: float | None


@dataclass(frozen=True)
class HeldItems:
    """A run holding items open (``pending``: claimed, not in a batch yet; ``submitted``)."""

    workload: str
    prompt_version: str
    dag_id: str | None
    run_id: str
    pending: int
    submitted: int
    since: datetime | None
    age_seconds: float | None


@dataclass(frozen=True)
class RunSummary:
    """One line of the run history, with what it saved and how long it took.

    :param saving_usd: the real-time equivalent minus what the batches cost.
    :param cache_hit_rate: cache reads over cache reads and writes (None: no caching).
    :param started_at: the run's first claim (its gate), from the ledger (None: its items have
        all been handed on to later runs).
    :param duration_seconds: from ``started_at`` to the last load's record.
    """

    workload: str
    run_id: str
    dag_id: str | None
    prompt_version: str | None
    cache_setting: str | None
    extracted: int
    staged: int
    rejected: int
    succeeded: int
    invalid: int
    retry: int
    dead: int
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    cost_usd: float
    realtime_cost_usd: float
    saving_usd: float
    cache_hit_rate: float | None
    started_at: datetime | None
    recorded_at: datetime | None
    duration_seconds: float | None
    # Where the run history has them (newer pipelines): the saving split into batching and
    # caching, the estimate.
    batching_saving_usd: float | None = None
    caching_saving_usd: float | None = None
    estimated_cost_usd: float | None = None


_OPTIONAL_RUN_COLUMNS = ("batching_saving_usd", "caching_saving_usd", "estimated_cost_usd")


@dataclass(frozen=True)
class Status:
    """The state of every workload (or one): ledger counts, batches in flight, runs holding items."""

    generated_at: datetime
    workloads: list[str]
    ledger: list[LedgerCounts]
    in_flight: list[BatchInFlight]
    holders: list[HeldItems]
    last_runs: list[RunSummary]


@dataclass(frozen=True)
class DeadItem:
    """A ``dead`` or ``invalid`` item and why.

    :param rejected: a row staging refused (never sent: no custom_id); fix the source row.
    """

    workload: str
    prompt_version: str
    record_key: str
    status: str
    reason: str | None
    attempts: int
    invalid_answers: int
    batch_id: str | None
    run_id: str | None
    dag_id: str | None
    rejected: bool
    updated_at: datetime | None


@dataclass(frozen=True)
class ReasonCount:
    status: str
    reason: str | None
    items: int


@dataclass(frozen=True)
class DeadItems:
    """A page of dead/invalid items (``total`` match the search), and the reasons among them."""

    workload: str | None
    prompt_versions: list[str]
    search: str | None
    total: int
    items: list[DeadItem]
    reasons: list[ReasonCount]


@dataclass(frozen=True)
class SkippedKey:
    """A key asked for that was not requeued, and why."""

    record_key: str
    status: str | None
    run_id: str | None
    why: str


@dataclass(frozen=True)
class RequeueResult:
    """What a requeue did: the items put back to ``retry``, and the keys it left alone.

    :param selected: items the selection matched (``dead``/``invalid``) when it was made.
    :param requeued: items moved (fewer than ``selected`` when another run moved one meanwhile).
    :param keys: the requeued keys (the first :data:`MAX_LISTED_KEYS`).
    """

    workload: str
    prompt_version: str
    selection: str
    by: str | None
    at: datetime
    dry_run: bool
    selected: int
    requeued: int
    keys: list[str]
    skipped: list[SkippedKey] = field(default_factory=list)


@dataclass(frozen=True)
class DailyCost:
    """Runs recorded on one day (UTC) for one workload, and what they cost."""

    day: date
    workload: str
    runs: int
    succeeded: int
    cost_usd: float
    realtime_cost_usd: float
    saving_usd: float
    input_tokens: int
    output_tokens: int
