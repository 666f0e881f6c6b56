"""``claude-batch``: the operator's command line over a pipeline's warehouse.

    claude-batch status   [--workload W]
        ledger counts, batches in flight, holders, last runs
    claude-batch runs     [--workload W] [--limit N]
        recent runs: outcomes, cost, saving, cache hits, duration
    claude-batch ledger   [--workload W] [--prompt-version V]
        items per status and prompt version
    claude-batch dead     [--workload W] [--search TEXT]
        dead and invalid items with their reasons
    claude-batch requeue  --workload W (--key K ... | --keys-file F | --reason TEXT | --all-dead) [--dry-run]
        put dead or invalid items back to retry
    claude-batch cost     [--workload W] [--days N]
        cost by day and workload

Every command takes ``--conn-id`` (default ``claude_batch_warehouse``, the pipeline's warehouse
connection) and ``--json`` (machine-readable output on stdout; tables otherwise). The connection
is looked up as ``airflow connections get`` does: ``AIRFLOW_CONN_*`` environment variables, the
configured secrets backends, then the metadata database. Bad input (an unknown workload, no such
connection, a prompt version that matches none) exits 2 with a message on stderr; a warehouse
that cannot be reached exits 1. No connection secret is ever printed.

The answers come from :mod:`claude_batch.ops`, which the Airflow UI page shares.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

from claude_batch.cli_text import (
    RENDERERS,
    STATUS_COLUMNS,
    _Right,
    duration,
    money,
    percent,
    render_cost,
    render_dead,
    render_ledger,
    render_requeue,
    render_runs,
    render_status,
    table,
)
from claude_batch.ops import Ops, OpsError, to_jsonable

# The default of PipelineConfig.warehouse_conn_id (a test keeps the two equal).
DEFAULT_WAREHOUSE_CONN_ID = "claude_batch_warehouse"
# How long a command waits for a DuckDB warehouse a task is using (seconds).
DEFAULT_LOCK_TIMEOUT = 60.0
_SECRET_EXTRA_WORDS = ("password", "secret", "token", "key")
# Connection types a pipeline uses that are not its warehouse (a likely --conn-id mix-up).
_NOT_WAREHOUSES = ("anthropic", "aws", "http", "smtp", "email", "slack", "fs")

# The tables and renderers (cli_text.py) stay importable from here.
__all__ = [
    "DEFAULT_LOCK_TIMEOUT",
    "DEFAULT_WAREHOUSE_CONN_ID",
    "RENDERERS",
    "STATUS_COLUMNS",
    "CliError",
    "_Right",
    "build_parser",
    "duration",
    "main",
    "money",
    "percent",
    "render_cost",
    "render_dead",
    "render_ledger",
    "render_requeue",
    "render_runs",
    "render_status",
    "table",
]


class CliError(Exception):
    """Bad input: said on stderr, exit status 2."""


# -- the parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--conn-id",
        default=DEFAULT_WAREHOUSE_CONN_ID,
        help=f"the warehouse's Airflow connection (default: {DEFAULT_WAREHOUSE_CONN_ID})",
    )
    common.add_argument("--json", action="store_true", help="print JSON (for scripts) instead of tables")
    common.add_argument(
        "--lock-timeout",
        type=float,
        default=DEFAULT_LOCK_TIMEOUT,
        metavar="SECONDS",
        help=f"wait this long for a DuckDB warehouse a task is using (default: {DEFAULT_LOCK_TIMEOUT:.0f})",
    )
    common.add_argument("--verbose", action="store_true", help="show Airflow's and the hooks' log lines")

    parser = argparse.ArgumentParser(
        prog="claude-batch",
        description="Look at and act on claude-batch pipelines: their ledger, runs and cost.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    status = commands.add_parser(
        "status", parents=[common], help="ledger counts, batches in flight, runs holding items, last runs"
    )
    status.add_argument("--workload", help="one workload (default: all)")

    runs = commands.add_parser("runs", parents=[common], help="recent runs: outcomes, cost, saving, duration")
    runs.add_argument("--workload", help="one workload (default: all)")
    runs.add_argument("--limit", type=_positive_int, default=20, help="how many runs (default: 20)")

    ledger = commands.add_parser("ledger", parents=[common], help="items per status and prompt version")
    ledger.add_argument("--workload", help="one workload (default: all)")
    ledger.add_argument("--prompt-version", help="one prompt version (or a unique prefix; needs --workload)")

    dead = commands.add_parser("dead", parents=[common], help="dead and invalid items with their reasons")
    dead.add_argument("--workload", help="one workload (default: all)")
    dead.add_argument(
        "--prompt-version",
        help="a prompt version (or a unique prefix; needs --workload; default: the current one)",
    )
    dead.add_argument("--search", help="text in the reason or the record key (case-insensitive)")
    dead.add_argument(
        "--status", choices=("dead", "invalid", "all"), default="all", help="which items (default: both)"
    )
    dead.add_argument("--limit", type=_positive_int, default=50, help="items listed (default: 50)")
    dead.add_argument("--offset", type=_non_negative_int, default=0, help="items skipped (paging)")

    requeue = commands.add_parser(
        "requeue",
        parents=[common],
        help="put dead or invalid items back to retry: the next run sends them again",
        description=(
            "Put dead or invalid items back to retry with fresh attempts, recorded in the ledger with who "
            "and when; the workload's next run extracts and sends them whatever its data interval. Items "
            "a run holds open are never touched. Fix the cause first (the source row, or what made the API "
            "refuse it)."
        ),
    )
    requeue.add_argument("--workload", required=True, help="the workload")
    requeue.add_argument(
        "--prompt-version", help="a prompt version (or a unique prefix; default: the current one)"
    )
    which = requeue.add_mutually_exclusive_group(required=True)
    which.add_argument("--key", action="append", dest="keys", metavar="KEY", help="a record key (repeatable)")
    which.add_argument("--keys-file", metavar="PATH", help="record keys, one a line ('-': standard input)")
    which.add_argument("--reason", help="every dead or invalid item whose reason contains this text")
    which.add_argument("--all-dead", action="store_true", help="every dead item of the prompt version")
    requeue.add_argument("--by", help="who asks, recorded in the ledger (default: cli:<your user name>)")
    requeue.add_argument("--dry-run", action="store_true", help="say what would be requeued; change nothing")

    cost = commands.add_parser("cost", parents=[common], help="cost by day and workload")
    cost.add_argument("--workload", help="one workload (default: all)")
    cost.add_argument(
        "--days", type=_positive_int, default=30, help="days back, today included (default: 30)"
    )
    return parser


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


# -- running a command ---------------------------------------------------------------------------


def main(
    argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None
) -> int:
    """Run one command; returns the exit status (0 done, 1 the warehouse failed, 2 bad input)."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    args = build_parser().parse_args(argv)
    secrets: list[str] = []
    try:
        with _server_context():
            result = _quietly(args.verbose, lambda: _run(args, secrets))
    except (CliError, OpsError) as exc:
        print(f"claude-batch: error: {_scrub(str(exc), secrets)}", file=err)
        return 2
    except Exception as exc:  # the warehouse or the driver: its words, without the connection's secrets
        print(f"claude-batch: error: {type(exc).__name__}: {_scrub(str(exc), secrets)}", file=err)
        return 1
    text = json.dumps(to_jsonable(result), indent=2) if args.json else RENDERERS[args.command](result, args)
    try:
        print(text, file=out)
        out.flush()
    except BrokenPipeError:  # `claude-batch dead | head`: the reader has what it wanted
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _run(args: argparse.Namespace, secrets: list[str]) -> Any:
    from claude_batch.connections import open_warehouse

    _lookup_connection(args.conn_id, secrets)
    keys = _read_keys(args) if args.command == "requeue" else None
    with open_warehouse(args.conn_id, timeout=args.lock_timeout) as warehouse:
        ops = Ops(warehouse)
        if args.command == "status":
            return ops.status(args.workload)
        if args.command == "runs":
            return ops.runs(args.workload, limit=args.limit)
        if args.command == "ledger":
            return ops.ledger_counts(args.workload, args.prompt_version)
        if args.command == "dead":
            statuses = ("dead", "invalid") if args.status == "all" else (args.status,)
            return ops.dead_items(
                args.workload, prompt_version=args.prompt_version, search=args.search, statuses=statuses,
                limit=args.limit, offset=args.offset,
            )  # fmt: skip
        if args.command == "requeue":
            return ops.requeue(
                args.workload, keys=keys, reason=args.reason, all_dead=args.all_dead,
                prompt_version=args.prompt_version, by=args.by or _default_by(), dry_run=args.dry_run,
            )  # fmt: skip
        if args.command == "cost":
            return ops.cost_by_day(args.workload, days=args.days)
    raise CliError(f"unknown command {args.command!r}")


