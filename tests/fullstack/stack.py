"""Airflow's real components as processes on loopback, as a deployment runs them, minus Docker.

PostgreSQL is the metadata database (a fresh database, dropped at the end), Redis the Celery
broker (a database number claimed for this run, flushed at the end), and ``airflow api-server``,
``scheduler``, ``dag-processor``, ``triggerer`` and ``celery worker`` run as separate processes,
each in its own session so that stopping one stops its children too. Every component logs to
``test-artifacts/fullstack/<component>.log``; task logs stay under the Airflow home there.

The workload's outside world runs in this process: the Claude API emulator and a moto S3
server (threads), and a second PostgreSQL database as the warehouse.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "fullstack"
AIRFLOW_BIN = Path(sys.executable).parent / "airflow"
PG_HOST, PG_PORT = "127.0.0.1", 5432
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
ADMIN_USER = "admin"
POOL = "claude_batch"
# The key marking a Redis database as this run's, so two runs never share (or flush) one.
REDIS_CLAIM_KEY = "claude_batch_fullstack:claimed_by"
TERMINAL_RUN_STATES = {"success", "failed"}


class StackError(RuntimeError):
    """A component did not start, stopped by itself, or the stack did not reach a state in time."""


def model_family(model: str) -> str:
    """The model as requested: the API answers an alias with its dated snapshot (``-20250929``)."""
    return re.sub(r"-\d{8}$", "", model)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


# -- processes ------------------------------------------------------------------------------


@dataclass
class Component:
    """One Airflow process; ``start`` again after ``stop`` appends to the same log."""

    name: str
    argv: list[str]
    env: dict[str, str] | None  # None: this process's environment
    log_path: Path
    process: subprocess.Popen | None = None
    starts: int = 0
    _signalled: bool = False

    def start(self) -> None:
        self.starts += 1
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        log.write(f"\n===== start #{self.starts}: {' '.join(self.argv)} =====\n".encode())
        log.flush()
        # A session of its own: the component's children (task supervisors, log servers, the
        # triggerer's runner) share its process group, which the teardown can then clean up.
        self.process = subprocess.Popen(
            self.argv, env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()

    def request_stop(self, sig: int = signal.SIGINT) -> None:
        """Signal the process once (a second SIGINT/SIGTERM makes Airflow's components force-exit)."""
        if self.process is not None and self.process.poll() is None and not self._signalled:
            self.process.send_signal(sig)
            self._signalled = True

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30.0) -> int | None:
        """Stop gracefully with ``sig``; escalate to the process group if it lingers.

        :returns: the exit code of the main process (None when it had to be killed).
        """
        if self.process is None:
            return None
        self.request_stop(sig)
        process, self.process, self._signalled = self.process, None, False
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal_group(process.pid, signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                self._signal_group(process.pid, signal.SIGKILL)
                process.wait(10)
                return None
        # Children the main process left behind (same group: pgid == the pid we started).
        self._signal_group(process.pid, signal.SIGTERM)
        return process.returncode

    @staticmethod
    def _signal_group(pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def stop_all(components: Iterable[Component]) -> dict[str, float]:
    """Signal every component first, then wait for each: their graceful exits overlap.

    :returns: seconds from the signal until each component had exited.
    """
    components = list(components)
    started = time.monotonic()
    for component in components:
        component.request_stop()
    exited = {}
    for component in components:
        component.stop()
        exited[component.name] = round(time.monotonic() - started, 1)
    return exited


# -- services the stack needs ---------------------------------------------------------------


def _pg_admin():
    import psycopg2

    conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user="postgres", dbname="postgres")
    conn.autocommit = True
    return conn


def create_database(name: str) -> None:
    conn = _pg_admin()
    try:
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()


def drop_database(name: str) -> None:
    conn = _pg_admin()
    try:
        with conn.cursor() as cur:
            # Components are stopped first; FORCE also ends connections a killed process left.
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        conn.close()


def claim_redis_db(token: str) -> int:
    """An empty Redis database number, marked as ours (highest first: low numbers are common)."""
    import redis

    for number in range(15, 0, -1):
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=number)
        try:
            if client.dbsize() == 0 and client.set(REDIS_CLAIM_KEY, token, nx=True) and client.dbsize() == 1:
                return number
        finally:
            client.close()
    raise StackError("no empty Redis database (1-15) to claim for the Celery broker")


def release_redis_db(number: int, token: str) -> None:
    import redis

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=number)
    try:
        if client.get(REDIS_CLAIM_KEY) in (token.encode(), None):
            client.flushdb()
    finally:
        client.close()


