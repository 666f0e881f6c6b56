"""Shared fixtures: real servers on loopback (moto S3, the Claude emulator, PostgreSQL).

Tests that need PostgreSQL skip with a clear reason when it is not running, unless
``REQUIRE_SERVICES=1`` (as ``.ci/run`` sets), in which case they fail.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services import POSTGRES_HOST, POSTGRES_PORT, fresh_postgres_schema, moto_store

# Never let a test reach the real API or real AWS.
os.environ.pop("ANTHROPIC_API_KEY", None)
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
# Airflow reads its configuration at import: point it at a test home before any test imports it.
REPO = Path(__file__).resolve().parent.parent
if "AIRFLOW_HOME" not in os.environ:
    # A home of its own per pytest process: two suites on one machine (a developer's and CI's, or
    # two agents') never share a SQLite metadata database. `airflow db migrate` on it costs ~5 s.
    _home = tempfile.mkdtemp(prefix="claude-batch-airflow-")
    atexit.register(shutil.rmtree, _home, ignore_errors=True)
    os.environ["AIRFLOW_HOME"] = _home
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(REPO / "dags"))
# dag.test() runs only DAGs found in a bundle: the project's dags/ and the tests' own.
os.environ.setdefault(
    "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST",
    json.dumps(
        [
            {
                "name": name,
                "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
                "kwargs": {"path": str(path), "refresh_interval": 0},
            }
            for name, path in (("dags-folder", REPO / "dags"), ("test-dags", REPO / "tests" / "dags"))
        ]
    ),
)
os.environ.setdefault("AIRFLOW__CORE__PARALLELISM", "4")
# dag.test() in Airflow 3.3 fails when a DAG has a deadline alert (it reads the serialized alerts
# as ids); the full-stack tests keep the alert, dag.test() runs turn it off.
os.environ.setdefault("CLAUDE_BATCH_DEADLINE_HOURS", "0")

EMULATOR_API_KEY = "sk-ant-test-emulator-key-0123456789"


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int) -> None:
    """Skip (or fail under REQUIRE_SERVICES=1) when a local service is not reachable."""
    if _port_open(host, port):
        return
    message = f"{name} is not reachable on {host}:{port}"
    if os.environ.get("REQUIRE_SERVICES") == "1":
        pytest.fail(f"{message}, and REQUIRE_SERVICES=1 requires it")
    pytest.skip(f"{message}; start it or set REQUIRE_SERVICES=1 to make this a failure")


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A moto S3 server on a free loopback port for the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_store(moto_endpoint: str):
    """An :class:`ObjectStore` on a fresh moto bucket."""
    import boto3

    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return moto_store(f"s3://{bucket}/claude-batch", moto_endpoint)


@pytest.fixture(scope="session")
def emulator_server():
    """One Claude API emulator for the session; tests reset it through ``emulator``."""
    from claude_batch.emulator import EmulatorServer

    with EmulatorServer(api_key=EMULATOR_API_KEY, time_scale=60.0, processing_seconds=30.0, seed=0) as emu:
        yield emu


@pytest.fixture
def emulator(emulator_server):
    """The session's emulator, reset to no batches, no faults and zeroed stats."""
    emulator_server.reset()
    yield emulator_server
    emulator_server.reset()


@pytest.fixture
def anthropic_conn(emulator, monkeypatch):
    """``anthropic_default`` as an environment connection to the emulator; yields the emulator."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_ANTHROPIC_DEFAULT",
        json.dumps(
            {
                "conn_type": "anthropic",
                "host": emulator.base_url,
                "password": EMULATOR_API_KEY,
                "extra": {"anthropic_client_kwargs": {"timeout": 30}},
            }
        ),
    )
    return emulator


@pytest.fixture
def postgres_dsn() -> Iterator[str]:
    """A fresh schema in the local ``test`` database, dropped afterwards."""
    require_service("PostgreSQL", POSTGRES_HOST, POSTGRES_PORT)
    with fresh_postgres_schema("t") as dsn:
        yield dsn


@pytest.fixture(scope="session")
def airflow_db() -> str:
    """An initialised Airflow metadata database (SQLite under the test AIRFLOW_HOME)."""
    home = Path(os.environ["AIRFLOW_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [str(Path(sys.executable).parent / "airflow"), "db", "migrate"],
        check=True,
        capture_output=True,
        env=os.environ.copy(),
    )
    return str(home)


@pytest.fixture
def aws_conn(moto_endpoint, monkeypatch) -> str:
    """``aws_default`` as an environment connection to the moto server."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_AWS_DEFAULT",
        json.dumps(
            {
                "conn_type": "aws",
                "login": "testing",
                "password": "testing",
                "extra": {"endpoint_url": moto_endpoint, "region_name": "us-east-1"},
            }
        ),
    )
    return "aws_default"
