"""The dialect seam: everything that differs between warehouses, behind one class.

A :class:`Dialect` owns placeholders, column types, transactions, streaming, bulk loads and
every statement whose SQL differs between engines (the ledger's outcome update, the results
upsert, the load strategy), so the warehouse steps never branch on the engine. A new warehouse
is one module in this package with a subclass, plus one entry in the registry
(``claude_batch.warehouse.dialects``). Identifiers reach SQL only through :meth:`Dialect.quote`
(validated, then quoted); values only as bound parameters.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa

from claude_batch.warehouse.dbapi import Connection, Cursor, Params, Row
from claude_batch.warehouse.types import WarehouseError, validate_identifier

# What :meth:`Dialect.stream_batches` yields: a query's rows as dicts, or as Arrow record batches.
StreamedRows = Iterator[dict[str, Any]] | Iterator[pa.RecordBatch]

if TYPE_CHECKING:
    from claude_batch.storage import ObjectStore
    from claude_batch.warehouse.types import LoadSummary


class RunLoad(Protocol):
    """One run's load, in the two ways a dialect can choose from (see :meth:`Dialect.load_run`)."""

    def rows(self) -> int:
        """How many rows the run's manifest says the load's parts hold."""
        ...

    def streaming(self) -> LoadSummary:
        """Send the rows batch by batch through :meth:`Dialect.load_arrow`."""
        ...

    def reading_parquet(self) -> LoadSummary:
        """Let the engine read the run's Parquet itself (:meth:`Dialect.parquet_relation`)."""
        ...


