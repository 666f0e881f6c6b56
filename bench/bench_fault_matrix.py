"""The fault matrix at full size: every fault on runs of 10,000 rows, and what the audit counted.

The same scenarios as ``tests/reliability/test_fault_matrix.py`` (see
``tests/reliability/scenarios.py``): run 1 with the fault and Airflow-like task retries, run 2
(the next night) retrying what run 1 sent back to the ledger, then the audit of the results
table, the ledger and every batch the emulator holds. Real parts: a DuckDB file per scenario
(and PostgreSQL for the load faults when it runs on 127.0.0.1:5432), a moto S3 server, the
Claude emulator over HTTP.

Sizes: ``BENCH_SCALE=full`` 10,000 rows in four shards of 2,500; otherwise 2,000 rows in two.
Run: ``python -m bench.bench_fault_matrix`` (or ``make soak`` for every benchmark at full size).
Writes ``bench/results/fault_matrix.md`` and ``.json``; fails if any scenario lost, duplicated or
double-billed a record, or broke the accounting.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from bench.common import REPO, markdown_table, postgres_up, scale, write_results

API_KEY = "sk-ant-bench-fault-matrix-0123456789"
POSTGRES = ("127.0.0.1", 5432)
POSTGRES_SCENARIOS = ("warehouse_load", "kill_load")
COLUMNS = [
    "fault",
    "warehouse",
    "rows",
    "records lost",
    "duplicates",
    "batches billed twice",
    "records billed twice",
    "accounting ok",
    "faults injected",
    "task attempts retried",
    "requests sent",
    "seconds",
]


def _environment(emulator_url: str, moto_url: str) -> None:
    """Connections and an Airflow home for the hooks (set before Airflow is imported)."""
    import json

    os.environ.setdefault("AIRFLOW_HOME", str(REPO / ".airflow" / "bench"))
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ.pop("ANTHROPIC_API_KEY", None)
    os.environ["AIRFLOW_CONN_ANTHROPIC_DEFAULT"] = json.dumps(
        {"conn_type": "anthropic", "host": emulator_url, "password": API_KEY,
         "extra": {"anthropic_client_kwargs": {"timeout": 60}}}
    )  # fmt: skip
    os.environ["AIRFLOW_CONN_AWS_DEFAULT"] = json.dumps(
        {"conn_type": "aws", "login": "testing", "password": "testing",
         "extra": {"endpoint_url": moto_url, "region_name": "us-east-1"}}
    )  # fmt: skip


def _bucket(moto_url: str) -> str:
    import boto3

    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/claude-batch"


def run_matrix(rows: int, shards: int) -> list[dict]:
    import logging

    from claude_batch.emulator import EmulatorServer
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's access log: a line per S3 call

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    moto_url = f"http://{host}:{port}"
    lines: list[dict] = []
    try:
        with EmulatorServer(api_key=API_KEY, time_scale=60.0, processing_seconds=30.0, seed=0) as emulator:
            _environment(emulator.base_url, moto_url)
            from tests.reliability.harness import Stack, fill_source
            from tests.reliability.scenarios import SCENARIOS
            from tests.services import fresh_postgres_schema

            plan = [(name, "duckdb") for name in SCENARIOS]
            if postgres_up(*POSTGRES):
                plan += [(name, "postgres") for name in POSTGRES_SCENARIOS]
            with tempfile.TemporaryDirectory(prefix="fault-matrix-") as workdir:
                for number, (name, warehouse) in enumerate(plan):
                    emulator.reset()
                    with (
                        fresh_postgres_schema("bench")
                        if warehouse == "postgres"
                        else _duckdb_file(workdir, number)
                    ) as url:
                        stack = Stack(_bucket(moto_url), moto_url, url, -(-rows // shards))
                        fill_source(stack, rows)
                        started = time.perf_counter()
                        result = SCENARIOS[name](stack, emulator, API_KEY, rows)
                        line = _line(result, time.perf_counter() - started)
                    lines.append(line)
                    print(
                        f"  {line['fault']} [{warehouse}]: lost {line['records lost']}, billed twice "
                        f"{line['batches billed twice']}, accounting {line['accounting ok']}",
                        flush=True,
                    )
    finally:
        moto.stop()
    return lines


@contextmanager
def _duckdb_file(workdir: str, number: int):
    path = Path(workdir) / f"warehouse-{number}.duckdb"
    yield f"duckdb://{path}"
    path.unlink(missing_ok=True)


def _line(result, seconds: float) -> dict:
    data = asdict(result)
    return {
        "fault": data["fault"],
        "warehouse": data["warehouse"],
        "rows": data["rows"],
        "records lost": data["records_lost"],
        "duplicates": data["duplicates"],
        "batches billed twice": data["batches_billed_twice"],
        "records billed twice": data["records_billed_twice"],
        "accounting ok": "yes" if data["accounting_ok"] else "NO",
        "faults injected": data["faults_injected"],
        "task attempts retried": data["failed_attempts"],
        "requests sent": data["notes"]["requests_received"],
        "seconds": round(seconds, 1),
        "succeeded": data["notes"]["succeeded"],
        "failed attempts": data["notes"]["failed"],
    }


def main() -> None:
    full = scale() == "full"
    rows, shards = (10_000, 4) if full else (2_000, 2)
    lines = run_matrix(rows, shards)
    bad = [
        line
        for line in lines
        if line["records lost"]
        or line["duplicates"]
        or line["batches billed twice"]
        or line["records billed twice"]
        or line["accounting ok"] != "yes"
        or line["succeeded"] != rows
        or (line["faults injected"] == 0 and not line["fault"].startswith("none"))  # the fault never happened
    ]
    survived = len(lines) - len(bad)
    totals = {key: sum(line[key] for line in lines) for key in
              ("records lost", "duplicates", "batches billed twice", "records billed twice")}  # fmt: skip
    markdown = "\n".join(
        [
            "### Fault matrix: nothing lost, nothing duplicated, nothing billed twice",
            "",
            markdown_table(lines, COLUMNS),
            "",
            f"{survived} of {len(lines)} fault scenarios survived on runs of {rows:,} rows ({shards} "
            f"shards): records lost {totals['records lost']}, duplicates {totals['duplicates']}, batches "
            f"billed twice {totals['batches billed twice']}, records billed twice "
            f"{totals['records billed twice']}. Each "
            "scenario: run 1 with the fault (tasks retried as Airflow would), run 2 retrying what run 1 "
            "left, "
            'audit of the results table, the ledger and every batch the emulator holds. "requests sent" '
            f"above {rows:,} are the retries run 2 sent. Re-run: `BENCH_SCALE={'full' if full else 'small'} "
            ".venv/bin/python -m bench.bench_fault_matrix`.",
        ]
    )
    write_results("fault_matrix", lines, markdown)
    if bad:
        raise SystemExit(f"{len(bad)} scenario(s) failed the audit: {[line['fault'] for line in bad]}")


if __name__ == "__main__":
    main()
