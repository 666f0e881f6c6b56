"""Accounts-payable invoices: department, amount and a short description; large amounts need approval.

Runs every four hours over the invoices received in the four hours before (``received_at``), so
an invoice received by 6 pm is in the 8 pm run and ready for approval long before 8 am.
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
APPROVAL_ABOVE = 200_000


class InvoiceExtraction(BaseModel):
    department: Literal["IT", "HR", "Admin", "Marketing", "Finance", "Other"]
    amount: float = Field(ge=0, description="The total amount due, a plain number.")
    description: str = Field(max_length=120, description="What was bought, in a few words.")


invoices = Workload(
    name="invoice_approval",
    description=__doc__,
    system_prompt=(PROMPTS / "invoice_approval.md").read_text(encoding="utf-8"),
    user_template="Invoice {invoice_id} from {vendor}:\n\n{invoice_text}",
    model="claude-sonnet-4-6",
    max_tokens=300,
    expected_output_tokens=60,
    output_schema=InvoiceExtraction,
    rules=(Rule("approval_required", lambda invoice: invoice.amount > APPROVAL_ABOVE),),
)

dag = claude_batch_dag(
    PipelineConfig(
        workload=invoices,
        source=SourceSpec(
            table="ap_invoices",
            key_column="invoice_id",
            columns=("invoice_id", "vendor", "invoice_text"),
            interval_column="received_at",
        ),
        allowed_models=("claude-sonnet-4-6", "claude-haiku-4-5", "claude-opus-4-6"),
    ),
    dag_id="invoice_approval",
    schedule="0 */4 * * *",
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
)
