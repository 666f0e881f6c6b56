"""Shared benchmark plumbing: servers in their own processes, fresh-process measurements."""

from __future__ import annotations

import json
import os
import re
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
BIN = Path(sys.executable).parent
API_KEY = "sk-ant-bench-emulator-key-0123456789"


def scale() -> str:
    """``small`` (default, minutes) or ``full`` (the sizes the issues name)."""
    return os.environ.get("BENCH_SCALE", "small")


def row_counts() -> tuple[int, ...]:
    """The row counts the data-path benchmarks run: the issue's sizes at full scale."""
    return (100_000, 1_000_000) if scale() == "full" else (10_000, 100_000)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def emulator_process(**options: object) -> Iterator[str]:
    """The emulator in its own process (its memory is not ours); yields its base URL."""
    args = [str(BIN / "claude-batch-emulator"), "--host", "127.0.0.1", "--port", "0", "--api-key", API_KEY]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:\d+", line)
        if not match:
            raise RuntimeError(f"emulator did not start: {line!r}")
        yield match.group(0)
    finally:
        proc.terminate()
        proc.wait(10)


@contextmanager
def server_process(command_for_port, **popen_options: object) -> Iterator[str]:
    """A server in its own process on a free loopback port; yields its base URL.

    :param command_for_port: ``port -> argv`` of the server to start.
    """
    port = _free_port()
    proc = subprocess.Popen(
        command_for_port(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen_options
    )
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def postgres_up(host: str = "127.0.0.1", port: int = 5432) -> bool:
    """Whether PostgreSQL listens on loopback (the benchmarks' PostgreSQL rows need it)."""
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def moto_process():
    """A moto S3 server in its own process; yields its endpoint URL."""
    return server_process(lambda port: [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)])


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MB.

    Read from ``VmHWM``, not ``getrusage``: Linux carries ``ru_maxrss`` over fork and exec, so
    a benchmark started by a large parent (``make bench`` after the fault matrix) would report
    the parent's peak as its own.
    """
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def cpu_seconds() -> float:
    """User plus system CPU time of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_isolated(module: str, function: str, **kwargs: object) -> dict:
    """Run ``module.function(**kwargs)`` in a fresh interpreter; it returns a JSON-able dict."""
    code = (
        "import json, sys, importlib; "
        f"result = getattr(importlib.import_module({module!r}), {function!r})(**json.loads(sys.argv[1])); "
        "print('@@RESULT@@' + json.dumps(result))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(kwargs)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    for line in out.stdout.splitlines():
        if line.startswith("@@RESULT@@"):
            return json.loads(line[len("@@RESULT@@") :])
    raise RuntimeError(f"{module}.{function} failed:\n{out.stderr[-3000:]}")


def write_results(name: str, rows: list[dict], markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps({"scale": scale(), "rows": rows}, indent=2))
    (RESULTS / f"{name}.md").write_text(markdown + "\n")
    print(markdown)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(col, "")) for col in columns) + " |")
    return "\n".join(lines)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.2f}" if value < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
