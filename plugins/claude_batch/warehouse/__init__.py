"""The warehouse side: extract, the ledger, bulk loads, the accounting check and run history.

Works on any DB-API connection through a :class:`Dialect`: DuckDB (the embedded default) and
PostgreSQL here; Snowflake or Redshift fill the same seam later, each one module in
``warehouse/dialects/`` and one registry entry. Every value is a bound parameter and every
identifier is validated and quoted, so no row content ever becomes SQL. Loads stream the run's
validated Parquet so memory stays flat however many rows a run has, and upsert results by
(record key, prompt version) with the ledger moving in the same transaction: a failure mid-load
leaves nothing half-done.

The package, one step a module, composed here into :class:`Warehouse`:

- ``types``: errors, identifier validation, ``SourceSpec`` and the summaries steps return;
- ``ledger``: the status vocabulary and the load's transition table (the ledger's contract);
- ``dbapi``: the DB-API Protocols connections and cursors are typed with;
- ``dialects``: the engines, one module each, and the registry (``dialect_for``);
- ``tables``: table names, columns and ``ensure_tables``; ``extract``; ``claims`` (the ledger
  moves outside a load); ``load``; ``accounting``; ``history`` (the run history).

Every name this module offered when it was one file is importable from here still.
"""

from __future__ import annotations

from claude_batch.warehouse.claims import STATISTICS_REFRESH_ROWS, ClaimsMixin
from claude_batch.warehouse.dialects import DEFAULT_DUCKDB_LOAD_MEMORY, Dialect, dialect_for
from claude_batch.warehouse.dialects.duckdb import (
    _DUCKDB_UNSPILLED_BYTES_PER_ROW as _DUCKDB_UNSPILLED_BYTES_PER_ROW,
)
from claude_batch.warehouse.dialects.duckdb import DuckDBDialect
from claude_batch.warehouse.dialects.duckdb import _fsspec_name as _fsspec_name
from claude_batch.warehouse.dialects.duckdb import _memory_bytes as _memory_bytes
from claude_batch.warehouse.dialects.postgres import PostgresDialect
from claude_batch.warehouse.dialects.postgres import _without_nul_characters as _without_nul_characters
from claude_batch.warehouse.extract import RECORD_KEY_COLUMN, ExtractMixin
from claude_batch.warehouse.history import HistoryMixin
from claude_batch.warehouse.ledger import FINAL_STATUSES, LEDGER_STATUSES
from claude_batch.warehouse.load import LoadMixin
from claude_batch.warehouse.load import _add_to_summary as _add_to_summary
from claude_batch.warehouse.load import _value_counts as _value_counts
from claude_batch.warehouse.tables import _OUTCOME_COLUMNS as _OUTCOME_COLUMNS
from claude_batch.warehouse.tables import _RESULT_META_COLUMNS as _RESULT_META_COLUMNS
from claude_batch.warehouse.tables import _RESULT_USAGE_COLUMNS as _RESULT_USAGE_COLUMNS
from claude_batch.warehouse.tables import _STAGED_COLUMNS as _STAGED_COLUMNS
from claude_batch.warehouse.tables import DEFAULT_ATTEMPT_LIMIT, DEFAULT_LEDGER_TABLE, DEFAULT_RUNS_TABLE
from claude_batch.warehouse.tables import _schema as _schema
from claude_batch.warehouse.types import (
    AccountingError,
    AccountingReport,
    ClaimResult,
    Holder,
    LoadSummary,
    SourceSpec,
    WarehouseError,
    validate_identifier,
)
from claude_batch.warehouse.types import _utcnow as _utcnow

# The private names above, imported "as" themselves, are those callers (ops.py, tests) imported
# from the one-file module: they stay importable from here.
__all__ = [
    "DEFAULT_ATTEMPT_LIMIT",
    "DEFAULT_DUCKDB_LOAD_MEMORY",
    "DEFAULT_LEDGER_TABLE",
    "DEFAULT_RUNS_TABLE",
    "FINAL_STATUSES",
    "LEDGER_STATUSES",
    "RECORD_KEY_COLUMN",
    "STATISTICS_REFRESH_ROWS",
    "AccountingError",
    "AccountingReport",
    "ClaimResult",
    "Dialect",
    "DuckDBDialect",
    "Holder",
    "LoadSummary",
    "PostgresDialect",
    "SourceSpec",
    "Warehouse",
    "WarehouseError",
    "dialect_for",
    "validate_identifier",
]


class Warehouse(ExtractMixin, ClaimsMixin, LoadMixin, HistoryMixin):
    """A connection, its dialect and the table names: every warehouse step of the data path.

    Constructed as :class:`~claude_batch.warehouse.tables.WarehouseTables` (its parameters:
    ``conn``, ``dialect``, ``ledger_table``, ``runs_table``, ``attempt_limit``, ``schema``). The
    steps live in one mixin each (``extract``, ``claims``, ``load``, ``accounting``, ``history``).
    """
