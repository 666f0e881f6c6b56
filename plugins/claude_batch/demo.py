"""``make demo``: the three workload DAGs end to end on embedded defaults, in a couple of minutes.

    python -m claude_batch.demo

What it sets up, all on loopback and under ``.airflow/demo/`` in the repository:

- the Claude API emulator (in this process, fast emulated time) and a moto S3 server;
- an Airflow home with a migrated SQLite metadata database;
- a DuckDB warehouse seeded from ``include/sample_data/`` (three days of support tickets, the
  five accounts-payable invoices, a few products);
- the connections ``claude_batch_warehouse``, ``anthropic_default`` and ``aws_default`` as
  ``AIRFLOW_CONN_*`` variables, and ``CLAUDE_BATCH_STORAGE_ROOT``.

Then it runs each DAG with ``airflow dags test`` for a logical date whose data interval holds
the seeded rows, prints the invoice table and each run's report, and exits non-zero if a run
failed.

It never spends money by default. With ``ANTHROPIC_API_KEY`` set *and*
``CLAUDE_BATCH_DEMO_REAL_API=1`` it sends the batches to the real API instead of the emulator
(with a small row limit and a budget on each run).

``CLAUDE_BATCH_MIN_POLL_SECONDS`` (read by the DAG files) is set to 1 here so the waits match
the emulator's fast clock; the DAGs default to 30 seconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

BUCKET = "claude-batch-demo"
STORAGE_ROOT = f"s3://{BUCKET}/runs"
REAL_API_FLAG = "CLAUDE_BATCH_DEMO_REAL_API"
# Emulated time runs 600x faster; a batch takes five emulated minutes (half a second).
EMULATOR_TIME_SCALE = 600.0
EMULATOR_PROCESSING_SECONDS = 300.0
# What the tables below are: without the real API no model answers, the emulator does.
EMULATED_ANSWERS = (
    "Answers: from the emulator, not from Claude. Its default responder reads each row's text: the label its "
    "words point to, a confidence from how clearly they do, a summary from its own sentences; instructions "
    "written into a row (the prompt-injection ticket) are ignored. Set CLAUDE_BATCH_DEMO_REAL_API=1 with "
    "ANTHROPIC_API_KEY for real answers."
)
EMULATED_ANSWERS_SHORT = (
    "The answers below come from the Claude API emulator "
    "(deterministic, read from each row's text), not from a model."
)
# With the real API: a small sample and a budget per run, so the demo costs cents.
REAL_API_CONF = {"row_limit": 100, "budget_usd": 1.0}


@dataclass(frozen=True)
class DemoRun:
    dag_id: str
    logical_date: datetime
    what: str


def repo_root() -> Path:
    """The repository holding ``dags/`` and ``include/`` (the package is installed editable)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "dags").is_dir() or not (root / "include" / "sample_data").is_dir():
        raise SystemExit(
            f"claude_batch.demo runs from a clone of the repository; {root} has no dags/ or include/"
        )
    return root


def load_sample_data(root: Path | None = None) -> ModuleType:
    """``include/sample_data/generate.py`` as a module (include/ is data, not a package)."""
    path = (root or repo_root()) / "include" / "sample_data" / "generate.py"
    spec = importlib.util.spec_from_file_location("claude_batch_sample_data", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load the sample data generator at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def demo_runs(end: datetime) -> list[DemoRun]:
    """The runs to make; ``end`` is the midnight (UTC) that closes the seeded period."""
    return [
        DemoRun("invoice_approval", end - timedelta(hours=4), "the 8 pm run: invoices received 4 pm to 8 pm"),
        DemoRun("support_ticket_triage", end, "the nightly run: yesterday's tickets"),
        DemoRun("product_descriptions", end, "the nightly run: products changed yesterday"),
    ]


def masked(secret: str) -> str:
    return f"{secret[:7]}...{secret[-2:]}" if len(secret) > 12 else "***"


# --- services ------------------------------------------------------------------------------


def start_s3() -> tuple[Any, str]:
    """A moto S3 server on a free loopback port, with the demo bucket."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per S3 request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    s3_client(endpoint).create_bucket(Bucket=BUCKET)
    return server, endpoint


def s3_client(endpoint: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="demo",
        aws_secret_access_key="demo",
        region_name="us-east-1",
    )


def start_emulator(api_key: str):
    from claude_batch.emulator import EmulatorServer

    return EmulatorServer(
        api_key=api_key,
        time_scale=EMULATOR_TIME_SCALE,
        processing_seconds=EMULATOR_PROCESSING_SECONDS,
        seed=0,
    ).start()


def airflow_env(
    home: Path, root: Path, warehouse: Path, s3_endpoint: str, claude: dict[str, Any]
) -> dict[str, str]:
    """The environment ``airflow`` subprocesses run with: home, DAGs, connections, storage root."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW__", "AIRFLOW_CONN_"))}
    env.pop("ANTHROPIC_API_KEY", None)  # only the connection carries a key
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(root / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__PARALLELISM": env.get("AIRFLOW__CORE__PARALLELISM", "4"),
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "AIRFLOW_CONN_CLAUDE_BATCH_WAREHOUSE": json.dumps(
                {"conn_type": "duckdb", "host": str(warehouse)}
            ),
            "AIRFLOW_CONN_ANTHROPIC_DEFAULT": json.dumps(claude),
            "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(
                {
                    "conn_type": "aws",
                    "login": "demo",
                    "password": "demo",
                    "extra": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"},
                }
            ),
            "CLAUDE_BATCH_STORAGE_ROOT": STORAGE_ROOT,
            # dag.test() in Airflow 3.3 fails on DAGs with a deadline alert (see pipeline.py).
            "CLAUDE_BATCH_DEADLINE_HOURS": "0",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    return env


