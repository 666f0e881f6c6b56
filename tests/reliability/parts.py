"""The parts one reliability run talks to, and the workload and rows it runs on.

:class:`Stack` names them (S3 on a moto server, a DuckDB file or PostgreSQL, the shard size):
JSON-able, so a forked worker process can rebuild it. Its warehouse connections carry the
active statement faults (``tests/reliability/injected_faults.py``). :func:`fill_source` seeds
the ``tickets`` table on :data:`DAY`; :func:`query` reads the warehouse on a connection of its
own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from claude_batch.pipeline import PipelineConfig
from claude_batch.staging import StagingLimits
from claude_batch.storage import ObjectStore, RunLayout
from claude_batch.warehouse import SourceSpec, Warehouse, dialect_for
from claude_batch.workloads import Workload
from pydantic import BaseModel, Field

from tests.reliability.injected_faults import _DuckDBConnection, _PostgresConnection
from tests.services import create_tickets, moto_store

DAG_ID = "reliability_matrix"
DAY = datetime(2026, 3, 1)


class TicketLabel(BaseModel):
    category: Literal["billing", "bug", "feature_request", "other"]
    confidence: float = Field(ge=0, le=1)


WORKLOAD = Workload(
    name="reliability",
    system_prompt="Classify the support ticket into one category and give your confidence.",
    user_template="Ticket {id}: {body}",
    model="claude-haiku-4-5",
    max_tokens=100,
    output_schema=TicketLabel,
    cache="off",
)
# The same task with a prompt long enough to cache (~1,500 tokens: Sonnet 4.6 caches from 1,024)
# and the caching policy on ``auto``: with no history, a run probes the 5-minute cache on a shard
# of its own (``claude_batch.caching``).
CACHED_WORKLOAD = dataclasses.replace(
    WORKLOAD,
    system_prompt=WORKLOAD.system_prompt + " Follow the house rules for every ticket." * 200,
    model="claude-sonnet-4-6",
    cache="auto",
)
WORKLOADS = {"plain": WORKLOAD, "cached": CACHED_WORKLOAD}
SOURCE = SourceSpec(table="tickets", key_column="id", interval_column="created_at")
BODIES = (
    "I was charged twice for invoice {i}, please refund",
    "The app crashes with an error when I open report {i}",
    "Please add a dark mode, a feature idea ({i})",
    "Where is my parcel {i}?",
)


@dataclass(frozen=True)
class Stack:
    """The parts one run talks to.

    :param store_root: ``s3://bucket/prefix`` on the moto server.
    :param s3_endpoint: the moto server's URL.
    :param warehouse_url: ``duckdb:///path/to/file.duckdb`` or a ``postgresql://`` DSN.
    :param shard_size: requests per shard.
    """

    store_root: str
    s3_endpoint: str
    warehouse_url: str
    shard_size: int
    workload_name: str = "plain"  # a key of WORKLOADS

    @property
    def workload(self) -> Workload:
        return WORKLOADS[self.workload_name]

    @property
    def dialect(self) -> str:
        return "duckdb" if self.warehouse_url.startswith("duckdb://") else "postgres"

    def store(self) -> ObjectStore:
        return moto_store(self.store_root, self.s3_endpoint)

    def layout(self, run_id: str) -> RunLayout:
        return RunLayout(self.store(), DAG_ID, run_id)

    def config(self) -> PipelineConfig:
        return PipelineConfig(
            workload=self.workload,
            source=SOURCE,
            storage_root=self.store_root,
            staging_limits=StagingLimits(max_requests_per_shard=self.shard_size),
        )

    def connect(self) -> Any:
        """A new DB-API connection, as each task attempt opens its own."""
        if self.dialect == "duckdb":
            import duckdb

            return duckdb.connect(self.warehouse_url.removeprefix("duckdb://"))
        import psycopg2

        return psycopg2.connect(self.warehouse_url)

    @contextlib.contextmanager
    def warehouse(self) -> Iterator[Warehouse]:
        """The warehouse on a new connection, which carries the active :func:`statement_faults`."""
        conn = self.connect()
        dialect = dialect_for(conn)
        wrapped = (_DuckDBConnection if self.dialect == "duckdb" else _PostgresConnection)(conn)
        try:
            yield Warehouse(wrapped, dialect)
        finally:
            with contextlib.suppress(Exception):
                conn.close()

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Stack:
        return cls(**json.loads(text))


def fill_source(stack: Stack, rows: int) -> None:
    """Create ``tickets(id, body, created_at)`` with ``rows`` rows on :data:`DAY`."""
    conn = stack.connect()
    try:
        create_tickets(
            conn,
            (
                {
                    "id": f"t{i:06d}",
                    "body": BODIES[i % len(BODIES)].format(i=i),
                    "created_at": DAY + timedelta(seconds=(i * 7) % 86_000),
                }
                for i in range(rows)
            ),
        )
    finally:
        conn.close()


def query(stack: Stack, sql: str) -> list[tuple]:
    conn = stack.connect()
    try:
        if stack.dialect == "duckdb":
            return conn.execute(sql).fetchall()
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()
    finally:
        conn.close()
