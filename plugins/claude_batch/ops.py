"""What an operator asks of a warehouse: status, runs, ledger counts, dead items, requeue, cost.

The query layer shared by the ``claude-batch`` CLI (``claude_batch.cli``) and the Airflow UI
page: plain Python over a :class:`~claude_batch.warehouse.Warehouse` (no Airflow import), typed
results (dataclasses; :func:`to_jsonable` turns any of them into JSON-ready data), every value a
bound parameter.

It reads the two tables the pipeline writes: the ledger (``claude_batch_ledger``, one row per
workload, record key and prompt version; see docs/layout.md) and the run history
(``claude_batch_runs``, one line per run, written by each round's load). Where the run history
says nothing, the ledger does: a run's DAG and its start (the gate's claim, ``claimed_at``), a
batch in flight (its items ``submitted``; its age from when the ``record`` task wrote its id).

Reads never change a table (no ``CREATE``/``ALTER``, which on PostgreSQL would wait behind a
running load); a warehouse no pipeline has run on says so. :meth:`Ops.requeue` is the one
write: it adds the ledger's newer columns first (``Warehouse.ensure_tables``), then calls
:meth:`Warehouse.requeue`, whose conditional UPDATE moves only ``dead``/``invalid`` items, so
an item a live run holds open is never touched (docs/concurrency.md).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from claude_batch.warehouse import LEDGER_STATUSES, Warehouse, _utcnow

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


# -- results -------------------------------------------------------------------------------------


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
    # Where the run history has them (newer pipelines): the saving split into batching and caching, the estimate.
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


# -- the queries ---------------------------------------------------------------------------------


class Ops:
    """The operator's questions, over one warehouse connection.

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
        """``name`` if the warehouse knows the workload; else :class:`UnknownWorkload` naming the known ones."""
        known = self.workloads()
        if name not in known:
            listed = ", ".join(known) if known else "none yet"
            raise UnknownWorkload(
                f"no workload {name!r} in this warehouse's ledger or run history (known: {listed})"
            )
        return name

    def dag_ids(self, workload: str) -> list[str]:
        """The DAGs whose runs claimed the workload's items, sorted (what access to a workload is checked on)."""
        rows = self._rows(
            f"SELECT DISTINCT dag_id FROM {self._ledger} WHERE workload = {self._p} AND dag_id IS NOT NULL",
            [self.check_workload(workload)],
        )
        return sorted(dag_id for (dag_id,) in rows)

    def prompt_versions(self, workload: str) -> list[str]:
        """The workload's prompt versions, the current one first (its latest run's, else the latest updated)."""
        p = self._p
        seen: list[str] = []
        if self.has_runs():
            for (version,) in self._rows(
                f"""SELECT prompt_version FROM {self._runs} WHERE workload = {p} AND prompt_version IS NOT NULL
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

    # -- status --------------------------------------------------------------------------------

    def ledger_counts(
        self, workload: str | None = None, prompt_version: str | None = None
    ) -> list[LedgerCounts]:
        """Items per status for each workload and prompt version (current version first)."""
        self._require_ledger()
        names = self._scope(workload)
        if prompt_version is not None and workload is None:
            raise OpsError("a prompt version needs its workload (--workload)")
        p = self._p
        requeued = "requeued_at" in (self._table_columns(self.warehouse.ledger_table) or set())
        stamp = (
            "SUM(CASE WHEN status = 'retry' AND requeued_at IS NOT NULL THEN 1 ELSE 0 END)"
            if requeued
            else "0"
        )
        out: list[LedgerCounts] = []
        for name in names:
            versions = self.prompt_versions(name)
            wanted = [self.resolve_prompt_version(name, prompt_version)] if prompt_version else versions
            rows = self._rows(
                f"""SELECT prompt_version, status, COUNT(*), MAX(updated_at), {stamp} FROM {self._ledger}
                WHERE workload = {p} GROUP BY prompt_version, status""",
                [name],
            )
            for version in wanted:
                counts = dict.fromkeys(LEDGER_STATUSES, 0)
                last: datetime | None = None
                stamped = 0
                for row_version, status, count, updated, requeued_count in rows:
                    if row_version != version:
                        continue
                    counts[status] = counts.get(status, 0) + int(count)
                    stamped += int(requeued_count or 0)
                    if updated is not None and (last is None or updated > last):
                        last = updated
                if not any(counts.values()) and version != (versions[0] if versions else None):
                    continue  # a version only the run history names, with no items left
                out.append(
                    LedgerCounts(
                        name, version, version == versions[0], counts, sum(counts.values()), stamped, last
                    )
                )
        return out

    def batches_in_flight(self, workload: str | None = None) -> list[BatchInFlight]:
        """Batches whose items are ``submitted``, oldest first."""
        self._require_ledger()
        where, params = self._workload_filter(workload)
        rows = self._rows(
            f"""SELECT workload, prompt_version, batch_id, MIN(dag_id), MIN(run_id), COUNT(*), MIN(updated_at)
            FROM {self._ledger} WHERE status = 'submitted' AND batch_id IS NOT NULL{where}
            GROUP BY workload, prompt_version, batch_id ORDER BY MIN(updated_at), batch_id""",
            params,
        )
        out = []
        for name, version, batch_id, dag_id, run_id, items, since in rows:
            age = self._age(since)
            expires = None if age is None else round(BATCH_EXPIRY.total_seconds() - age, 1)
            out.append(
                BatchInFlight(name, version, batch_id, dag_id, run_id, int(items), since, age, expires)
            )
        return out

    def holders(self, workload: str | None = None) -> list[HeldItems]:
        """Runs holding open items (``pending``/``submitted``), longest held first."""
        self._require_ledger()
        where, params = self._workload_filter(workload)
        rows = self._rows(
            f"""SELECT workload, prompt_version, dag_id, run_id,
                SUM(CASE WHEN status = 'pending' THEN 1 ELSE 0 END),
                SUM(CASE WHEN status = 'submitted' THEN 1 ELSE 0 END), MIN(claimed_at)
            FROM {self._ledger} WHERE status IN ('pending', 'submitted') AND run_id IS NOT NULL{where}
            GROUP BY workload, prompt_version, dag_id, run_id ORDER BY MIN(claimed_at), run_id""",
            params,
        )
        return [
            HeldItems(
                name, version, dag_id, run_id, int(pending or 0), int(submitted or 0), since, self._age(since)
            )
            for name, version, dag_id, run_id, pending, submitted, since in rows
        ]

    def status(self, workload: str | None = None) -> Status:
        """Ledger counts, batches in flight, runs holding items, and each workload's last run."""
        self._require_ledger()
        names = self._scope(workload)
        last_runs = []
        for name in names:
            last_runs += self.runs(name, limit=1)
        return Status(
            generated_at=self.now,
            workloads=names,
            ledger=self.ledger_counts(workload),
            in_flight=self.batches_in_flight(workload),
            holders=self.holders(workload),
            last_runs=last_runs,
        )

    def _workload_filter(self, workload: str | None) -> tuple[str, list[Any]]:
        if workload is None:
            return "", []
        return f" AND workload = {self._p}", [self.check_workload(workload)]

    # -- runs ----------------------------------------------------------------------------------

    def runs(self, workload: str | None = None, *, limit: int = 20) -> list[RunSummary]:
        """The most recent runs (newest first), from the run history."""
        self._require_ledger()
        if workload is not None:
            self.check_workload(workload)
        if not self.has_runs():
            return []
        limit = max(1, min(int(limit), 1000))
        p = self._p
        where, params = ("WHERE workload = " + p, [workload]) if workload is not None else ("", [])
        present = self._table_columns(self.warehouse.runs_table) or set()
        optional = [name for name in _OPTIONAL_RUN_COLUMNS if name in present]
        rows = self._rows(
            f"""SELECT workload, run_id, prompt_version, cache_setting, extracted, staged, rejected, succeeded,
                invalid, retry, dead, input_tokens, output_tokens, cache_creation_input_tokens,
                cache_read_input_tokens, cost_usd, realtime_cost_usd, recorded_at{"".join(", " + n for n in optional)}
            FROM {self._runs} {where} ORDER BY recorded_at DESC, run_id DESC LIMIT {limit}""",
            params,
        )
        starts = self._run_starts([(row[0], row[1]) for row in rows])
        out = []
        for row in rows:
            (name, run_id, version, cache_setting, extracted, staged, rejected, succeeded, invalid, retry, dead,
             input_tokens, output_tokens, cache_write, cache_read, cost, realtime, recorded_at) = row[:18]  # fmt: skip
            extra = {
                key: None if value is None else round(float(value), 6)
                for key, value in zip(optional, row[18:], strict=True)
            }
            dag_id, started_at = starts.get((name, run_id), (None, None))
            cost, realtime = float(cost or 0.0), float(realtime or 0.0)
            cache_write, cache_read = int(cache_write or 0), int(cache_read or 0)
            duration = None
            if started_at is not None and recorded_at is not None:
                duration = round(max((_naive(recorded_at) - _naive(started_at)).total_seconds(), 0.0), 1)
            out.append(
                RunSummary(
                    workload=name, run_id=run_id, dag_id=dag_id, prompt_version=version, cache_setting=cache_setting,
                    extracted=int(extracted or 0), staged=int(staged or 0), rejected=int(rejected or 0),
                    succeeded=int(succeeded or 0), invalid=int(invalid or 0), retry=int(retry or 0),
                    dead=int(dead or 0), input_tokens=int(input_tokens or 0), output_tokens=int(output_tokens or 0),
                    cache_creation_input_tokens=cache_write, cache_read_input_tokens=cache_read,
                    cost_usd=round(cost, 6), realtime_cost_usd=round(realtime, 6),
                    saving_usd=round(realtime - cost, 6),
                    cache_hit_rate=round(cache_read / (cache_read + cache_write), 4) if cache_read + cache_write else None,
                    started_at=started_at, recorded_at=recorded_at, duration_seconds=duration, **extra,
                )
            )  # fmt: skip
        return out

    def _run_starts(
        self, runs: list[tuple[str, str]]
    ) -> dict[tuple[str, str], tuple[str | None, datetime | None]]:
        """(workload, run_id) -> (dag_id, first claim) of the items each run still holds or handled last."""
        p = self._p
        out: dict[tuple[str, str], tuple[str | None, datetime | None]] = {}
        by_workload: dict[str, list[str]] = {}
        for name, run_id in runs:
            by_workload.setdefault(name, []).append(run_id)
        for name, run_ids in by_workload.items():
            for chunk in _chunks(run_ids, 200):
                rows = self._rows(
                    f"""SELECT run_id, MIN(dag_id), MIN(claimed_at) FROM {self._ledger}
                    WHERE workload = {p} AND run_id IN ({", ".join([p] * len(chunk))}) GROUP BY run_id""",
                    [name, *chunk],
                )
                for run_id, dag_id, started_at in rows:
                    out[(name, run_id)] = (dag_id, started_at)
        return out

    # -- dead and invalid items ----------------------------------------------------------------

    def dead_items(
        self,
        workload: str | None = None,
        *,
        prompt_version: str | None = None,
        search: str | None = None,
        statuses: Sequence[str] = REQUEUEABLE,
        limit: int = 50,
        offset: int = 0,
    ) -> DeadItems:
        """Dead and invalid items with their reasons, newest first.

        :param workload: one workload (default: all), at its current prompt version unless
            ``prompt_version`` (a unique prefix will do) says otherwise.
        :param search: text found (case-insensitive) in the reason or the record key.
        :param statuses: ``dead``, ``invalid`` or both.
        """
        self._require_ledger()
        bad = [s for s in statuses if s not in REQUEUEABLE]
        if bad or not statuses:
            raise OpsError(f"statuses must be among {', '.join(REQUEUEABLE)}, not {', '.join(bad) or 'none'}")
        if prompt_version is not None and workload is None:
            raise OpsError("a prompt version needs its workload (--workload)")
        scopes = [(name, self.resolve_prompt_version(name, prompt_version)) for name in self._scope(workload)
                  if self.prompt_versions(name)]  # fmt: skip
        limit = max(1, min(int(limit), 10_000))
        offset = max(0, int(offset))
        p = self._p
        if not scopes:
            return DeadItems(workload, [], search, 0, [], [])
        scope_sql = " OR ".join([f"(workload = {p} AND prompt_version = {p})"] * len(scopes))
        params: list[Any] = [value for scope in scopes for value in scope]
        where = f"({scope_sql}) AND status IN ({', '.join([p] * len(statuses))})"
        params += list(statuses)
        if search:
            pattern = _like_pattern(search)
            where += f" AND (LOWER(COALESCE(last_error, '')) LIKE {p} ESCAPE '!' OR LOWER(record_key) LIKE {p} ESCAPE '!')"
            params += [pattern, pattern]
        total = int(self._rows(f"SELECT COUNT(*) FROM {self._ledger} WHERE {where}", params)[0][0])
        rows = self._rows(
            f"""SELECT workload, prompt_version, record_key, status, last_error, attempts, invalid_answers, batch_id,
                run_id, dag_id, custom_id, updated_at
            FROM {self._ledger} WHERE {where}
            ORDER BY updated_at DESC, workload, record_key LIMIT {limit} OFFSET {offset}""",
            params,
        )
        items = [
            DeadItem(name, version, key, status, reason, int(attempts or 0), int(invalid or 0), batch_id, run_id,
                     dag_id, custom_id is None, updated)
            for name, version, key, status, reason, attempts, invalid, batch_id, run_id, dag_id, custom_id, updated
            in rows
        ]  # fmt: skip
        reasons = [
            ReasonCount(status, reason, int(count))
            for status, reason, count in self._rows(
                f"""SELECT status, last_error, COUNT(*) FROM {self._ledger} WHERE {where}
                GROUP BY status, last_error ORDER BY COUNT(*) DESC, status, last_error LIMIT 50""",
                params,
            )
        ]
        return DeadItems(workload, sorted({v for _, v in scopes}), search, total, items, reasons)

    # -- requeue -------------------------------------------------------------------------------

    def requeue(
        self,
        workload: str,
        *,
        keys: Iterable[str] | None = None,
        reason: str | None = None,
        all_dead: bool = False,
        prompt_version: str | None = None,
        by: str | None = None,
        dry_run: bool = False,
    ) -> RequeueResult:
        """Put dead (or invalid) items back to ``retry``, so the workload's next run sends them again.

        Exactly one selection: ``keys`` (each must be ``dead`` or ``invalid``; the others are
        reported in ``skipped`` with why), ``reason`` (every dead or invalid item whose reason
        contains the text, case-insensitive) or ``all_dead`` (every ``dead`` item). Only the
        workload's current prompt version unless ``prompt_version`` names another (the DAG's
        next run sends only its current one).

        The next run extracts the items whatever its data interval and claims them at its gate;
        each gets fresh attempts. A rejected row (never sent) comes back once its source row
        is fixed; a row without a usable key matches no source row and stays ``retry`` until
        its interval is run again. ``requeued_by``/``requeued_at`` in the ledger say who and when.
        """
        self._require_ledger()
        self.check_workload(workload)
        chosen = [keys is not None, bool(reason), all_dead]
        if sum(chosen) != 1:
            raise OpsError("requeue needs exactly one of: keys, a reason, or all dead items")
        version = self.resolve_prompt_version(workload, prompt_version)
        p = self._p
        skipped: list[SkippedKey] = []
        scope = [workload, version]
        if keys is not None:
            wanted = sorted({str(key) for key in keys})
            if not wanted:
                raise OpsError("no keys given")
            found: dict[str, tuple[str, str | None]] = {}
            for chunk in _chunks(wanted, 500):
                for key, status, run_id in self._rows(
                    f"""SELECT record_key, status, run_id FROM {self._ledger} WHERE workload = {p}
                    AND prompt_version = {p} AND record_key IN ({", ".join([p] * len(chunk))})""",
                    [*scope, *chunk],
                ):
                    found[key] = (status, run_id)
            selected = []
            for key in wanted:
                if key not in found:
                    skipped.append(
                        SkippedKey(key, None, None, f"no item with this key at prompt version {version}")
                    )
                    continue
                status, run_id = found[key]
                if status in REQUEUEABLE:
                    selected.append(key)
                elif status in ("pending", "submitted"):
                    skipped.append(
                        SkippedKey(key, status, run_id, f"held open by run {run_id} ({status}): left to it")
                    )
                elif status == "retry":
                    skipped.append(
                        SkippedKey(key, status, run_id, "already due for retry: the next run sends it")
                    )
                else:
                    skipped.append(SkippedKey(key, status, run_id, f"{status}: done, nothing to requeue"))
            selection = f"{len(wanted):,} key(s)"
        else:
            where = f"workload = {p} AND prompt_version = {p}"
            params: list[Any] = list(scope)
            if reason:
                where += f" AND status IN ('dead', 'invalid') AND LOWER(COALESCE(last_error, '')) LIKE {p} ESCAPE '!'"
                params.append(_like_pattern(reason))
                selection = f"reason contains {reason!r}"
            else:
                where += " AND status = 'dead'"
                selection = "all dead items"
            selected = [
                key for (key,) in self._rows(f"SELECT record_key FROM {self._ledger} WHERE {where}", params)
            ]
            selected.sort()
        at = self.now
        requeued = 0
        if selected and not dry_run:
            if "requeued_at" not in (self._table_columns(self.warehouse.ledger_table) or set()):
                self.warehouse.ensure_tables()  # a ledger made before requeues gains requeued_by / requeued_at
                self._columns.pop(self.warehouse.ledger_table, None)
            requeued = self.warehouse.requeue(WorkloadRef(workload, version), selected, by=by)  # type: ignore[arg-type]
        return RequeueResult(
            workload=workload,
            prompt_version=version,
            selection=selection,
            by=by,
            at=at,
            dry_run=dry_run,
            selected=len(selected),
            requeued=requeued,
            keys=selected[:MAX_LISTED_KEYS],
            skipped=skipped,
        )

    # -- cost ----------------------------------------------------------------------------------

    def cost_by_day(self, workload: str | None = None, *, days: int = 30) -> list[DailyCost]:
        """What runs cost per day (UTC, by their record time) and workload, newest day first."""
        self._require_ledger()
        if workload is not None:
            self.check_workload(workload)
        if not self.has_runs():
            return []
        days = max(1, min(int(days), 3660))
        since = datetime.combine((self.now - timedelta(days=days - 1)).date(), datetime.min.time())
        p = self._p
        where, params = f"recorded_at >= {p}", [since]
        if workload is not None:
            where += f" AND workload = {p}"
            params.append(workload)
        rows = self._rows(
            f"""SELECT CAST(recorded_at AS DATE), workload, COUNT(*), SUM(succeeded), SUM(cost_usd),
                SUM(realtime_cost_usd), SUM(input_tokens), SUM(output_tokens)
            FROM {self._runs} WHERE {where} GROUP BY CAST(recorded_at AS DATE), workload
            ORDER BY CAST(recorded_at AS DATE) DESC, workload""",
            params,
        )
        out = []
        for day, name, runs, succeeded, cost, realtime, input_tokens, output_tokens in rows:
            cost, realtime = float(cost or 0.0), float(realtime or 0.0)
            out.append(
                DailyCost(
                    day=day if isinstance(day, date) else date.fromisoformat(str(day)),
                    workload=name, runs=int(runs), succeeded=int(succeeded or 0), cost_usd=round(cost, 6),
                    realtime_cost_usd=round(realtime, 6), saving_usd=round(realtime - cost, 6),
                    input_tokens=int(input_tokens or 0), output_tokens=int(output_tokens or 0),
                )
            )  # fmt: skip
        return out


# -- helpers -------------------------------------------------------------------------------------


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
