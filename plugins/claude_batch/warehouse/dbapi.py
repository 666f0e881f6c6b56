"""The DB-API surface the warehouse uses (PEP 249), as typing Protocols.

Any driver whose connection and cursor have these methods works through a
:class:`~claude_batch.warehouse.dialects.base.Dialect`; what only one engine has (DuckDB's
``register``, psycopg2's ``copy_expert``) stays in that engine's dialect module. Rows are plain
sequences of driver values, so they stay ``Any``: the warehouse only counts, compares or passes
them on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

Row = Sequence[Any]
Params = Sequence[Any]


class Cursor(Protocol):
    """A DB-API cursor (a DuckDB connection is its own cursor inside a transaction)."""

    # PEP 249 makes it None after a statement that returns no rows; typed for the case callers
    # read it in (after a query), so that they need not test for None first.
    @property
    def description(self) -> Sequence[Sequence[Any]]: ...

    @property
    def rowcount(self) -> int: ...

    def execute(self, sql: str, parameters: Any = ..., /) -> Any: ...

    def executemany(self, sql: str, parameters: Any, /) -> Any: ...

    def fetchall(self) -> Sequence[Row]: ...

    def fetchmany(self, size: int = ..., /) -> Sequence[Row]: ...

    def close(self) -> Any: ...


class Connection(Protocol):
    """A DB-API connection: cursors, commit and rollback."""

    def cursor(self) -> Cursor: ...

    def commit(self) -> Any: ...

    def rollback(self) -> Any: ...
