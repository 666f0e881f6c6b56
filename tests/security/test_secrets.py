"""After a run with canary secrets, the secrets appear nowhere the run left traces, nor in error messages.

The run is ``cb_reliability_corpus`` (tests/reliability/corpus.py): its ``anthropic_default``
connection carries a canary API key (the emulator accepts only that key), its ``aws_default``
connection a canary secret access key. Looked at afterwards: everything the process running
the DAG printed (dag.test() writes its task logs there, not under the logs folder, which is
scanned too), the metadata database (XCom, rendered templates, every other table, and the
database files themselves), every S3 object of the run's bucket (Parquet decoded), and every
warehouse table. Then auth and S3 failures are forced and their full tracebacks scanned.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import traceback
from datetime import UTC, datetime

import duckdb
import pytest
from claude_batch.hooks import ClaudeBatchAuthError, ClaudeBatchError, ClaudeBatchHook
from claude_batch.results import collect_results
from claude_batch.storage import ObjectStore, RunLayout
from claude_batch.submission import BatchSubmitter, InlineRequests

from tests.reliability.corpus import DAG_ID, SECRET_API_KEY, SECRET_AWS_KEY_ID, SECRET_AWS_PASSWORD
from tests.security.scan import Findings, leak_forms, parquet_text, store_objects

pytestmark = pytest.mark.airflow
WRONG_KEY = "sk-ant-api03-WRONG-canary-0d1e2f3a4b5c6d7e-eHl6"


def findings(*extra: str) -> Findings:
    return Findings((SECRET_API_KEY, SECRET_AWS_PASSWORD, *extra))


def test_the_scanner_finds_secrets_in_every_form_it_looks_for(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    secret = SECRET_AWS_PASSWORD
    (tmp_path / "plain.log").write_text(f"connecting with {secret} ...")
    (tmp_path / "url.log").write_text(f"s3://{SECRET_AWS_KEY_ID}:{leak_forms(secret)[0].decode()}@host/x")
    pq.write_table(pa.table({"v": [f"x{secret}y"] * 1000}), tmp_path / "hidden.parquet", compression="zstd")
    (tmp_path / "clean.log").write_text("nothing to see")
    scan = Findings((secret,))
    assert scan.check_files(tmp_path) == 4
    found = set(scan.found)
    assert {
        f"secret #0 in {tmp_path / name}" for name in ("plain.log", "url.log", "hidden.parquet (decoded)")
    } <= found
    assert not any("clean.log" in where for where in found)


def test_no_secret_in_the_task_logs(corpus_run):
    scan = findings()
    output = corpus_run.output_path.read_bytes()
    scan.check("everything the dag.test() process printed", output)
    log_files = scan.check_files(corpus_run.log_folder) if corpus_run.log_folder.exists() else 0
    home_logs = corpus_run.airflow_home / "logs"
    log_files += scan.check_files(home_logs) if home_logs.exists() else 0
    assert scan.found == []
    text = output.decode(errors="replace")
    for task in ("stage", "gate", "submit", "wait", "collect", "load"):
        assert f"task_id={task}" in text  # it is the whole run's log
    assert "Run report:" in text and scan.bytes > 20_000
    # The connections were used: the AWS one by its login, the Claude one against the emulator.
    assert "credentials retrieved from login and password" in text
    assert corpus_run.emulator_stats["http_requests"]["create"] == 2


def _metadata_db(corpus_run) -> sqlite3.Connection:
    from airflow.configuration import conf

    url = conf.get("database", "sql_alchemy_conn")
    assert url.startswith("sqlite:///"), url
    return sqlite3.connect(url.removeprefix("sqlite:///"))


def test_no_secret_in_xcom_rendered_templates_or_any_metadata_table(corpus_run):
    scan = findings()
    db = _metadata_db(corpus_run)
    try:
        xcom = db.execute(
            "SELECT task_id, map_index, key, value FROM xcom WHERE dag_id = ? AND run_id = ?",
            (DAG_ID, corpus_run.run_id),
        ).fetchall()
        rendered = db.execute(
            "SELECT task_id, map_index, rendered_fields FROM rendered_task_instance_fields "
            "WHERE dag_id = ? AND run_id = ?",
            (DAG_ID, corpus_run.run_id),
        ).fetchall()
        scan.check_values("xcom", xcom)
        scan.check_values("rendered_task_instance_fields", rendered)
        tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            scan.check_values(f"metadata table {table}", db.execute(f'SELECT * FROM "{table}"'))
        database_file = db.execute("PRAGMA database_list").fetchall()[0][2]
    finally:
        db.close()
    # ... and the database files byte for byte (deleted rows linger in free pages).
    for path in sorted(__import__("pathlib").Path(database_file).parent.glob("airflow.db*")):
        scan.check(str(path), path.read_bytes())
    assert scan.found == []
    # Not a scan of nothing: the run's XCom (batch ids, summaries) and rendered fields are there.
    keys = {(task, key) for task, _, key, _ in xcom}
    assert ("submit", "batch_id") in keys and ("load", "return_value") in keys
    assert any(
        b"msgbatch_" in (value if isinstance(value, bytes) else str(value).encode()) for *_, value in xcom
    )
    rendered_tasks = {task for task, _, _ in rendered}
    assert {"stage", "submit", "wait", "load"} <= rendered_tasks
    assert any("storage_root" in str(fields) or "shard" in str(fields) for _, _, fields in rendered)


def test_no_secret_in_any_s3_object(corpus_run):
    scan = findings()
    store = corpus_run.store()
    objects = list(store_objects(store))
    for path, data in objects:
        scan.check(path, data)
        if path.endswith(".parquet"):
            scan.check(f"{path} (decoded)", parquet_text(data))
    assert scan.found == []
    layout = RunLayout(store, DAG_ID, corpus_run.run_id)
    names = {path.rsplit(f"{layout.prefix}/", 1)[-1] for path, _ in objects}
    assert {"manifest.json", "report.json", "requests/part-00000.jsonl", "requests/rejects.jsonl",
            "results/part-00000.jsonl", "results/part-00001.parquet", "validated/part-00000.parquet",
            "state/submit.part-00001.json"} <= names, names  # fmt: skip


def test_no_secret_in_the_warehouse(corpus_run):
    scan = findings()
    conn = duckdb.connect(str(corpus_run.warehouse_path), read_only=True)
    try:
        tables = [
            name for (name,) in conn.execute("SELECT table_name FROM information_schema.tables").fetchall()
        ]
        for table in tables:
            scan.check_values(f"warehouse table {table}", conn.execute(f'SELECT * FROM "{table}"').fetchall())
    finally:
        conn.close()
    assert scan.found == [] and len(tables) >= 4


# -- error messages ------------------------------------------------------------------------------


def _full_text(exc: BaseException) -> str:
    """The exception as a task log shows it: the whole chain, with every message."""
    return "".join(traceback.format_exception(exc))


@pytest.fixture
def wrong_key(emulator, monkeypatch):
    """``anthropic_default`` pointing at the emulator with a key it refuses."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_ANTHROPIC_DEFAULT",
        json.dumps({"conn_type": "anthropic", "host": emulator.base_url, "password": WRONG_KEY}),
    )
    return emulator


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name} {record.getMessage()} {record.exc_text or ''}")


