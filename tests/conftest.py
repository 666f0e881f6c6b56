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
if "AIRFLOW_HOME" not in os.environ or os.environ["AIRFLOW_HOME"] == os.environ.get("CLAUDE_BATCH_TEST_HOME"):
    # A home of its own per pytest process: two suites on one machine (a developer's and CI's, or
    # two agents'), or two xdist workers (which inherit the controller's environment), never share
    # a SQLite metadata database. `airflow db migrate` on it costs ~5 s.
    _home = tempfile.mkdtemp(prefix="claude-batch-airflow-")
    atexit.register(shutil.rmtree, _home, ignore_errors=True)
    os.environ["AIRFLOW_HOME"] = os.environ["CLAUDE_BATCH_TEST_HOME"] = _home
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


@pytest.fixture(scope="session")
def corpus_run(airflow_db, moto_endpoint, tmp_path_factory):
    """The bad-input corpus through cb_reliability_corpus (with canary secrets), once per session.

    tests/reliability reads what became of each bad row, tests/security that no canary leaked.
    """
    from tests.reliability.corpus import run_corpus

    return run_corpus(tmp_path_factory.mktemp("corpus"), moto_endpoint, airflow_db)


# Under ``make test`` (``pytest -n 2 --dist loadscope``) each group runs on one worker, which
# builds each session fixture once for itself, so tests that share an expensive one stay
# together: the full-stack tests (one Airflow stack, ~75 s to start, at fixed artifact paths),
# the readers of the corpus run (~55 s) and each module with module-scoped fixtures. Every
# other test is a unit of its own, so the two workers finish close together.
CORPUS_MODULES = ("tests/reliability/test_bad_inputs.py", "tests/security/test_secrets.py")
MODULE_FIXTURE_MODULES = ("tests/workflow/test_dags.py",)


def scheduling_group(nodeid: str) -> str:
    module = nodeid.split("::", 1)[0]
    if module.startswith("tests/fullstack/"):
        return "fullstack"
    if module in CORPUS_MODULES:
        return "corpus"
    return module if module in MODULE_FIXTURE_MODULES else nodeid


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's scope scheduler, with :func:`scheduling_group` as the scope, in collection order."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scheduling_group(nodeid)

    config.option.loadscopereorder = False  # collection order: the full-stack group first
    return SharedFixtureScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """The longest units first: the full-stack group, the corpus, then the slow kinds of test."""
    for item in items:
        group = scheduling_group(item.nodeid)
        if "corpus_run" in getattr(item, "fixturenames", ()) and group != "corpus":
            raise pytest.UsageError(f"{item.nodeid} reads corpus_run: add its module to CORPUS_MODULES")
        for name in getattr(item, "fixturenames", ()):
            definitions = item._fixtureinfo.name2fixturedefs.get(name, ())
            if any(d.scope == "module" for d in definitions) and group == item.nodeid:
                raise pytest.UsageError(f"{item.nodeid} uses the module fixture {name}: add its module to "
                                        "MODULE_FIXTURE_MODULES")  # fmt: skip

    def order(item) -> int:
        group = scheduling_group(item.nodeid)
        if group in ("fullstack", "corpus"):
            return 0 if group == "fullstack" else 1
        # Then the slow kinds (Airflow machinery, then real services), so no long test starts last.
        return 2 if item.get_closest_marker("airflow") else 3 if item.get_closest_marker("services") else 4

    items.sort(key=order)  # stable: collection order within each kind


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
