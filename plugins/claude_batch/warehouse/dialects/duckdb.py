"""DuckDB, the embedded default: reads the run's Parquet itself, scans Arrow tables in place.

Within a load DuckDB keeps to a memory budget (:class:`DuckDBDialect`'s ``load_memory_limit``,
spilling the rest to disk) and restores the database's own limit afterwards; a lower limit the
user set is kept. A load that runs out of memory within the budget is rolled back and run again
with twice the budget, up to the database's own limit. DuckDB updates rows one by one in a join's
order, and its ``ON CONFLICT`` costs about twice a plain ``INSERT``: the ledger moves by a
join-computed upsert and new results go in by an ``INSERT`` of their own.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Generator, Iterator, Sequence
from contextlib import closing, contextmanager
from typing import TYPE_CHECKING, Any, Protocol, cast

import pyarrow as pa

from claude_batch.warehouse.dbapi import Connection, Cursor, Params
from claude_batch.warehouse.dialects.base import Dialect, RunLoad, StreamedRows
from claude_batch.warehouse.types import WarehouseError, validate_identifier

if TYPE_CHECKING:
    import duckdb

    from claude_batch.storage import ObjectStore
    from claude_batch.warehouse.types import LoadSummary

# Enough for DuckDB to load a run of a million rows at full speed: at 256 MiB it spills, costing
# a 1,000,000-row load about 30% more CPU, and sometimes runs out of memory (bench/RESULTS.md).
DEFAULT_DUCKDB_LOAD_MEMORY = "512MiB"
# What a load's transaction keeps in DuckDB memory that cannot spill (the ledger rows' old values,
# the new rows' index entries), per row loaded: a 3,000,000-row run loaded within 600 MB. Below
# that a load runs out of memory, and is run again with twice the budget.
_DUCKDB_UNSPILLED_BYTES_PER_ROW = 200
log = logging.getLogger(__name__)
_MEMORY_SIZE = re.compile(r"(\d+(?:\.\d+)?) ?(bytes|B|([KMGTPE])(i?)B)", re.IGNORECASE)
_MEMORY_POWERS = {prefix: power for power, prefix in enumerate("KMGTPE", start=1)}


def _memory_bytes(size: str) -> float | None:
    """Bytes in a DuckDB memory size such as ``512MiB``, ``1GB`` or ``18.8 GiB``; None if it is not one."""
    match = _MEMORY_SIZE.fullmatch(size.strip())
    if not match:
        return None
    number, _, prefix, binary = match.groups()
    if prefix is None:
        return float(number)
    return float(number) * (1024 if binary else 1000) ** _MEMORY_POWERS[prefix.upper()]


def _memory_limit(db: duckdb.DuckDBPyConnection) -> str:
    """The database's memory_limit as DuckDB shows it (``18.8 GiB``)."""
    setting = db.execute("SELECT current_setting('memory_limit')").fetchone()
    return str(setting[0] if setting else None)


def _fsspec_name(fs: Any) -> str:
    """The name DuckDB registers an fsspec filesystem under (its first protocol)."""
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


class _OlderDuckDBResult(Protocol):
    """A result of a DuckDB before ``to_arrow_reader``: batches through ``fetch_record_batch``."""

    def fetch_record_batch(self, rows_per_batch: int, /) -> pa.RecordBatchReader: ...


def _duckdb(conn: Connection | Cursor) -> duckdb.DuckDBPyConnection:
    """The DuckDB connection behind a DB-API handle (inside a transaction it is its own cursor)."""
    return cast("duckdb.DuckDBPyConnection", conn)


