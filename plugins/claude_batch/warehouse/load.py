"""The load: a run's validated results into the results table, and its ledger moved, at once.

Loads go through the bulk paths, streaming the run's validated Parquet so memory stays flat
however many rows a run has: the dialect chooses how (``Dialect.load_run``). PostgreSQL gets
COPY from CSV that pyarrow writes batch by batch into temporary tables, then set-based
statements; DuckDB reads the Parquet itself, one statement per table, within a memory budget.
Results are upserted by (record key, prompt version), so a re-run never duplicates, and the
ledger moves in the same transaction by :data:`~claude_batch.warehouse.ledger.OUTCOME_RULES`:
a failure mid-load leaves nothing half-done, and since only items still open for the run move,
loading twice changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from claude_batch.staging import Manifest
from claude_batch.storage import RunLayout
from claude_batch.validation import iter_validated, validated_path
from claude_batch.warehouse.dbapi import Cursor
from claude_batch.warehouse.ledger import (
    INVALID_ANSWER,
    OPEN_STATUSES,
    VALID,
    outcome_status_sql,
    sql_in,
    sql_literal,
)
from claude_batch.warehouse.tables import _OUTCOME_COLUMNS, WarehouseTables
from claude_batch.warehouse.types import LoadSummary, utcnow
from claude_batch.workloads import Workload

_TOKEN_COLUMNS = ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def _add_to_summary(summary: LoadSummary, table: pa.Table) -> None:
    summary.rows += table.num_rows
    for status, count in _value_counts(table.column("status")).items():
        summary.by_status[status] = summary.by_status.get(status, 0) + count
    for name in _TOKEN_COLUMNS:
        setattr(summary, name, getattr(summary, name) + int(pc.sum(table.column(name)).as_py() or 0))
    summary.cost_usd += float(pc.sum(table.column("cost_usd")).as_py() or 0.0)


def _value_counts(column: pa.ChunkedArray) -> dict[str, int]:
    counts = pc.value_counts(column)
    return {item["values"].as_py(): item["counts"].as_py() for item in counts}


@dataclass
class _RunLoad:
    """One run's load, as :class:`~claude_batch.warehouse.dialects.base.RunLoad` offers it a dialect."""

    warehouse: LoadMixin
    workload: Workload
    layout: RunLayout
    manifest: Manifest
    parts: list[int]
    batch_rows: int

    def rows(self) -> int:
        return sum(self.manifest.shard(part).count for part in self.parts)

    def streaming(self) -> LoadSummary:
        return self.warehouse._load_streaming(
            self.workload, self.layout, self.manifest, self.parts, self.batch_rows
        )

    def reading_parquet(self) -> LoadSummary:
        return self.warehouse._load_reading_parquet(self.workload, self.layout, self.manifest, self.parts)


