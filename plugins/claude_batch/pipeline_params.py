"""The trigger form: the Params a run of a ``claude_batch_dag`` is asked for.

Airflow validates them before the run starts; :class:`claude_batch.steps.config.RunOptions`
reads the same keys back in the tasks. The keys are the names a REST trigger's ``conf`` and
``airflow dags test --conf`` use, so renaming one breaks those callers.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import Param

from claude_batch.steps.config import PipelineConfig

__all__ = ["PARAM_SECTIONS", "run_params"]


# The trigger form's sections after its first, in the order the form shows them. The first
# (what to send) has no section of its own: Airflow's form opens only its default section
# ("Run Parameters") and shows the others collapsed, to be opened when wanted.
PARAM_SECTIONS = ("Cost and dry run", "Pilot run")


def run_params(config: PipelineConfig, default_row_limit: int = 0) -> dict[str, Any]:
    """The Params a UI trigger shows as a form; Airflow validates them before the run starts.

    Each has a title and a description; the cost and pilot fields have a section of the form
    each (:data:`PARAM_SECTIONS`). The keys stay the names a REST trigger's ``conf`` and
    ``airflow dags test --conf`` use.
    """
    cost, pilot = PARAM_SECTIONS
    models = list(config.models)
    return {
        "model": Param(
            config.workload.model,
            type="string",
            enum=models,
            values_display={model: _model_title(model) for model in models},
            title="Model",
            description=f"The model every request goes to (the workload's own: {config.workload.model}). "
            "Another model is another prompt version: its rows are sent again.",
        ),
        "row_limit": Param(
            default_row_limit,
            type="integer",
            minimum=0,
            maximum=10_000_000,
            title="Row limit",
            description="Send at most this many rows of the interval (0: all of them).",
        ),
        "window_start": Param(
            None,
            type=["null", "string"],
            format="date",
            title="From date",
            description="Take the rows from this date on instead of the run's data interval "
            "(give both dates).",
        ),
        "window_end": Param(
            None,
            type=["null", "string"],
            format="date",
            title="To date (exclusive)",
            description="Take the rows before this date (with From date).",
        ),
        "dry_run": Param(
            False,
            type="boolean",
            title="Dry run",
            description="Extract the rows and estimate the cost; submit nothing. "
            "The run's note gives the estimate.",
            section=cost,
        ),
        "budget_usd": Param(
            0.0,
            type="number",
            minimum=0,
            title="Budget (USD)",
            description="Refuse to submit when the estimated cost is above this many dollars (0: no budget).",
            section=cost,
        ),
        "pilot_size": Param(
            0,
            type="integer",
            minimum=0,
            maximum=10_000,
            title="Pilot size",
            description="Send this many requests first, on their own, and go on only if they validate "
            "(0: no pilot).",
            section=pilot,
        ),
        "pilot_min_pass_rate": Param(
            0.8,
            type="number",
            minimum=0,
            maximum=1,
            title="Pilot pass rate",
            description="The share of pilot answers (0 to 1) that must pass validation for the run to go on.",
            section=pilot,
        ),
        "pilot_approval": Param(
            config.pilot_approval,
            type="boolean",
            title="A person approves the pilot",
            description="After the pilot, a person sees its answers and the full run's cost estimate "
            "and decides (instead of the pass rate).",
            section=pilot,
        ),
    }


def _model_title(model: str) -> str:
    """``claude-haiku-4-5`` -> ``Claude Haiku 4.5`` (the form's label; the value stays the id)."""
    words = model.split("-")
    if words[:1] != ["claude"]:
        return model
    name = [w.capitalize() for w in words if not w.isdigit()]
    version = [w for w in words if w.isdigit() and len(w) <= 2]  # not a snapshot's date
    return " ".join(name) + (f" {'.'.join(version)}" if version else "")
