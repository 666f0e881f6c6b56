"""Run every benchmark under bench/ and gather their tables into bench/RESULTS.md.

``make bench`` runs the small sizes (minutes); ``make soak`` sets BENCH_SCALE=full.
A benchmark that fails is reported in the file, and the command exits non-zero.
"""

from __future__ import annotations

import importlib
import platform
import sys
import time
import traceback
from datetime import UTC, datetime

from bench.common import REPO, RESULTS, scale

BENCHMARKS = [
    "bench.bench_fault_matrix",
    "bench.bench_submit",
    "bench.bench_queue",
    "bench.bench_end_to_end",
    "bench.bench_trigger",
    "bench.bench_staging",
    "bench.bench_collect",
    "bench.bench_load",
    "bench.bench_emulator_memory",
    "bench.bench_emulator_speed",
    "bench.bench_caching",
]


def main(argv: list[str]) -> int:
    """Run every benchmark, or with ``--gather`` only collect the tables the last runs wrote."""
    gather_only = "--gather" in argv
    sections, failed = [], []
    for name in BENCHMARKS:
        if not (REPO / (name.replace(".", "/") + ".py")).exists():
            continue
        started = time.perf_counter()
        if not gather_only:
            print(f"== {name}", flush=True)
            try:
                importlib.import_module(name).main()
            except Exception:
                failed.append(name)
                sections.append(f"### {name}: FAILED\n\n```\n{traceback.format_exc()[-2000:]}\n```")
                continue
        stem = name.rsplit(".", 1)[1].removeprefix("bench_")
        table = RESULTS / f"{stem}.md"
        body = table.read_text() if table.exists() else "(no table written)"
        took = "" if gather_only else f", {time.perf_counter() - started:.0f} s"
        sections.append(f"{body}\n_{name}{took}_")
    header = (
        f"# Benchmark results\n\nScale `{scale()}`, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"Python {platform.python_version()}, {platform.machine()}, 2 cores. "
        "Re-run with `make bench` (or `make soak` for the full sizes).\n"
    )
    (REPO / "bench" / "RESULTS.md").write_text(header + "\n" + "\n\n".join(sections) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
