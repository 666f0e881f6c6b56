"""Step 10, ``report``: what the run did, cost and saved, written to ``<run>/report.json``.

The cost definitions are :class:`claude_batch.costs.RunCosts`'s; the report only gathers them
with the counts, the estimate, the cache decision and the batches' durations. A multi-model run
reads its billed tokens per model from the results Parquet its collects wrote; when a part
cannot be read, the run's totals are apportioned by its staged requests per model instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from claude_batch.costs import PriceTable, TokenTotals, apportion_tokens, run_costs
from claude_batch.pilot import with_pilot
from claude_batch.staging import Manifest
from claude_batch.steps.manifests import estimated_cost, require_manifest
from claude_batch.storage import RunLayout


def _tokens_by_model(layout: RunLayout, collected: list[Mapping[str, Any]]) -> dict[str, TokenTotals] | None:
    """Every billed token of the run by answering model, read from the results Parquet its collects wrote.

    None when a part cannot be read (the costs then apportion the run's totals).
    """
    names = [
        "model",
        "input_tokens",
        "output_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    ]
    totals: dict[str, TokenTotals] = {}
    try:
        for part in collected:
            path = (part.get("collected") or {}).get("results_parquet")
            if not path:
                return None
            with layout.store.open(path, "rb") as handle:
                table = pq.read_table(handle, columns=names)
            table = table.filter(pc.is_valid(table.column("model")))
            for row in table.group_by("model").aggregate([(name, "sum") for name in names[1:]]).to_pylist():
                found = TokenTotals(*(int(row[f"{name}_sum"] or 0) for name in names[1:]))
                totals[row["model"]] = totals.get(row["model"], TokenTotals()) + found
    except (OSError, KeyError, ValueError):
        return None
    return totals


def report_costs(
    manifest: Manifest,
    load: Mapping[str, Any],
    prices: PriceTable,
    by_model: Mapping[str, TokenTotals] | None = None,
) -> dict[str, Any]:
    """The report's cost section (the definitions: :class:`claude_batch.costs.RunCosts`).

    :param load: the run's load totals (a ``LoadSummary`` as a dict).
    :param by_model: billed tokens by model; without it a one-model run uses its totals (exact) and a
        multi-model run apportions them by its staged requests per model (``exact`` False).
    """
    total = TokenTotals(
        int(load["input_tokens"]), int(load["output_tokens"]),
        int(load["cache_creation_input_tokens"]), int(load["cache_read_input_tokens"]),
    )  # fmt: skip
    exact = True
    if not by_model:
        per_model = (manifest.estimate or {}).get("per_model") or {}
        shares = {model: entry.get("requests", 0) for model, entry in per_model.items()}
        by_model = apportion_tokens(total, shares or dict.fromkeys(manifest.models or ["unknown"], 1))
        exact = len(by_model) <= 1
    return run_costs(float(load["cost_usd"]), by_model, prices, manifest.estimate, exact=exact).to_dict()


def build_report(
    layout: RunLayout,
    loaded: Mapping[str, Any],
    collected: list[Mapping[str, Any]],
    prices: PriceTable,
    pilot: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The run report: counts per outcome, what the run cost and saved, the estimate, caching, durations.

    ``costs`` holds the definitions (:class:`claude_batch.costs.RunCosts`): the actual cost; the
    same tokens as plain real-time calls without caching (also ``realtime_cost_usd``); the same
    tokens in batches without caching; the saving from batching and the saving (or, negative, the
    loss) from caching, apart; the estimate beside the actual, with the gap. ``saving_usd`` is the
    saving against plain real-time calls: batching and caching together.

    :param pilot: the pilot's decision (``pilot_decide``), if the run had a pilot; its tokens and
        cost are in ``loaded`` already, its requests in ``staged``.
    """
    manifest = with_pilot(layout, require_manifest(layout))
    load = loaded["load"]
    cost = float(load["cost_usd"])
    cache_read = int(load["cache_read_input_tokens"])
    cache_write = int(load["cache_creation_input_tokens"])
    durations = [c["batch_seconds"] for c in collected if c.get("batch_seconds") is not None]
    by_model = _tokens_by_model(layout, collected) if len(manifest.models) > 1 else None
    costs = report_costs(manifest, load, prices, by_model)
    plan = (manifest.estimate or {}).get("cache_plan") or {}
    return {
        "workload": manifest.workload,
        "dag_id": layout.dag_id,
        "run_id": layout.run_id,
        "prompt_version": manifest.prompt_version,
        "models": manifest.models,
        "cache_setting": manifest.cache_setting,
        "extracted": manifest.extracted_rows,
        "staged": manifest.staged_requests,
        "rejected": manifest.rejected_rows,
        "rejected_by_reason": manifest.rejected_by_reason,
        "ledger": loaded["ledger"],
        "batches": len(collected),
        "rounds": loaded.get("rounds", []),
        "tokens": {
            "input": int(load["input_tokens"]),
            "output": int(load["output_tokens"]),
            "cache_write": cache_write,
            "cache_read": cache_read,
        },
        "cost_usd": round(cost, 6),
        "realtime_cost_usd": costs["realtime_uncached_usd"],
        "saving_usd": costs["saving_usd"],
        "estimated_cost_usd": estimated_cost(manifest),
        "costs": costs,
        "cache": {
            "policy": plan.get("policy"),
            "setting": manifest.cache_setting,
            "reason": plan.get("reason"),
            "probe": plan.get("probe"),
            "evidence": plan.get("evidence"),
        },
        "cache_hit_rate": round(cache_read / (cache_read + cache_write), 4)
        if cache_read + cache_write
        else None,
        "batch_seconds": {"max": max(durations), "mean": sum(durations) / len(durations)}
        if durations
        else None,
        "pilot": _pilot_summary(pilot),
        "reported_at": datetime.now(UTC).isoformat(),
    }


def _pilot_summary(decision: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not decision:
        return None
    keys = (
        "requests",
        "valid",
        "judged",
        "pass_rate",
        "threshold",
        "failures",
        "approval",
        "batch_ids",
        "cost_usd",
    )
    return {key: decision.get(key) for key in keys}


def write_report(layout: RunLayout, report: Mapping[str, Any]) -> None:
    """Write the report (or the dry run's estimate) to the run's ``report.json``."""
    layout.store.write_json(layout.report, dict(report))