# -- the REST API, as the UI calls it ---------------------------------------------------------


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


# -- the stack ------------------------------------------------------------------------------


@dataclass
class AirflowStack:
    """The running stack: its components, REST client, emulator, S3 and warehouse."""

    env: dict[str, str]
    api_url: str
    password: str
    emulator: Any
    moto_endpoint: str
    warehouse_dsn: str
    storage_root: str
    components: dict[str, Component] = field(default_factory=dict)
    api: AirflowApi | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase into ``timings.json`` beside the logs (kept even when the phase fails)."""
        started = time.monotonic()
        try:
            yield
        finally:
            self.timings[name] = round(time.monotonic() - started, 1)
            (ARTIFACTS / "timings.json").write_text(json.dumps(self.timings, indent=2) + "\n")

    def check_alive(self) -> None:
        """Fail at once, with the log's tail, when a component stopped by itself."""
        for component in self.components.values():
            if component.process is not None and component.process.poll() is not None:
                raise StackError(
                    f"{component.name} exited with {component.process.returncode}; its log "
                    f"({component.log_path}) ends:\n{component.tail()}"
                )

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 180.0) -> dict:
        """Poll the run until it is success or failed (its state and tasks are then in the asserts)."""

        def finished() -> dict | None:
            run = self.api.dag_run(dag_id, run_id)
            return run if run["state"] in TERMINAL_RUN_STATES else None

        return wait_for(
            f"run {run_id} of {dag_id} to finish", finished, timeout, interval=1.0, check=self.check_alive
        )

    def check_run_alive(self, dag_id: str, run_id: str) -> Callable[[], None]:
        """A ``wait_for`` check: the stack is up and the run has not failed (else say why, at once)."""

        def check() -> None:
            self.check_alive()
            if self.api.dag_run(dag_id, run_id)["state"] == "failed":
                raise StackError(f"run {run_id} of {dag_id} failed: {self.describe_run(dag_id, run_id)}")

        return check

    def describe_run(self, dag_id: str, run_id: str) -> str:
        """Task states of a run and, for each failed task, the error its log ends with."""
        parts = []
        for ti in self.api.task_instances(dag_id, run_id):
            part = f"{ti['task_id']}[{ti['map_index']}]={ti['state']}"
            if ti["state"] in ("failed", "up_for_retry", "up_for_reschedule"):
                part += f" ({self._task_error(dag_id, run_id, ti)})"
            parts.append(part)
        return ", ".join(parts)

    def _task_error(self, dag_id: str, run_id: str, ti: dict) -> str:
        """The last error a task logged (the task logs are JSON lines under the Airflow home)."""
        folder = (
            Path(self.env["AIRFLOW_HOME"])
            / "logs"
            / f"dag_id={dag_id}"
            / f"run_id={run_id}"
            / f"task_id={ti['task_id']}"
        )
        if ti["map_index"] >= 0:
            folder /= f"map_index={ti['map_index']}"
        logs = sorted(folder.glob("attempt=*.log"))
        if not logs:
            return "no log"
        last = "no error logged"
        for line in logs[-1].read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("level") in ("error", "critical"):
                details = record.get("error_detail") or [{}]
                last = f"{record.get('event')}: {details[-1].get('exc_type', '')} {details[-1].get('exc_value', '')}".strip()
        return last

    def warehouse_query(self, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
        import psycopg2

        conn = psycopg2.connect(self.warehouse_dsn)
        try:
            with conn.cursor() as cur:
                cur.execute(sql, tuple(params))
                return cur.fetchall()
        finally:
            conn.close()


def airflow_env(
    *,
    home: Path,
    metadata_url: str,
    broker_url: str,
    result_backend: str,
    api_port: int,
    password_file: Path,
    connections: dict[str, dict],
    storage_root: str,
    bundles: list[tuple[str, Path]],
) -> dict[str, str]:
    """The environment every component gets: one configuration, as a deployment shares one."""
    from cryptography.fernet import Fernet

    # Nothing of the pytest process's Airflow settings leaks in (its home, SQLite, DAG folders).
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AIRFLOW__", "AIRFLOW_CONN_", "AIRFLOW_VAR_", "CLAUDE_BATCH_"))
        and key != "AIRFLOW_HOME"
    }
    api_url = f"http://127.0.0.1:{api_port}"
    # The repository on the path: the worker imports its Celery settings from tests.fullstack.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api_url}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(password_file),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url,
            "AIRFLOW__CELERY__BROKER_URL": broker_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": result_backend,
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": "4",
            "AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS": "tests.fullstack.celery_preload.CELERY_CONFIG",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(api_port),
            "AIRFLOW__API__BASE_URL": api_url,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
            # Every process signs or checks task and UI tokens with the same secret.
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
            # Parse once at start and rarely after: the DAG files do not change during the test,
            # and re-parsing every 30 s costs CPU this 2-core machine needs for the tasks.
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "600",
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            # Every run here is triggered by the test (REST, backfill, browser). The scheduled run
            # an unpaused daily DAG would get for yesterday only competes for the two cores.
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": json.dumps(
                [
                    {
                        "name": name,
                        "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
                        "kwargs": {"path": str(path), "refresh_interval": 300},
                    }
                    for name, path in bundles
                ]
            ),
            "CLAUDE_BATCH_STORAGE_ROOT": storage_root,
            # The deadline alert stays on here (dag.test() tests turn it off): the scheduler and
            # triggerer must handle the DAG exactly as a deployment would.
            "CLAUDE_BATCH_DEADLINE_HOURS": "20",
            "CLAUDE_BATCH_MIN_POLL_SECONDS": "0.5",
        }
    )
    for conn_id, conn in connections.items():
        env[f"AIRFLOW_CONN_{conn_id.upper()}"] = json.dumps(conn)
    return env


