"""The ground every operator query stands on: the connection, the clock, workloads and prompt versions.

:class:`WarehouseQueries` holds one warehouse connection and answers what the other queries
ask first: which tables exist (asked with a query that reads no row, never a ``CREATE``), which
workloads the ledger or run history knows, which prompt version is meant. Every value is a
bound parameter; a warehouse no pipeline has run on raises :class:`NoLedger`.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Sequence
from datetime import date, datetime
from typing import Any

from claude_batch.ops.results import NoLedger, OpsError, UnknownWorkload
from claude_batch.warehouse import Warehouse, _utcnow


class WarehouseQueries:
    """The helpers and workload questions the status, run, item and cost queries share.

    :param warehouse: an open warehouse (its ledger and run-history table names are used).
    :param now: the clock (naive UTC, as the ledger stores it); for tests.
    """

    def __init__(self, warehouse: Warehouse, *, now: datetime | None = None) -> None:
        self.warehouse = warehouse
        self._now = now
        self._columns: dict[str, set[str] | None] = {}
        self._workloads: list[str] | None = None

    # -- helpers -------------------------------------------------------------------------------

    @property
    def now(self) -> datetime:
        return self._now or _utcnow()

    @property
    def _ledger(self) -> str:
        return self.warehouse._q(self.warehouse.ledger_table)

    @property
    def _runs(self) -> str:
        return self.warehouse._q(self.warehouse.runs_table)

    @property
    def _p(self) -> str:
        return self.warehouse.dialect.placeholder

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.warehouse._fetchall(sql, list(params))

    def _table_columns(self, table: str) -> set[str] | None:
        """The table's columns (lower case), or None when it does not exist."""
        if table not in self._columns:
            d = self.warehouse.dialect
            try:
                with d.transaction(self.warehouse.conn) as cursor:
                    cursor.execute(f"SELECT * FROM {self.warehouse._q(table)} WHERE 1 = 0")
                    names = {str(column[0]).lower() for column in cursor.description}
                    cursor.fetchall()
            except Exception:  # no such table (the driver's own error type): asked as a question
                names = None
            self._columns[table] = names
        return self._columns[table]

    def has_ledger(self) -> bool:
        return self._table_columns(self.warehouse.ledger_table) is not None

    def has_runs(self) -> bool:
        return self._table_columns(self.warehouse.runs_table) is not None

    def _require_ledger(self) -> None:
        if not self.has_ledger():
            raise NoLedger(
                f"this warehouse has no {self.warehouse.ledger_table} table: no claude-batch pipeline has "
                f"run on this connection (is it the pipeline's warehouse connection?)"
            )

    def _age(self, since: datetime | None) -> float | None:
        return None if since is None else round((self.now - _naive(since)).total_seconds(), 1)

    # -- workloads and prompt versions ---------------------------------------------------------

    def workloads(self) -> list[str]:
        """Every workload the ledger or the run history knows, sorted."""
        if self._workloads is None:
            self._require_ledger()
            names = {name for (name,) in self._rows(f"SELECT DISTINCT workload FROM {self._ledger}")}
            if self.has_runs():
                names |= {name for (name,) in self._rows(f"SELECT DISTINCT workload FROM {self._runs}")}
            self._workloads = sorted(names)
        return list(self._workloads)

    def check_workload(self, name: str) -> str:
        """``name`` if the warehouse knows the workload.

        Else :class:`UnknownWorkload` naming the known ones.
        """
        known = self.workloads()
        if name not in known:
            listed = ", ".join(known) if known else "none yet"
            raise UnknownWorkload(
                f"no workload {name!r} in this warehouse's ledger or run history (known: {listed})"
            )
        return name

    def dag_ids(self, workload: str) -> list[str]:
        """The DAGs whose runs claimed the workload's items, sorted.

        What access to a workload is checked on.
        """
        rows = self._rows(
            f"SELECT DISTINCT dag_id FROM {self._ledger} WHERE workload = {self._p} AND dag_id IS NOT NULL",
            [self.check_workload(workload)],
        )
        return sorted(dag_id for (dag_id,) in rows)

    def prompt_versions(self, workload: str) -> list[str]:
        """The workload's prompt versions, the current one first.

        The current one is its latest run's, else the latest updated.
        """
        p = self._p
        seen: list[str] = []
        if self.has_runs():
            for (version,) in self._rows(
                f"""SELECT prompt_version FROM {self._runs}
                WHERE workload = {p} AND prompt_version IS NOT NULL
                GROUP BY prompt_version ORDER BY MAX(recorded_at) DESC""",
                [workload],
            ):
                seen.append(version)
        for (version,) in self._rows(
            f"""SELECT prompt_version FROM {self._ledger} WHERE workload = {p}
            GROUP BY prompt_version ORDER BY MAX(updated_at) DESC""",
            [workload],
        ):
            if version not in seen:
                seen.append(version)
        return seen

    def current_prompt_version(self, workload: str) -> str | None:
        versions = self.prompt_versions(workload)
        return versions[0] if versions else None

    def resolve_prompt_version(self, workload: str, prompt_version: str | None = None) -> str:
        """The prompt version meant: ``prompt_version`` (or a unique prefix of one), else the current one."""
        versions = self.prompt_versions(workload)
        if not versions:
            raise OpsError(f"workload {workload!r} has no ledger items yet")
        if not prompt_version:
            return versions[0]
        matches = [v for v in versions if v == prompt_version] or [
            v for v in versions if v.startswith(prompt_version)
        ]
        if len(matches) == 1:
            return matches[0]
        listed = ", ".join(versions)
        if not matches:
            raise OpsError(
                f"workload {workload!r} has no prompt version {prompt_version!r} (it has: {listed})"
            )
        raise OpsError(
            f"prompt version {prompt_version!r} of {workload!r} is ambiguous: {', '.join(matches)}"
        )

    def _scope(self, workload: str | None) -> list[str]:
        if workload is not None:
            return [self.check_workload(workload)]
        return self.workloads()


def _naive(value: datetime) -> datetime:
    """A timestamp as naive UTC (the ledger's TIMESTAMP columns; a driver may hand back an aware one)."""
    if value.tzinfo is not None:
        from datetime import UTC

        return value.astimezone(UTC).replace(tzinfo=None)
    return value


def _like_pattern(text: str) -> str:
    """``%text%`` in lower case for ``LIKE ... ESCAPE '!'``, the text's own wildcards escaped."""
    escaped = text.lower().replace("!", "!!").replace("%", "!%").replace("_", "!_")
    return f"%{escaped}%"


def _chunks(values: Sequence[str], size: int) -> Iterable[Sequence[str]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def to_jsonable(value: Any) -> Any:
    """A result (dataclasses, lists, dicts, datetimes, dates) as JSON-ready data; times in ISO 8601 UTC."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, datetime):
        return _naive(value).isoformat(timespec="seconds") + "Z"
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(v) for v in value]
    return value
