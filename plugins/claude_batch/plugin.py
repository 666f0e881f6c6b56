"""The Airflow plugin: the Claude Console extra link and the run-note listener.

- ``ClaudeConsoleBatchLink``: the submit task's (mapped or not) link to its batch in the Claude
  Console; hidden when the ``anthropic`` connection points somewhere else (the emulator, a
  gateway), unless ``CLAUDE_BATCH_CONSOLE_URL`` says where batches are shown there.
- :mod:`claude_batch.notes` as a listener: when a run ends, its outcome and cost become the DAG
  run's note (the scheduler runs listeners as it ends runs).
- :mod:`claude_batch.ui`: the Claude Batches page, a FastAPI app at ``/claude-batch`` behind
  Airflow's authentication, and its entry in the UI's navigation (shown in an iframe).
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from claude_batch import notes, ui
from claude_batch.operators import ClaudeConsoleBatchLink


class ClaudeBatchPlugin(AirflowPlugin):
    """claude-batch: the Claude Message Batches API for Airflow."""

    name = "claude_batch"
    # The link reaches the API server as the serialized operator's XCom link (``_link_*``), so it
    # needs no ``operators`` list here: with one, the API server would call get_link itself,
    # outside a task, and show nothing.
    operator_extra_links = [ClaudeConsoleBatchLink()]
    listeners = [notes]
    fastapi_apps = [ui.FASTAPI_APP]
    external_views = [ui.EXTERNAL_VIEW]