def run_airflow(env: dict[str, str], *args: str, log_path: Path, timeout: float = 300.0) -> None:
    """A one-shot ``airflow`` command (the init job's steps), logged; raises on failure."""
    with log_path.open("ab") as log:
        log.write(f"\n===== airflow {' '.join(args)} =====\n".encode())
        log.flush()
        done = subprocess.run(
            [str(AIRFLOW_BIN), *args],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    if done.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise StackError(f"`airflow {' '.join(args)}` failed ({done.returncode}):\n{tail}")


def start_stack(
    *, emulator: Any, moto_endpoint: str, api_key: str, dag_ids: Iterable[str], startup_timeout: float = 180.0
) -> tuple[AirflowStack, Callable[[], None]]:
    """Create databases, migrate, start every component, wait until the DAGs are parsed.

    :returns: the stack and a teardown function (idempotent) that stops and removes everything.
    """
    import boto3

    token = uuid.uuid4().hex[:10]
    meta_db, warehouse_db = f"cb_fullstack_{token}_meta", f"cb_fullstack_{token}_wh"
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    home = ARTIFACTS / "airflow-home"
    home.mkdir(parents=True)
    password = secrets.token_urlsafe(12)
    password_file = home / "simple_auth_manager_passwords.json"
    password_file.write_text(json.dumps({ADMIN_USER: password}))

    cleanups: list[tuple[str, Callable[[], Any]]] = []
    stopped = False

    def teardown() -> None:
        nonlocal stopped
        if stopped:
            return
        stopped = True
        durations: dict[str, Any] = {}
        for name, cleanup in reversed(cleanups):
            started = time.monotonic()
            try:
                detail = cleanup()
            except Exception as exc:  # keep tearing down the rest; the first test error matters more
                print(f"fullstack teardown: {name}: {exc!r}", file=sys.stderr)
                detail = None
            durations[name] = detail or round(time.monotonic() - started, 1)
        (ARTIFACTS / "teardown-timings.json").write_text(json.dumps(durations, indent=2) + "\n")

    try:
        create_database(meta_db)
        cleanups.append(("drop the metadata database", lambda: drop_database(meta_db)))
        create_database(warehouse_db)
        cleanups.append(("drop the warehouse database", lambda: drop_database(warehouse_db)))
        redis_db = claim_redis_db(token)
        cleanups.append(("flush the Redis database", lambda: release_redis_db(redis_db, token)))

        bucket = f"cb-fullstack-{token}"
        boto3.client(
            "s3",
            endpoint_url=moto_endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ).create_bucket(Bucket=bucket)
        storage_root = f"s3://{bucket}/runs"

        api_port = free_port()
        metadata_url = f"postgresql+psycopg2://postgres@{PG_HOST}:{PG_PORT}/{meta_db}"
        connections = {
            "claude_batch_warehouse": {
                "conn_type": "postgres",
                "host": PG_HOST,
                "port": PG_PORT,
                "login": "postgres",
                "schema": warehouse_db,
            },
            "anthropic_default": {
                "conn_type": "anthropic",
                "host": emulator.base_url,
                "password": api_key,
                "extra": {"anthropic_client_kwargs": {"timeout": 30}},
            },
            "aws_default": {
                "conn_type": "aws",
                "login": "testing",
                "password": "testing",
                "extra": {"endpoint_url": moto_endpoint, "region_name": "us-east-1"},
            },
        }
        env = airflow_env(
            home=home,
            metadata_url=metadata_url,
            broker_url=f"redis://{REDIS_HOST}:{REDIS_PORT}/{redis_db}",
            result_backend=f"db+postgresql+psycopg2://postgres@{PG_HOST}:{PG_PORT}/{meta_db}",
            api_port=api_port,
            password_file=password_file,
            connections=connections,
            storage_root=storage_root,
            bundles=[("dags-folder", REPO / "dags"), ("test-dags", REPO / "tests" / "dags")],
        )
        stack = AirflowStack(
            env=env,
            api_url=f"http://127.0.0.1:{api_port}",
            password=password,
            emulator=emulator,
            moto_endpoint=moto_endpoint,
            warehouse_dsn=f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{warehouse_db}",
            storage_root=storage_root,
        )

        # The init job: migrate the metadata database and create the pool the submit tasks use.
        init_log = ARTIFACTS / "init.log"
        with stack.phase("init: db migrate"):
            run_airflow(env, "db", "migrate", log_path=init_log)
        run_airflow(
            env,
            "pools",
            "set",
            POOL,
            "4",
            "claude-batch submissions (sized for the API's batch queue)",
            log_path=init_log,
        )

        airflow = str(AIRFLOW_BIN)
        for name, argv in (
            (
                "api-server",
                [airflow, "api-server", "--host", "127.0.0.1", "--port", str(api_port), "--workers", "1"],
            ),
            ("scheduler", [airflow, "scheduler"]),
            ("dag-processor", [airflow, "dag-processor"]),
            # Airflow's log servers bind every interface (no host setting); every component here
            # shares one log folder, from which the API server reads task and trigger logs.
            ("triggerer", [airflow, "triggerer", "--skip-serve-logs"]),
            (
                "celery-worker",
                [
                    airflow,
                    "celery",
                    "worker",
                    "--concurrency",
                    "4",
                    "--skip-serve-logs",
                    "--celery-hostname",
                    f"fullstack-{token}@%h",
                ],
            ),
        ):
            stack.components[name] = Component(name, argv, env, ARTIFACTS / f"{name}.log")
        cleanups.append(("stop the components", lambda: stop_all(stack.components.values())))
        stack.api = AirflowApi(stack.api_url, ADMIN_USER, password)
        cleanups.append(("close the REST client", stack.api.http.close))
        with stack.phase("components: start until DAGs are parsed and unpaused"):
            for component in stack.components.values():
                component.start()
            _wait_until_ready(stack, dag_ids, startup_timeout)
        return stack, teardown
    except BaseException:
        teardown()
        raise


def _wait_until_ready(stack: AirflowStack, dag_ids: Iterable[str], timeout: float) -> None:
    """API up and logged in, every component heartbeating, the worker ready, the DAGs unpaused."""
    api = stack.api
    wait_for("the API server", api.health, timeout, check=stack.check_alive)
    api.login()
    # The execution API's first request is slow (lazy set-up in the server); pay for it now
    # rather than in the first task's start, whose client times out and backs off meanwhile.
    # (Without the UI token: the execution API checks its own audience and would log a rejection.)
    httpx.get(f"{stack.api_url}/execution/health", timeout=120)

    def healthy() -> bool:
        health = api.health()
        parts = ("metadatabase", "scheduler", "triggerer", "dag_processor")
        return all(health.get(part, {}).get("status") == "healthy" for part in parts)

    wait_for("scheduler, triggerer and DAG processor heartbeats", healthy, timeout, check=stack.check_alive)
    worker_log = stack.components["celery-worker"].log_path
    wait_for(
        "the Celery worker to be ready",
        lambda: " ready." in worker_log.read_text(errors="replace"),
        timeout,
        check=stack.check_alive,
    )
    for dag_id in dag_ids:
        try:
            wait_for(
                f"DAG {dag_id} to be parsed",
                lambda dag_id=dag_id: api.http.get(f"/api/v2/dags/{dag_id}").status_code == 200,
                timeout,
                check=stack.check_alive,
            )
        except StackError as exc:
            errors = api.get("/importErrors").get("import_errors", [])
            details = "; ".join(
                f"{e['filename']}: {e['stack_trace'].strip().splitlines()[-1]}" for e in errors
            )
            raise StackError(f"{exc}; import errors: {details or 'none'}") from exc
        # Runs of a paused DAG stay queued; the UI's toggle does this PATCH.
        api.unpause(dag_id)
