"""Fixtures for the data path: a workload, stores, and warehouses over DuckDB and PostgreSQL."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Literal

import pytest
from claude_batch.storage import ObjectStore, RunLayout
from claude_batch.workloads import Rule, Workload
from pydantic import BaseModel, Field

INTERVAL = (dt.datetime(2026, 1, 1), dt.datetime(2026, 1, 2))


class Invoice(BaseModel):
    category: Literal["billing", "bug", "other"]
    total_amount: float = Field(ge=0)
    summary: str


def make_workload(**changes) -> Workload:
    values = {
        "name": "invoices",
        "system_prompt": "Classify the support ticket and extract the invoice total. " * 8,
        "user_template": "Ticket {id}: {body}",
        "model": "claude-haiku-4-5",
        "max_tokens": 300,
        "output_schema": Invoice,
        "rules": (Rule("approval_required", lambda out: out.total_amount > 200_000),),
        "cache": "off",
    }
    values.update(changes)
    return Workload(**values)


@pytest.fixture
def workload() -> Workload:
    return make_workload()


@pytest.fixture
def local_store(tmp_path) -> ObjectStore:
    return ObjectStore(str(tmp_path / "store"))


@pytest.fixture
def layout(local_store) -> RunLayout:
    return RunLayout(local_store, "invoices_dag", "scheduled__2026-01-01T00:00:00+00:00")


def ticket_rows(count: int, *, start: int = 0, day: dt.datetime = INTERVAL[0]) -> Iterator[dict]:
    """Rows as extract yields them: an id, a body with an invoice total, a timestamp."""
    for i in range(start, start + count):
        yield {
            "id": f"t{i:06d}",
            "body": f"Invoice total: ${i * 250:,}.00. I was charged twice, please refund.",
            "created_at": day + dt.timedelta(minutes=i % 600),
        }


@pytest.fixture
def setup(warehouse_conn, local_store):
    """A warehouse (each dialect in turn) with the test workload's tables, the workload, a local store."""
    from claude_batch.warehouse import Warehouse

    workload = make_workload()
    warehouse = Warehouse(warehouse_conn)
    warehouse.ensure_tables(workload)
    return warehouse, workload, local_store


@pytest.fixture
def duckdb_conn():
    import duckdb

    conn = duckdb.connect()
    yield conn
    conn.close()


@pytest.fixture
def postgres_conn(postgres_dsn):
    import psycopg2

    conn = psycopg2.connect(postgres_dsn)
    yield conn
    conn.close()


@pytest.fixture(params=["duckdb", "postgres"])
def warehouse_conn(request):
    """A connection to each warehouse in turn (PostgreSQL skips when it is not running)."""
    if request.param == "duckdb":
        return request.getfixturevalue("duckdb_conn")
    return request.getfixturevalue("postgres_conn")


def query(conn, sql: str, params=()) -> list[tuple]:
    if type(conn).__module__.split(".")[0] in ("duckdb", "_duckdb"):
        return conn.execute(sql, list(params)).fetchall()
    with conn.cursor() as cur:
        cur.execute(sql.replace("?", "%s"), params)
        rows = cur.fetchall()
    conn.commit()
    return rows
