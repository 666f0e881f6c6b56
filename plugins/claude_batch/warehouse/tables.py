"""The warehouse's tables: names, columns, creation, and the state every step shares.

Three tables: the ledger (one row per workload, record key and prompt version), the run
history (one row per workload and run) and each workload's results table (one row per record
key and prompt version). :meth:`WarehouseTables.ensure_tables` creates them and adds the
columns a newer schema has to tables made before, so it is safe to call on every run.
Every name reaches SQL through the dialect's quoting (see docs/architecture.md for the contracts
these tables carry).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from claude_batch.warehouse.dbapi import Connection, Params
from claude_batch.warehouse.dialects import Dialect, dialect_for
from claude_batch.warehouse.types import validate_identifier
from claude_batch.workloads import Workload

DEFAULT_LEDGER_TABLE = "claude_batch_ledger"
DEFAULT_RUNS_TABLE = "claude_batch_runs"
DEFAULT_ATTEMPT_LIMIT = 3
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
# Columns the run history gained after it was first made (see HistoryMixin.record_run).
_RUNS_ADDED_COLUMNS: tuple[tuple[str, str], ...] = (
    ("answers", "big"),
    ("batch_uncached_cost_usd", "double"),
    ("batching_saving_usd", "double"),
    ("caching_saving_usd", "double"),
    ("estimated_cost_usd", "double"),
    ("estimate_low_usd", "double"),
    ("estimate_high_usd", "double"),
    ("cache_policy", "text"),
    ("cache_probe_setting", "text"),
    ("cache_probe_requests", "big"),
    ("cache_decision", "text"),
)


def _schema(columns: Sequence[tuple[str, pa.DataType]]) -> pa.Schema:
    return pa.schema(list(columns))


class WarehouseTables:
    """A connection, its dialect and the table names, shared by every warehouse step.

    :param conn: a DB-API connection (``duckdb.connect(...)`` or ``psycopg2.connect(...)``).
    :param dialect: the dialect (default: detected from the connection).
    :param ledger_table: the ledger table name (``schema.table`` allowed).
    :param runs_table: the run-history table name.
    :param attempt_limit: attempts before a retryable item is ``dead``.
    :param schema: the schema holding the workloads' results tables (default: the connection's).
    """

    def __init__(
        self,
        conn: Connection,
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

    def _fetchall(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        with self.dialect.transaction(self.conn) as cursor:
            return self.dialect.query(cursor, sql, params)

    # -- tables -----------------------------------------------------------------------------

    def ensure_tables(self, workload: Workload | None = None) -> None:
        """Create the ledger, the run history and (given a workload) its results table.

        Columns a newer schema adds are added to an existing results table.
        """
        d = self.dialect
        text, big, double, ts = d.sql_type(pa.string()), "BIGINT", d.sql_type(pa.float64()), "TIMESTAMP"
        kinds = {"text": text, "big": big, "double": double}
        ledger, runs = self._q(self.ledger_table), self._q(self.runs_table)
        statements = [
            f"""CREATE TABLE IF NOT EXISTS {ledger} (
                workload {text} NOT NULL, record_key {text} NOT NULL, prompt_version {text} NOT NULL,
                custom_id {text}, status {text} NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
                invalid_answers INTEGER NOT NULL DEFAULT 0, last_error {text}, batch_id {text},
                run_id {text}, updated_at {ts} NOT NULL, claimed_at {ts}, dag_id {text},
                requeued_by {text}, requeued_at {ts},
                PRIMARY KEY (workload, record_key, prompt_version)){d.ledger_options}""",
            # Ledgers made before claims (and requeues) existed gain the columns.
            f"ALTER TABLE {ledger} ADD COLUMN IF NOT EXISTS claimed_at {ts}",
            f"ALTER TABLE {ledger} ADD COLUMN IF NOT EXISTS dag_id {text}",
            f"ALTER TABLE {ledger} ADD COLUMN IF NOT EXISTS requeued_by {text}",
            f"ALTER TABLE {ledger} ADD COLUMN IF NOT EXISTS requeued_at {ts}",
            f"""CREATE TABLE IF NOT EXISTS {runs} (
                workload {text} NOT NULL, run_id {text} NOT NULL, prompt_version {text},
                cache_setting {text}, extracted {big}, staged {big}, rejected {big}, succeeded {big},
                invalid {big}, retry {big}, dead {big}, input_tokens {big}, output_tokens {big},
                cache_creation_input_tokens {big}, cache_read_input_tokens {big}, cost_usd {double},
                realtime_cost_usd {double}, recorded_at {ts} NOT NULL,
                PRIMARY KEY (workload, run_id))""",
            # Run histories made before the cost report's definitions gain their columns.
            *(
                f"ALTER TABLE {runs} ADD COLUMN IF NOT EXISTS {name} {kinds[kind]}"
                for name, kind in _RUNS_ADDED_COLUMNS
            ),
            *d.ledger_indexes(self.ledger_table),
        ]
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
