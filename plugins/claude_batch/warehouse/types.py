"""What goes in and comes out of the warehouse steps: errors, identifiers, source and summaries.

Nothing here touches a connection. Every identifier that reaches SQL passes
:func:`validate_identifier` first (configuration only, never row content), and timestamps are
naive UTC (:func:`utcnow`), which both dialects' ``TIMESTAMP`` holds without a time-zone extension.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

from claude_batch.warehouse.ledger import FINAL_STATUSES

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class WarehouseError(RuntimeError):
    """A warehouse step that cannot go on (bad identifiers, an unknown connection type)."""


class AccountingError(RuntimeError):
    """A run whose extracted items are not all accounted for; the message names the gap."""


def utcnow() -> datetime:
    # Stored as naive UTC: both dialects' TIMESTAMP, no time-zone extension needed.
    return datetime.now(UTC).replace(tzinfo=None)


_utcnow = utcnow  # the name the one-file module had (ops.py imports it from the package)


def validate_identifier(name: str) -> str:
    """``name`` if it is a plain SQL identifier, optionally schema-qualified (``schema.table``).

    :param name: a table or column name from configuration (never from row content).
    """
    parts = name.split(".")
    if not 1 <= len(parts) <= 2 or not all(_IDENTIFIER.fullmatch(part) for part in parts):
        raise WarehouseError(
            f"{name!r} is not a valid identifier (letters, digits, underscores; schema.table)"
        )
    return name


@dataclass(frozen=True)
class SourceSpec:
    """Where a workload's rows come from.

    :param key_column: the record key column.
    :param table: a table (or view) name; or ``query``: a trusted SQL query (from the DAG's code).
    :param columns: the columns to extract (default: all).
    :param interval_column: the timestamp column the data interval applies to (None: every row).
    """

    key_column: str
    table: str | None = None
    query: str | None = None
    columns: tuple[str, ...] | None = None
    interval_column: str | None = None

    def __post_init__(self) -> None:
        if (self.table is None) == (self.query is None):
            raise WarehouseError("give exactly one of table or query")
        validate_identifier(self.key_column)
        if self.table is not None:
            validate_identifier(self.table)
        for column in self.columns or ():
            validate_identifier(column)
        if self.interval_column is not None:
            validate_identifier(self.interval_column)


@dataclass
class LoadSummary:
    """What one load wrote, for the run's report and history."""

    run_id: str
    rows: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    results_upserted: int = 0
    ledger_updated: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost_usd: float = 0.0


@dataclass(frozen=True)
class AccountingReport:
    """The ledger's view of one run: ``extracted = succeeded + invalid + retry + dead``."""

    run_id: str
    extracted: int
    by_status: dict[str, int]
    handed_on: int = 0  # left as retry/invalid, since claimed by a later run

    @property
    def accounted(self) -> int:
        return sum(self.by_status.get(status, 0) for status in FINAL_STATUSES) + self.handed_on


@dataclass(frozen=True)
class Holder:
    """A run holding open items: which DAG run, how many items in each open state, since when."""

    dag_id: str | None
    run_id: str
    pending: int
    submitted: int
    since: datetime | None


@dataclass
class ClaimResult:
    """What a run's claim took: its items, and the staged keys it could not take, by shard.

    :param run_id: the claiming run.
    :param claimed: staged items now held by this run (``pending``).
    :param rejected: rejected rows recorded as ``dead`` for this run.
    :param not_claimed: shard part (None: a rejected row) -> keys another run holds or that are final.
    :param holders: the holding run id (or ``"<status> (done)"``) -> how many of this run's keys it has.
    """

    run_id: str
    claimed: int = 0
    rejected: int = 0
    not_claimed: dict[int | None, set[str]] = field(default_factory=dict)
    holders: dict[str, int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.not_claimed

    def describe_holders(self) -> str:
        return ", ".join(f"{count:,} by {holder}" for holder, count in sorted(self.holders.items()))