def _lookup_connection(conn_id: str, secrets: list[str]) -> Any:
    """The Airflow connection, or a clear :class:`CliError`.

    Notes its secrets, to keep them out of messages.
    """
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        conn = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        raise CliError(
            f"no Airflow connection {conn_id!r} (looked in AIRFLOW_CONN_{conn_id.upper()}, the secrets "
            "backends and the metadata database): create it (see the README's connections section) "
            "or pass --conn-id"
        ) from None
    secrets += [value for value in (conn.password,) if value]
    with contextlib.suppress(Exception):
        secrets += [
            str(value)
            for name, value in conn.extra_dejson.items()
            if value and isinstance(value, str) and any(word in name.lower() for word in _SECRET_EXTRA_WORDS)
        ]
    if conn.conn_type in _NOT_WAREHOUSES:
        raise CliError(
            f"connection {conn_id!r} is of type {conn.conn_type!r}, not a warehouse "
            f"(duckdb, duckdb_aws, postgres or another common.sql type)"
        )
    return conn


def _read_keys(args: argparse.Namespace) -> list[str] | None:
    if args.keys:
        return list(args.keys)
    if not args.keys_file:
        return None
    try:
        if args.keys_file == "-":
            lines = sys.stdin.read().splitlines()
        else:
            with open(args.keys_file, encoding="utf-8") as handle:
                lines = handle.read().splitlines()
    except OSError as exc:
        raise CliError(f"cannot read keys from {args.keys_file}: {exc.strerror}") from None
    keys = [line for line in lines if line != ""]  # spaces are part of a key: only empty lines are dropped
    if not keys:
        raise CliError(f"no keys in {args.keys_file}")
    return keys


