"""``make ui``: a local Airflow to click through, on loopback, with the demo's warehouse; Ctrl-C stops it all.

    python -m claude_batch.devstack [--port 8080] [--home .airflow/ui] [--tickets 3000] [--no-run]

What it starts, fresh each time under ``.airflow/ui/`` in the repository (the previous one is
removed: the emulator and S3 live in memory, so nothing of an old stack would still hold):

- the Claude API emulator (this process, fast emulated time) and a moto S3 server, as ``make demo``;
- a DuckDB warehouse seeded from ``include/sample_data/`` as ``make demo`` seeds it;
- Airflow's own components as processes: ``api-server``, ``scheduler``, ``dag-processor`` and
  ``triggerer``, with the LocalExecutor (tasks run as the scheduler's children) on a SQLite
  metadata database, the project's ``dags/`` parsed, the ``claude_batch`` pool made;
- two users of the simple auth manager: ``admin`` (may do anything) and ``viewer`` (may read,
  not trigger or requeue), with passwords made for this start and printed.

Once every component is healthy and the DAGs are parsed it prints the URL and the logins, and
(unless ``--no-run``) unpauses ``support_ticket_triage``, whose scheduled run for the latest day
(the seeded tickets of yesterday) then starts, so that the Claude Batches page has a run to show
a minute later. The other DAGs stay paused, as Airflow leaves new DAGs, until you toggle them.
Each component logs to ``<home>/logs/<component>.log``. Ctrl-C (or SIGTERM) stops every
component (their children too) and the emulator and S3 server.

SQLite and the LocalExecutor, not PostgreSQL: this must come up on a machine with nothing but
the clone (``airflow standalone`` makes the same choice); Airflow 3.3 runs the LocalExecutor on
SQLite. The full-stack tests (``tests/fullstack/stack.py``) run the same components on
PostgreSQL, Redis and Celery, with the pieces below shared.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from claude_batch.airflow_api import (
    AirflowApi,
    StackError,
    wait_for,
    wait_until_healthy,
    wait_until_parsed,
)

AIRFLOW_BIN = Path(sys.executable).parent / "airflow"
ADMIN_USER, VIEWER_USER = "admin", "viewer"
POOL = "claude_batch"  # PipelineConfig.pool's default
POOL_SLOTS = 4
FIRST_RUN_DAG = "support_ticket_triage"
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")

# The full-stack tests import the REST client and the waits from here (airflow_api.py holds them).
__all__ = [
    "ADMIN_USER",
    "AIRFLOW_BIN",
    "COMPONENTS",
    "FIRST_RUN_DAG",
    "POOL",
    "POOL_SLOTS",
    "VIEWER_USER",
    "AirflowApi",
    "Component",
    "DevStack",
    "StackError",
    "airflow_components",
    "check_alive",
    "free_port",
    "init_metadata",
    "main",
    "parse_args",
    "run_airflow",
    "server_settings",
    "stop_all",
    "wait_for",
    "wait_until_healthy",
    "wait_until_parsed",
    "write_users",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- processes ------------------------------------------------------------------------------


@dataclass
class Component:
    """One Airflow process; ``start`` again after ``stop`` appends to the same log.

    :param env: its environment (None: this process's).
    :param cwd: its working directory (None: this process's).
    """

    name: str
    argv: list[str]
    env: dict[str, str] | None
    log_path: Path
    cwd: Path | None = None
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
        # triggerer's runner) share its process group, which the teardown can then clean up;
        # and a Ctrl-C in the terminal reaches only the launcher, which stops them in order.
        self.process = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
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


def check_alive(components: Iterable[Component]) -> None:
    """Raise, with the log's tail, when a component stopped by itself."""
    for component in components:
        if component.process is not None and component.process.poll() is not None:
            raise StackError(
                f"{component.name} exited with {component.process.returncode}; its log "
                f"({component.log_path}) ends:\n{component.tail()}"
            )


def airflow_components(
    env: dict[str, str], api_port: int, logs: Path, cwd: Path | None = None
) -> dict[str, Component]:
    """The api-server, scheduler, dag-processor and triggerer, as a deployment runs them (not started)."""
    airflow = str(AIRFLOW_BIN)
    argvs = {
        "api-server": [
            airflow,
            "api-server",
            "--host",
            "127.0.0.1",
            "--port",
            str(api_port),
            "--workers",
            "1",
        ],
        "scheduler": [airflow, "scheduler"],
        "dag-processor": [airflow, "dag-processor"],
        # Airflow's log servers bind every interface (no host setting); every component here
        # shares one log folder, from which the API server reads task and trigger logs.
        "triggerer": [airflow, "triggerer", "--skip-serve-logs"],
    }
    return {name: Component(name, argv, env, logs / f"{name}.log", cwd) for name, argv in argvs.items()}


def run_airflow(
    env: dict[str, str], *args: str, log_path: Path, cwd: Path | None = None, timeout: float = 300.0
) -> None:
    """A one-shot ``airflow`` command (an init step), logged; raises on failure."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(f"\n===== airflow {' '.join(args)} =====\n".encode())
        log.flush()
        done = subprocess.run(
            [str(AIRFLOW_BIN), *args], env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
        )
    if done.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
        raise StackError(f"`airflow {' '.join(args)}` failed ({done.returncode}):\n{tail}")


def init_metadata(env: dict[str, str], log_path: Path, cwd: Path | None = None) -> None:
    """What a deployment's init job does: migrate the metadata database, make the submissions' pool."""
    run_airflow(env, "db", "migrate", log_path=log_path, cwd=cwd)
    run_airflow(
        env, "pools", "set", POOL, str(POOL_SLOTS),
        "claude-batch submissions (sized for the API's batch queue)", log_path=log_path, cwd=cwd,
    )  # fmt: skip


# -- configuration --------------------------------------------------------------------------


def write_users(home: Path, users: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Simple-auth-manager users with a fresh password each.

    :param users: user name -> role (``admin``, ``op``, ``user``, ``viewer``).
    :returns: the settings naming them and their password file, and the passwords.
    """
    passwords = {name: secrets.token_urlsafe(12) for name in users}
    password_file = home / "simple_auth_manager_passwords.json"
    password_file.write_text(json.dumps(passwords))
    settings = {
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(
            f"{name}:{role}" for name, role in users.items()
        ),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(password_file),
    }
    return settings, passwords


def server_settings(
    *, home: Path, metadata_url: str, api_port: int, bundles: Sequence[tuple[str, Path]]
) -> dict[str, str]:
    """The settings every component shares, as a deployment shares one configuration."""
    from cryptography.fernet import Fernet

    api_url = f"http://127.0.0.1:{api_port}"
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api_url}/execution/",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url,
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__API__BASE_URL": api_url,
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
        # Every process signs or checks task and UI tokens with the same secret.
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
        # Parse once at start and rarely after: the DAG files do not change meanwhile, and
        # re-parsing every 30 s costs CPU the tasks need.
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "600",
        "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
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
        # The scheduler and triggerer handle the DAGs' deadline alert as a deployment does.
        "CLAUDE_BATCH_DEADLINE_HOURS": "20",
    }


