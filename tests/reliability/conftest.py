"""Fixtures for the reliability tests: a run's stack over a DuckDB file or PostgreSQL.

``RELIABILITY_ROWS`` sets the fault matrix's size (default 2,000 rows in two shards: the CI
size); ``bench/bench_fault_matrix.py`` runs the same scenarios at 10,000+ rows.
"""

from __future__ import annotations

import os

import pytest

from tests.reliability.harness import Stack, fill_source

ROWS = int(os.environ.get("RELIABILITY_ROWS", "2000"))
SHARDS = 2


def _stack(warehouse_url: str, s3_store, moto_endpoint: str) -> Stack:
    stack = Stack(
        store_root=s3_store.root,
        s3_endpoint=moto_endpoint,
        warehouse_url=warehouse_url,
        shard_size=-(-ROWS // SHARDS),
    )
    fill_source(stack, ROWS)
    return stack


@pytest.fixture
def duckdb_stack(tmp_path, s3_store, moto_endpoint, anthropic_conn, aws_conn) -> Stack:
    return _stack(f"duckdb://{tmp_path / 'warehouse.duckdb'}", s3_store, moto_endpoint)


@pytest.fixture
def postgres_stack(postgres_dsn, s3_store, moto_endpoint, anthropic_conn, aws_conn) -> Stack:
    return _stack(postgres_dsn, s3_store, moto_endpoint)
