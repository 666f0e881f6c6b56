"""The Claude Batches page: a plugin FastAPI app under ``/claude-batch``, shown in Airflow's own UI.

Registered by :class:`claude_batch.plugin.ClaudeBatchPlugin` through Airflow 3's plugin UI
extension points: :data:`FASTAPI_APP` (``fastapi_apps``: the app, mounted by the API server at
``/claude-batch``) and :data:`EXTERNAL_VIEW` (``external_views``: a "Claude Batches" entry in the
navigation that shows the app in an iframe inside Airflow's UI, at ``/plugin/claude-batch``).

The page (server-rendered HTML, no build step, nothing fetched from outside) shows, per workload
of each warehouse connection it is given, what :mod:`claude_batch.ops` answers: recent runs with
items per outcome, cost, the real-time equivalent, saving, cache hit rate and duration; cost per
day as an inline SVG chart; batches in flight (items, age, time to the API's 24-hour expiry);
ledger counts per status; dead and invalid items with their reasons, searchable; and a requeue of
the items ticked (recorded in the ledger with the Airflow user and the time). Runs, items and
batches link to the DAG run and task in Airflow's own pages.

Which warehouses: the connection ids in ``CLAUDE_BATCH_UI_CONN_IDS`` (comma-separated), by default
``claude_batch_warehouse`` (the pipeline's default warehouse connection). Only these can be
opened through the page: a connection id in a URL that is not listed is a 404.

Routes, each behind Airflow's authentication and the auth manager's DAG permissions
(:mod:`claude_batch.ui.auth`)::

    GET  /                                  every workload the user may read, per connection
    GET  /{conn_id}/{workload}              the workload (?q= search, ?status=, ?offset=)
    POST /{conn_id}/{workload}/requeue      requeue the ticked dead/invalid items (edit permission)

The FastAPI app is built on its first request (:class:`LazyApp`): every Airflow process loads the
plugin (the scheduler, each task), and only the API server serves the page, so the others never
import FastAPI or Airflow's API security module for it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

URL_PREFIX = "/claude-batch"
URL_ROUTE = "claude-batch"
PAGE_NAME = "Claude Batches"


class LazyApp:
    """An ASGI app that builds the real one (``factory()``) on first use, once.

    :param factory: returns the FastAPI app.
    """

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._app: Any = None
        self._lock = threading.Lock()

    @property
    def app(self) -> Any:
        if self._app is None:
            with self._lock:
                if self._app is None:
                    self._app = self._factory()
        return self._app

    @property
    def routes(self) -> list[Any]:
        """The built app's routes (what the security tests call one by one)."""
        return self.app.routes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        await self.app(scope, receive, send)

    def __repr__(self) -> str:  # what Airflow's plugins list shows for the app
        return "claude_batch.ui.app:create_app (built on first request)"


def _create_app() -> Any:
    from claude_batch.ui.app import create_app

    return create_app()


FASTAPI_APP: dict[str, Any] = {"app": LazyApp(_create_app), "url_prefix": URL_PREFIX, "name": PAGE_NAME}
EXTERNAL_VIEW: dict[str, Any] = {
    "name": PAGE_NAME,
    # Relative (no leading slash): the UI resolves it against its own base URL, so the page
    # still loads when Airflow is served under a path.
    "href": f"{URL_ROUTE}/",
    "url_route": URL_ROUTE,
    "destination": "nav",
    "nav_top_level": True,  # an entry of its own in the navigation bar, not inside a "Plugins" menu
}