# -- make ui ----------------------------------------------------------------------------------


@dataclass
class DevStack:
    """What ``make ui`` runs: the components, their REST client, and what to print."""

    home: Path
    url: str
    passwords: dict[str, str]
    components: dict[str, Component] = field(default_factory=dict)
    api: AirflowApi | None = None

    def check_alive(self) -> None:
        check_alive(self.components.values())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m claude_batch.devstack", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("CLAUDE_BATCH_UI_PORT", "8080")),
                        help="the API server's port on 127.0.0.1 "
                        "(default 8080; 0: any free port)")  # fmt: skip
    parser.add_argument("--home", type=Path, default=None, help="the stack's directory (default .airflow/ui)")
    parser.add_argument("--tickets", type=int, default=3000, help="support tickets to seed (over 3 days)")
    parser.add_argument(
        "--no-run", action="store_true", help=f"leave {FIRST_RUN_DAG} paused (no run) once up"
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the stack to be up")
    parser.add_argument(
        "--exit-when-ready", action="store_true", help="stop again once up (to time the start)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from claude_batch import demo

    started = time.monotonic()
    args = parse_args(argv)
    root = demo.repo_root()
    home = (args.home or root / ".airflow" / "ui").resolve()
    shutil.rmtree(home, ignore_errors=True)
    logs = home / "logs"
    logs.mkdir(parents=True)
    warehouse = home / "warehouse.duckdb"
    port = args.port or free_port()
    if not _port_free(port):
        print(f"Port {port} on 127.0.0.1 is in use: pass --port (make ui PORT=...) or stop what holds it.")
        return 2
    end = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)

    print(f"claude-batch UI stack in {home}")
    s3_server, s3_endpoint = demo.start_s3()
    emulator_key = f"sk-emulator-{secrets.token_hex(12)}"
    emulator = demo.start_emulator(emulator_key)
    stack: DevStack | None = None
    stopping = {"signal": False}

    def on_term(signum: int, frame: Any) -> None:  # SIGTERM: as Ctrl-C
        stopping["signal"] = True
        raise KeyboardInterrupt

    previous_term = signal.signal(signal.SIGTERM, on_term)
    try:
        print(f"Claude: the emulator at {emulator.base_url} (answers are the emulator's, not a model's)")
        print(f"S3: moto at {s3_endpoint}, storage root {demo.STORAGE_ROOT}")
        claude = {"conn_type": "anthropic", "host": emulator.base_url, "password": emulator_key}
        env = demo.airflow_env(home, root, warehouse, s3_endpoint, claude)
        users, passwords = write_users(home, {ADMIN_USER: "admin", VIEWER_USER: "viewer"})
        env.update(users)
        env.update(
            server_settings(
                home=home, metadata_url=f"sqlite:///{home / 'airflow.db'}", api_port=port,
                bundles=[("dags-folder", root / "dags")],
            )
        )  # fmt: skip
        env.update({"AIRFLOW__CORE__EXECUTOR": "LocalExecutor", "CLAUDE_BATCH_MIN_POLL_SECONDS": "1"})

        import duckdb

        with duckdb.connect(str(warehouse)) as conn:
            counts = demo.load_sample_data(root).seed_warehouse(conn, end=end, tickets=args.tickets)
        print(f"Warehouse {warehouse} seeded: " + ", ".join(f"{t} {n:,} rows" for t, n in counts.items()))
        init_metadata(env, logs / "init.log", cwd=root)
        print(f"Airflow metadata database ready ({time.monotonic() - started:.0f} s)")

        stack = DevStack(home, f"http://127.0.0.1:{port}", passwords)
        stack.components = airflow_components(env, port, logs, cwd=root)
        stack.api = AirflowApi(stack.url, ADMIN_USER, passwords[ADMIN_USER])
        for component in stack.components.values():
            component.start()
        wait_until_healthy(stack.api, args.timeout, stack.check_alive)
        dag_ids = [run.dag_id for run in demo.demo_runs(end)]
        # Left paused, as Airflow makes new DAGs: unpausing one starts its run for the latest day.
        wait_until_parsed(stack.api, dag_ids, args.timeout, stack.check_alive, unpause=False)
        ready = time.monotonic() - started
        print(
            f"\nAirflow is up after {ready:.0f} s: {stack.url}\n"
            f"  log in as {ADMIN_USER} / {passwords[ADMIN_USER]}   "
            f"(or {VIEWER_USER} / {passwords[VIEWER_USER]}: may read, not run or requeue)\n"
            f"  the Claude Batches page: {stack.url}/plugin/claude-batch   "
            '(the navigation\'s "Claude Batches")\n'
            f"  component logs: {logs}"
        )
        if not args.no_run:
            stack.api.unpause(FIRST_RUN_DAG)
            print(
                f"  unpaused {FIRST_RUN_DAG}: its nightly run over the seeded tickets of "
                f"{end - timedelta(days=1):%Y-%m-%d} starts now; its cost shows on the page when it ends "
                "(the other DAGs wait for your toggle)"
            )
        if args.exit_when_ready:
            return 0
        print("\nCtrl-C stops it all.")
        while True:
            stack.check_alive()
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("\nStopping ..." if not stopping["signal"] else "\nStopping (SIGTERM) ...")
        return 0
    except StackError as exc:
        print(f"\nThe stack did not come up: {exc}")
        return 1
    finally:
        if stack is not None:
            exited = stop_all(stack.components.values())
            print("Stopped: " + ", ".join(f"{name} ({seconds:.0f} s)" for name, seconds in exited.items()))
        emulator.stop()
        s3_server.stop()
        signal.signal(signal.SIGTERM, previous_term)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


if __name__ == "__main__":
    sys.exit(main())
