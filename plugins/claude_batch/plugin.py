"""The Airflow plugin: registers the operator extra link (and, later, the UI views)."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from claude_batch.operators import ClaudeConsoleBatchLink


class ClaudeBatchPlugin(AirflowPlugin):
    """claude-batch: the Claude Message Batches API for Airflow."""

    name = "claude_batch"
    operator_extra_links = [ClaudeConsoleBatchLink()]
