"""Status, run history and cost queries: what the ledger and the run history say, read only.

Reads never change a table (no ``CREATE``/``ALTER``, which on PostgreSQL would wait behind a
running load). Where the run history says nothing, the ledger does: a run's DAG and its start
(the gate's claim, ``claimed_at``), a batch in flight (its age from when the ``record`` task
wrote its id).
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Any

from claude_batch.ops.queries import WarehouseQueries, _chunks, _naive
from claude_batch.ops.results import (
    _OPTIONAL_RUN_COLUMNS,
    BATCH_EXPIRY,
    BatchInFlight,
    DailyCost,
    HeldItems,
    LedgerCounts,
    OpsError,
    RunSummary,
    Status,
)
from claude_batch.warehouse import LEDGER_STATUSES


class StatusQueries(WarehouseQueries):
    """Ledger counts, batches in flight, runs holding items, the run history and cost per day."""

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
            f"""SELECT workload, run_id, prompt_version, cache_setting, extracted, staged, rejected,
                succeeded, invalid, retry, dead, input_tokens, output_tokens, cache_creation_input_tokens,
                cache_read_input_tokens, cost_usd, realtime_cost_usd,
                recorded_at{"".join(", " + n for n in optional)}
            FROM {self._runs} {where} ORDER BY recorded_at DESC, run_id DESC LIMIT {limit}""",
            params,
        )
        starts = self._run_starts([(row[0], row[1]) for row in rows])
        out = []
        for row in rows:
            (name, run_id, version, cache_setting, extracted, staged, rejected, succeeded, invalid, retry,
             dead, input_tokens, output_tokens, cache_write, cache_read, cost, realtime,
             recorded_at) = row[:18]  # fmt: skip
            extra = {
                key: None if value is None else round(float(value), 6)
                for key, value in zip(optional, row[18:], strict=True)
            }
            dag_id, started_at = starts.get((name, run_id), (None, None))
            cost, realtime = float(cost or 0.0), float(realtime or 0.0)
            cache_write, cache_read = int(cache_write or 0), int(cache_read or 0)
            cached = cache_read + cache_write
            hit_rate = round(cache_read / cached, 4) if cached else None
            duration = None
            if started_at is not None and recorded_at is not None:
                duration = round(max((_naive(recorded_at) - _naive(started_at)).total_seconds(), 0.0), 1)
            out.append(
                RunSummary(
                    workload=name, run_id=run_id, dag_id=dag_id, prompt_version=version,
                    cache_setting=cache_setting, extracted=int(extracted or 0), staged=int(staged or 0),
                    rejected=int(rejected or 0), succeeded=int(succeeded or 0), invalid=int(invalid or 0),
                    retry=int(retry or 0), dead=int(dead or 0), input_tokens=int(input_tokens or 0),
                    output_tokens=int(output_tokens or 0),
                    cache_creation_input_tokens=cache_write, cache_read_input_tokens=cache_read,
                    cost_usd=round(cost, 6), realtime_cost_usd=round(realtime, 6),
                    saving_usd=round(realtime - cost, 6),
                    cache_hit_rate=hit_rate,
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
        where = f"recorded_at >= {p}"
        params: list[Any] = [since]
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