def test_auth_failures_name_the_connection_but_never_the_key(wrong_key, tmp_path, capfd):
    scan = findings(WRONG_KEY)
    records = _Records()
    logging.getLogger().addHandler(records)
    try:
        failures, event, submit_error = _fail_every_call(tmp_path)
    finally:
        logging.getLogger().removeHandler(records)
    for exc in failures:
        scan.check(type(exc).__name__, _full_text(exc))
    scan.check("trigger event", json.dumps(event.payload))
    scan.check("log records", "\n".join(records.lines))
    out, err = capfd.readouterr()
    scan.check("stdout and stderr", out + err)
    assert scan.found == []
    assert "password field of Airflow connection 'anthropic_default'" in str(submit_error)
    assert "anthropic_default" in event.payload["message"]
    assert len(failures) == 4 and wrong_key.stats()["batches_created"] == 0


def _fail_every_call(tmp_path):
    """Submit, retrieve, list, collect and wait with a refused key; return what each raised."""
    from claude_batch.triggers import ClaudeBatchTrigger

    from tests.batchcore.conftest import make_requests

    hook = ClaudeBatchHook()
    failures: list[BaseException] = []
    with pytest.raises(ClaudeBatchAuthError) as submit_error:
        BatchSubmitter(hook, ObjectStore(str(tmp_path)), "dag/run/state/submit.part-00000.json").submit(
            InlineRequests(make_requests(3))
        )
    failures.append(submit_error.value)
    with pytest.raises(ClaudeBatchAuthError) as retrieve_error:
        hook.retrieve_batch("msgbatch_0123456789")
    failures.append(retrieve_error.value)
    with pytest.raises(ClaudeBatchError) as list_error:
        list(hook.batches_created_since(datetime(2026, 1, 1, tzinfo=UTC)))
    failures.append(list_error.value)
    store = ObjectStore(str(tmp_path / "store"))
    with pytest.raises(ClaudeBatchAuthError) as collect_error:
        collect_results(
            hook.conn, RunLayout(store, "d", "r"), 0, "msgbatch_0123456789", manifest=_no_manifest()
        )
    failures.append(collect_error.value)

    async def wait():
        trigger = ClaudeBatchTrigger(
            batch_ids=["msgbatch_0123456789"], min_poll_interval=0.05, max_poll_interval=0.1
        )
        return await asyncio.wait_for(anext(trigger.run()), 30)

    event = asyncio.run(wait())
    assert event.payload["status"] == "error"
    return failures, event, submit_error.value


