"""The Claude Batches page (``claude_batch.ui``), with Airflow's own auth.

It runs over a DuckDB warehouse two real runs fill.

The app is the plugin's, called through FastAPI's TestClient with tokens the simple auth manager
signs (its JWT validator checks them); users and roles come from
``AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS``: an admin, a viewer (may read DAGs, not edit them)
and a user with no role (may do nothing). The first run leaves a row staging refused (dead) and
an answer in prose (invalid); the admin finds them, searches, mends the refused row and requeues
it from the page; the ledger records who and when; the next run sends it.
"""

from __future__ import annotations

import json
import re
from html import unescape

import pytest
from fastapi.testclient import TestClient

from tests.ops.conftest import CONTROL_KEY, PROSE_KEY, fix_row, ledger
from tests.reliability.harness import DAG_ID, RUN_1, RUN_2, WORKLOAD, PipelineRun

USERS = {"admin": "admin", "viewer": "viewer", "nobody": ""}
CONN_ID = "claude_batch_warehouse"
PAGE = f"/{CONN_ID}/{WORKLOAD.name}"


@pytest.fixture(name="ui_client")
def ui_client_fixture(airflow_db, monkeypatch):
    """The page's app and a token maker, on a fresh simple auth manager (tests/security uses it too)."""
    from airflow.api_fastapi import app as airflow_app
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from claude_batch.ui.app import create_app

    monkeypatch.setenv(
        "AIRFLOW__CORE__AUTH_MANAGER",
        "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager",
    )
    monkeypatch.setenv(
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", ",".join(f"{u}:{r}" for u, r in USERS.items())
    )
    monkeypatch.setenv("AIRFLOW__API_AUTH__JWT_SECRET", "ui-test-jwt-secret-" + "0123456789abcdef" * 4)
    monkeypatch.setenv("AIRFLOW__API__SECRET_KEY", "ui-test-secret-key")
    monkeypatch.setenv(
        "_AIRFLOW_PROCESS_CONTEXT", "server"
    )  # as in the API server (airflow.api_fastapi.main)
    monkeypatch.delenv("CLAUDE_BATCH_UI_CONN_IDS", raising=False)
    monkeypatch.setattr(airflow_app._AuthManagerState, "instance", None)
    manager = airflow_app.create_auth_manager()
    manager.init()

    def token(user: str) -> str:
        return manager.generate_jwt(SimpleAuthManagerUser(username=user, role=USERS[user]))

    client = TestClient(create_app(), raise_server_exceptions=True)
    yield client, token
    client.close()


def get(client: TestClient, path: str, user: str | None, token, **params) -> tuple[int, str]:
    cookies = {"_token": token(user)} if user else None  # the UI's session cookie, as the browser sends it
    client.cookies.clear()
    response = client.get(path, params=params or None, cookies=cookies)
    return response.status_code, response.text


def post_requeue(
    client: TestClient, user: str, token, keys: list[str], form_token: str, version: str
) -> tuple[int, str]:
    response = client.post(
        f"{PAGE}/requeue",
        data={"token": form_token, "prompt_version": version, "key": keys},
        headers={"Authorization": f"Bearer {token(user)}"},  # the API's bearer token works as the cookie does
    )
    return response.status_code, response.text


def attrs(html: str, tag_attr: str) -> list[dict[str, str]]:
    """Every element carrying ``tag_attr``, as its data-* attributes."""
    out = []
    for match in re.finditer(rf"<[a-z]+ [^>]*\b{tag_attr}=\"[^\"]*\"[^>]*>", html):
        out.append({k: unescape(v) for k, v in re.findall(r'data-([a-z-]+)="([^"]*)"', match.group(0))})
    return out


def form_token_of(html: str) -> str:
    return re.search(r'name="token" value="([0-9a-f]+)"', html).group(1)


