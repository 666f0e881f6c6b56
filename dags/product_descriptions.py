"""Product copy: a tagline and a description of at most 300 characters for each changed product.

Runs at midnight UTC over the products whose catalogue data changed the day before
(``updated_at``). The length limits are part of the output schema: a longer answer fails
validation and is retried once.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from claude_batch.pipeline import PipelineConfig, SourceSpec, claude_batch_dag
from claude_batch.workloads import Rule, Workload
from pydantic import BaseModel, Field

# An Airflow DAG file: the pipeline builder wires the tasks, this file says what the workload is.
PROMPTS = Path(__file__).resolve().parent.parent / "include" / "prompts"
DESCRIPTION_LIMIT = 300  # the marketplace feeds cut anything longer


class ProductCopy(BaseModel):
    tagline: str = Field(max_length=80, description="The main benefit in one line.")
    description: str = Field(max_length=DESCRIPTION_LIMIT, description="Two or three short sentences.")


copy = Workload(
    name="product_descriptions",
    description=__doc__,
    # The style guide is long enough to cache: every request in a batch reads it from the cache.
    system_prompt=(PROMPTS / "product_descriptions.md").read_text(encoding="utf-8"),
    user_template=(
        "Product {sku}: {name}\nCategory: {category}\nMaterials: {materials}\nFeatures: {features}"
    ),
    text_fields=("name", "features"),
    model="claude-sonnet-4-6",
    max_tokens=400,
    expected_output_tokens=120,
    output_schema=ProductCopy,
    rules=(Rule("description_chars", lambda product: len(product.description), dtype="int"),),
)

dag = claude_batch_dag(
    PipelineConfig(
        workload=copy,
        source=SourceSpec(
            table="products",
            key_column="sku",
            columns=("sku", "name", "category", "materials", "features"),
            interval_column="updated_at",
        ),
        allowed_models=("claude-sonnet-4-6", "claude-opus-4-6", "claude-haiku-4-5"),
    ),
    dag_id="product_descriptions",
    schedule="@daily",
    start_date=datetime(2026, 1, 1, tzinfo=UTC),
)
