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

Connections are opened through the providers' hooks, so what the Airflow UI's connection form
and ``airflow connections add`` write is what a task opens: ``duckdb`` through the DuckDB
provider's ``DuckDBHook`` (the database file is its *Database path*, the host; its extra's
settings apply), ``duckdb_aws`` through the Amazon provider's ``AwsDuckDBHook``, ``postgres``
through the postgres provider's ``PostgresHook`` (on psycopg2), anything else through its hook's
``get_conn``.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

from claude_batch.warehouse import Warehouse, WarehouseError

log = logging.getLogger(__name__)

# How long a task waits for the DuckDB file before it fails naming the file (seconds).
DEFAULT_DUCKDB_LOCK_TIMEOUT = float(os.environ.get("CLAUDE_BATCH_DUCKDB_LOCK_TIMEOUT", "900"))
_POLL_SECONDS = 0.2


# Connection types opened as a DuckDB database file: the DuckDB provider's own, and the Amazon
# provider's "DuckDB on AWS" (a DuckDBHook that also loads httpfs/aws and makes an S3 secret).
DUCKDB_CONN_TYPES = ("duckdb", "duckdb_aws")
POSTGRES_CONN_TYPES = ("postgres", "postgresql")
_IN_MEMORY = ":memory:"


@contextlib.contextmanager
def open_warehouse(conn_id: str, *, timeout: float | None = None) -> Iterator[Warehouse]:
    """A :class:`Warehouse` on an Airflow connection, closed on exit.

    :param conn_id: a ``duckdb`` connection (the DuckDB provider's ``DuckDBHook``: *Database
        path* = host, or ``database`` in the extra), a ``duckdb_aws`` one (the Amazon provider's
        ``AwsDuckDBHook``), a ``postgres`` one (the postgres provider's ``PostgresHook``, on
        psycopg2 for COPY), or any other common.sql connection (its hook's ``get_conn``).
    :param timeout: seconds a DuckDB warehouse is waited for (default
        ``CLAUDE_BATCH_DUCKDB_LOCK_TIMEOUT``, 900).
    """
    from airflow.sdk import BaseHook

    conn = BaseHook.get_connection(conn_id)
    if conn.conn_type in DUCKDB_CONN_TYPES:
        with duckdb_hook_connection(duckdb_hook(conn), timeout) as duck:
            yield Warehouse(duck)
        return
    raw = _connect_other(conn)
    try:
        yield Warehouse(raw)
    finally:
        raw.close()


def duckdb_hook(conn: Any) -> Any:
    """The provider hook of a ``duckdb`` (``DuckDBHook``) or ``duckdb_aws`` (``AwsDuckDBHook``) connection."""
    if conn.conn_type == "duckdb_aws":
        from airflow.providers.amazon.aws.hooks.duckdb import AwsDuckDBHook

        return AwsDuckDBHook(duckdb_conn_id=conn.conn_id)
    from airflow.providers.duckdb.hooks.duckdb import DuckDBHook

    return DuckDBHook(duckdb_conn_id=conn.conn_id)