def airflow(args: Sequence[str], env: dict[str, str], log_path: Path) -> tuple[int, float]:
    """Run ``airflow <args>`` with its output in ``log_path``; returns (exit code, seconds)."""
    binary = Path(sys.executable).parent / "airflow"
    started = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log:
        code = subprocess.run(
            [str(binary), *args], env=env, stdout=log, stderr=subprocess.STDOUT, check=False
        ).returncode
    return code, time.monotonic() - started


def tail(path: Path, lines: int = 40) -> str:
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(text[-lines:])


# --- what is printed -----------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    """A plain-text table; ``align`` has one ``<`` or ``>`` per column (default left)."""
    cells = [[str(h) for h in headers]] + [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    align = align or "<" * len(headers)

    def line(row: Sequence[str]) -> str:
        return "  ".join(f"{value:{align[i]}{widths[i]}}" for i, value in enumerate(row)).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(row) for row in cells[1:]])


def invoice_table(warehouse: Path) -> str:
    import duckdb

    with duckdb.connect(str(warehouse), read_only=True) as conn:
        rows = conn.execute(
            "SELECT record_key, department, amount, description, approval_required "
            "FROM invoice_approval_results ORDER BY record_key"
        ).fetchall()
    return table(
        ("invoice", "department", "amount", "description", "approval"),
        [
            (key, dept, f"{amount:,.2f}", desc, "REQUIRED" if flag else "-")
            for key, dept, amount, desc, flag in rows
        ],
        "<<><<",
    )


def triage_summary(warehouse: Path) -> str:
    import duckdb

    with duckdb.connect(str(warehouse), read_only=True) as conn:
        rows = conn.execute(
            "SELECT category, count(*), count(*) FILTER (WHERE needs_review), round(avg(confidence), 2) "
            "FROM support_ticket_triage_results GROUP BY 1 ORDER BY 2 DESC"
        ).fetchall()
        dead = conn.execute(
            "SELECT record_key, last_error FROM claude_batch_ledger "
            "WHERE workload = 'support_ticket_triage' AND status = 'dead' ORDER BY record_key"
        ).fetchall()
    text = table(("category", "tickets", "needs review", "avg confidence"), rows, "<>>>")
    if dead:
        text += "\n\nNot sent (in the ledger as dead, with the reason):\n"
        text += "\n".join(f"  {key}: {error}" for key, error in dead)
    return text


def product_table(warehouse: Path) -> str:
    import duckdb

    with duckdb.connect(str(warehouse), read_only=True) as conn:
        rows = conn.execute(
            "SELECT record_key, description_chars, tagline "
            "FROM product_descriptions_results ORDER BY record_key"
        ).fetchall()
    return table(("sku", "description chars", "tagline"), rows, "<><")


def read_report(endpoint: str, dag_id: str) -> dict[str, Any] | None:
    """The run's ``report.json`` (each DAG runs once per demo, on a fresh bucket)."""
    client = s3_client(endpoint)
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=f"runs/{dag_id}/")
    keys = [item["Key"] for item in listed.get("Contents", []) if item["Key"].endswith("/report.json")]
    if not keys:
        return None
    return json.loads(client.get_object(Bucket=BUCKET, Key=keys[0])["Body"].read())


