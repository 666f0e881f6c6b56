"""Nightly support-ticket triage: each ticket gets a category and a confidence; doubtful ones go to a person.

Runs at midnight UTC over the previous day's tickets (the data interval selects them by
``created_at``), so a backfill over a date range triages each day once.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from claude_batch.pipeline import PipelineConfig, SourceSpec, claude_batch_dag
from claude_batch.workloads import Rule, Workload
from pydantic import BaseModel, Field

# An Airflow DAG file: the pipeline builder wires the tasks, this file says what the workload is.
PROMPTS = Path(__file__).resolve().parent.parent / "include" / "prompts"
REVIEW_BELOW_CONFIDENCE = 0.6


class TicketTriage(BaseModel):
    category: Literal["billing", "bug", "feature_request", "cancellation", "other"]
    confidence: float = Field(ge=0, le=1, description="How sure the category is right, 0 to 1.")
    summary: str = Field(max_length=160, description="The customer's request in one short sentence.")


triage = Workload(
    name="support_ticket_triage",
    description=__doc__,
    system_prompt=(PROMPTS / "support_ticket_triage.md").read_text(encoding="utf-8"),
    user_template="Ticket {ticket_id} ({channel})\nSubject: {subject}\n\n{body}",
    text_fields=("body",),  # chat tickets have no subject
    model="claude-haiku-4-5",
    max_tokens=300,
    expected_output_tokens=70,
    output_schema=TicketTriage,
    rules=(Rule("needs_review", lambda triaged: triaged.confidence < REVIEW_BELOW_CONFIDENCE),),
)

dag = claude_batch_dag(
    PipelineConfig(
        workload=triage,
        source=SourceSpec(
            table="support_tickets",
            key_column="ticket_id",
            columns=("ticket_id", "channel", "subject", "body"),
            interval_column="created_at",
        ),
        allowed_models=("claude-haiku-4-5", "claude-sonnet-4-6"),
        # Only the demo and tests shorten the first poll (the emulator runs in fast time).
    ),
    dag_id="support_ticket_triage",
    schedule="@daily",
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
)