class LoadMixin(WarehouseTables):
    """The load step of :class:`~claude_batch.warehouse.Warehouse`."""

    def load_run(
        self,
        workload: Workload,
        layout: RunLayout,
        manifest: Manifest,
        parts: Iterable[int] | None = None,
        *,
        batch_rows: int = 50_000,
    ) -> LoadSummary:
        """Upsert the valid rows and move every item's ledger row, in one transaction.

        Reads ``validated/part-NNNNN.parquet`` for each part (default: every shard with a
        validated part), batch by batch. Valid rows go to the results table keyed by (record
        key, prompt version), so a re-run overwrites instead of duplicating. Each result moves
        its ledger item: valid -> ``succeeded``; an invalid answer -> ``invalid`` once, then
        ``dead``; ``invalid_request_error`` -> ``dead``; other errors, ``expired`` and
        ``canceled`` -> ``retry`` until the attempt limit, then ``dead``. Only items still
        ``pending`` or ``submitted`` for this run move, so loading twice changes nothing. All of
        it commits together or not at all.

        :param workload: the workload (its results table must exist: :meth:`ensure_tables`).
        :param layout: the run's S3 layout.
        :param manifest: the staging manifest.
        :param parts: the shard parts to load (default: all with validated results).
        :param batch_rows: rows per bulk batch.
        """
        if parts is None:
            parts = [s.part for s in manifest.shards if layout.store.exists(validated_path(layout, s.part))]
        parts = list(parts)
        if not parts:
            return LoadSummary(manifest.run_id)
        run = _RunLoad(self, workload, layout, manifest, parts, batch_rows)
        return self.dialect.load_run(self.conn, run)

    def _load_streaming(
        self, workload: Workload, layout: RunLayout, manifest: Manifest, parts: list[int], batch_rows: int
    ) -> LoadSummary:
        """Stream the validated parts batch by batch into the warehouse's bulk path.

        Each batch's valid rows are upserted as they come (a primary-key lookup per row, so
        batches cost the same however many went before); its outcomes are kept in a staging
        table for one ledger update at the end, which joins the whole run in one pass instead
        of scanning the run's ledger rows once per batch.
        """
        d = self.dialect
        summary = LoadSummary(manifest.run_id)
        result_columns = self._results_columns(workload)
        result_names = [name for name, _ in result_columns]
        outcome_names = [name for name, _ in _OUTCOME_COLUMNS]
        with (
            d.transaction(self.conn) as cursor,
            d.staging_table(cursor, "cb_outcomes", _OUTCOME_COLUMNS) as outcomes,
            d.staging_table(cursor, "cb_results", result_columns) as results,
        ):
            for part in parts:
                for batch in iter_validated(layout, part, batch_rows):
                    _add_to_summary(summary, batch)
                    d.load_arrow(cursor, "cb_outcomes", batch.select(outcome_names))
                    # The status compared as a pattern (an option): a Python value would be converted,
                    # and pyarrow's first conversion imports pandas (0.3 s of a 10,000-row load).
                    is_valid = pc.match_like(batch.column("status"), VALID)
                    valid = batch.filter(is_valid).select(result_names)
                    if valid.num_rows:
                        d.load_arrow(cursor, "cb_results", valid)
                        self._upsert_results(cursor, workload, results, result_names, manifest.run_id)
                        d.empty_table(cursor, "cb_results")
                        summary.results_upserted += valid.num_rows
            d.analyze(cursor, "cb_outcomes")
            with d.join_memory(cursor):
                summary.ledger_updated = max(
                    self._apply_outcomes(cursor, workload, outcomes, manifest.run_id), 0
                )
        return summary

    def _load_reading_parquet(
        self, workload: Workload, layout: RunLayout, manifest: Manifest, parts: list[int]
    ) -> LoadSummary:
        """One statement per table over all the run's validated parts, read by the engine itself.

        For engines that read Parquet (DuckDB): no row passes through Python, and a per-batch
        loop would make every batch re-read rows this transaction already changed.
        """
        d = self.dialect
        summary = LoadSummary(manifest.run_id)
        result_names = [name for name, _ in self._results_columns(workload)]
        columns = ", ".join(self._q(name) for name in result_names)
        outcome_columns = ", ".join(self._q(name) for name, _ in _OUTCOME_COLUMNS)
        paths = [validated_path(layout, part) for part in parts]
        with (
            d.transaction(self.conn) as cursor,
            d.parquet_relation(cursor, "cb_validated", layout.store, paths) as relation,
        ):
            sums = ", ".join(f"SUM({name})" for name in (*_TOKEN_COLUMNS, "cost_usd"))
            for status, rows, *totals in d.query(
                cursor, f"SELECT status, COUNT(*), {sums} FROM {relation} GROUP BY status"
            ):
                summary.rows += int(rows)
                summary.by_status[status] = int(rows)
                for name, total in zip(_TOKEN_COLUMNS, totals, strict=False):
                    setattr(summary, name, getattr(summary, name) + int(total or 0))
                summary.cost_usd += float(totals[4] or 0.0)
            outcomes = f"(SELECT {outcome_columns} FROM {relation})"
            summary.ledger_updated = max(self._apply_outcomes(cursor, workload, outcomes, manifest.run_id), 0)
            valid = f"(SELECT {columns} FROM {relation} WHERE status = {sql_literal(VALID)})"
            self._upsert_results(cursor, workload, valid, result_names, manifest.run_id)
            summary.results_upserted = summary.by_status.get(VALID, 0)
        return summary

    def _upsert_results(
        self, cursor: Cursor, workload: Workload, relation: str, names: list[str], run_id: str
    ) -> None:
        """Insert the rows of ``relation`` into the results table, overwriting rows with their keys."""
        d = self.dialect
        table = self._q(self.results_table(workload))
        columns = ", ".join(self._q(name) for name in names)
        updates = ", ".join(
            f"{self._q(name)} = excluded.{self._q(name)}"
            for name in [*names, "run_id", "loaded_at"]
            if name not in ("record_key", "prompt_version")
        )
        loaded_at = utcnow()
        for statement in d.upsert_statements(table, relation, columns, updates):
            d.execute(cursor, statement, [run_id, loaded_at])

    def _apply_outcomes(self, cursor: Cursor, workload: Workload, relation: str, run_id: str) -> int:
        """Move the ledger rows of a batch of outcomes (see :meth:`load_run` for the rules)."""
        d = self.dialect
        p = d.placeholder
        status, limits = outcome_status_sql(p)
        which = (
            f"l.workload = {p} AND l.prompt_version = {p} AND l.run_id = {p} "
            f"AND l.status IN {sql_in(OPEN_STATUSES)} AND l.record_key = o.record_key"
        )
        statement = d.move_ledger_statement(
            self._q(self.ledger_table),
            relation,
            status=status,
            invalid_answers=(
                f"l.invalid_answers + CASE WHEN o.status = {sql_literal(INVALID_ANSWER)} THEN 1 ELSE 0 END"
            ),
            last_error=f"CASE WHEN o.status = {sql_literal(VALID)} THEN NULL ELSE o.reason END",
            which=which,
        )
        params = [
            *[int(self.attempt_limit)] * limits,
            utcnow(),
            workload.name,
            workload.prompt_version,
            run_id,
        ]
        return d.execute(cursor, statement, params)