class DuckDBDialect(Dialect):
    """DuckDB: reads the run's Parquet itself and Arrow tables registered on the connection.

    :param load_memory_limit: the most memory DuckDB may use while a load runs (it spills the
        rest to disk), so a load's peak stays at the budget as runs grow; raised by 200 bytes a row
        for runs of more than 2.7 million rows (see ``_DUCKDB_UNSPILLED_BYTES_PER_ROW``), and
        doubled for a load that runs out of memory within it; a lower limit already set on the
        database is kept. None leaves DuckDB's own limit (80% of RAM by default).
    """

    name = "duckdb"
    placeholder = "?"
    _types = {**Dialect._types, "string": "VARCHAR", "double": "DOUBLE"}

    def __init__(self, load_memory_limit: str | None = DEFAULT_DUCKDB_LOAD_MEMORY) -> None:
        if load_memory_limit is not None and _memory_bytes(load_memory_limit) is None:
            raise WarehouseError(
                f"{load_memory_limit!r} is not a memory size (a number and B, KB, MiB, GB, ...)"
            )
        self.load_memory_limit = load_memory_limit

    @contextmanager
    def transaction(self, conn: Connection) -> Iterator[Cursor]:
        # A DuckDB "cursor" is a second connection with its own transaction: use conn itself.
        db = _duckdb(conn)
        db.execute("BEGIN TRANSACTION")
        try:
            yield cast(Cursor, db)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def execute(self, cursor: Cursor, sql: str, params: Params = ()) -> int:
        cursor.execute(sql, list(params))
        # Reading the result completes the statement (DuckDB 2 keeps it pending otherwise);
        # data-changing statements answer with their row count.
        description = cursor.description
        rows = cursor.fetchall() if description else []
        return int(rows[0][0]) if rows and description and description[0][0] == "Count" else -1

    def stream(
        self, conn: Connection, sql: str, params: Params, chunk_rows: int
    ) -> Iterator[list[dict[str, Any]]]:
        with closing(self._batches(conn, sql, params, chunk_rows)) as batches:
            for batch in batches:
                yield batch.to_pylist()

    def stream_batches(self, conn: Connection, sql: str, params: Params, chunk_rows: int) -> StreamedRows:
        # DuckDB hands out Arrow: staging reads its batches' columns without a dict per row.
        return self._batches(conn, sql, params, chunk_rows)

    def _batches(
        self, conn: Connection, sql: str, params: Params, chunk_rows: int
    ) -> Generator[pa.RecordBatch]:
        """The query's non-empty record batches of at most ``chunk_rows`` rows, as DuckDB reads them."""
        db = _duckdb(conn)
        relation = db.sql(sql, params=list(params))
        reader = relation.to_arrow_reader(chunk_rows) if hasattr(relation, "to_arrow_reader") else None
        if reader is None:  # older DuckDB
            reader = cast(_OlderDuckDBResult, db.execute(sql, list(params))).fetch_record_batch(chunk_rows)
        try:
            for batch in reader:
                if batch.num_rows:
                    yield batch
        finally:
            # A consumer that stops early (a failed staging) must not leave the result pending
            # on the connection: the next statement would wait on it.
            reader.close()

    @contextmanager
    def rows_relation(
        self, cursor: Cursor, name: str, data: pa.Table | pa.RecordBatch, *, joined: bool = False
    ) -> Iterator[str]:
        # DuckDB scans a registered Arrow table in place: no copy into a temporary table.
        db = _duckdb(cursor)
        view = f"{validate_identifier(name)}_{uuid.uuid4().hex[:12]}"
        db.register(view, data)
        try:
            yield self.quote(view)
        finally:
            db.unregister(view)

    @contextmanager
    def parquet_relation(
        self, cursor: Cursor, name: str, store: ObjectStore, paths: Sequence[str]
    ) -> Iterator[str]:
        # DuckDB's own reader streams row groups and reads only the columns a statement uses.
        # A remote store is read through its fsspec filesystem, so its credentials stay there.
        db = _duckdb(cursor)
        view = f"{validate_identifier(name)}_{uuid.uuid4().hex[:12]}"
        remote = store.protocol != "file"
        if remote:
            db.register_filesystem(store.fs)
        try:
            db.read_parquet([store.uri(path) for path in paths]).create_view(view)
            yield self.quote(view)
            self.execute(cursor, f"DROP VIEW {self.quote(view)}")
        finally:
            if remote:
                db.unregister_filesystem(_fsspec_name(store.fs))

    def load_budget(self, rows: int) -> int | None:
        """The memory budget of a load of ``rows`` rows, in bytes (None: DuckDB's own limit)."""
        if self.load_memory_limit is None:
            return None
        return int(max(_memory_bytes(self.load_memory_limit) or 0, rows * _DUCKDB_UNSPILLED_BYTES_PER_ROW))

    @contextmanager
    def load_memory(self, conn: Connection, limit: int | None) -> Iterator[None]:
        """Bound the memory DuckDB may use to ``limit`` bytes while a load runs, if that is lower."""
        if limit is None:
            yield
            return
        db = _duckdb(conn)
        current = _memory_limit(db)
        current_bytes = _memory_bytes(current)
        if current_bytes is None or current_bytes <= limit:
            yield  # a lower limit is kept (and one we cannot read is not touched)
            return
        # SET takes no parameters: the limit is an int, and current matched _MEMORY_SIZE (digits, a unit).
        db.execute(f"SET memory_limit = '{limit}B'")
        try:
            yield
        finally:
            # DuckDB shows the limit rounded to 0.1 of its unit: restored to that precision.
            db.execute(f"SET memory_limit = '{current}'")

    # -- statements that differ ----------------------------------------------------------------

    def ledger_indexes(self, ledger_table: str) -> list[str]:
        # DuckDB's indexes slow updates more than the accounting check gains from one.
        return []

    def load_run(self, conn: Connection, run: RunLoad) -> LoadSummary:
        # One statement per table over all the parts, read by DuckDB, within the memory budget.
        import duckdb

        rows = run.rows()
        limit = self.load_budget(rows)
        while True:
            try:
                with self.load_memory(conn, limit):
                    return run.reading_parquet()
            except duckdb.OutOfMemoryException as exc:
                # The load's transaction was rolled back: nothing of it is left to undo.
                database_limit = _memory_limit(_duckdb(conn))
                ceiling = _memory_bytes(database_limit)
                if limit is None or ceiling is None or limit >= ceiling:
                    raise WarehouseError(
                        f"DuckDB ran out of memory loading {rows:,} rows within its memory_limit "
                        f"({database_limit}); nothing was loaded. Raise the database's "
                        f"memory_limit. ({exc})"
                    ) from exc
                log.warning(
                    "DuckDB ran out of memory loading %s rows within %s MiB; nothing was loaded, "
                    "loading again within %s MiB.",
                    f"{rows:,}", limit >> 20, min(2 * limit, int(ceiling)) >> 20,
                )  # fmt: skip
                limit = min(2 * limit, int(ceiling))

    def move_ledger_statement(
        self, ledger: str, outcomes: str, *, status: str, invalid_answers: str, last_error: str, which: str
    ) -> str:
        # DuckDB updates rows one by one in the join's order, slow when it is not the table's:
        # a join-computed upsert moves ledger rows faster.
        p = self.placeholder
        return f"""INSERT INTO {ledger} (workload, record_key, prompt_version, custom_id, status, attempts,
                invalid_answers, last_error, batch_id, run_id, updated_at)
            SELECT l.workload, l.record_key, l.prompt_version, l.custom_id, {status}, l.attempts + 1,
                {invalid_answers}, {last_error}, o.batch_id, l.run_id, {p}
            FROM {ledger} l JOIN {outcomes} o ON l.record_key = o.record_key
            WHERE {which}
            ON CONFLICT (workload, record_key, prompt_version) DO UPDATE SET
                status = excluded.status, attempts = excluded.attempts,
                invalid_answers = excluded.invalid_answers, last_error = excluded.last_error,
                batch_id = excluded.batch_id, updated_at = excluded.updated_at"""

    def upsert_statements(self, table: str, rows: str, columns: str, updates: str) -> list[str]:
        # ON CONFLICT costs about twice the time and memory of a plain INSERT here: rows already
        # stored first (a re-run), then the new ones by a plain INSERT, so none is upserted twice.
        p = self.placeholder
        stored = (
            f"SELECT 1 FROM {table} r "
            "WHERE r.record_key = v.record_key AND r.prompt_version = v.prompt_version"
        )
        return [
            f"""INSERT INTO {table} ({columns}, run_id, loaded_at)
            SELECT {columns}, {p}, {p} FROM {rows} v WHERE EXISTS ({stored})
            ON CONFLICT (record_key, prompt_version) DO UPDATE SET {updates}""",
            f"""INSERT INTO {table} ({columns}, run_id, loaded_at)
            SELECT {columns}, {p}, {p} FROM {rows} v WHERE NOT EXISTS ({stored})""",
        ]
