"""Local services for tests and benchmarks: a fresh PostgreSQL schema."""

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