class Dialect:
    """What differs between warehouses: placeholders, types, transactions, streaming, bulk loads."""

    name = "generic"
    placeholder = "?"
    # Table options for the ledger, which is updated more than it grows.
    ledger_options = ""
    _types: dict[str, str] = {
        "string": "VARCHAR",
        "int64": "BIGINT",
        "double": "DOUBLE PRECISION",
        "bool": "BOOLEAN",
        "date32[day]": "DATE",
        "timestamp[us]": "TIMESTAMP",
    }

    def quote(self, name: str) -> str:
        """The validated identifier, double-quoted part by part."""
        return ".".join(f'"{part}"' for part in validate_identifier(name).split("."))

    def sql_type(self, arrow_type: pa.DataType) -> str:
        try:
            return self._types[str(arrow_type)]
        except KeyError:
            raise WarehouseError(f"no {self.name} column type for Arrow type {arrow_type}") from None

    def query_text(self, sql: str) -> str:
        """A user's SQL text as it must appear in a statement that also has parameters."""
        return sql

    def bind(self, params: Params) -> list[Any] | tuple[Any, ...]:
        """Parameters as the driver's ``execute`` takes them (a list for ``?``, else a tuple)."""
        return list(params) if self.placeholder == "?" else tuple(params)

    @contextmanager
    def transaction(self, conn: Connection) -> Iterator[Cursor]:
        """A cursor inside one transaction: committed on success, rolled back on any error."""
        cursor = conn.cursor()
        try:
            yield cursor
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        finally:
            cursor.close()

    def execute(self, cursor: Cursor, sql: str, params: Params = ()) -> int:
        """Run one statement; returns the rows it changed (-1 when the driver does not say)."""
        cursor.execute(sql, tuple(params))
        return int(getattr(cursor, "rowcount", -1) or 0)

    def query(self, cursor: Cursor, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        """Run a query and return all its rows (for small answers: counts, samples)."""
        cursor.execute(sql, self.bind(params))
        return [tuple(row) for row in cursor.fetchall()]

    def stream(
        self, conn: Connection, sql: str, params: Params, chunk_rows: int
    ) -> Iterator[list[dict[str, Any]]]:
        """The query's rows as dicts, ``chunk_rows`` at a time."""
        cursor = conn.cursor()
        try:
            cursor.execute(sql, tuple(params))
            names = [column[0] for column in cursor.description]
            while rows := cursor.fetchmany(chunk_rows):
                yield [dict(zip(names, row, strict=True)) for row in rows]
        finally:
            cursor.close()

    def stream_batches(self, conn: Connection, sql: str, params: Params, chunk_rows: int) -> StreamedRows:
        """The query's rows as Arrow record batches where the engine gives them so, else as dicts.

        Staging reads either (:func:`claude_batch.staging.stage_requests`). The default yields
        :meth:`stream`'s dicts one by one: building batches from a driver's Python rows would
        cost more than staging saves on them, and would guess each column's type from its values.
        A dialect whose driver hands out Arrow (DuckDB) yields its batches as they come.
        """
        return (row for chunk in self.stream(conn, sql, params, chunk_rows) for row in chunk)

    @contextmanager
    def rows_relation(
        self, cursor: Cursor, name: str, data: pa.Table | pa.RecordBatch, *, joined: bool = False
    ) -> Iterator[str]:
        """``data`` as a relation the statements of this transaction can select from.

        The bulk path: a temporary table filled by the dialect's fastest load (COPY for
        PostgreSQL), or the Arrow data itself where the engine can scan it (DuckDB).

        :param name: a name for the relation (unique within the transaction).
        :param data: the rows.
        :param joined: whether a statement will join it (worth gathering statistics for).
        """
        self.create_temp_table(cursor, name, [(f.name, f.type) for f in data.schema])
        try:
            self.load_arrow(cursor, name, data)
            yield self.quote(name)
        finally:
            self.drop_temp_table(cursor, name)

    def create_temp_table(
        self, cursor: Cursor, name: str, columns: Sequence[tuple[str, pa.DataType]]
    ) -> None:
        body = ", ".join(f"{self.quote(column)} {self.sql_type(kind)}" for column, kind in columns)
        self.execute(cursor, f"DROP TABLE IF EXISTS {self.quote(name)}")
        self.execute(cursor, f"CREATE TEMPORARY TABLE {self.quote(name)} ({body}){self.temp_table_options}")

    # What a temporary table's CREATE ends with (PostgreSQL drops it at commit).
    temp_table_options = ""

    def drop_temp_table(self, cursor: Cursor, name: str) -> None:
        self.execute(cursor, f"DROP TABLE IF EXISTS {self.quote(name)}")

    def refresh_statistics(self, conn: Connection, table: str) -> None:
        """Bring the planner's statistics of ``table`` up to date after a bulk change (if it keeps any)."""

    def load_arrow(self, cursor: Cursor, table: str, data: pa.Table | pa.RecordBatch) -> int:
        """Append ``data`` to ``table`` (same column names) through the warehouse's bulk path.

        The generic fallback is executemany, row by row: a new warehouse should override it with
        its bulk load (a stage and ``COPY INTO`` for Snowflake, ``COPY`` from S3 for Redshift).
        """
        if data.num_rows == 0:
            return 0
        names = data.schema.names
        marks = ", ".join([self.placeholder] * len(names))
        columns = ", ".join(self.quote(name) for name in names)
        rows: list[Row] = list(zip(*(data.column(i).to_pylist() for i in range(len(names))), strict=True))
        cursor.executemany(f"INSERT INTO {self.quote(table)} ({columns}) VALUES ({marks})", rows)
        return data.num_rows

    @contextmanager
    def staging_table(
        self, cursor: Cursor, name: str, columns: Sequence[tuple[str, pa.DataType]]
    ) -> Iterator[str]:
        """An empty temporary table for bulk loads within this transaction; yields its quoted name.

        Dropped when the block ends; a failed block leaves it to the transaction's rollback
        (a statement in an aborted transaction would hide the error that aborted it).
        """
        self.create_temp_table(cursor, name, columns)
        yield self.quote(name)
        self.drop_temp_table(cursor, name)

    def empty_table(self, cursor: Cursor, table: str) -> None:
        """Remove every row of a staging table, to fill it again."""
        self.execute(cursor, f"DELETE FROM {self.quote(table)}")

    def analyze(self, cursor: Cursor, table: str) -> None:
        """Gather statistics on a freshly filled staging table (where the planner needs them)."""

    @contextmanager
    def join_memory(self, cursor: Cursor) -> Iterator[None]:
        """Room for one statement joining a whole run's rows (where the server can be told)."""
        yield

    @contextmanager
    def parquet_relation(
        self, cursor: Cursor, name: str, store: ObjectStore, paths: Sequence[str]
    ) -> Iterator[str]:
        """The Parquet objects ``paths`` of ``store`` as a relation the engine reads itself.

        Only for dialects whose :meth:`load_run` reads Parquet: such a dialect must provide it
        (and read the store's files without the rows passing through Python).
        """
        raise NotImplementedError(
            f"the {self.name} dialect loads by reading Parquet but does not provide parquet_relation"
        )

    # -- statements that differ between engines ------------------------------------------------

    def ledger_indexes(self, ledger_table: str) -> list[str]:
        """The ledger's secondary indexes: (workload, run_id) serves the accounting check."""
        index = validate_identifier(f"{ledger_table.split('.')[-1]}_run")
        return [
            f"CREATE INDEX IF NOT EXISTS {self.quote(index)} ON {self.quote(ledger_table)} (workload, run_id)"
        ]

    def load_run(self, conn: Connection, run: RunLoad) -> LoadSummary:
        """Load one run the engine's best way: here, streamed through :meth:`load_arrow`."""
        return run.streaming()

    def move_ledger_statement(
        self, ledger: str, outcomes: str, *, status: str, invalid_answers: str, last_error: str, which: str
    ) -> str:
        """The statement moving ledger rows ``l`` by outcomes ``o`` (see ``Warehouse.load_run``).

        The expressions given are over ``l`` and ``o``; the statement binds one placeholder of
        its own, ``updated_at``, after those of ``status`` and before those of ``which``.
        Here: one ``UPDATE ... FROM``, the best plan where updates follow the join.
        """
        p = self.placeholder
        return f"""UPDATE {ledger} AS l SET status = {status}, attempts = l.attempts + 1,
                invalid_answers = {invalid_answers}, last_error = {last_error}, batch_id = o.batch_id,
                updated_at = {p}
            FROM {outcomes} o WHERE {which}"""

    def upsert_statements(self, table: str, rows: str, columns: str, updates: str) -> list[str]:
        """Statements putting ``rows`` into results ``table``, overwriting rows with their keys.

        Each binds ``run_id`` and ``loaded_at``, in that order. Here: one ``ON CONFLICT`` upsert.
        """
        p = self.placeholder
        return [
            f"""INSERT INTO {table} ({columns}, run_id, loaded_at)
            SELECT {columns}, {p}, {p} FROM {rows} v
            ON CONFLICT (record_key, prompt_version) DO UPDATE SET {updates}"""
        ]
