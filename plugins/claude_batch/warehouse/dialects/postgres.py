"""PostgreSQL through psycopg2: COPY ... FROM STDIN of a CSV that pyarrow writes per batch.

Loads stream: each batch is copied into a temporary table (dropped at commit), then set-based
statements join it. The ledger is created with room in each page for a new version of every
row (HOT updates), and the one ledger update of a load gets hash memory for the whole run, for
its transaction only. Text cannot hold U+0000: it is replaced before COPY.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol, cast

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from claude_batch.warehouse.dbapi import Connection, Cursor, Params
from claude_batch.warehouse.dialects.base import Dialect


class _CopyCursor(Cursor, Protocol):
    """A psycopg2 cursor: COPY from a file-like object."""

    def copy_expert(self, sql: str, file: io.BytesIO, /) -> Any: ...


class _NamedCursors(Protocol):
    """A psycopg2 connection: named (server-side) cursors."""

    def cursor(self, name: str) -> Any: ...

    def commit(self) -> Any: ...


def _without_nul_characters(data: pa.Table | pa.RecordBatch) -> pa.Table | pa.RecordBatch:
    """PostgreSQL text cannot hold U+0000: replace it (only model output could carry one)."""
    columns = []
    changed = False
    for column in data.columns:
        if pa.types.is_string(column.type) and pc.any(pc.match_substring(column, "\x00")).as_py():
            column = pc.replace_substring(column, "\x00", "\ufffd")
            changed = True
        columns.append(column)
    if not changed:
        return data
    return type(data).from_arrays(columns, schema=data.schema)


class PostgresDialect(Dialect):
    """PostgreSQL (psycopg2): COPY ... FROM STDIN of a CSV that pyarrow writes per batch."""

    name = "postgres"
    placeholder = "%s"
    # Room in each page for a new version of every row on it lets PostgreSQL update ledger rows
    # on their page (HOT), without index writes: a load's ledger update runs about 4x faster.
    ledger_options = " WITH (fillfactor = 40)"
    temp_table_options = " ON COMMIT DROP"
    # Hash memory for the load's one ledger update: enough to join a million-item run in one
    # pass (a hash spilled into batches revisits every ledger page once per batch).
    join_work_mem = "256MB"
    _types = {**Dialect._types, "string": "TEXT"}

    def query_text(self, sql: str) -> str:
        # psycopg2 interpolates client-side: a literal % must be doubled.
        return sql.replace("%", "%%")

    def stream(
        self, conn: Connection, sql: str, params: Params, chunk_rows: int
    ) -> Iterator[list[dict[str, Any]]]:
        # A named (server-side) cursor: rows arrive chunk by chunk, never all at once.
        server_side = cast(_NamedCursors, conn)
        cursor = server_side.cursor(name=f"claude_batch_extract_{uuid.uuid4().hex[:12]}")
        cursor.itersize = chunk_rows
        try:
            cursor.execute(sql, tuple(params))
            names: list[str] | None = None
            while rows := cursor.fetchmany(chunk_rows):
                if names is None:
                    names = [column[0] for column in cursor.description]
                yield [dict(zip(names, row, strict=True)) for row in rows]
        finally:
            cursor.close()
            server_side.commit()  # ends the read transaction the named cursor needed

    def empty_table(self, cursor: Cursor, table: str) -> None:
        self.execute(cursor, f"TRUNCATE {self.quote(table)}")

    def analyze(self, cursor: Cursor, table: str) -> None:
        self.execute(cursor, f"ANALYZE {self.quote(table)}")

    @contextmanager
    def join_memory(self, cursor: Cursor) -> Iterator[None]:
        # Raised for this transaction only (set_config(..., true)), never lowered, put back after.
        previous = self.query(cursor, "SELECT current_setting('work_mem')")[0][0]
        self.query(
            cursor,
            """SELECT set_config('work_mem', CASE WHEN pg_size_bytes(current_setting('work_mem'))
                < pg_size_bytes(%s) THEN %s ELSE current_setting('work_mem') END, true)""",
            [self.join_work_mem, self.join_work_mem],
        )
        yield
        self.query(cursor, "SELECT set_config('work_mem', %s, true)", [previous])

    def refresh_statistics(self, conn: Connection, table: str) -> None:
        # A claim can add 100,000s of rows of a new prompt version that autovacuum has not seen:
        # the planner then takes them for one row and probes every staged key against each
        # (measured: mark_submitted of one 100,000-item shard ran past 8 minutes). In its own
        # short transaction, so no claim holds the table's ANALYZE lock while it waits on rows.
        with self.transaction(conn) as cursor:
            self.execute(cursor, f"ANALYZE {table}")

    @contextmanager
    def rows_relation(
        self, cursor: Cursor, name: str, data: pa.Table | pa.RecordBatch, *, joined: bool = False
    ) -> Iterator[str]:
        with super().rows_relation(cursor, name, data) as relation:
            if joined:  # statistics let the planner hash-join the batch instead of probing row by row
                self.execute(cursor, f"ANALYZE {relation}")
            yield relation

    def load_arrow(self, cursor: Cursor, table: str, data: pa.Table | pa.RecordBatch) -> int:
        if data.num_rows == 0:
            return 0
        data = _without_nul_characters(data)
        buffer = io.BytesIO()
        pacsv.write_csv(data, buffer, pacsv.WriteOptions(include_header=False, quoting_style="needed"))
        buffer.seek(0)
        columns = ", ".join(self.quote(name) for name in data.schema.names)
        # Unquoted empty fields are NULL, quoted "" is the empty string: pyarrow writes both so.
        copy = f"COPY {self.quote(table)} ({columns}) FROM STDIN WITH (FORMAT csv)"
        cast(_CopyCursor, cursor).copy_expert(copy, buffer)
        return data.num_rows
