"""Alert callbacks (run in the triggerer for Airflow deadline alerts)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


async def run_overdue(workload: str, **context: object) -> None:
    """A run is still not done long after it was queued: say so loudly in the triggerer's log.

    Deployments that page someone replace this with their own callback (Slack, PagerDuty...).
    """
    log.error(
        "claude-batch: a %s run is past its deadline (still not done since it was queued): %s",
        workload,
        {k: v for k, v in context.items() if k in ("dag_id", "run_id", "deadline")},
    )
