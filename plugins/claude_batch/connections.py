"""Warehouse connections for tasks: opened per stage, closed after it, DuckDB taken in turn.

DuckDB, the embedded default, lets one process at a time open a database file for writing; a
second process gets ``IO Error: Could not set lock on file``. Under a multi-process executor
(LocalExecutor, Celery) two runs' stages, or a load beside a gate, would meet there. So every
task that touches a DuckDB warehouse first takes an exclusive ``flock`` on ``<file>.lock`` beside
the database (waiting for it, not failing), holds the connection only for its own statements,
and lets go at once; a lock held by another program (a DuckDB shell left open) is waited out
by retrying the connect. Tasks wait seconds (the length of another task's statements), never a
batch. DuckDB is for one machine; beyond it use PostgreSQL or another common.sql warehouse
(see the README).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

from claude_batch.warehouse import Warehouse, WarehouseError

log = logging.getLogger(__name__)

# How long a task waits for the DuckDB file before it fails naming the file (seconds).
DEFAULT_DUCKDB_LOCK_TIMEOUT = float(os.environ.get("CLAUDE_BATCH_DUCKDB_LOCK_TIMEOUT", "900"))
_POLL_SECONDS = 0.2


@contextlib.contextmanager
def open_warehouse(conn_id: str) -> Iterator[Warehouse]:
    """A :class:`Warehouse` on an Airflow connection, closed on exit.

    :param conn_id: a ``duckdb`` connection (host: the database file), or any common.sql
        connection (``postgres`` is opened with psycopg2 for COPY).
    """
    from airflow.sdk import BaseHook

    conn = BaseHook.get_connection(conn_id)
    if conn.conn_type == "duckdb":
        with duckdb_connection(conn.host or conn.schema or ":memory:") as duck:
            yield Warehouse(duck)
        return
    raw = _connect_other(conn)
    try:
        yield Warehouse(raw)
    finally:
        raw.close()


@contextlib.contextmanager
def duckdb_connection(path: str, timeout: float | None = None) -> Iterator[Any]:
    """A DuckDB connection to ``path`` held by this process alone, waiting its turn.

    :param path: the database file (``:memory:`` needs no lock).
    :param timeout: seconds to wait for the file (default ``CLAUDE_BATCH_DUCKDB_LOCK_TIMEOUT``, 900).
    """
    import duckdb

    timeout = DEFAULT_DUCKDB_LOCK_TIMEOUT if timeout is None else timeout
    if path == ":memory:":
        conn = duckdb.connect(path)
        try:
            yield conn
        finally:
            conn.close()
        return
    deadline = time.monotonic() + timeout
    with _file_lock(f"{path}.lock", deadline, path):
        conn = _connect_duckdb(duckdb, path, deadline)
        try:
            yield conn
        finally:
            conn.close()


@contextlib.contextmanager
def _file_lock(lock_path: str, deadline: float, database: str) -> Iterator[None]:
    handle = open(lock_path, "a+b")  # noqa: SIM115 - held for the block's duration
    try:
        waited = False
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise WarehouseError(
                        f"the DuckDB warehouse {database} stayed in use by another task past the lock "
                        f"timeout; raise CLAUDE_BATCH_DUCKDB_LOCK_TIMEOUT or use PostgreSQL for parallel runs"
                    ) from None
                if not waited:
                    log.info("Waiting for the DuckDB warehouse %s: another task holds it.", database)
                    waited = True
                time.sleep(_POLL_SECONDS)
        yield
    finally:
        handle.close()  # closing the file releases the lock


def _connect_duckdb(duckdb: Any, path: str, deadline: float) -> Any:
    while True:
        try:
            return duckdb.connect(path)
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower():
                raise
            if time.monotonic() >= deadline:
                raise WarehouseError(
                    f"the DuckDB warehouse {path} is locked by another program (not a claude-batch "
                    f"task) past the lock timeout: {exc}"
                ) from exc
            time.sleep(_POLL_SECONDS)


def _connect_other(conn: Any) -> Any:
    if conn.conn_type in ("postgres", "postgresql"):
        # The postgres provider hands out psycopg 3 when it is installed; the PostgreSQL dialect
        # (COPY through copy_expert, named cursors) is written for psycopg2.
        import psycopg2

        return psycopg2.connect(
            host=conn.host,
            port=conn.port or 5432,
            user=conn.login,
            password=conn.password,
            dbname=conn.schema or "postgres",
            **{k: v for k, v in conn.extra_dejson.items() if k in ("sslmode", "options", "connect_timeout")},
        )
    return conn.get_hook().get_conn()
