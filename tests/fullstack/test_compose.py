"""docker-compose.yaml and the Dockerfile agree with the project (Docker does not run here).

Each check reads the project's own source of truth rather than repeating it: the pipeline's
default connection ids and pool, the emulator's argument parser, the Airflow CLI's parser,
requirements.txt's pins and pyproject's console script.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import tomllib
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yaml"
DOCKERFILE = REPO / "Dockerfile"
AIRFLOW_SERVICES = {
    "airflow-apiserver": ["api-server"],
    "airflow-scheduler": ["scheduler"],
    "airflow-dag-processor": ["dag-processor"],
    "airflow-triggerer": ["triggerer"],
    "airflow-worker": ["celery", "worker"],
}
_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ``${VAR}``/``${VAR:-default}`` interpolation and ``$$`` escapes, recursively."""
    if isinstance(value, str):

        def substitute(match: re.Match) -> str:
            if match.group(0) == "$$":
                return "$"
            return env.get(match.group("name")) or (match.group("default") or "")

        return _VARIABLE.sub(substitute, value)
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict:
    # An empty environment: the defaults in the file are what `docker compose up` uses.
    return interpolate(yaml.safe_load(COMPOSE.read_text()), env={})


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict]:
    return compose["services"]


def command_of(service: dict) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else list(command)


def env_of(service: dict) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {key: str(value) for key, value in environment.items()}


def connection(service: dict, conn_id: str) -> dict:
    raw = env_of(service).get(f"AIRFLOW_CONN_{conn_id.upper()}")
    assert raw, f"AIRFLOW_CONN_{conn_id.upper()} is not set"
    return json.loads(raw)


def requirement_pin(name: str) -> str:
    for line in (REPO / "requirements.txt").read_text().splitlines():
        if line.split("==")[0].strip().lower() == name:
            return line.split("==")[1].strip()
    raise AssertionError(f"{name} is not pinned in requirements.txt")


def pipeline_defaults() -> dict[str, Any]:
    from claude_batch.pipeline import PipelineConfig

    return {
        f.name: f.default for f in dataclasses.fields(PipelineConfig) if f.default is not dataclasses.MISSING
    }


def test_the_stack_has_every_component(services):
    expected = {"postgres", "redis", "s3", "claude-emulator", "airflow-init", *AIRFLOW_SERVICES}
    assert expected <= set(services), f"missing services: {expected - set(services)}"


def test_airflow_services_run_the_project_image_and_valid_airflow_commands(services):
    from airflow.cli import cli_parser

    parser = cli_parser.get_parser()
    images = set()
    for name, subcommand in AIRFLOW_SERVICES.items():
        service = services[name]
        assert service["build"]["context"] == "." and service["build"]["dockerfile"] == "Dockerfile", name
        images.add(service["image"])
        command = command_of(service)
        assert command == subcommand, f"{name} runs {command}"
        # The Airflow CLI itself accepts the command (a renamed or removed subcommand fails here).
        parser.parse_args(command)
        # Every long-running component reports its health, so depends_on and restarts work.
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        assert service.get("restart") == "always", name
        depends = service["depends_on"]
        assert depends["airflow-init"]["condition"] == "service_completed_successfully", name
        assert depends["postgres"]["condition"] == depends["redis"]["condition"] == "service_healthy", name
    assert len(images) == 1, f"the Airflow services should share one image, not {images}"
    version = requirement_pin("apache-airflow")
    assert images.pop().endswith(f":{version}"), "the image tag follows the pinned Airflow version"


