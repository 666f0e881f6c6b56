"""The full-stack overlap test's workload Airflow DAG: a DuckDB warehouse, four shards per interval.

Its warehouse connection (``cb_overlap_duckdb_warehouse``, conn_type ``duckdb``, host = the
database file) is created by ``tests/fullstack/test_overlap.py`` through the REST API, and the
file is seeded there; parsing this file needs neither.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from claude_batch.pipeline import PipelineConfig, SourceSpec, claude_batch_dag
from claude_batch.staging import StagingLimits
from claude_batch.workloads import Workload
from pydantic import BaseModel, Field

OVERLAP_DAG_ID = "cb_overlap_duckdb"
OVERLAP_WAREHOUSE_CONN_ID = "cb_overlap_duckdb_warehouse"
REQUESTS_PER_SHARD = 25


class TicketLabel(BaseModel):
    category: Literal["billing", "bug", "feature_request", "cancellation", "other"]
    confidence: float = Field(ge=0, le=1)


OVERLAP_TRIAGE = Workload(
    name="overlap_triage",
    system_prompt="Classify the support ticket into one category and give your confidence.",
    user_template="Ticket {ticket_id}: {body}",
    model="claude-haiku-4-5",
    max_tokens=200,
    output_schema=TicketLabel,
    cache="off",
)

dag = claude_batch_dag(
    PipelineConfig(
        workload=OVERLAP_TRIAGE,
        source=SourceSpec(table="tickets", key_column="ticket_id", interval_column="created_at"),
        warehouse_conn_id=OVERLAP_WAREHOUSE_CONN_ID,
        staging_limits=StagingLimits(max_requests_per_shard=REQUESTS_PER_SHARD),
        min_poll_interval=0.2,
        max_poll_interval=0.5,
    ),
    dag_id=OVERLAP_DAG_ID,
    schedule="@daily",
    start_date=datetime(2026, 11, 1),
)
