"""The warehouse side: extract, the ledger, bulk loads, the accounting check and run history.

Works on any DB-API connection through a :class:`Dialect`: DuckDB (the embedded default) and
PostgreSQL here; Snowflake or Redshift fill the same seam later. Every value is a bound
parameter and every identifier is validated and quoted, so no row content ever becomes SQL.
Loads go through the bulk paths, streaming the run's validated Parquet so memory stays flat
however many rows a run has: PostgreSQL gets COPY from CSV that pyarrow writes batch by batch
into temporary tables, then set-based statements; DuckDB reads the Parquet itself, one
statement per table, within a memory budget. Results are upserted by (record key, prompt
version), so a re-run never duplicates, and the ledger moves in the same transaction: a failure
mid-load leaves nothing half-done.

The ledger holds one row per (workload, record key, prompt version): ``pending`` once staged,
``submitted`` once in a batch, then ``succeeded``, ``invalid`` (an answer that failed
validation, retried once), ``retry`` (errored, expired or canceled, retried up to the attempt
limit) or ``dead`` (``invalid_request_error``, rejected input, or out of attempts). Items due
for retry are extracted again by the next run; items done for the prompt version never are.
"""

from __future__ import annotations

import io
import logging
import re
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from claude_batch.costs import PriceTable, default_prices
from claude_batch.staging import Manifest, iter_rejections, read_shard_keys
from claude_batch.storage import ObjectStore, RunLayout
from claude_batch.validation import iter_validated, validated_path
from claude_batch.workloads import CacheObservation, Workload

log = logging.getLogger(__name__)

DEFAULT_LEDGER_TABLE = "claude_batch_ledger"
# The column extract adds to every row: the key column's value as the warehouse itself casts it to
# text. Staging, the ledger and every comparison use this one text, so a CHAR(n), timestamp,
# decimal or UUID key means the same item everywhere (see docs/layout.md, the ledger's columns).
RECORD_KEY_COLUMN = "_claude_batch_record_key"
# A claim of this many rows or more refreshes the ledger's planner statistics (PostgreSQL).
STATISTICS_REFRESH_ROWS = 1_000
DEFAULT_RUNS_TABLE = "claude_batch_runs"
DEFAULT_ATTEMPT_LIMIT = 3
# Enough for DuckDB to load a run of a million rows at nearly full speed; beyond it DuckDB spills.
DEFAULT_DUCKDB_LOAD_MEMORY = "512MiB"
# What a load's transaction keeps in DuckDB memory that cannot spill, per row loaded (measured
# near 100 bytes: 256MiB failed with "Out of Memory" at 3 million rows); the limit leaves twice that.
_DUCKDB_UNSPILLED_BYTES_PER_ROW = 200
LEDGER_STATUSES = ("pending", "submitted", "succeeded", "invalid", "retry", "dead")
FINAL_STATUSES = ("succeeded", "invalid", "retry", "dead")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_RESULT_META_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("record_key", pa.string()),
    ("prompt_version", pa.string()),
    ("custom_id", pa.string()),
    ("model", pa.string()),
    ("batch_id", pa.string()),
    ("output_json", pa.string()),
]
_RESULT_USAGE_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("input_tokens", pa.int64()),
    ("output_tokens", pa.int64()),
    ("cache_creation_input_tokens", pa.int64()),
    ("cache_read_input_tokens", pa.int64()),
    ("cost_usd", pa.float64()),
]
# What the ledger update needs of each validated row.
_OUTCOME_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("record_key", pa.string()),
    ("status", pa.string()),
    ("reason", pa.string()),
    ("error_type", pa.string()),
    ("batch_id", pa.string()),
]
_STAGED_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("record_key", pa.string()),
    ("custom_id", pa.string()),
    ("status", pa.string()),
    ("last_error", pa.string()),
]


class WarehouseError(RuntimeError):
    """A warehouse step that cannot go on (bad identifiers, an unknown connection type)."""


class AccountingError(RuntimeError):
    """A run whose extracted items are not all accounted for; the message names the gap."""


def _utcnow() -> datetime:
    # Stored as naive UTC: both dialects' TIMESTAMP, no time-zone extension needed.
    return datetime.now(UTC).replace(tzinfo=None)


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


# -- dialects -------------------------------------------------------------------------------


