"""Any web endpoint the plugin adds requires Airflow's authentication; today it adds none.

Airflow 3 mounts a plugin's ``fastapi_apps`` under the API server as they are: it adds no
authentication of its own, so each route must demand it. The check below calls every route of
every FastAPI app the plugin registers without credentials and wants 401 or 403; it is shown
to catch an open route on a stand-in app. Web surfaces it cannot call (Flask blueprints, FAB
views, React apps, root middlewares) must not appear without a test of their own.
"""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
from claude_batch.plugin import ClaudeBatchPlugin
from fastapi import Depends, FastAPI
from fastapi.security import HTTPBearer
from fastapi.testclient import TestClient

CALLABLE_SURFACES = ("fastapi_apps",)
OTHER_SURFACES = (
    "flask_blueprints",
    "appbuilder_views",
    "appbuilder_menu_items",
    "fastapi_root_middlewares",
    "react_apps",
    "external_views",
    "admin_views",
    "menu_links",
)


def routes_open_without_credentials(app: FastAPI) -> list[str]:
    """Every route (and method) of ``app`` that answers a request without credentials with other than 401/403."""
    client = TestClient(app, raise_server_exceptions=False)
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
            if status not in (401, 403):
                open_routes.append(f"{method} {path} -> {status}")
    return open_routes


def test_the_registered_plugin_is_ours():
    plugins = [ep for ep in entry_points(group="airflow.plugins") if ep.value.startswith("claude_batch")]
    assert [ep.load() for ep in plugins] == [ClaudeBatchPlugin]


def test_the_plugin_adds_no_web_endpoint_today():
    surfaces = {name: list(getattr(ClaudeBatchPlugin, name, None) or []) for name in CALLABLE_SURFACES + OTHER_SURFACES}
    assert surfaces == {name: [] for name in surfaces}, (
        "The plugin now adds a web surface: every FastAPI route is checked below; for anything else, add a "
        f"test that it requires Airflow's authentication. Surfaces: {surfaces}"
    )
    # The one UI addition is an operator extra link: a URL shown on a task, not an endpoint.
    assert [type(link).__name__ for link in ClaudeBatchPlugin.operator_extra_links] == ["ClaudeConsoleBatchLink"]


@pytest.mark.parametrize("spec", ClaudeBatchPlugin.fastapi_apps or [None], ids=lambda s: (s or {}).get("name", "none"))
def test_every_plugin_route_requires_authentication(spec):
    if spec is None:
        pytest.skip("the plugin registers no FastAPI app (asserted above)")
    assert routes_open_without_credentials(spec["app"]) == []


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
