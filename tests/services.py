"""Local services for tests and benchmarks: a fresh PostgreSQL schema, a moto store, a tickets table."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

POSTGRES_HOST, POSTGRES_PORT = "127.0.0.1", 5432


@contextmanager
def fresh_postgres_schema(prefix: str = "t") -> Iterator[str]:
    """A new schema in the local ``test`` database; yields a DSN that uses it, drops it after."""
    import psycopg2

    schema = f"{prefix}_{uuid.uuid4().hex[:10]}"
    base = f"postgresql://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/test"
    with psycopg2.connect(base) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{base}?options=-csearch_path%3D{schema}"
    finally:
        conn = psycopg2.connect(base)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        conn.close()


def moto_store(root: str, endpoint_url: str):
    """An :class:`~claude_batch.storage.ObjectStore` at ``root`` on the moto server at ``endpoint_url``."""
    from claude_batch.storage import ObjectStore

    return ObjectStore(
        root,
        key="testing",
        secret="testing",
        endpoint_url=endpoint_url,
        client_kwargs={"region_name": "us-east-1"},
    )


def create_tickets(conn, rows) -> None:
    """Create and fill ``tickets(id, body, created_at)`` in either warehouse."""
    rows = [(r["id"], r["body"], r["created_at"]) for r in rows]
    if type(conn).__module__.split(".")[0] in ("duckdb", "_duckdb"):
        import pyarrow as pa

        conn.execute("CREATE TABLE tickets (id VARCHAR, body VARCHAR, created_at TIMESTAMP)")
        table = pa.table(
            {
                "id": [r[0] for r in rows],
                "body": [r[1] for r in rows],
                "created_at": pa.array([r[2] for r in rows], pa.timestamp("us")),
            }
        )
        conn.register("tickets_in", table)
        conn.execute("INSERT INTO tickets SELECT * FROM tickets_in")
        conn.unregister("tickets_in")
    else:
        from psycopg2.extras import execute_values

        with conn.cursor() as cur:
            cur.execute("CREATE TABLE tickets (id TEXT, body TEXT, created_at TIMESTAMP)")
            execute_values(cur, "INSERT INTO tickets VALUES %s", rows, page_size=5000)
        conn.commit()
