"""Airflow's real components as processes on loopback, as a deployment runs them, minus Docker.

PostgreSQL is the metadata database (a fresh database, dropped at the end), Redis the Celery
broker (a database number claimed for this run, flushed at the end), and ``airflow api-server``,
``scheduler``, ``dag-processor``, ``triggerer`` and ``celery worker`` run as separate processes,
each in its own session so that stopping one stops its children too. Every component logs to
``test-artifacts/fullstack/<component>.log``; task logs stay under the Airflow home there.

The workload's outside world runs in this process: the Claude API emulator and a moto S3
server (threads), and a second PostgreSQL database as the warehouse.

The processes, the shared configuration, the init job and the REST client are ``make ui``'s
(:mod:`claude_batch.devstack`); this module adds PostgreSQL, Redis and Celery.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from claude_batch.devstack import (
    ADMIN_USER,
    AIRFLOW_BIN,
    POOL,
    VIEWER_USER,
    AirflowApi,
    Component,
    StackError,
    airflow_components,
    check_alive,
    free_port,
    init_metadata,
    server_settings,
    stop_all,
    wait_for,
    wait_until_healthy,
    wait_until_parsed,
    write_users,
)

__all__ = [  # what the full-stack tests import from here (the shared pieces among them)
    "ADMIN_USER",
    "AIRFLOW_BIN",
    "ARTIFACTS",
    "POOL",
    "VIEWER_USER",
    "AirflowApi",
    "AirflowStack",
    "Component",
    "StackError",
    "free_port",
    "model_family",
    "start_stack",
    "stop_all",
    "wait_for",
]

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "fullstack"
PG_HOST, PG_PORT = "127.0.0.1", 5432
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
# The key marking a Redis database as this run's, so two runs never share (or flush) one.
REDIS_CLAIM_KEY = "claude_batch_fullstack:claimed_by"
TERMINAL_RUN_STATES = {"success", "failed"}


def model_family(model: str) -> str:
    """The model as requested: the API answers an alias with its dated snapshot (``-20250929``)."""
    return re.sub(r"-\d{8}$", "", model)


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


# -- the stack ------------------------------------------------------------------------------


@dataclass
class AirflowStack:
    """The running stack: its components, REST client, emulator, S3 and warehouse."""

    env: dict[str, str]
    api_url: str
    password: str
    emulator: Any
    viewer_password: str
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
        check_alive(self.components.values())

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
                error = details[-1]
                last = (
                    f"{record.get('event')}: {error.get('exc_type', '')} {error.get('exc_value', '')}".strip()
                )
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
    users: dict[str, str],
    connections: dict[str, dict],
    storage_root: str,
    bundles: list[tuple[str, Path]],
) -> dict[str, str]:
    """The environment every component gets: ``make ui``'s shared settings, with Celery on Redis.

    :param users: the simple auth manager's settings (:func:`claude_batch.devstack.write_users`).
    """
    # Nothing of the pytest process's Airflow settings leaks in (its home, SQLite, DAG folders).
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AIRFLOW__", "AIRFLOW_CONN_", "AIRFLOW_VAR_", "CLAUDE_BATCH_"))
        and key != "AIRFLOW_HOME"
    }
    # The repository on the path: the worker imports its Celery settings from tests.fullstack.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(server_settings(home=home, metadata_url=metadata_url, api_port=api_port, bundles=bundles))
    env.update(users)
    env.update(
        {
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CELERY__BROKER_URL": broker_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": result_backend,
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": "4",
            "AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS": "tests.fullstack.celery_preload.CELERY_CONFIG",
            # Every run here is triggered by the test (REST, backfill, browser). The scheduled run
            # an unpaused daily DAG would get for yesterday only competes for the two cores.
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            "CLAUDE_BATCH_STORAGE_ROOT": storage_root,
            "CLAUDE_BATCH_MIN_POLL_SECONDS": "0.5",
        }
    )
    for conn_id, conn in connections.items():
        env[f"AIRFLOW_CONN_{conn_id.upper()}"] = json.dumps(conn)
    return env


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
    # The browser tests log in as both: the admin may do anything, the viewer only read.
    users, passwords = write_users(home, {ADMIN_USER: "admin", VIEWER_USER: "viewer"})

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
            users=users,
            connections=connections,
            storage_root=storage_root,
            bundles=[("dags-folder", REPO / "dags"), ("test-dags", REPO / "tests" / "dags")],
        )
        stack = AirflowStack(
            env=env,
            api_url=f"http://127.0.0.1:{api_port}",
            password=passwords[ADMIN_USER],
            viewer_password=passwords[VIEWER_USER],
            emulator=emulator,
            moto_endpoint=moto_endpoint,
            warehouse_dsn=f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{warehouse_db}",
            storage_root=storage_root,
        )

        # The init job: migrate the metadata database and create the pool the submit tasks use.
        with stack.phase("init: db migrate"):
            init_metadata(env, ARTIFACTS / "init.log", cwd=REPO)

        stack.components = airflow_components(env, api_port, ARTIFACTS, cwd=REPO)
        stack.components["celery-worker"] = Component(
            "celery-worker",
            [str(AIRFLOW_BIN), "celery", "worker", "--concurrency", "4",
             "--skip-serve-logs", "--celery-hostname", f"fullstack-{token}@%h"],
            env,
            ARTIFACTS / "celery-worker.log",
            REPO,
        )  # fmt: skip
        cleanups.append(("stop the components", lambda: stop_all(stack.components.values())))
        stack.api = AirflowApi(stack.api_url, ADMIN_USER, stack.password)
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
    wait_until_healthy(api, timeout, stack.check_alive)
    worker_log = stack.components["celery-worker"].log_path
    wait_for(
        "the Celery worker to be ready",
        lambda: " ready." in worker_log.read_text(errors="replace"),
        timeout,
        check=stack.check_alive,
    )
    wait_until_parsed(api, dag_ids, timeout, stack.check_alive)
