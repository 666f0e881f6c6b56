"""An airflow DAG for the reliability and security tests: the bad-input corpus, warehouse to warehouse.

Warehouse, storage root and connections come from the environment the tests set
(``tests/reliability/corpus.py``). The body column is a BLOB in the test warehouse, so rows can
hold bytes that are not UTF-8 at all; good rows are plain UTF-8 bytes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from claude_batch.pipeline import PipelineConfig, SourceSpec, claude_batch_dag
from claude_batch.staging import StagingLimits
from claude_batch.workloads import Workload
from pydantic import BaseModel, Field


class TicketVerdict(BaseModel):
    category: Literal["billing", "bug", "feature_request", "cancellation", "other"]
    confidence: float = Field(ge=0, le=1)


CORPUS_WORKLOAD = Workload(
    name="corpus",
    system_prompt="Classify the support ticket into one category and give your confidence.",
    user_template="Ticket {ticket_id}: {body}",
    model="claude-haiku-4-5",
    max_tokens=200,
    output_schema=TicketVerdict,
    cache="off",
)

dag = claude_batch_dag(
    PipelineConfig(
        workload=CORPUS_WORKLOAD,
        source=SourceSpec(table="corpus", key_column="ticket_id", interval_column="created_at"),
        # 600 kB shards: a 700,000-character row fits the model's window but not a shard.
        staging_limits=StagingLimits(max_requests_per_shard=25, max_shard_bytes=600_000),
        min_poll_interval=0.2,
        max_poll_interval=0.5,
    ),
    dag_id="cb_reliability_corpus",
    schedule="@daily",
    start_date=datetime(2026, 11, 1),
)