def _default_by() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no user name in this environment
        user = "unknown"
    return f"cli:{user}"


@contextlib.contextmanager
def _server_context() -> Iterator[None]:
    """Look connections up as Airflow's own CLI does (``airflow connections get``).

    Outside a task the Task SDK reads only environment variables (and secrets backends); with
    ``_AIRFLOW_PROCESS_CONTEXT=server`` it reads the metadata database too, as the API server does.
    """
    previous = os.environ.get("_AIRFLOW_PROCESS_CONTEXT")
    os.environ["_AIRFLOW_PROCESS_CONTEXT"] = "server"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("_AIRFLOW_PROCESS_CONTEXT", None)
        else:
            os.environ["_AIRFLOW_PROCESS_CONTEXT"] = previous


def _quietly(verbose: bool, body: Callable[[], Any]) -> Any:
    """``body()`` with Airflow's and the hooks' log lines off (they go to stdout), as Airflow's own
    CLI commands run (``suppress_logs_and_warning``), unless ``--verbose``."""
    if verbose:
        return body()
    from airflow.utils.cli import suppress_logs_and_warning

    outcome: dict[str, Any] = {}

    @suppress_logs_and_warning
    def call(_args: argparse.Namespace) -> None:
        outcome["result"] = body()

    call(argparse.Namespace(verbose=False))
    return outcome["result"]


def _scrub(text: str, secrets: Sequence[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 3:
            text = text.replace(secret, "***")
    return text


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
