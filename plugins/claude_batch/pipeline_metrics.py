"""The run report as Airflow metrics: ``claude_batch.*`` gauges and the batches' duration.

They go wherever Airflow's metrics are configured (StatsD or OpenTelemetry), tagged with the
workload. The cost figures carry the report's definitions (:class:`claude_batch.costs.RunCosts`),
so a dashboard and ``report.json`` never disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from airflow.sdk.observability import stats as airflow_stats


def emit_metrics(workload: str, report: Mapping[str, Any]) -> None:
    """Counts, cost and durations as Airflow metrics (StatsD or OpenTelemetry, as configured)."""
    # Looked up when called, not bound at import: a test (or a plugin) may replace Stats.
    Stats = airflow_stats.Stats
    tags = {"workload": workload}
    for status, count in (report.get("ledger") or {}).items():
        Stats.gauge(f"claude_batch.items.{status}", count, tags=tags)
    Stats.gauge("claude_batch.cost_usd", report["cost_usd"], tags=tags)
    # The report's definitions (claude_batch.costs.RunCosts): savings against plain real-time calls.
    costs = report.get("costs") or {}
    Stats.gauge("claude_batch.saving_usd", report["saving_usd"], tags=tags)
    for name in (
        "realtime_uncached_usd",
        "batch_uncached_usd",
        "saving_from_batching_usd",
        "saving_from_caching_usd",
    ):
        if costs.get(name) is not None:
            Stats.gauge(f"claude_batch.{name}", costs[name], tags=tags)
    gap = (costs.get("estimate") or {}).get("gap_pct")
    if gap is not None:
        Stats.gauge("claude_batch.estimate_gap_pct", gap, tags=tags)
    if report.get("batch_seconds"):
        Stats.timing(
            "claude_batch.batch_duration", timedelta(seconds=report["batch_seconds"]["max"]), tags=tags
        )