def test_executor_metadata_database_and_broker(services):
    postgres = env_of(services["postgres"])
    for name in (*AIRFLOW_SERVICES, "airflow-init"):
        env = env_of(services[name])
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        metadata = urlsplit(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
        assert metadata.scheme.startswith("postgresql") and metadata.hostname == "postgres", name
        assert metadata.path.lstrip("/") == postgres["POSTGRES_DB"], name
        assert (metadata.username, metadata.password) == (
            postgres["POSTGRES_USER"],
            postgres["POSTGRES_PASSWORD"],
        )
        backend = urlsplit(env["AIRFLOW__CELERY__RESULT_BACKEND"].removeprefix("db+"))
        assert backend.hostname == "postgres" and backend.path == metadata.path, name
        broker = urlsplit(env["AIRFLOW__CELERY__BROKER_URL"])
        assert broker.scheme == "redis" and broker.hostname == "redis", name
        # Workers reach the API server's execution API by its service name and port.
        execution = urlsplit(env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
        assert execution.hostname == "airflow-apiserver" and execution.path == "/execution/", name
        assert f"{execution.port}:{execution.port}" in services["airflow-apiserver"]["ports"][0]
        # Components must agree on the JWT secret, or task tokens are rejected.
        assert env["AIRFLOW__API_AUTH__JWT_SECRET"], name


def test_connections_are_the_ones_the_pipeline_uses(services):
    defaults = pipeline_defaults()
    conn_ids = {defaults["warehouse_conn_id"], defaults["anthropic_conn_id"], defaults["aws_conn_id"]}
    # The workload DAGs may name other connections; every one must be configured here too.
    for dag_file in (REPO / "dags").glob("*.py"):
        conn_ids |= set(re.findall(r"_conn_id\s*=\s*['\"]([^'\"]+)['\"]", dag_file.read_text()))
    for name in AIRFLOW_SERVICES:
        service = services[name]
        for conn_id in conn_ids:
            connection(service, conn_id)

        warehouse = connection(service, defaults["warehouse_conn_id"])
        assert warehouse["conn_type"] == "postgres" and warehouse["host"] == "postgres"
        init_script = " ".join(command_of(services["airflow-init"]))
        assert f"CREATE DATABASE {warehouse['schema']}" in init_script, "the init job creates the warehouse"

        anthropic = connection(service, defaults["anthropic_conn_id"])
        assert anthropic["conn_type"] == "anthropic"
        emulator_args = emulator_arguments(services)
        base = urlsplit(anthropic["host"])
        assert (base.hostname, base.port) == ("claude-emulator", emulator_args.port)
        assert anthropic["password"] == emulator_args.api_key, "the key the emulator accepts"

        aws = connection(service, defaults["aws_conn_id"])
        endpoint = urlsplit(aws["extra"]["endpoint_url"])
        s3_command = command_of(services["s3"])
        assert endpoint.hostname == "s3" and str(endpoint.port) == s3_command[s3_command.index("--port") + 1]

        root = urlsplit(env_of(service)["CLAUDE_BATCH_STORAGE_ROOT"])
        assert root.scheme == "s3" and f'Bucket="{root.hostname}"' in init_script, (
            "the init job creates the bucket"
        )


def emulator_arguments(services):
    from claude_batch.emulator.cli import parse_args

    command = command_of(services["claude-emulator"])
    # The image's entrypoint runs `python -m MODULE`; MODULE must be the console script's.
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module = scripts["claude-batch-emulator"].split(":")[0]
    assert command[:3] == ["python", "-m", module], command
    args = parse_args(command[3:])  # exits (fails the test) on an unknown or malformed flag
    assert args.host == "0.0.0.0", "reachable from the other containers"
    assert f"127.0.0.1:{args.port}:{args.port}" in services["claude-emulator"].get("ports", [])
    return args


def test_emulator_command_matches_the_console_script(services):
    args = emulator_arguments(services)
    assert args.time_scale > 1, "a local stack runs the emulator in fast time"


def test_s3_service_runs_moto_from_the_image(services):
    command = command_of(services["s3"])
    assert command[:3] == ["python", "-m", "moto.server"] and "0.0.0.0" in command
    requirement_pin("moto")  # moto[server] comes with requirements.txt


def test_init_job_migrates_and_creates_the_pool(services):
    from airflow.cli import cli_parser

    init = services["airflow-init"]
    # The shell expands the script's own variables from the job's environment.
    script = interpolate(command_of(init)[-1], env_of(init))
    assert init["entrypoint"] == "/bin/bash" and command_of(init)[0] == "-c"
    airflow_lines = [
        shlex.split(line.strip()) for line in script.splitlines() if line.strip().startswith("airflow ")
    ]
    assert ["airflow", "db", "migrate"] in airflow_lines
    pool_line = next(line for line in airflow_lines if line[1:3] == ["pools", "set"])
    assert pool_line[3] == pipeline_defaults()["pool"], "the pool the submit tasks use"
    parser = cli_parser.get_parser()
    for line in airflow_lines:
        parser.parse_args(line[1:])
    # The UI user: the simple auth manager's password file is where the services read it.
    env = env_of(init)
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"] in script
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"].split(":")[0] == "admin"


def test_dockerfile_builds_on_the_pinned_airflow_and_installs_the_project():
    text = DOCKERFILE.read_text()
    instructions = [
        line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    version = requirement_pin("apache-airflow")
    assert instructions[0] == f"FROM apache/airflow:{version}-python3.11"
    runs = [line for line in instructions if line.startswith("RUN ")]
    copies = [line.split()[-2:] for line in instructions if line.startswith("COPY ")]
    assert ["requirements.txt", "/opt/claude-batch/requirements.txt"] in copies
    assert any("pip install" in run and "-r /opt/claude-batch/requirements.txt" in run for run in runs)
    assert any("pip install" in run and "--no-deps /opt/claude-batch" in run for run in runs)
    assert ["plugins", "/opt/claude-batch/plugins"] in copies
    # The DAG files read include/ beside dags/; prices.py needs its price table found.
    assert ["dags", "/opt/airflow/dags"] in copies and ["include", "/opt/airflow/include"] in copies
    assert "ENV CLAUDE_BATCH_PRICES=/opt/airflow/include/prices.json" in instructions
    assert (REPO / "include" / "prices.json").exists()


def test_requirements_pin_a_celery_the_provider_can_import():
    """The pinned celery must still have what the pinned celery provider imports (the worker's app)."""
    import importlib
    import importlib.metadata

    module = importlib.import_module("celery.backends.database")
    assert hasattr(module, "retry"), (
        f"celery {requirement_pin('celery')} has no celery.backends.database.retry, which "
        f"apache-airflow-providers-celery {requirement_pin('apache-airflow-providers-celery')} imports: "
        "`airflow celery worker` cannot start. Pin celery below 5.7."
    )
    assert importlib.metadata.version("celery") == requirement_pin("celery"), (
        "the venv is not synced to requirements.txt"
    )


def init_python_scripts(services) -> list[str]:
    """The ``python - <<'PY' ... PY`` heredocs of the init job, in order."""
    script = command_of(services["airflow-init"])[-1]
    return re.findall(r"python - <<'PY'\n(.*?)\nPY\n", script, flags=re.S)


@pytest.mark.services
def test_init_job_seeds_the_sample_data_into_a_postgres_warehouse(services):
    """The init job's seeding script, run as it is against a real PostgreSQL database, twice."""
    import subprocess
    import sys

    import psycopg2

    from tests.conftest import POSTGRES_HOST, POSTGRES_PORT, require_service

    require_service("PostgreSQL", POSTGRES_HOST, POSTGRES_PORT)
    seeding = next(script for script in init_python_scripts(services) if "seed_warehouse" in script)
    database = f"cb_compose_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(host=POSTGRES_HOST, port=POSTGRES_PORT, user="postgres", dbname="postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{database}"')
    dsn = f"postgresql://postgres@{POSTGRES_HOST}:{POSTGRES_PORT}/{database}"
    env = {
        **os.environ,
        "SAMPLE_DATA_GENERATOR": str(REPO / "include" / "sample_data" / "generate.py"),
        "SAMPLE_WAREHOUSE_DSN": dsn,
    }
    try:
        first = subprocess.run(
            [sys.executable, "-c", seeding], env=env, capture_output=True, text=True, timeout=300
        )
        assert first.returncode == 0, first.stderr[-2000:]
        again = subprocess.run(
            [sys.executable, "-c", seeding], env=env, capture_output=True, text=True, timeout=300
        )
        assert again.returncode == 0, again.stderr[-2000:]
        assert again.stdout.count("exists, left as it is") == first.stdout.count("rows"), again.stdout
        conn = psycopg2.connect(dsn)
        with conn, conn.cursor() as cur:
            counts = {}
            for table in ("support_tickets", "ap_invoices", "products"):
                cur.execute(f"SELECT count(*) FROM {table}")
                counts[table] = cur.fetchone()[0]
            # The tickets cover the days before today: the nightly run's interval has rows.
            cur.execute("SELECT count(*) FROM support_tickets WHERE created_at >= now()::date - 1")
            yesterday = cur.fetchone()[0]
        conn.close()
        assert all(counts.values()), counts
        assert yesterday > 0
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin.close()
