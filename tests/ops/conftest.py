"""Fixtures for the ops tests: a pipeline's warehouse with dead items, reached through an Airflow connection.

Runs of the reliability harness (``tests/reliability/harness.py``: the pipeline's own step
functions, the emulator over HTTP, moto S3) over eight tickets, on DuckDB or PostgreSQL, leave
two items dead for two reasons: a row staging refuses (an ANSI escape in its text) and a row the
model answers in prose instead of JSON (the emulator's responder does so when the text asks for
it): ``invalid`` after the first run, ``dead`` after the second. ``claude_batch_warehouse``
points at the same warehouse as an environment connection.
"""

from __future__ import annotations

import io
import json
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from claude_batch.emulator.responder import DefaultResponder, user_text

from tests.reliability.harness import DAY, Stack, query
from tests.services import create_tickets

PROSE = "[[answer-in-prose]]"
PROSE_KEY, CONTROL_KEY = "t-prose", "t-control"
GOOD_KEYS = [f"t{i:06d}" for i in range(6)]
PG_PASSWORD = "pg-Secret-Passw0rd-never-printed"


class ProseResponder:
    """The emulator's default answers, except for text with the marker.

    That text gets prose, not the JSON the schema asks for.
    """

    def __init__(self) -> None:
        self.default = DefaultResponder()

    def __call__(self, params: dict, context: Any) -> dict:
        if PROSE in user_text(params):
            return {
                "content": [{"type": "text", "text": "Sure! This one is about billing, I am quite sure."}]
            }
        return self.default(params, context)


def fill(stack: Stack) -> None:
    rows = [
        {
            "id": key,
            "body": f"I was charged twice for invoice {i}, please refund",
            "created_at": DAY + timedelta(minutes=i),
        }
        for i, key in enumerate(GOOD_KEYS)
    ]
    rows.append({"id": PROSE_KEY, "body": f"Refund me {PROSE} now", "created_at": DAY + timedelta(hours=1)})
    rows.append(
        {
            "id": CONTROL_KEY,
            "body": "\x1b[31mred alert\x1b[0m about my invoice",
            "created_at": DAY + timedelta(hours=2),
        }
    )
    conn = stack.connect()
    try:
        create_tickets(conn, rows)
    finally:
        conn.close()


def fix_row(stack: Stack, key: str, body: str) -> None:
    """What the data engineer does before a requeue: mend the source row."""
    conn = stack.connect()
    try:
        if stack.dialect == "duckdb":
            conn.execute("UPDATE tickets SET body = ? WHERE id = ?", [body, key])
        else:
            with conn.cursor() as cur:
                cur.execute("UPDATE tickets SET body = %s WHERE id = %s", (body, key))
            conn.commit()
    finally:
        conn.close()


def postgres_connection(dsn: str, **changes: Any) -> dict[str, Any]:
    """An Airflow ``postgres`` connection (as JSON) for the fresh schema of ``dsn``."""
    parts = urlsplit(dsn)
    options = unquote(parse_qs(parts.query)["options"][0])
    return {
        "conn_type": "postgres",
        "host": parts.hostname,
        "port": parts.port,
        "login": parts.username,
        "password": PG_PASSWORD,  # trust auth ignores it; no output may show it
        "schema": parts.path.lstrip("/"),
        "extra": {"options": options, "application_name": "claude-batch-ops-test"},
        **changes,
    }


@pytest.fixture(params=["duckdb", "postgres"])
def ops_stack(request, tmp_path, s3_store, moto_endpoint, anthropic_conn, aws_conn, monkeypatch) -> Stack:
    """A filled warehouse of either kind, as ``claude_batch_warehouse``.

    The emulator answers in prose on cue.
    """
    if request.param == "duckdb":
        path = tmp_path / "warehouse.duckdb"
        url = f"duckdb://{path}"
        connection = {"conn_type": "duckdb", "host": str(path)}
    else:
        url = request.getfixturevalue("postgres_dsn")
        connection = postgres_connection(url)
    monkeypatch.setenv("AIRFLOW_CONN_CLAUDE_BATCH_WAREHOUSE", json.dumps(connection))
    stack = Stack(store_root=s3_store.root, s3_endpoint=moto_endpoint, warehouse_url=url, shard_size=50)
    fill(stack)
    store = anthropic_conn.store
    previous = store.responder
    store.responder = ProseResponder()
    yield stack
    store.responder = previous


def cli(*argv: str) -> tuple[int, str, str]:
    """``claude-batch ARGV`` in this process: (exit status, stdout, stderr)."""
    from claude_batch import cli as cli_module

    out, err = io.StringIO(), io.StringIO()
    code = cli_module.main(list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def cli_json(*argv: str) -> Any:
    code, out, err = cli(*argv, "--json")
    assert code == 0, err
    return json.loads(out)


def ledger(stack: Stack) -> dict[str, tuple]:
    rows = query(
        stack,
        "SELECT record_key, status, attempts, requeued_by, requeued_at, run_id, last_error "
        "FROM claude_batch_ledger",
    )
    return {row[0]: row[1:] for row in rows}
