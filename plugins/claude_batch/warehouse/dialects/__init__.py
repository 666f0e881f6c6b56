"""The dialect registry: which :class:`Dialect` serves a DB-API connection.

One entry per warehouse, keyed by the top-level module of its driver's connection class. A new
warehouse is one module in this package (a :class:`Dialect` subclass) and one entry in
``DIALECTS``; nothing else in the warehouse changes.
"""

from __future__ import annotations

from collections.abc import Callable

from claude_batch.warehouse.dbapi import Connection
from claude_batch.warehouse.dialects.base import Dialect, RunLoad
from claude_batch.warehouse.dialects.duckdb import DEFAULT_DUCKDB_LOAD_MEMORY, DuckDBDialect
from claude_batch.warehouse.dialects.postgres import PostgresDialect
from claude_batch.warehouse.types import WarehouseError

__all__ = [
    "DEFAULT_DUCKDB_LOAD_MEMORY",
    "DIALECTS",
    "Dialect",
    "DuckDBDialect",
    "PostgresDialect",
    "RunLoad",
    "dialect_for",
]

# The driver module of a connection's class -> the dialect for it.
DIALECTS: dict[str, Callable[[], Dialect]] = {
    "duckdb": DuckDBDialect,
    "_duckdb": DuckDBDialect,
    "psycopg2": PostgresDialect,
}


def dialect_for(conn: Connection | object) -> Dialect:
    """The dialect of a DB-API connection (DuckDB or psycopg2)."""
    module = type(conn).__module__.split(".")[0]
    make = DIALECTS.get(module)
    if make is None:
        raise WarehouseError(f"no dialect for connections of {type(conn).__module__}.{type(conn).__name__}")
    return make()