@contextlib.contextmanager
def duckdb_hook_connection(hook: Any, timeout: float | None = None) -> Iterator[Any]:
    """The connection ``hook.get_conn()`` opens, holding the database file by this process alone.

    The hook says which database (``get_database``: the ``database`` extra, else the host) and
    applies the connection's settings and extensions; the ``flock`` beside the file makes tasks
    take it in turn, as :func:`duckdb_connection` does. A MotherDuck database (``md:``) is not a
    local file and takes no lock; an in-memory one is refused (each task would get an empty one).
    """
    database = hook.get_database()
    conn_id = hook.get_conn_id()
    if database == _IN_MEMORY:
        raise WarehouseError(
            f"the DuckDB connection {conn_id!r} names no database file: set its Database path (host), "
            f"e.g. /data/warehouse.duckdb (an in-memory database would be empty in every task)"
        )
    timeout = DEFAULT_DUCKDB_LOCK_TIMEOUT if timeout is None else timeout
    deadline = time.monotonic() + timeout
    shown = _redacted(database)

    def connect() -> Any:
        import duckdb

        try:
            return hook.get_conn()
        except duckdb.IOException as exc:
            if "lock" in str(exc).lower():
                raise  # another program holds the file: waited out by _connect_duckdb
            raise _hook_error(hook, conn_id, shown, exc) from exc
        except (ValueError, duckdb.Error) as exc:
            raise _hook_error(hook, conn_id, shown, exc) from exc

    remote = database.startswith("md:")
    with contextlib.nullcontext() if remote else _file_lock(f"{database}.lock", deadline, shown):
        conn = _connect_duckdb(connect, shown, deadline)
        try:
            yield conn
        finally:
            conn.close()


def _hook_error(hook: Any, conn_id: str, database: str, exc: BaseException) -> WarehouseError:
    message = f"the DuckDB connection {conn_id!r} could not open {database}: {exc}"
    if getattr(hook, "conn_type", "") == "duckdb_aws":
        message += (
            " (a duckdb_aws connection loads DuckDB's httpfs and aws extensions, downloading them unless "
            "they are in its extension_directory; claude-batch reads S3 through the aws connection itself, "
            "so a plain duckdb connection needs neither)"
        )
    return WarehouseError(message)


def _redacted(database: str) -> str:
    return re.sub(r"motherduck_token=[^&]*", "motherduck_token=***", database)


@contextlib.contextmanager
def duckdb_connection(path: str, timeout: float | None = None) -> Iterator[Any]:
    """A DuckDB connection to ``path`` held by this process alone, waiting its turn.

    :param path: the database file (``:memory:`` needs no lock).
    :param timeout: seconds to wait for the file (default ``CLAUDE_BATCH_DUCKDB_LOCK_TIMEOUT``, 900).
    """
    import duckdb

    timeout = DEFAULT_DUCKDB_LOCK_TIMEOUT if timeout is None else timeout
    if path == _IN_MEMORY:
        conn = duckdb.connect(path)
        try:
            yield conn
        finally:
            conn.close()
        return
    deadline = time.monotonic() + timeout
    with _file_lock(f"{path}.lock", deadline, path):
        conn = _connect_duckdb(lambda: duckdb.connect(path), path, deadline)
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


def _connect_duckdb(connect: Callable[[], Any], path: str, deadline: float) -> Any:
    import duckdb

    while True:
        try:
            return connect()
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
    if conn.conn_type in POSTGRES_CONN_TYPES:
        # Without a database the provider would let libpq pick one named like the user.
        return postgres_hook(conn.conn_id, database=None if conn.schema else "postgres").get_conn()
    return conn.get_hook().get_conn()


def postgres_hook(conn_id: str, **kwargs: Any) -> Any:
    """The postgres provider's ``PostgresHook`` on ``conn_id``, handing out psycopg2 connections.

    The hook builds the connection as the provider documents (host, login, password, port, the
    schema as the database, every extra as a libpq parameter, IAM tokens); only the driver is
    fixed: the provider picks psycopg 3 when it is installed, while the PostgreSQL dialect (COPY
    through ``copy_expert``, named cursors) is written for psycopg2. A ``cursor`` extra is
    ignored: the warehouse reads plain tuples.
    """
    return _psycopg2_postgres_hook_class()(postgres_conn_id=conn_id, **kwargs)


@functools.cache
def _psycopg2_postgres_hook_class() -> type:
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    class Psycopg2PostgresHook(PostgresHook):
        def _create_connection(self, conn_args: dict[str, Any]) -> Any:
            import psycopg2

            args = {k: v for k, v in conn_args.items() if k not in ("row_factory", "cursor_factory")}
            return psycopg2.connect(**args)

    return Psycopg2PostgresHook