def describe_report(report: dict[str, Any], clock: str = "") -> str:
    """The run report as a few readable lines; ``clock`` qualifies batch durations (e.g. "emulated")."""
    ledger = report.get("ledger") or {}
    outcomes = ", ".join(f"{status} {count:,}" for status, count in sorted(ledger.items()))
    rejected = report.get("rejected_by_reason") or {}
    durations = report.get("batch_seconds") or {}
    hit_rate = report.get("cache_hit_rate")
    tokens = report.get("tokens") or {}
    lines = [
        f"run             {report['run_id']}  "
        f"(prompt {report['prompt_version']}, model {', '.join(report['models'])})",
        f"items           extracted {report['extracted']:,}, staged {report['staged']:,}, "
        f"rejected before sending {report['rejected']:,}" + (f" {rejected}" if rejected else ""),
        f"outcomes        {outcomes}",
        f"batches         {report['batches']}"
        + (f", longest {durations['max']:.1f} s, mean {durations['mean']:.1f} s" if durations else "")
        + (f" ({clock})" if durations and clock else ""),
        f"tokens          input {tokens.get('input', 0):,}, output {tokens.get('output', 0):,}, "
        f"cache write {tokens.get('cache_write', 0):,}, cache read {tokens.get('cache_read', 0):,}",
        f"cache           {report['cache_setting']}"
        + (
            f" ({(report.get('cache') or {}).get('policy')})"
            if (report.get("cache") or {}).get("policy")
            else ""
        )
        + ", hit rate "
        + (f"{hit_rate:.0%}" if hit_rate is not None else "n/a (nothing cached)")
        + _describe_probe((report.get("cache") or {}).get("probe")),
        *_describe_costs(report),
    ]
    return "\n".join(lines)


def _describe_probe(probe: dict[str, Any] | None) -> str:
    if not probe or not probe.get("requests"):
        return ""
    return (
        f"; probed {probe['setting']} on {probe['requests']:,} requests "
        f"(at most ${probe.get('max_extra_usd', 0):.4f} over caching off)"
    )