@pytest.mark.parametrize("ops_stack", ["duckdb"], indirect=True)
def test_the_page_shows_runs_and_dead_items_and_requeues_for_the_allowed_user_only(
    ops_stack, anthropic_conn, ui_client
):
    client, token = ui_client
    stack = ops_stack
    first = PipelineRun(stack, "night-1", RUN_1).run()
    assert first.accounting and first.accounting["ok"], first.accounting

    # -- who is refused: no token (401), no role (403 everywhere), forged or foreign tokens -----
    for path in ("/", PAGE):
        assert get(client, path, None, token)[0] == 401
        assert get(client, path, "nobody", token)[0] == 403
    code, text = get(client, PAGE, None, token)
    assert "Sign in to Airflow" in text and "/auth/login" in text
    assert client.post(f"{PAGE}/requeue", data={"key": [CONTROL_KEY]}).status_code == 401
    assert client.get("/", headers={"Authorization": "Bearer not.a.jwt"}).status_code == 403

    # -- the admin: the front page, then the workload --------------------------------------------
    code, text = get(client, "/", "admin", token)
    assert code == 200, text
    (line,) = attrs(text, "data-workload")
    assert line["workload"] == WORKLOAD.name
    code, text = get(client, PAGE, "admin", token)
    assert code == 200, text
    (run,) = attrs(text, "data-run-id")
    assert (run["run-id"], run["succeeded"], run["invalid"], run["dead"]) == ("night-1", "6", "1", "1")
    assert float(run["cost"]) > 0
    assert f'href="/dags/{DAG_ID}/runs/night-1"' in text  # the run in Airflow's own pages
    bars = [b for b in attrs(text, "data-day") if float(b["cost"]) > 0]
    assert len(bars) == 1 and float(bars[0]["cost"]) == pytest.approx(float(run["cost"]))  # today's bar
    assert "<svg" in text and "cost in batches" in text
    (current,) = attrs(text, "data-prompt-version")
    assert current["prompt-version"] == WORKLOAD.prompt_version
    items = {row["key"]: row["status"] for row in attrs(text, "data-key")}
    assert items == {CONTROL_KEY: "dead", PROSE_KEY: "invalid"}
    assert "control character U+001B" in text and "not valid JSON" in text  # their reasons
    assert "\x1b" not in text  # the row's own text never reaches the page

    # -- search: in the reason or the key, case-insensitive; wildcards are text ----------------
    code, text = get(client, PAGE, "admin", token, q="CONTROL character")
    assert code == 200 and [row["key"] for row in attrs(text, "data-key")] == [CONTROL_KEY]
    code, text = get(client, PAGE, "admin", token, q="100%_")
    assert attrs(text, "data-key") == [] and 'data-dead-total="0"' in text
    code, text = get(client, PAGE, "admin", token, status="invalid")
    assert [row["key"] for row in attrs(text, "data-key")] == [PROSE_KEY]
    assert get(client, PAGE, "admin", token, status="everything")[0] == 400
    code, text = get(client, PAGE, "admin", token, pv=WORKLOAD.prompt_version[:8])  # a prefix of the version
    assert (
        code == 200
        and len(attrs(text, "data-key")) == 2
        and f'name="pv" value="{WORKLOAD.prompt_version[:8]}"' in text
    )
    code, text = get(client, PAGE, "admin", token, pv="pv_nothing")
    assert code == 400 and "has no prompt version &#39;pv_nothing&#39;" in text

    # -- the viewer sees it all but may not requeue --------------------------------------------
    code, text = get(client, PAGE, "viewer", token)
    assert code == 200 and 'data-can-requeue="no"' in text and "needs edit access to DAG" in text
    code, text = post_requeue(
        client, "viewer", token, [CONTROL_KEY], form_token_of(text), WORKLOAD.prompt_version
    )
    assert code == 403 and f"edit access to DAG {DAG_ID}" in text
    assert ledger(stack)[CONTROL_KEY][0] == "dead"

    # -- the admin mends the row and requeues it; a form from another user's page is refused ---
    fix_row(stack, CONTROL_KEY, "red alert about my invoice")
    code, text = get(client, PAGE, "admin", token)
    assert 'data-can-requeue="yes"' in text
    admin_form = form_token_of(text)
    assert post_requeue(client, "admin", token, [CONTROL_KEY], "0" * 64, WORKLOAD.prompt_version)[0] == 403
    code, text = post_requeue(client, "admin", token, [CONTROL_KEY], admin_form, WORKLOAD.prompt_version)
    assert code == 200, text
    (banner,) = attrs(text, "data-requeued")
    assert (banner["requeued"], banner["requeued-by"]) == ("1", "admin")
    status_, attempts, by, at, _run_id, last_error = ledger(stack)[CONTROL_KEY]
    assert (status_, attempts, by) == ("retry", 0, "admin") and at is not None and last_error
    assert get(client, f"/other_conn/{WORKLOAD.name}", "admin", token)[0] == 404  # only listed connections

    # -- the next run (no rows of its own) sends it: in flight on the page, then succeeded ------
    received = anthropic_conn.stats()["requests_received"]
    second = PipelineRun(stack, "night-2", RUN_2)
    for step in second.steps():
        if step == "record":
            code, text = get(client, PAGE, "admin", token)
            (batch,) = attrs(text, "data-batch-id")
            assert batch["batch-id"] == second.record.batch_ids[0]
            row = re.search(rf'data-batch-id="{batch["batch-id"]}".*?</tr>', text, re.S).group(0)
            # Two items (the requeued one, the invalid one), just sent: about 24 hours to the API's expiry.
            assert '<td class="num">2</td>' in row and re.search(r">2[34]h \d\dm<", row), row
    assert second.record.accounting and second.record.accounting["ok"], second.record.accounting
    assert anthropic_conn.stats()["requests_received"] - received == 2
    assert ledger(stack)[CONTROL_KEY][0] == "succeeded" and ledger(stack)[CONTROL_KEY][4] == "night-2"
    code, text = get(client, PAGE, "admin", token)
    runs = {r["run-id"]: r for r in attrs(text, "data-run-id")}
    assert set(runs) == {"night-1", "night-2"} and runs["night-2"]["succeeded"] == "1"
    assert [row["key"] for row in attrs(text, "data-key")] == [PROSE_KEY]  # prose again: dead now


def test_only_the_listed_connections_are_shown(ui_client, monkeypatch, tmp_path):
    client, token = ui_client
    monkeypatch.setenv("CLAUDE_BATCH_UI_CONN_IDS", "wh_missing, wh_empty")
    monkeypatch.setenv(
        "AIRFLOW_CONN_WH_EMPTY", json.dumps({"conn_type": "duckdb", "host": str(tmp_path / "e.duckdb")})
    )
    code, text = get(client, "/", "admin", token)
    assert code == 200
    sections = [s["conn-id"] for s in attrs(text, "data-conn-id")]
    assert sections == ["wh_missing", "wh_empty"]
    assert "There is no Airflow connection &#39;wh_missing&#39;" in text
    assert "No claude-batch pipeline has run on &#39;wh_empty&#39; yet" in text
    assert get(client, "/claude_batch_warehouse/anything", "admin", token)[0] == 404