class Dialect:
    """What differs between warehouses: placeholders, types, transactions, streaming, bulk loads."""

    name = "generic"
    placeholder = "?"
    # DuckDB updates rows one by one in the join's order, slow when it is not the table's:
    # there a join-computed upsert moves ledger rows faster; elsewhere UPDATE ... FROM is best.
    updates_by_upsert = False
    # An index on (workload, run_id) serves the accounting check; DuckDB's indexes slow updates.
    run_index = True
    # Whether results whose keys are not stored yet go in by a plain INSERT of their own: DuckDB's
    # ON CONFLICT needs about twice the time and memory of a plain INSERT.
    inserts_new_rows_apart = False
    # Whether the engine reads the run's Parquet files itself (:meth:`parquet_relation`); the
    # others are sent the rows batch by batch through :meth:`load_arrow`.
    reads_parquet = False
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

    @contextmanager
    def transaction(self, conn: Any) -> Iterator[Any]:
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

    def execute(self, cursor: Any, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement; returns the rows it changed (-1 when the driver does not say)."""
        cursor.execute(sql, tuple(params))
        return int(getattr(cursor, "rowcount", -1) or 0)

    def query(self, cursor: Any, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a query and return all its rows (for small answers: counts, samples)."""
        cursor.execute(sql, list(params) if self.placeholder == "?" else tuple(params))
        return [tuple(row) for row in cursor.fetchall()]

    def stream(
        self, conn: Any, sql: str, params: Sequence[Any], chunk_rows: int
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

    @contextmanager
    def rows_relation(
        self, cursor: Any, name: str, data: pa.Table | pa.RecordBatch, *, joined: bool = False
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

    def create_temp_table(self, cursor: Any, name: str, columns: Sequence[tuple[str, pa.DataType]]) -> None:
        body = ", ".join(f"{self.quote(column)} {self.sql_type(kind)}" for column, kind in columns)
        self.execute(cursor, f"DROP TABLE IF EXISTS {self.quote(name)}")
        self.execute(cursor, f"CREATE TEMPORARY TABLE {self.quote(name)} ({body})")

    def drop_temp_table(self, cursor: Any, name: str) -> None:
        self.execute(cursor, f"DROP TABLE IF EXISTS {self.quote(name)}")

    def refresh_statistics(self, conn: Any, table: str) -> None:
        """Bring the planner's statistics of ``table`` up to date after a bulk change (if it keeps any)."""

    def load_arrow(self, cursor: Any, table: str, data: pa.Table | pa.RecordBatch) -> int:
        """Append ``data`` to ``table`` (same column names) through the warehouse's bulk path.

        The generic fallback is executemany, row by row: a new warehouse should override it with
        its bulk load (a stage and ``COPY INTO`` for Snowflake, ``COPY`` from S3 for Redshift).
        """
        if data.num_rows == 0:
            return 0
        names = data.schema.names
        marks = ", ".join([self.placeholder] * len(names))
        columns = ", ".join(self.quote(name) for name in names)
        rows = list(zip(*(data.column(i).to_pylist() for i in range(len(names))), strict=True))
        cursor.executemany(f"INSERT INTO {self.quote(table)} ({columns}) VALUES ({marks})", rows)
        return data.num_rows

    @contextmanager
    def staging_table(
        self, cursor: Any, name: str, columns: Sequence[tuple[str, pa.DataType]]
    ) -> Iterator[str]:
        """An empty temporary table for bulk loads within this transaction; yields its quoted name.

        Dropped when the block ends; a failed block leaves it to the transaction's rollback
        (a statement in an aborted transaction would hide the error that aborted it).
        """
        self.create_temp_table(cursor, name, columns)
        yield self.quote(name)
        self.drop_temp_table(cursor, name)

    def empty_table(self, cursor: Any, table: str) -> None:
        """Remove every row of a staging table, to fill it again."""
        self.execute(cursor, f"DELETE FROM {self.quote(table)}")

    def analyze(self, cursor: Any, table: str) -> None:
        """Gather statistics on a freshly filled staging table (where the planner needs them)."""

    @contextmanager
    def join_memory(self, cursor: Any) -> Iterator[None]:
        """Room for one statement joining a whole run's rows (where the server can be told)."""
        yield

    @contextmanager
    def load_memory(self, conn: Any, rows: int) -> Iterator[None]:
        """Bound the memory an in-process engine may use while it loads ``rows`` rows."""
        yield

    @contextmanager
    def parquet_relation(
        self, cursor: Any, name: str, store: ObjectStore, paths: Sequence[str]
    ) -> Iterator[str]:
        """The Parquet objects ``paths`` of ``store`` as a relation the engine reads itself.

        Only for dialects with ``reads_parquet``: such a dialect must provide it (and read the
        store's files without the rows passing through Python).
        """
        raise NotImplementedError(
            f"the {self.name} dialect sets reads_parquet but does not provide parquet_relation"
        )


class DuckDBDialect(Dialect):
    """DuckDB: reads the run's Parquet itself and Arrow tables registered on the connection.

    :param load_memory_limit: the most memory DuckDB may use while a load runs (it spills the
        rest to disk), so a load's peak stays flat as runs grow; raised for runs of more than a
        few million rows (see ``_DUCKDB_UNSPILLED_BYTES_PER_ROW``); a lower limit already set on
        the database is kept. None leaves DuckDB's own limit (80% of RAM by default).
    """

    name = "duckdb"
    placeholder = "?"
    updates_by_upsert = True
    run_index = False
    reads_parquet = True
    inserts_new_rows_apart = True
    _types = {**Dialect._types, "string": "VARCHAR", "double": "DOUBLE"}

    def __init__(self, load_memory_limit: str | None = DEFAULT_DUCKDB_LOAD_MEMORY) -> None:
        if load_memory_limit is not None and _memory_bytes(load_memory_limit) is None:
            raise WarehouseError(
                f"{load_memory_limit!r} is not a memory size (a number and B, KB, MiB, GB, ...)"
            )
        self.load_memory_limit = load_memory_limit

    @contextmanager
    def transaction(self, conn: Any) -> Iterator[Any]:
        # A DuckDB "cursor" is a second connection with its own transaction: use conn itself.
        conn.execute("BEGIN TRANSACTION")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def execute(self, cursor: Any, sql: str, params: Sequence[Any] = ()) -> int:
        cursor.execute(sql, list(params))
        # Reading the result completes the statement (DuckDB 2 keeps it pending otherwise);
        # data-changing statements answer with their row count.
        rows = cursor.fetchall() if cursor.description else []
        return int(rows[0][0]) if rows and cursor.description[0][0] == "Count" else -1

    def stream(
        self, conn: Any, sql: str, params: Sequence[Any], chunk_rows: int
    ) -> Iterator[list[dict[str, Any]]]:
        relation = conn.sql(sql, params=list(params))
        reader = relation.to_arrow_reader(chunk_rows) if hasattr(relation, "to_arrow_reader") else None
        if reader is None:  # older DuckDB
            reader = conn.execute(sql, list(params)).fetch_record_batch(chunk_rows)
        try:
            for batch in reader:
                if batch.num_rows:
                    yield batch.to_pylist()
        finally:
            # A consumer that stops early (a failed staging) must not leave the result pending
            # on the connection: the next statement would wait on it.
            reader.close()

    @contextmanager
    def rows_relation(
        self, cursor: Any, name: str, data: pa.Table | pa.RecordBatch, *, joined: bool = False
    ) -> Iterator[str]:
        # DuckDB scans a registered Arrow table in place: no copy into a temporary table.
        view = f"{validate_identifier(name)}_{uuid.uuid4().hex[:12]}"
        cursor.register(view, data)
        try:
            yield self.quote(view)
        finally:
            cursor.unregister(view)

    @contextmanager
    def parquet_relation(
        self, cursor: Any, name: str, store: ObjectStore, paths: Sequence[str]
    ) -> Iterator[str]:
        # DuckDB's own reader streams row groups and reads only the columns a statement uses.
        # A remote store is read through its fsspec filesystem, so its credentials stay there.
        view = f"{validate_identifier(name)}_{uuid.uuid4().hex[:12]}"
        remote = store.protocol != "file"
        if remote:
            cursor.register_filesystem(store.fs)
        try:
            cursor.read_parquet([store.uri(path) for path in paths]).create_view(view)
            yield self.quote(view)
            self.execute(cursor, f"DROP VIEW {self.quote(view)}")
        finally:
            if remote:
                cursor.unregister_filesystem(_fsspec_name(store.fs))

    @contextmanager
    def load_memory(self, conn: Any, rows: int) -> Iterator[None]:
        if self.load_memory_limit is None:
            yield
            return
        limit = int(max(_memory_bytes(self.load_memory_limit) or 0, rows * _DUCKDB_UNSPILLED_BYTES_PER_ROW))
        current = str(conn.execute("SELECT current_setting('memory_limit')").fetchone()[0])
        current_bytes = _memory_bytes(current)
        if current_bytes is None or current_bytes <= limit:
            yield  # a lower limit is kept (and one we cannot read is not touched)
            return
        # SET takes no parameters: the limit is an int, and current matched _MEMORY_SIZE (digits, a unit).
        conn.execute(f"SET memory_limit = '{limit}B'")
        try:
            yield
        finally:
            # DuckDB shows the limit rounded to 0.1 of its unit: restored to that precision.
            conn.execute(f"SET memory_limit = '{current}'")


class PostgresDialect(Dialect):
    """PostgreSQL (psycopg2): COPY ... FROM STDIN of a CSV that pyarrow writes per batch."""

    name = "postgres"
    placeholder = "%s"
    # Room in each page for a new version of every row on it lets PostgreSQL update ledger rows
    # on their page (HOT), without index writes: a load's ledger update runs about 4x faster.
    ledger_options = " WITH (fillfactor = 40)"
    # Hash memory for the load's one ledger update: enough to join a million-item run in one
    # pass (a hash spilled into batches revisits every ledger page once per batch).
    join_work_mem = "256MB"
    _types = {**Dialect._types, "string": "TEXT"}

    def query_text(self, sql: str) -> str:
        # psycopg2 interpolates client-side: a literal % must be doubled.
        return sql.replace("%", "%%")

    def stream(
        self, conn: Any, sql: str, params: Sequence[Any], chunk_rows: int
    ) -> Iterator[list[dict[str, Any]]]:
        # A named (server-side) cursor: rows arrive chunk by chunk, never all at once.
        cursor = conn.cursor(name=f"claude_batch_extract_{uuid.uuid4().hex[:12]}")
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
            conn.commit()  # ends the read transaction the named cursor needed

    def create_temp_table(self, cursor: Any, name: str, columns: Sequence[tuple[str, pa.DataType]]) -> None:
        body = ", ".join(f"{self.quote(column)} {self.sql_type(kind)}" for column, kind in columns)
        self.execute(cursor, f"DROP TABLE IF EXISTS {self.quote(name)}")
        self.execute(cursor, f"CREATE TEMPORARY TABLE {self.quote(name)} ({body}) ON COMMIT DROP")

    def empty_table(self, cursor: Any, table: str) -> None:
        self.execute(cursor, f"TRUNCATE {self.quote(table)}")

    def analyze(self, cursor: Any, table: str) -> None:
        self.execute(cursor, f"ANALYZE {self.quote(table)}")

    @contextmanager
    def join_memory(self, cursor: Any) -> Iterator[None]:
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

    def refresh_statistics(self, conn: Any, table: str) -> None:
        # A claim can add 100,000s of rows of a new prompt version that autovacuum has not seen:
        # the planner then takes them for one row and probes every staged key against each
        # (measured: mark_submitted of one 100,000-item shard ran past 8 minutes). In its own
        # short transaction, so no claim holds the table's ANALYZE lock while it waits on rows.
        with self.transaction(conn) as cursor:
            self.execute(cursor, f"ANALYZE {table}")

    @contextmanager
    def rows_relation(
        self, cursor: Any, name: str, data: pa.Table | pa.RecordBatch, *, joined: bool = False
    ) -> Iterator[str]:
        with super().rows_relation(cursor, name, data) as relation:
            if joined:  # statistics let the planner hash-join the batch instead of probing row by row
                self.execute(cursor, f"ANALYZE {relation}")
            yield relation

    def load_arrow(self, cursor: Any, table: str, data: pa.Table | pa.RecordBatch) -> int:
        if data.num_rows == 0:
            return 0
        data = _without_nul_characters(data)
        buffer = io.BytesIO()
        pacsv.write_csv(data, buffer, pacsv.WriteOptions(include_header=False, quoting_style="needed"))
        buffer.seek(0)
        columns = ", ".join(self.quote(name) for name in data.schema.names)
        # Unquoted empty fields are NULL, quoted "" is the empty string: pyarrow writes both so.
        cursor.copy_expert(f"COPY {self.quote(table)} ({columns}) FROM STDIN WITH (FORMAT csv)", buffer)
        return data.num_rows


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


def _fsspec_name(fs: Any) -> str:
    """The name DuckDB registers an fsspec filesystem under (its first protocol)."""
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def dialect_for(conn: Any) -> Dialect:
    """The dialect of a DB-API connection (DuckDB or psycopg2)."""
    module = type(conn).__module__.split(".")[0]
    if module in ("duckdb", "_duckdb"):
        return DuckDBDialect()
    if module in ("psycopg2",):
        return PostgresDialect()
    raise WarehouseError(f"no dialect for connections of {type(conn).__module__}.{type(conn).__name__}")


# -- what goes in and comes out -------------------------------------------------------------


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


class Warehouse:
    """A connection, its dialect and the table names: every warehouse step of the data path.

    :param conn: a DB-API connection (``duckdb.connect(...)`` or ``psycopg2.connect(...)``).
    :param dialect: the dialect (default: detected from the connection).
    :param ledger_table: the ledger table name (``schema.table`` allowed).
    :param runs_table: the run-history table name.
    :param attempt_limit: attempts before a retryable item is ``dead``.
    :param schema: the schema holding the workloads' results tables (default: the connection's).
    """

    def __init__(
        self,
        conn: Any,
        dialect: Dialect | None = None,
        *,
        ledger_table: str = DEFAULT_LEDGER_TABLE,
        runs_table: str = DEFAULT_RUNS_TABLE,
        attempt_limit: int = DEFAULT_ATTEMPT_LIMIT,
        schema: str | None = None,
    ) -> None:
        self.conn = conn
        self.dialect = dialect or dialect_for(conn)
        self.ledger_table = validate_identifier(ledger_table)
        self.runs_table = validate_identifier(runs_table)
        self.attempt_limit = attempt_limit
        self.schema = validate_identifier(schema) if schema else None

    # -- helpers ----------------------------------------------------------------------------

    def _q(self, name: str) -> str:
        return self.dialect.quote(name)

    def _p(self, count: int = 1) -> str:
        return ", ".join([self.dialect.placeholder] * count)

    def results_table(self, workload: Workload) -> str:
        return f"{self.schema}.{workload.results_table}" if self.schema else workload.results_table

    def _results_columns(self, workload: Workload) -> list[tuple[str, pa.DataType]]:
        columns = list(_RESULT_META_COLUMNS)
        columns += [(column.name, column.arrow_type) for column in workload.output_columns]
        columns += list(workload.rule_columns())
        columns += _RESULT_USAGE_COLUMNS
        return columns

    def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.dialect.transaction(self.conn) as cursor:
            return self.dialect.query(cursor, sql, params)

    # -- tables -----------------------------------------------------------------------------

    def ensure_tables(self, workload: Workload | None = None) -> None:
        """Create the ledger, the run history and (given a workload) its results table.

        Columns a newer schema adds are added to an existing results table.
        """
        d = self.dialect
        text, big, double, ts = d.sql_type(pa.string()), "BIGINT", d.sql_type(pa.float64()), "TIMESTAMP"
        statements = [
            f"""CREATE TABLE IF NOT EXISTS {self._q(self.ledger_table)} (
                workload {text} NOT NULL, record_key {text} NOT NULL, prompt_version {text} NOT NULL,
                custom_id {text}, status {text} NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
                invalid_answers INTEGER NOT NULL DEFAULT 0, last_error {text}, batch_id {text},
                run_id {text}, updated_at {ts} NOT NULL, claimed_at {ts}, dag_id {text},
                requeued_by {text}, requeued_at {ts},
                PRIMARY KEY (workload, record_key, prompt_version)){d.ledger_options}""",
            # Ledgers made before claims (and requeues) existed gain the columns.
            f"ALTER TABLE {self._q(self.ledger_table)} ADD COLUMN IF NOT EXISTS claimed_at {ts}",
            f"ALTER TABLE {self._q(self.ledger_table)} ADD COLUMN IF NOT EXISTS dag_id {text}",
            f"ALTER TABLE {self._q(self.ledger_table)} ADD COLUMN IF NOT EXISTS requeued_by {text}",
            f"ALTER TABLE {self._q(self.ledger_table)} ADD COLUMN IF NOT EXISTS requeued_at {ts}",
            f"""CREATE TABLE IF NOT EXISTS {self._q(self.runs_table)} (
                workload {text} NOT NULL, run_id {text} NOT NULL, prompt_version {text},
                cache_setting {text}, extracted {big}, staged {big}, rejected {big}, succeeded {big},
                invalid {big}, retry {big}, dead {big}, input_tokens {big}, output_tokens {big},
                cache_creation_input_tokens {big}, cache_read_input_tokens {big}, cost_usd {double},
                realtime_cost_usd {double}, recorded_at {ts} NOT NULL,
                PRIMARY KEY (workload, run_id))""",
            # Run histories made before the cost report's definitions gain their columns (see record_run).
            *(
                f"ALTER TABLE {self._q(self.runs_table)} ADD COLUMN IF NOT EXISTS {name} {kind}"
                for name, kind in (
                    ("answers", big),
                    ("batch_uncached_cost_usd", double),
                    ("batching_saving_usd", double),
                    ("caching_saving_usd", double),
                    ("estimated_cost_usd", double),
                    ("estimate_low_usd", double),
                    ("estimate_high_usd", double),
                    ("cache_policy", text),
                    ("cache_probe_setting", text),
                    ("cache_probe_requests", big),
                    ("cache_decision", text),
                )
            ),  # fmt: skip
        ]
        if d.run_index:
            index = validate_identifier(f"{self.ledger_table.split('.')[-1]}_run")
            statements.append(
                f"CREATE INDEX IF NOT EXISTS {self._q(index)} ON {self._q(self.ledger_table)} (workload, run_id)"
            )
        if workload is not None:
            table = self._q(self.results_table(workload))
            columns = self._results_columns(workload) + [
                ("run_id", pa.string()),
                ("loaded_at", pa.timestamp("us")),
            ]
            body = ", ".join(f"{self._q(name)} {d.sql_type(kind)}" for name, kind in columns)
            statements.append(
                f"CREATE TABLE IF NOT EXISTS {table} ({body}, PRIMARY KEY (record_key, prompt_version))"
            )
            statements += [
                f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {self._q(name)} {d.sql_type(kind)}"
                for name, kind in columns
            ]
        with d.transaction(self.conn) as cursor:
            for statement in statements:
                d.execute(cursor, statement)

    # -- extract ----------------------------------------------------------------------------

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
            f"AND r.prompt_version = {p} AND r.status IN ('retry', 'invalid'))"
        )
        params += [workload.name, workload.prompt_version]
        sql = (
            f"SELECT {columns} FROM {origin} src WHERE ({' OR '.join(wanted)}) "
            f"AND NOT EXISTS (SELECT 1 FROM {ledger} d WHERE d.workload = {p} AND d.prompt_version = {p} "
            f"AND d.record_key = {key_text} AND (d.status IN ('succeeded', 'dead') "
            f"OR (d.status IN ('pending', 'submitted') AND d.run_id <> {p})))"
        )
        params += [workload.name, workload.prompt_version, run_id]
        return sql, params

    def source_columns(self, source: SourceSpec) -> list[str]:
        """The column names the source yields (a query that reads no rows)."""
        from claude_batch.preflight import source_columns_query

        sql, params = source_columns_query(source, self.dialect)
        with self.dialect.transaction(self.conn) as cursor:
            cursor.execute(sql, list(params) if self.dialect.placeholder == "?" else tuple(params))
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

    def take_back_retries(self, workload: Workload, run_id: str) -> int:
        """This run's ``retry`` items become its ``pending`` items again, for its next round.

        One conditional UPDATE: an item another run claimed meanwhile is not this run's any more.
        Attempt counts are kept (the load counts each answer), so an item goes round at most
        until the attempt limit makes it ``dead``.
        """
        d = self.dialect
        p = d.placeholder
        with d.transaction(self.conn) as cursor:
            return max(
                d.execute(
                    cursor,
                    f"""UPDATE {self._q(self.ledger_table)} SET status = 'pending', updated_at = {p}
                    WHERE workload = {p} AND prompt_version = {p} AND run_id = {p} AND status = 'retry'""",
                    [_utcnow(), workload.name, workload.prompt_version, run_id],
                ),
                0,
            )

    def extract_held(
        self, workload: Workload, source: SourceSpec, run_id: str, *, chunk_rows: int = 10_000
    ) -> Iterator[dict[str, Any]]:
        """Stream the source rows of the items this run holds ``pending`` (a follow-up round's rows)."""
        p = self.dialect.placeholder
        ledger = self._q(self.ledger_table)
        columns, origin, key_text = self._source_select(source)
        sql = (
            f"SELECT {columns} FROM {origin} src WHERE {key_text} IN (SELECT h.record_key FROM {ledger} h "
            f"WHERE h.workload = {p} AND h.prompt_version = {p} AND h.run_id = {p} AND h.status = 'pending')"
        )
        for chunk in self.dialect.stream(
            self.conn, sql, [workload.name, workload.prompt_version, run_id], chunk_rows
        ):
            yield from chunk

    # -- ledger -----------------------------------------------------------------------------

    def claim_staged(self, workload: Workload, layout: RunLayout, manifest: Manifest) -> ClaimResult:
        """Claim the run's staged items (``pending``) and record its rejected rows (``dead``), atomically.

        One transaction, one conditional upsert per shard: an item is taken only when it is new,
        already this run's and still open (``pending``/``submitted``: a retried gate), or free
        (``retry``/``invalid``) and last handled by another run (or by none: released). A
        rejected row seen again (a row without a usable key matches no ledger key, so every run
        of its interval extracts it) is recorded ``dead`` again for this run. An item another run holds open,
        or one that is final, is left as it is, so two live runs never hold, and never pay for,
        the same item; on PostgreSQL the upsert's row locks make concurrent claims wait for each
        other and re-check the condition. Attempt counts of items seen before are kept.

        :param workload: the workload staged.
        :param layout: the run's S3 layout.
        :param manifest: the staging manifest.
        :returns: what was claimed, and for each shard the keys that were not, with their holders.
        """
        result = ClaimResult(manifest.run_id)
        with self.dialect.transaction(self.conn) as cursor:
            for shard in manifest.shards:
                keys = read_shard_keys(layout, shard)
                size = keys.num_rows
                staged = pa.table(
                    {
                        "record_key": keys.column("record_key"),
                        "custom_id": keys.column("custom_id"),
                        "status": pa.array(["pending"] * size, pa.string()),
                        "last_error": pa.nulls(size, pa.string()),
                    }
                )
                claimed = self._claim(cursor, workload, layout, staged, shard.part, result)
                result.claimed += claimed
            rejected: list[dict[str, Any]] = []
            for rejection in iter_rejections(layout, manifest):
                rejected.append(
                    {
                        "record_key": rejection["ledger_key"],
                        "custom_id": None,
                        "status": "dead",
                        "last_error": rejection["reason"],
                    }
                )
                if len(rejected) >= 10_000:
                    table = pa.Table.from_pylist(rejected, _schema(_STAGED_COLUMNS))
                    result.rejected += self._claim(cursor, workload, layout, table, None, result)
                    rejected.clear()
            if rejected:
                table = pa.Table.from_pylist(rejected, _schema(_STAGED_COLUMNS))
                result.rejected += self._claim(cursor, workload, layout, table, None, result)
        if result.claimed + result.rejected >= STATISTICS_REFRESH_ROWS:
            self.dialect.refresh_statistics(self.conn, self._q(self.ledger_table))
        return result

    def _claim(
        self,
        cursor: Any,
        workload: Workload,
        layout: RunLayout,
        rows: pa.Table,
        part: int | None,
        result: ClaimResult,
    ) -> int:
        """Upsert ``rows`` where the item may be taken; note the rest in ``result``. Returns rows taken."""
        run_id = layout.run_id
        d = self.dialect
        p = d.placeholder
        ledger = self._q(self.ledger_table)
        now = _utcnow()
        with d.rows_relation(cursor, "cb_staged", rows) as staged:
            taken = d.execute(
                cursor,
                f"""INSERT INTO {ledger} AS l (workload, record_key, prompt_version, custom_id,
                    status, attempts, invalid_answers, last_error, batch_id, run_id, updated_at, claimed_at, dag_id)
                SELECT {p}, s.record_key, {p}, s.custom_id, s.status, 0, 0, s.last_error, NULL, {p}, {p}, {p}, {p}
                FROM {staged} s
                ON CONFLICT (workload, record_key, prompt_version) DO UPDATE SET
                    custom_id = excluded.custom_id,
                    status = CASE WHEN l.status = 'submitted' AND l.run_id = excluded.run_id
                        THEN l.status ELSE excluded.status END,
                    last_error = excluded.last_error, run_id = excluded.run_id, updated_at = excluded.updated_at,
                    dag_id = excluded.dag_id,
                    claimed_at = CASE WHEN l.run_id = excluded.run_id AND l.claimed_at IS NOT NULL
                        THEN l.claimed_at ELSE excluded.claimed_at END
                WHERE (l.status IN ('pending', 'submitted') AND l.run_id = excluded.run_id)
                    OR (l.status IN ('retry', 'invalid') AND l.run_id IS DISTINCT FROM excluded.run_id)
                    OR (l.status = 'dead' AND excluded.status = 'dead')""",
                [workload.name, workload.prompt_version, run_id, now, now, layout.dag_id],
            )
            if taken >= 0 and taken == rows.num_rows:
                return taken
            # Some were not taken: which, and who holds them (few, in the race this guards against).
            mine = f"l.run_id = {p} AND (l.status = s.status OR (s.status = 'pending' AND l.status = 'submitted'))"
            left = d.query(
                cursor,
                f"""SELECT s.record_key, l.run_id, l.status FROM {staged} s JOIN {ledger} l
                ON l.workload = {p} AND l.prompt_version = {p} AND l.record_key = s.record_key
                WHERE NOT ({mine})""",
                [workload.name, workload.prompt_version, run_id],
            )
        for key, holder, status in left:
            result.not_claimed.setdefault(part, set()).add(key)
            label = holder if status in ("pending", "submitted") else f"{status} (done)"
            result.holders[label] = result.holders.get(label, 0) + 1
        return rows.num_rows - len(left)

    def release_claim(
        self,
        workload: Workload,
        run_id: str,
        reason: str,
        *,
        layout: RunLayout | None = None,
        parts: Sequence[Any] | None = None,
    ) -> int:
        """Give back the run's items not yet in a batch (a pilot that failed, a run that is over).

        They become ``retry`` held by no run, so the next run of any kind claims them; their
        attempt counts are kept. Items already ``submitted`` stay: their batch will answer.

        :param layout: with ``parts``, release only the items of those shards of the run.
        :param parts: the shards (``ShardManifest``) whose items to release (default: all).
        :returns: the number of items released.
        """
        d = self.dialect
        p = d.placeholder
        update = f"""UPDATE {self._q(self.ledger_table)} SET status = 'retry', run_id = NULL, last_error = {p},
                updated_at = {p}
            WHERE workload = {p} AND prompt_version = {p} AND run_id = {p} AND status = 'pending'"""
        params = [reason[:500], _utcnow(), workload.name, workload.prompt_version, run_id]
        if parts is None:
            with d.transaction(self.conn) as cursor:
                return d.execute(cursor, update, params)
        if layout is None:
            raise ValueError("release_claim needs the run's layout to release by shard")
        released = 0
        with d.transaction(self.conn) as cursor:
            for shard in parts:
                keys = read_shard_keys(layout, shard).select(["record_key"])
                with d.rows_relation(cursor, "cb_release", keys, joined=True) as relation:
                    released += max(
                        d.execute(
                            cursor, f"{update} AND record_key IN (SELECT record_key FROM {relation})", params
                        ),
                        0,
                    )
        return released

    def open_holders(self, workload: Workload) -> list[Holder]:
        """Runs holding open items (``pending``/``submitted``) of the workload's prompt version."""
        p = self.dialect.placeholder
        rows = self._fetchall(
            f"""SELECT dag_id, run_id, SUM(CASE WHEN status = 'pending' THEN 1 ELSE 0 END),
                SUM(CASE WHEN status = 'submitted' THEN 1 ELSE 0 END), MIN(claimed_at)
            FROM {self._q(self.ledger_table)}
            WHERE workload = {p} AND prompt_version = {p} AND status IN ('pending', 'submitted')
                AND run_id IS NOT NULL
            GROUP BY dag_id, run_id ORDER BY MIN(claimed_at)""",
            [workload.name, workload.prompt_version],
        )
        return [
            Holder(dag_id, run_id, int(pending or 0), int(submitted or 0), since)
            for dag_id, run_id, pending, submitted, since in rows
        ]

    def mark_submitted(
        self, workload: Workload, layout: RunLayout, manifest: Manifest, part: int, batch_id: str
    ) -> None:
        """Record that shard ``part`` went out as ``batch_id`` (its items become ``submitted``).

        :param part: the shard's part number.
        :param batch_id: the batch the shard became.
        """
        keys = read_shard_keys(layout, manifest.shard(part)).select(["record_key"])
        self._update_keys(
            keys,
            "status = 'submitted', batch_id = {p}, updated_at = {p}",
            [batch_id, _utcnow()],
            "run_id = {p} AND status = 'pending'",
            [manifest.run_id],
            workload,
        )

    def requeue(self, workload: Workload, record_keys: Iterable[str], *, by: str | None = None) -> int:
        """Put dead or invalid items back to ``retry`` with fresh attempts (after fixing their cause).

        The next run of the workload extracts them whatever its interval (as every ``retry`` item)
        and its gate claims them. Only items that are ``dead`` or ``invalid`` move, in one
        conditional UPDATE: an item a run holds open (``pending``/``submitted``) or that is done
        is left alone. The item keeps its last run (``run_id``) and its ``last_error`` (why it
        was dead); ``requeued_by`` and ``requeued_at`` say who asked, and when.

        :param workload: the workload (only its ``name`` and ``prompt_version`` are read).
        :param record_keys: the items' record keys.
        :param by: who asked (recorded in ``requeued_by``).
        :returns: the number of items requeued.
        """
        keys = pa.table({"record_key": pa.array(sorted(set(record_keys)), pa.string())})
        if keys.num_rows == 0:
            return 0
        d = self.dialect
        p = d.placeholder
        ledger = self._q(self.ledger_table)
        now = _utcnow()
        params = [now, (by or "")[:200] or None, now, workload.name, workload.prompt_version]
        with (
            d.transaction(self.conn) as cursor,
            d.rows_relation(cursor, "cb_requeue", keys, joined=True) as relation,
        ):
            changed = d.execute(
                cursor,
                f"""UPDATE {ledger} SET status = 'retry', attempts = 0, invalid_answers = 0, updated_at = {p},
                    requeued_by = {p}, requeued_at = {p}
                WHERE workload = {p} AND prompt_version = {p} AND status IN ('dead', 'invalid')
                AND record_key IN (SELECT record_key FROM {relation})""",
                params,
            )
            if changed < 0:  # a driver that does not count: the rows this statement stamped
                changed = int(
                    d.query(
                        cursor,
                        f"""SELECT COUNT(*) FROM {ledger} WHERE requeued_at = {p} AND workload = {p}
                        AND prompt_version = {p} AND record_key IN (SELECT record_key FROM {relation})""",
                        [now, workload.name, workload.prompt_version],
                    )[0][0]
                )
        return changed

    def _update_keys(
        self,
        keys: pa.Table,
        assignments: str,
        assignment_params: list[Any],
        condition: str,
        condition_params: list[Any],
        workload: Workload,
    ) -> None:
        """UPDATE the ledger rows of ``keys`` (joined: a 100,000-key shard must not be probed row by row)."""
        d = self.dialect
        p = d.placeholder
        with (
            d.transaction(self.conn) as cursor,
            d.rows_relation(cursor, "cb_keys", keys, joined=True) as relation,
        ):
            d.execute(
                cursor,
                f"""UPDATE {self._q(self.ledger_table)} SET {assignments.format(p=p)}
                WHERE workload = {p} AND prompt_version = {p} AND {condition.format(p=p)}
                AND record_key IN (SELECT record_key FROM {relation})""",
                [*assignment_params, workload.name, workload.prompt_version, *condition_params],
            )

    # -- load -------------------------------------------------------------------------------

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
        d = self.dialect
        if parts is None:
            parts = [s.part for s in manifest.shards if layout.store.exists(validated_path(layout, s.part))]
        parts = list(parts)
        if not parts:
            return LoadSummary(manifest.run_id)
        if d.reads_parquet:
            with d.load_memory(self.conn, sum(manifest.shard(part).count for part in parts)):
                return self._load_reading_parquet(workload, layout, manifest, parts)
        return self._load_streaming(workload, layout, manifest, parts, batch_rows)

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
                    is_valid = pc.match_like(batch.column("status"), "valid")
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
            for status, rows, *sums in d.query(
                cursor,
                f"""SELECT status, COUNT(*), SUM(input_tokens), SUM(output_tokens), SUM(cache_creation_input_tokens),
                    SUM(cache_read_input_tokens), SUM(cost_usd) FROM {relation} GROUP BY status""",
            ):
                summary.rows += int(rows)
                summary.by_status[status] = int(rows)
                summary.input_tokens += int(sums[0] or 0)
                summary.output_tokens += int(sums[1] or 0)
                summary.cache_creation_input_tokens += int(sums[2] or 0)
                summary.cache_read_input_tokens += int(sums[3] or 0)
                summary.cost_usd += float(sums[4] or 0.0)
            outcomes = f"(SELECT {outcome_columns} FROM {relation})"
            summary.ledger_updated = max(self._apply_outcomes(cursor, workload, outcomes, manifest.run_id), 0)
            valid = f"(SELECT {columns} FROM {relation} WHERE status = 'valid')"
            self._upsert_results(cursor, workload, valid, result_names, manifest.run_id)
            summary.results_upserted = summary.by_status.get("valid", 0)
        return summary

    def _upsert_results(
        self, cursor: Any, workload: Workload, relation: str, names: list[str], run_id: str
    ) -> None:
        """Insert the rows of ``relation`` into the results table, overwriting rows with their keys."""
        d = self.dialect
        p = d.placeholder
        table = self._q(self.results_table(workload))
        columns = ", ".join(self._q(name) for name in names)
        updates = ", ".join(
            f"{self._q(name)} = excluded.{self._q(name)}"
            for name in [*names, "run_id", "loaded_at"]
            if name not in ("record_key", "prompt_version")
        )
        loaded_at = _utcnow()
        stored = f"SELECT 1 FROM {table} r WHERE r.record_key = v.record_key AND r.prompt_version = v.prompt_version"
        if d.inserts_new_rows_apart:
            # Rows already stored first (a re-run), so the new ones, inserted next, are not upserted twice.
            which = f"WHERE EXISTS ({stored})"
        else:
            which = ""
        d.execute(
            cursor,
            f"""INSERT INTO {table} ({columns}, run_id, loaded_at)
            SELECT {columns}, {p}, {p} FROM {relation} v {which}
            ON CONFLICT (record_key, prompt_version) DO UPDATE SET {updates}""",
            [run_id, loaded_at],
        )
        if d.inserts_new_rows_apart:
            d.execute(
                cursor,
                f"""INSERT INTO {table} ({columns}, run_id, loaded_at)
                SELECT {columns}, {p}, {p} FROM {relation} v WHERE NOT EXISTS ({stored})""",
                [run_id, loaded_at],
            )

    def _apply_outcomes(self, cursor: Any, workload: Workload, relation: str, run_id: str) -> int:
        """Move the ledger rows of a batch of outcomes (see :meth:`load_run` for the rules)."""
        d = self.dialect
        p = d.placeholder
        ledger = self._q(self.ledger_table)
        limit = int(self.attempt_limit)
        # attempts counts this answer too, hence "+ 1 >= limit".
        status = f"""CASE
                WHEN o.status = 'valid' THEN 'succeeded'
                WHEN o.status = 'invalid' THEN CASE
                    WHEN l.invalid_answers >= 1 OR l.attempts + 1 >= {p} THEN 'dead' ELSE 'invalid' END
                WHEN o.status = 'errored' AND o.error_type = 'invalid_request_error' THEN 'dead'
                WHEN l.attempts + 1 >= {p} THEN 'dead'
                ELSE 'retry' END"""
        invalid_answers = "l.invalid_answers + CASE WHEN o.status = 'invalid' THEN 1 ELSE 0 END"
        last_error = "CASE WHEN o.status = 'valid' THEN NULL ELSE o.reason END"
        which = (
            f"l.workload = {p} AND l.prompt_version = {p} AND l.run_id = {p} "
            "AND l.status IN ('pending', 'submitted') AND l.record_key = o.record_key"
        )
        params = [limit, limit, _utcnow(), workload.name, workload.prompt_version, run_id]
        if not d.updates_by_upsert:
            return d.execute(
                cursor,
                f"""UPDATE {ledger} AS l SET status = {status}, attempts = l.attempts + 1,
                    invalid_answers = {invalid_answers}, last_error = {last_error}, batch_id = o.batch_id,
                    updated_at = {p}
                FROM {relation} o WHERE {which}""",
                params,
            )
        return d.execute(
            cursor,
            f"""INSERT INTO {ledger} (workload, record_key, prompt_version, custom_id, status, attempts,
                invalid_answers, last_error, batch_id, run_id, updated_at)
            SELECT l.workload, l.record_key, l.prompt_version, l.custom_id, {status}, l.attempts + 1,
                {invalid_answers}, {last_error}, o.batch_id, l.run_id, {p}
            FROM {ledger} l JOIN {relation} o ON l.record_key = o.record_key
            WHERE {which}
            ON CONFLICT (workload, record_key, prompt_version) DO UPDATE SET
                status = excluded.status, attempts = excluded.attempts, invalid_answers = excluded.invalid_answers,
                last_error = excluded.last_error, batch_id = excluded.batch_id, updated_at = excluded.updated_at""",
            params,
        )

    # -- accounting -------------------------------------------------------------------------

    def accounting(self, workload: Workload, manifest: Manifest) -> AccountingReport:
        """The ledger's counts for the run, by status."""
        p = self.dialect.placeholder
        rows = self._fetchall(
            f"""SELECT status, COUNT(*) FROM {self._q(self.ledger_table)}
            WHERE workload = {p} AND prompt_version = {p} AND run_id = {p} GROUP BY status""",
            [workload.name, workload.prompt_version, manifest.run_id],
        )
        return AccountingReport(
            manifest.run_id, manifest.extracted_rows, {status: int(n) for status, n in rows}
        )

    def check_accounting(
        self, workload: Workload, manifest: Manifest, *, sample: int = 20, layout: RunLayout | None = None
    ) -> AccountingReport:
        """Check ``extracted = succeeded + invalid + retry + dead`` for the run; raise naming the gap.

        Items this run left as ``retry`` or ``invalid`` that a later run has since claimed count
        as handed on (given ``layout``, the run's keys are looked up), so re-checking an older
        run after a later one retried its items still holds.

        :param workload: the workload.
        :param manifest: the run's staging manifest (``extracted_rows`` is the left side).
        :param sample: how many unaccounted keys the error names.
        :param layout: the run's layout, to find items handed on to later runs.
        """
        report = self.accounting(workload, manifest)
        open_items = report.by_status.get("pending", 0) + report.by_status.get("submitted", 0)
        total = sum(report.by_status.values())
        if report.accounted == report.extracted and open_items == 0 and total == report.extracted:
            return report
        if layout is not None and open_items == 0 and total < report.extracted:
            handed_on = self._handed_on(workload, layout, manifest)
            if total + handed_on == report.extracted:
                return AccountingReport(report.run_id, report.extracted, report.by_status, handed_on)
        p = self.dialect.placeholder
        keys = self._fetchall(
            f"""SELECT record_key, status, batch_id FROM {self._q(self.ledger_table)}
            WHERE workload = {p} AND prompt_version = {p} AND run_id = {p} AND status IN ('pending', 'submitted')
            ORDER BY record_key LIMIT {int(sample)}""",
            [workload.name, workload.prompt_version, manifest.run_id],
        )
        named = ", ".join(
            f"{key} ({status}{', batch ' + batch if batch else ''})" for key, status, batch in keys
        )
        counts = ", ".join(f"{s}={report.by_status.get(s, 0)}" for s in LEDGER_STATUSES)
        gap = report.extracted - report.accounted
        message = (
            f"accounting failed for {workload.name} run {manifest.run_id!r}: extracted {report.extracted} but "
            f"succeeded + invalid + retry + dead = {report.accounted} (gap {gap}; ledger: {counts})"
        )
        if open_items:
            message += f"; {open_items} items never got an outcome, e.g. {named}"
        if total != report.extracted:
            message += f"; the ledger holds {total} items for this run, not {report.extracted}"
        raise AccountingError(message)

    def _handed_on(self, workload: Workload, layout: RunLayout, manifest: Manifest) -> int:
        """How many of the run's staged items another run holds now (claimed after this run left them)."""
        d = self.dialect
        p = d.placeholder
        handed_on = 0
        with d.transaction(self.conn) as cursor:
            for shard in manifest.shards:
                keys = read_shard_keys(layout, shard).select(["record_key"])
                with d.rows_relation(cursor, "cb_run_keys", keys, joined=True) as relation:
                    handed_on += int(
                        d.query(
                            cursor,
                            f"""SELECT COUNT(*) FROM {relation} k JOIN {self._q(self.ledger_table)} l
                            ON l.workload = {p} AND l.prompt_version = {p} AND l.record_key = k.record_key
                            WHERE l.run_id IS DISTINCT FROM {p}""",
                            [workload.name, workload.prompt_version, manifest.run_id],
                        )[0][0]
                    )
        return handed_on

    # -- run history ------------------------------------------------------------------------

    def record_run(
        self,
        workload: Workload,
        manifest: Manifest,
        load: LoadSummary,
        report: AccountingReport | None = None,
        prices: PriceTable | None = None,
    ) -> None:
        """Write (or overwrite) the run's line in the run history: counts, tokens, cost, caching.

        The costs use the report's definitions (:class:`claude_batch.costs.RunCosts`):
        ``realtime_cost_usd`` is the same tokens as plain real-time calls without caching,
        ``batch_uncached_cost_usd`` the same in batches without caching, ``batching_saving_usd`` and
        ``caching_saving_usd`` (negative when caching cost money) the two savings apart, beside the
        estimate and its band. Lines written before these definitions have no
        ``batch_uncached_cost_usd`` (their ``realtime_cost_usd`` was the cost at list prices). A
        multi-model run's reference costs apportion its tokens by the requests each model was sent
        (``cache_decision``'s ``costs_exact`` is false); the report reads them per model.
        The caching decision and its evidence go in ``cache_decision`` (JSON), the probe apart.
        """
        import orjson

        from claude_batch.costs import TokenTotals, apportion_tokens, run_costs

        report = report or self.accounting(workload, manifest)
        table = prices or default_prices()
        estimate = manifest.estimate or {}
        plan = estimate.get("cache_plan") or {}
        probe = plan.get("probe") or {}
        probing = bool(probe.get("requests")) and probe.get("setting") in ("5m", "1h")
        shares = {
            model: entry.get("requests", 0) for model, entry in (estimate.get("per_model") or {}).items()
        }
        by_model = apportion_tokens(
            TokenTotals(load.input_tokens, load.output_tokens, load.cache_creation_input_tokens,
                        load.cache_read_input_tokens),
            shares or dict.fromkeys(manifest.models or [workload.model], 1),
        )  # fmt: skip
        costs = run_costs(load.cost_usd, by_model, table, estimate, exact=len(by_model) <= 1)
        # The batches whose requests used the cache, each starting with a write (see claude_batch.caching).
        if probing:
            cached_batches = max(
                1, len(next((s.models for s in manifest.shards if s.part == probe.get("part")), {}))
            )
        elif manifest.cache_setting in ("5m", "1h"):
            cached_batches = sum(max(1, len(shard.models)) for shard in manifest.shards)
        else:
            cached_batches = 0
        decision = {**plan, "costs_exact": costs.exact, "estimate_method": estimate.get("method"),
                    "cached_batches": cached_batches}  # fmt: skip

        def money(value: float | None) -> float | None:
            return None if value is None else round(value, 6)

        values = [
            workload.name, manifest.run_id, workload.prompt_version, manifest.cache_setting,
            manifest.extracted_rows, manifest.staged_requests, manifest.rejected_rows,
            report.by_status.get("succeeded", 0), report.by_status.get("invalid", 0),
            report.by_status.get("retry", 0), report.by_status.get("dead", 0),
            load.input_tokens, load.output_tokens, load.cache_creation_input_tokens, load.cache_read_input_tokens,
            round(load.cost_usd, 6), money(costs.realtime_uncached_usd), _utcnow(),
            load.by_status.get("valid", 0) + load.by_status.get("invalid", 0),
            money(costs.batch_uncached_usd), money(costs.saving_from_batching_usd), money(costs.saving_from_caching_usd),
            money(costs.estimated_usd), money(costs.estimate_low_usd), money(costs.estimate_high_usd),
            plan.get("policy") or workload.cache, probe.get("setting") if probing else None,
            int(probe.get("requests") or 0) if probing else 0, orjson.dumps(decision).decode(),
        ]  # fmt: skip
        names = (
            "workload, run_id, prompt_version, cache_setting, extracted, staged, rejected, succeeded, invalid, "
            "retry, dead, input_tokens, output_tokens, cache_creation_input_tokens, cache_read_input_tokens, "
            "cost_usd, realtime_cost_usd, recorded_at, answers, batch_uncached_cost_usd, batching_saving_usd, "
            "caching_saving_usd, estimated_cost_usd, estimate_low_usd, estimate_high_usd, cache_policy, "
            "cache_probe_setting, cache_probe_requests, cache_decision"
        )
        updates = ", ".join(f"{n} = excluded.{n}" for n in names.split(", ")[2:])
        with self.dialect.transaction(self.conn) as cursor:
            self.dialect.execute(
                cursor,
                f"""INSERT INTO {self._q(self.runs_table)} ({names}) VALUES ({self._p(len(values))})
                ON CONFLICT (workload, run_id) DO UPDATE SET {updates}""",
                values,
            )

    def recent_cache_observations(self, workload: Workload, limit: int = 3) -> list[CacheObservation]:
        """The workload's recent runs as the caching policy and the estimate read them, latest first.

        For each setting a run measured (its own, or its probe's when it went with caching off and
        probed; ``off`` when it measured none) the ``limit`` latest such runs, however many runs of
        other settings came after them: a streak of runs without caching erases no evidence. The
        latest ``limit`` runs overall are always among them (for the output tokens per answer).
        ``runs_ago`` counts the workload's runs recorded since each.
        """
        import orjson

        p = self.dialect.placeholder
        measured = (
            "CASE WHEN cache_setting IN ('5m', '1h') THEN cache_setting "
            "WHEN cache_probe_setting IN ('5m', '1h') THEN cache_probe_setting ELSE 'off' END"
        )
        rows = self._fetchall(
            f"""SELECT measured, cache_setting, cache_probe_setting, cache_read_input_tokens,
                cache_creation_input_tokens, answers, succeeded, invalid, output_tokens, prompt_version, run_id,
                cache_decision, runs_ago
            FROM (
                SELECT m.*, ROW_NUMBER() OVER (ORDER BY recorded_at DESC, run_id DESC) - 1 AS runs_ago,
                    ROW_NUMBER() OVER (PARTITION BY measured ORDER BY recorded_at DESC, run_id DESC) AS nth
                FROM (SELECT r.*, {measured} AS measured FROM {self._q(self.runs_table)} r WHERE workload = {p}) m
            ) t
            WHERE nth <= {int(limit)} ORDER BY runs_ago""",
            [workload.name],
        )
        observations = []
        for (setting, run_setting, probe_setting, read, written, answers, succeeded, invalid, output,
             version, run_id, decision, runs_ago) in rows:  # fmt: skip
            try:
                plan = orjson.loads(decision) if decision else {}
            except orjson.JSONDecodeError:
                plan = {}
            plan = plan if isinstance(plan, dict) else {}
            prefix = plan.get("prefix_tokens")
            batches = plan.get("cached_batches")
            observations.append(
                CacheObservation(
                    setting,
                    int(read or 0),
                    int(written or 0),
                    runs_ago=int(runs_ago),
                    probe=run_setting not in ("5m", "1h") and probe_setting in ("5m", "1h"),
                    prefix_tokens=int(prefix) if isinstance(prefix, int | float) and prefix > 0 else None,
                    answers=int(answers if answers is not None else (succeeded or 0) + (invalid or 0)),
                    output_tokens=int(output or 0),
                    prompt_version=version,
                    run_setting=run_setting,
                    run_id=run_id,
                    batches=int(batches) if isinstance(batches, int) and batches > 0 else None,
                )  # fmt: skip
            )
        return observations

    def ledger_counts(self, workload: Workload) -> dict[str, int]:
        """Items of the workload's current prompt version, by status."""
        p = self.dialect.placeholder
        rows = self._fetchall(
            f"""SELECT status, COUNT(*) FROM {self._q(self.ledger_table)}
            WHERE workload = {p} AND prompt_version = {p} GROUP BY status""",
            [workload.name, workload.prompt_version],
        )
        return {status: int(n) for status, n in rows}


def _schema(columns: Sequence[tuple[str, pa.DataType]]) -> pa.Schema:
    return pa.schema(list(columns))


def _add_to_summary(summary: LoadSummary, table: pa.Table) -> None:
    summary.rows += table.num_rows
    for status, count in _value_counts(table.column("status")).items():
        summary.by_status[status] = summary.by_status.get(status, 0) + count
    for name in ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"):
        setattr(summary, name, getattr(summary, name) + int(pc.sum(table.column(name)).as_py() or 0))
    summary.cost_usd += float(pc.sum(table.column("cost_usd")).as_py() or 0.0)


def _value_counts(column: pa.ChunkedArray) -> dict[str, int]:
    counts = pc.value_counts(column)
    return {item["values"].as_py(): item["counts"].as_py() for item in counts}
