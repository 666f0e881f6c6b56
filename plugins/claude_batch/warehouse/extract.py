"""Extract: the rows a run sends, streamed from the source, with the ledger deciding which.

A run extracts its data interval, plus every ledger item due for retry (``retry``, ``invalid``)
whatever the interval, minus items done for the prompt version (``succeeded``, ``dead``) and
items another run holds open (``pending``, ``submitted``): what keeps an item from being paid
for twice. Each row gains :data:`RECORD_KEY_COLUMN`, the key as the warehouse itself casts it
to text; staging, the ledger and every comparison use that one text (docs/architecture.md,
*custom_id*). Rows stream in chunks, never all at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from claude_batch.warehouse.dialects.base import StreamedRows
from claude_batch.warehouse.ledger import (
    DONE_STATUSES,
    DUE_STATUSES,
    OPEN_STATUSES,
    PENDING,
    sql_in,
    sql_literal,
)
from claude_batch.warehouse.tables import WarehouseTables
from claude_batch.warehouse.types import SourceSpec
from claude_batch.workloads import Workload

# The column extract adds to every row: the key column's value as the warehouse itself casts it to
# text. Staging, the ledger and every comparison use this one text, so a CHAR(n), timestamp,
# decimal or UUID key means the same item everywhere (see docs/layout.md, the ledger's columns).
RECORD_KEY_COLUMN = "_claude_batch_record_key"


class ExtractMixin(WarehouseTables):
    """The extract steps of :class:`~claude_batch.warehouse.Warehouse`."""

    def _source_select(self, source: SourceSpec) -> tuple[str, str, str]:
        """The select list (with the record key as text), the FROM item and the key-as-text expression."""
        key_text = f"CAST(src.{self._q(source.key_column)} AS {self.dialect.sql_type(pa.string())})"
        columns = ", ".join(f"src.{self._q(c)}" for c in source.columns) if source.columns else "src.*"
        columns += f", {key_text} AS {self._q(RECORD_KEY_COLUMN)}"
        origin = self._q(source.table) if source.table else f"({self.dialect.query_text(source.query or '')})"
        return columns, origin, key_text

    def extract_query(
        self,
        workload: Workload,
        source: SourceSpec,
        run_id: str,
        interval: tuple[Any, Any] | None,
    ) -> tuple[str, list[Any]]:
        """The extract statement and its parameters (see :meth:`extract`)."""
        p = self.dialect.placeholder
        ledger = self._q(self.ledger_table)
        columns, origin, key_text = self._source_select(source)
        params: list[Any] = []
        wanted = []
        if interval is not None and source.interval_column is not None:
            stamp = f"src.{self._q(source.interval_column)}"
            wanted.append(f"({stamp} >= {p} AND {stamp} < {p})")
            params += [interval[0], interval[1]]
        else:
            # No interval, or a source without a time column: every row not yet done (the
            # ledger keeps each run incremental).
            wanted.append("1 = 1")
        wanted.append(
            f"{key_text} IN (SELECT r.record_key FROM {ledger} r WHERE r.workload = {p} "
            f"AND r.prompt_version = {p} AND r.status IN {sql_in(DUE_STATUSES)})"
        )
        params += [workload.name, workload.prompt_version]
        sql = (
            f"SELECT {columns} FROM {origin} src WHERE ({' OR '.join(wanted)}) "
            f"AND NOT EXISTS (SELECT 1 FROM {ledger} d WHERE d.workload = {p} AND d.prompt_version = {p} "
            f"AND d.record_key = {key_text} AND (d.status IN {sql_in(DONE_STATUSES)} "
            f"OR (d.status IN {sql_in(OPEN_STATUSES)} AND d.run_id <> {p})))"
        )
        params += [workload.name, workload.prompt_version, run_id]
        return sql, params

    def source_columns(self, source: SourceSpec) -> list[str]:
        """The column names the source yields (a query that reads no rows)."""
        from claude_batch.preflight import source_columns_query

        sql, params = source_columns_query(source, self.dialect)
        with self.dialect.transaction(self.conn) as cursor:
            cursor.execute(sql, self.dialect.bind(params))
            names = [column[0] for column in cursor.description]
            cursor.fetchall()
        return names

    def extract(
        self,
        workload: Workload,
        source: SourceSpec,
        run_id: str,
        interval: tuple[Any, Any] | None = None,
        *,
        chunk_rows: int = 10_000,
    ) -> Iterator[dict[str, Any]]:
        """Stream the run's rows: the data interval, plus ledger items due for retry, minus done ones.

        Done means ``succeeded`` or ``dead`` for this prompt version, or in flight (``pending``,
        ``submitted``) for another run, which is what keeps an item from being paid for twice.

        :param workload: the workload (name and prompt version select its ledger rows).
        :param source: where the rows live.
        :param run_id: this run's id (its own in-flight items are extracted again on a re-run).
        :param interval: ``(start, end)``, half-open, compared with ``source.interval_column``;
            None extracts every row.
        :param chunk_rows: rows fetched per round trip.
        """
        sql, params = self.extract_query(workload, source, run_id, interval)
        for chunk in self.dialect.stream(self.conn, sql, params, chunk_rows):
            yield from chunk

    def extract_batches(self, statement: tuple[str, list[Any]], *, chunk_rows: int = 10_000) -> StreamedRows:
        """The rows of an extract statement, as Arrow record batches where the dialect gives them so.

        What staging reads (:meth:`Dialect.stream_batches`): DuckDB's batches as they come,
        without a dict per row; other warehouses' rows as dicts.

        :param statement: the SQL and its parameters (:meth:`extract_query`: :meth:`extract`'s rows).
        :param chunk_rows: the most rows a batch (or a round trip) holds.
        """
        sql, params = statement
        return self.dialect.stream_batches(self.conn, sql, params, chunk_rows)

    def extract_held(
        self, workload: Workload, source: SourceSpec, run_id: str, *, chunk_rows: int = 10_000
    ) -> Iterator[dict[str, Any]]:
        """Stream the source rows of the items this run holds ``pending`` (a follow-up round's rows)."""
        p = self.dialect.placeholder
        ledger = self._q(self.ledger_table)
        columns, origin, key_text = self._source_select(source)
        sql = (
            f"SELECT {columns} FROM {origin} src WHERE {key_text} IN (SELECT h.record_key FROM {ledger} h "
            f"WHERE h.workload = {p} AND h.prompt_version = {p} AND h.run_id = {p} "
            f"AND h.status = {sql_literal(PENDING)})"
        )
        for chunk in self.dialect.stream(
            self.conn, sql, [workload.name, workload.prompt_version, run_id], chunk_rows
        ):
            yield from chunk
