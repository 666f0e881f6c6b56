"""Talking to a running Airflow: waiting for it to come up, and its public REST API as the UI calls it.

Shared by ``make ui`` (:mod:`claude_batch.devstack`) and the full-stack tests
(``tests/fullstack/stack.py``). Every wait has a deadline and a ``check`` that raises as soon as
a component has died, so a broken stack fails with its reason instead of a timeout.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any

import httpx


class StackError(RuntimeError):
    """A component did not start, stopped by itself, or the stack did not reach a state in time."""


def wait_for(
    what: str,
    probe: Callable[[], Any],
    timeout: float,
    interval: float = 0.5,
    check: Callable[[], None] | None = None,
) -> Any:
    """Call ``probe`` until it returns something truthy; ``check`` raises if the stack died meanwhile."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if check is not None:
            check()
        try:
            value = probe()
        except (httpx.HTTPError, OSError, ValueError) as exc:  # not up yet, or not JSON yet
            last_error, value = exc, None
        if value:
            return value
        time.sleep(interval)
    raise StackError(
        f"timed out after {timeout:.0f} s waiting for {what}"
        + (f" (last error: {last_error})" if last_error else "")
    )


class AirflowApi:
    """A thin client of Airflow's public REST API with a simple-auth-manager JWT."""

    def __init__(self, base_url: str, username: str, password: str) -> None:
        self.base_url = base_url
        self.http = httpx.Client(base_url=base_url, timeout=30.0)
        self.username, self.password = username, password

    def login(self) -> str:
        """POST /auth/token with the user's credentials, as the UI's login form does."""
        response = self.http.post("/auth/token", json={"username": self.username, "password": self.password})
        response.raise_for_status()
        token = response.json()["access_token"]
        self.http.headers["Authorization"] = f"Bearer {token}"
        return token

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.http.request(method, f"/api/v2{path}", **kwargs)
        if response.is_error:
            raise StackError(f"{method} {path} -> {response.status_code}: {response.text[:500]}")
        return response.json() if response.content else None

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params or None)

    def health(self) -> dict:
        return self.http.get("/api/v2/monitor/health").json()

    def unpause(self, dag_id: str) -> None:
        self.request(
            "PATCH", f"/dags/{dag_id}", params={"update_mask": "is_paused"}, json={"is_paused": False}
        )

    def trigger(
        self, dag_id: str, conf: dict, logical_date: str | None = None, note: str | None = None
    ) -> dict:
        body = {"logical_date": logical_date, "conf": conf, "note": note}
        return self.request("POST", f"/dags/{dag_id}/dagRuns", json=body)

    def dag_run(self, dag_id: str, run_id: str) -> dict:
        return self.get(f"/dags/{dag_id}/dagRuns/{run_id}")

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        return self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", limit=100)["task_instances"]

    def task_instance(self, dag_id: str, run_id: str, task_id: str) -> dict:
        return self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}")

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        value = self.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}")[
            "value"
        ]
        # The native form is the stored JSON, which some versions hand back as a string.
        return json.loads(value) if isinstance(value, str) else value


def wait_until_healthy(api: AirflowApi, timeout: float, check: Callable[[], None]) -> None:
    """The API server answers, the user logs in, and the scheduler, triggerer and DAG processor heartbeat."""
    wait_for("the API server", api.health, timeout, check=check)

    def logged_in() -> bool:
        # The server answers health checks before its auth manager has read the users' passwords
        # (seen under load: one 401, then the same login succeeds).
        try:
            api.login()
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != 401:
                raise
            return False
        return True

    wait_for("the user's login", logged_in, timeout, check=check)
    # The execution API's first request is slow (lazy set-up in the server); pay for it now
    # rather than in the first task's start, whose client times out and backs off meanwhile.
    # (Without the UI token: the execution API checks its own audience and would log a rejection.)
    httpx.get(f"{api.base_url}/execution/health", timeout=120)

    def healthy() -> bool:
        health = api.health()
        parts = ("metadatabase", "scheduler", "triggerer", "dag_processor")
        return all(health.get(part, {}).get("status") == "healthy" for part in parts)

    wait_for("scheduler, triggerer and DAG processor heartbeats", healthy, timeout, check=check)


def wait_until_parsed(
    api: AirflowApi,
    dag_ids: Iterable[str],
    timeout: float,
    check: Callable[[], None],
    *,
    unpause: bool = True,
) -> None:
    """Each DAG parsed (else the import errors, named) and, with ``unpause``, unpaused (a paused DAG's
    runs stay queued)."""
    for dag_id in dag_ids:
        try:

            def parsed(dag_id: str = dag_id) -> bool:
                return api.http.get(f"/api/v2/dags/{dag_id}").status_code == 200

            wait_for(f"DAG {dag_id} to be parsed", parsed, timeout, check=check)
        except StackError as exc:
            errors = api.get("/importErrors").get("import_errors", [])
            details = "; ".join(
                f"{e['filename']}: {e['stack_trace'].strip().splitlines()[-1]}" for e in errors
            )
            raise StackError(f"{exc}; import errors: {details or 'none'}") from exc
        if unpause:
            api.unpause(dag_id)
