"""Faults one level under the pipeline: SQL statements and S3 calls.

A :class:`StatementFault` acts on the SQL text a warehouse connection executes (connections
opened through ``Stack.warehouse`` carry the active :func:`statement_faults`); an S3 fault
(:func:`s3_call_faults`) acts on the ``nth`` S3 call of some methods. Matching SQL text and S3
methods, not the pipeline's own functions, keeps each fault where it is when those modules are
refactored. The fault matrix (``tests/reliability/harness.py``) and the killed worker
(``tests/reliability/worker.py``) inject them.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from unittest import mock


@dataclass
class StatementFault:
    """Act when the ``nth`` statement matching ``pattern`` runs, once one matching ``after`` has.

    Statements are the SQL text a warehouse connection executes; ``COMMIT`` stands for a
    commit however the driver does it. Matching SQL text, not the warehouse module's methods,
    keeps the fault where it is when that module is refactored.

    :param pattern: a regular expression searched in each statement.
    :param action: called with the statement instead of running it (it raises, or kills).
    :param after: only statements after one matching this count.
    :param nth: act on this matching statement (1 = the first).
    """

    pattern: str
    action: Callable[[str, Any], None]
    after: str | None = None
    nth: int = 1
    seen: int = 0
    armed: bool = False

    def before(self, sql: str, conn: Any) -> None:
        if self.after is not None and not self.armed:
            self.armed = re.search(self.after, sql) is not None
            return
        if re.search(self.pattern, sql):
            self.seen += 1
            if self.seen == self.nth:
                self.action(sql, conn)


_statement_faults: list[StatementFault] = []


@contextlib.contextmanager
def statement_faults(*faults: StatementFault) -> Iterator[None]:
    """Within the block, warehouse connections opened through :class:`Stack` carry ``faults``."""
    _statement_faults.extend(faults)
    try:
        yield
    finally:
        for fault in faults:
            _statement_faults.remove(fault)


def _before(sql: str, conn: Any) -> None:
    for fault in list(_statement_faults):
        fault.before(sql, conn)


class _Proxy:
    """Delegates everything to the wrapped DB-API object (attribute writes too)."""

    def __init__(self, inner: Any) -> None:
        object.__setattr__(self, "_inner", inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._inner, name, value)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._inner.__exit__(*exc_info)


class _DuckDBConnection(_Proxy):
    def execute(self, sql: str, *args: Any, **kwargs: Any) -> Any:
        _before(sql, self._inner)
        return self._inner.execute(sql, *args, **kwargs)


class _PostgresCursor(_Proxy):
    def execute(self, sql: str, *args: Any, **kwargs: Any) -> Any:
        _before(sql, self._inner.connection)
        return self._inner.execute(sql, *args, **kwargs)

    def copy_expert(self, sql: str, *args: Any, **kwargs: Any) -> Any:
        _before(sql, self._inner.connection)
        return self._inner.copy_expert(sql, *args, **kwargs)


class _PostgresConnection(_Proxy):
    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        return _PostgresCursor(self._inner.cursor(*args, **kwargs))

    def commit(self) -> None:
        _before("COMMIT", self._inner)
        self._inner.commit()


def terminate_backend(dsn: str) -> Callable[[str, Any], None]:
    """An action: another session terminates this connection's PostgreSQL backend (a lost server)."""

    def action(sql: str, conn: Any) -> None:
        import psycopg2

        admin = psycopg2.connect(dsn)
        admin.autocommit = True
        with admin.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(%s)", (conn.get_backend_pid(),))
        admin.close()

    return action


@contextlib.contextmanager
def s3_call_faults(methods: set[str], nth: int, action: Callable[[str, dict], None]) -> Iterator[None]:
    """Within the block, the ``nth`` S3 call whose method is in ``methods`` runs ``action`` first.

    s3fs sends every S3 request through ``S3FileSystem._call_s3`` (and ``call_s3``, its sync
    wrapper, made at class creation: both are patched).
    """
    import s3fs
    from fsspec.asyn import sync_wrapper

    original = s3fs.S3FileSystem._call_s3
    seen = {"n": 0}

    async def call_s3(self, method, *args, **kwargs):
        if method in methods:
            seen["n"] += 1
            if seen["n"] == nth:
                action(method, kwargs)
        return await original(self, method, *args, **kwargs)

    with (
        mock.patch.object(s3fs.S3FileSystem, "_call_s3", call_s3),
        mock.patch.object(s3fs.S3FileSystem, "call_s3", sync_wrapper(call_s3)),
    ):
        yield


S3_WRITES = {"put_object", "create_multipart_upload", "upload_part", "complete_multipart_upload"}
S3_READS = {"get_object", "head_object"}
