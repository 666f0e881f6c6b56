"""Every web endpoint the plugin adds requires Airflow's authentication and the user's DAG permissions.

Airflow 3 mounts a plugin's ``fastapi_apps`` under the API server as they are: it adds no
authentication of its own, so each route must demand it. The checks below call every route of
every FastAPI app the plugin registers (the Claude Batches page) without credentials, wanting
401 or 403, and with a valid token of a user who may read no DAG, wanting 403; the first check
is shown to catch an open route on a stand-in app. The page's navigation entry
(``external_views``) points at that app; web surfaces these tests cannot call (Flask blueprints,
FAB views, React apps, root middlewares) must not appear without a test of their own.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
from claude_batch.plugin import ClaudeBatchPlugin
from fastapi import Depends, FastAPI
from fastapi.security import HTTPBearer
from fastapi.testclient import TestClient

from tests.ops.test_ui import ui_client_fixture  # noqa: F401 - the ui_client fixture: the page's app, signed tokens

CALLABLE_SURFACES = ("fastapi_apps",)
OTHER_SURFACES = (
    "flask_blueprints",
    "appbuilder_views",
    "appbuilder_menu_items",
    "fastapi_root_middlewares",
    "react_apps",
    "admin_views",
    "menu_links",
)


def routes_open_without_credentials(
    app: FastAPI, cookies: dict[str, str] | None = None, refused: tuple[int, ...] = (401, 403)
) -> list[str]:
    """Every route (and method) of ``app`` answering a request with ``cookies`` (default: no
    credentials) with other than a status in ``refused``."""
    client = TestClient(app, raise_server_exceptions=False, cookies=cookies)
    open_routes = []
    for route in app.routes:
        methods = sorted(getattr(route, "methods", None) or [])
        path = getattr(route, "path", "")
        if not methods or path in ("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"):
            continue
        concrete = path.replace("{", "").replace("}", "")  # any value for a path parameter
        for method in methods:
            if method in ("HEAD", "OPTIONS"):
                continue
            status = client.request(method, concrete).status_code
            if status not in refused:
                open_routes.append(f"{method} {path} -> {status}")
    return open_routes


def test_the_registered_plugin_is_ours():
    plugins = [ep for ep in entry_points(group="airflow.plugins") if ep.value.startswith("claude_batch")]
    assert [ep.load() for ep in plugins] == [ClaudeBatchPlugin]


def test_the_plugin_adds_the_page_and_its_navigation_entry_only():
    surfaces = {name: list(getattr(ClaudeBatchPlugin, name, None) or []) for name in OTHER_SURFACES}
    assert surfaces == {name: [] for name in surfaces}, (
        "The plugin now adds another web surface: add a test that it requires Airflow's authentication. "
        f"Surfaces: {surfaces}"
    )
    (app,) = ClaudeBatchPlugin.fastapi_apps
    (view,) = ClaudeBatchPlugin.external_views
    assert app["url_prefix"] == "/claude-batch" and app["name"] == "Claude Batches"
    # The navigation entry frames the app itself (relative to the UI's base URL), nothing outside.
    assert (
        view["href"] == "claude-batch/"
        and view["url_route"] == "claude-batch"
        and view["destination"] == "nav"
    )
    assert [type(link).__name__ for link in ClaudeBatchPlugin.operator_extra_links] == [
        "ClaudeConsoleBatchLink"
    ]


@pytest.mark.parametrize("spec", ClaudeBatchPlugin.fastapi_apps, ids=lambda s: s["name"])
def test_every_plugin_route_refuses_an_anonymous_caller(spec):
    routes = [route for route in spec["app"].routes if getattr(route, "methods", None)]
    assert len(routes) == 3  # the front page, a workload, the requeue: a new route must be looked at
    assert routes_open_without_credentials(spec["app"]) == []


@pytest.mark.parametrize("spec", ClaudeBatchPlugin.fastapi_apps, ids=lambda s: s["name"])
def test_every_plugin_route_refuses_a_user_without_permission(spec, ui_client):
    _, token = ui_client
    # A valid token of a user with no role: refused (403) before any warehouse is opened.
    assert (
        routes_open_without_credentials(spec["app"], cookies={"_token": token("nobody")}, refused=(403,))
        == []
    )
    # The same calls with the admin's token get through the gate (to a 404: no such connection).
    assert sorted(
        routes_open_without_credentials(spec["app"], cookies={"_token": token("admin")}, refused=())
    ) == [
        "GET / -> 200",
        "GET /{conn_id}/{workload} -> 404",
        "POST /{conn_id}/{workload}/requeue -> 404",
    ]


def test_the_check_catches_an_open_route_and_passes_a_protected_one():
    open_app, protected_app = FastAPI(), FastAPI(dependencies=[Depends(HTTPBearer())])

    @open_app.get("/batches/{batch_id}")
    def batch_open(batch_id: str) -> dict:
        return {"id": batch_id}

    @protected_app.get("/batches/{batch_id}")
    def batch_protected(batch_id: str) -> dict:
        return {"id": batch_id}

    @protected_app.post("/batches/{batch_id}/cancel")
    def cancel_protected(batch_id: str) -> dict:
        return {"id": batch_id}

    assert routes_open_without_credentials(open_app) == ["GET /batches/{batch_id} -> 200"]
    assert routes_open_without_credentials(protected_app) == []