def _no_manifest():
    from claude_batch.staging import Manifest, ShardManifest

    shard = ShardManifest(
        part=0,
        requests="requests/part-00000.jsonl",
        keys="requests/part-00000.keys.parquet",
        count=1,
        bytes=1,
        sha256="0",
        models={},
    )
    return Manifest(
        workload="w",
        prompt_version="v",
        dag_id="d",
        run_id="r",
        cache_setting="off",
        key_field="id",
        models=[],
        extracted_rows=1,
        staged_requests=1,
        rejected_rows=0,
        rejected_by_reason={},
        rejects="requests/rejects.jsonl",
        shards=[shard],
        limits={},
        estimate={},
        created_at="2026-01-01T00:00:00+00:00",
    )


def test_s3_failures_never_show_the_aws_secret(moto_endpoint, monkeypatch):
    scan = findings()
    monkeypatch.setenv(
        "AIRFLOW_CONN_AWS_DEFAULT",
        json.dumps(
            {
                "conn_type": "aws",
                "login": SECRET_AWS_KEY_ID,
                "password": SECRET_AWS_PASSWORD,
                "extra": {"endpoint_url": moto_endpoint, "region_name": "us-east-1"},
            }
        ),
    )
    store = ObjectStore.from_airflow("s3://no-such-bucket-canary/root", "aws_default")
    assert store.fs.secret == SECRET_AWS_PASSWORD  # the store really holds the secret
    errors = []
    for attempt in (
        lambda: store.read_bytes("dag/run/manifest.json"),
        lambda: store.write_bytes("dag/x", b"1"),
    ):
        with pytest.raises(Exception) as failure:  # noqa: B017 - whatever s3fs raises, its text is what matters
            attempt()
        errors.append(failure.value)
    unreachable = ObjectStore(
        "s3://bucket/root",
        key=SECRET_AWS_KEY_ID,
        secret=SECRET_AWS_PASSWORD,
        endpoint_url="http://127.0.0.1:9",  # nothing listens on the discard port
        retries=1,
        config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 1},
    )
    with pytest.raises(Exception) as failure:  # noqa: B017
        unreachable.read_bytes("x.json")
    errors.append(failure.value)
    for exc in errors:
        scan.check(type(exc).__name__, _full_text(exc) + repr(exc))
    assert scan.found == []
    assert len(errors) == 3
