"""A small workload Airflow DAG for the pipeline builder's tests (warehouse and storage from env)."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from claude_batch.pipeline import PipelineConfig, SourceSpec, claude_batch_dag
from claude_batch.staging import StagingLimits
from claude_batch.workloads import Rule, Workload
from pydantic import BaseModel, Field


class TicketLabel(BaseModel):
    category: Literal["billing", "bug", "feature_request", "cancellation", "other"]
    confidence: float = Field(ge=0, le=1)


TINY_TRIAGE = Workload(
    name="tiny_triage",
    system_prompt="Classify the support ticket into one category and give your confidence.",
    user_template="Ticket {ticket_id}: {body}",
    model="claude-haiku-4-5",
    max_tokens=200,
    output_schema=TicketLabel,
    rules=(Rule("needs_review", lambda out: out.confidence < 0.6),),
    cache="off",
)

dag = claude_batch_dag(
    PipelineConfig(
        workload=TINY_TRIAGE,
        source=SourceSpec(table="tickets", key_column="ticket_id", interval_column="created_at"),
        staging_limits=StagingLimits(max_requests_per_shard=40),
        min_poll_interval=0.2,
        max_poll_interval=0.5,
        allowed_models=("claude-haiku-4-5", "claude-sonnet-4-5"),
    ),
    dag_id="cb_tiny_triage",
    schedule="@daily",
    start_date=datetime(2026, 11, 1),
)