def _describe_costs(report: dict[str, Any]) -> list[str]:
    """The cost lines, with the report's definitions (claude_batch.costs.RunCosts)."""
    costs = report.get("costs")
    if not costs:  # a report from before the definitions
        return [
            f"cost            ${report['cost_usd']:.4f} in batches "
            f"(estimate was ${report['estimated_cost_usd']:.4f}); "
            f"real-time equivalent ${report['realtime_cost_usd']:.4f}; saving ${report['saving_usd']:.4f}"
        ]
    estimate = costs.get("estimate") or {}
    line = f"cost            ${costs['actual_usd']:.4f} in batches"
    if estimate.get("expected_usd") is not None:
        line += f"; estimate ${estimate['expected_usd']:.4f}"
        if estimate.get("low_usd") is not None and estimate.get("high_usd") is not None:
            line += f" (between ${estimate['low_usd']:.4f} and ${estimate['high_usd']:.4f})"
        if estimate.get("gap_pct") is not None:
            line += f", off by {estimate['gap_pct']:+.1f}%"
    realtime = costs["realtime_uncached_usd"]
    share = f" ({costs['saving_usd'] / realtime:.0%})" if realtime else ""
    caching = round(costs["saving_from_caching_usd"], 4) + 0.0  # no "-0.0000" for a rounding crumb
    return [
        line,
        f"compared with   plain real-time calls without caching ${realtime:.4f}; batches without caching "
        f"${costs['batch_uncached_usd']:.4f}",
        f"saving          ${costs['saving_usd']:.4f}{share}: "
        f"batching ${costs['saving_from_batching_usd']:.4f}, "
        + (
            f"caching ${caching:.4f}"
            if caching >= 0
            else f"caching cost ${-caching:.4f} more than caching off"
        ),
    ]


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m claude_batch.demo", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--tickets", type=int, default=3000, help="ordinary support tickets to seed (over 3 days)"
    )
    parser.add_argument(
        "--home", type=Path, default=None, help="the demo's directory (default .airflow/demo)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    root = repo_root()
    home = (args.home or root / ".airflow" / "demo").resolve()
    home.mkdir(parents=True, exist_ok=True)
    logs = home / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir()
    warehouse = home / "warehouse.duckdb"
    warehouse.unlink(missing_ok=True)

    real_api = os.environ.get(REAL_API_FLAG) == "1"
    api_key = os.environ.get("ANTHROPIC_API_KEY", "")
    if real_api and not api_key:
        raise SystemExit(f"{REAL_API_FLAG}=1 needs ANTHROPIC_API_KEY as well")
    if api_key and not real_api:
        print(f"ANTHROPIC_API_KEY is set, but the demo uses the emulator unless {REAL_API_FLAG}=1.")

    end = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
    print(f"claude-batch demo in {home}")
    s3_server, s3_endpoint = start_s3()
    emulator = None
    try:
        if real_api:
            claude = {"conn_type": "anthropic", "password": api_key}
            print(f"Claude: the REAL API (key {masked(api_key)}); each run limited by {REAL_API_CONF}")
        else:
            emulator_key = f"sk-demo-{secrets.token_hex(12)}"
            emulator = start_emulator(emulator_key)
            claude = {"conn_type": "anthropic", "host": emulator.base_url, "password": emulator_key}
            print(
                f"Claude: the emulator at {emulator.base_url} (key {masked(emulator_key)}; "
                f"time x{EMULATOR_TIME_SCALE:.0f}, "
                f"a batch takes {EMULATOR_PROCESSING_SECONDS / 60:.0f} emulated min)"
            )
            print(EMULATED_ANSWERS)
        print(f"S3: moto at {s3_endpoint}, storage root {STORAGE_ROOT}")
        env = airflow_env(home, root, warehouse, s3_endpoint, claude)
        env["CLAUDE_BATCH_MIN_POLL_SECONDS"] = "10" if real_api else "1"

        code, seconds = airflow(["db", "migrate"], env, logs / "db-migrate.log")
        if code:
            print(tail(logs / "db-migrate.log"))
            raise SystemExit(f"airflow db migrate failed (exit {code}); see {logs / 'db-migrate.log'}")
        print(f"Airflow metadata database ready ({seconds:.0f} s)")

        import duckdb

        with duckdb.connect(str(warehouse)) as conn:
            counts = load_sample_data(root).seed_warehouse(conn, end=end, tickets=args.tickets)
        print(
            f"Warehouse {warehouse.name} seeded: " + ", ".join(f"{t} {n:,} rows" for t, n in counts.items())
        )

        failed = []
        for run in demo_runs(end):
            stamp = run.logical_date.replace(tzinfo=UTC).isoformat()
            command = ["dags", "test", run.dag_id, stamp]
            if real_api:
                command += ["--conf", json.dumps(REAL_API_CONF)]
            log_path = logs / f"{run.dag_id}.log"
            print(f"\n$ airflow {' '.join(command)}    # {run.what}")
            code, seconds = airflow(command, env, log_path)
            print(f"  {'succeeded' if code == 0 else 'FAILED'} in {seconds:.0f} s (log: {log_path})")
            if code:
                failed.append(run.dag_id)
                print(tail(log_path))

        if emulator is not None:
            print(f"\n{EMULATED_ANSWERS_SHORT}")
        if "invoice_approval" not in failed:
            print("\nInvoices ready for approval (invoice_approval_results)\n")
            print(invoice_table(warehouse))
        if "support_ticket_triage" not in failed:
            print("\nSupport tickets triaged (support_ticket_triage_results)\n")
            print(triage_summary(warehouse))
        if "product_descriptions" not in failed:
            print("\nProduct copy (product_descriptions_results)\n")
            print(product_table(warehouse))
        for run in demo_runs(end):
            report = read_report(s3_endpoint, run.dag_id)
            if report is not None:
                print(f"\nRun report: {run.dag_id} ({STORAGE_ROOT}/{run.dag_id}/.../report.json)")
                print(describe_report(report, "" if real_api else "the emulator's fast clock"))
        if emulator is not None:
            stats = emulator.stats()
            print(
                f"\nEmulator: {stats.get('batches_created', 0)} batches, "
                f"{stats.get('requests_received', 0):,} requests received"
            )
    finally:
        if emulator is not None:
            emulator.stop()
        s3_server.stop()

    total = time.monotonic() - started
    if failed:
        print(f"\nDemo FAILED ({', '.join(failed)}) after {total:.0f} s")
        return 1
    print(f"\nDemo finished in {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
