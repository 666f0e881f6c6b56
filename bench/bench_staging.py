"""Staging throughput and peak memory against the floor: the same rows written with orjson.

Each measurement runs in a fresh interpreter: rows are generated on the fly (support tickets
of 300 to 900 characters), rendered into requests and streamed to shards on a local-directory
store; the floor serialises the same rows with orjson to a local file. Both first process 1,000
rows untimed, so one-time costs (pyarrow's lazy imports, about 0.25 s) stay out of the rate
(their memory counts). Peak memory is the
process's peak RSS minus its RSS after imports, before the warm-up; the table also shows the
peak RSS itself. The floor and staging run in turn, five times each (so both see the same
machine, which may be shared); the table shows the run of median time of each, and
``staging / floor`` is the median of the five pairs' ratios. Sizes: 10,000 and 100,000 rows
(``BENCH_SCALE=full``: 100,000 and 1,000,000). Run: ``python -m bench.bench_staging``.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from typing import Literal

from bench.common import (
    cpu_seconds,
    current_rss_mb,
    markdown_table,
    peak_rss_mb,
    row_counts,
    run_isolated,
    write_results,
)

WARM_UP_ROWS = 1_000
RUNS = 5
SENTENCES = (
    "I was charged twice for my subscription this month and need a refund.",
    "The app crashes every time I open the settings page on Android 14.",
    "Could you add an export to CSV for the monthly usage report?",
    "Our invoice INV-20931 lists 14 seats but we only have 9 active users.",
    "Login fails with error 500 since this morning, for the whole team.",
    "Thanks for the quick help last week, everything works fine now.",
    "The delivery was late by three days and the box was damaged.",
    "Please update the billing address on our account to the new office.",
    "Search results are empty when the query contains an apostrophe.",
    "We would like to upgrade to the annual plan if there is a discount.",
)
SYSTEM_PROMPT = (
    "You are a support triage assistant for a software company. Read the customer's ticket and "
    "classify it. Categories: billing (charges, refunds, invoices, plans), bug (crashes, errors, "
    "broken features), feature_request (asks for something new), shipping (deliveries), other. "
    "Priority is 1 (lowest) to 5 (urgent): outages and security issues are 5, money problems 4, "
    "broken features 3, questions 2, thanks and feedback 1. Write a one-sentence summary in plain "
    "English without personal data. Set needs_refund when the customer asks for money back. "
) * 2


def workload():
    from claude_batch.workloads import Rule, Workload
    from pydantic import BaseModel, Field

    class Triage(BaseModel):
        category: Literal["billing", "bug", "feature_request", "shipping", "other"]
        priority: int = Field(ge=1, le=5)
        summary: str
        needs_refund: bool

    return Workload(
        name="ticket_triage",
        system_prompt=SYSTEM_PROMPT,
        user_template="Ticket {ticket_id} from {customer}\nSubject: {subject}\n\n{body}",
        model="claude-haiku-4-5",
        max_tokens=256,
        output_schema=Triage,
        rules=(Rule("escalate", lambda out: out.priority >= 4),),
        cache="off",
    )


def ticket_rows(count: int) -> Iterator[dict]:
    """Deterministic ticket rows as an extract yields them."""
    n = len(SENTENCES)
    for i in range(count):
        body = " ".join(SENTENCES[(i * 7 + j * 3) % n] for j in range(4 + i % 9))
        yield {
            "ticket_id": f"T{i:09d}",
            "customer": f"customer-{i % 5000}",
            "subject": SENTENCES[i % n][:40],
            "body": body,
            "created_at": f"2026-01-01T{i % 24:02d}:{i % 60:02d}:00",
        }


def measure_floor(count: int) -> dict:
    """The same rows serialised with orjson to a local file."""
    import orjson

    def write_floor(path: str, rows: int) -> None:
        with open(path, "wb") as handle:
            for row in ticket_rows(rows):
                handle.write(orjson.dumps(row) + b"\n")

    baseline = current_rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        write_floor(os.path.join(tmp, "warm-up.jsonl"), WARM_UP_ROWS)
        path = os.path.join(tmp, "floor.jsonl")
        started, cpu_started = time.perf_counter(), cpu_seconds()
        write_floor(path, count)
        seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
        size = os.path.getsize(path)
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "bytes": size,
        "peak_mb": peak_rss_mb() - baseline,
        "rss_mb": peak_rss_mb(),
    }


def measure_staging(count: int) -> dict:
    """Stage the rows into shards (local-directory store) and write the manifest."""
    from claude_batch.staging import stage_requests
    from claude_batch.storage import ObjectStore, RunLayout

    spec = workload()
    _ = spec.prompt_version, spec.prefix_tokens
    baseline = current_rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        warm_up = RunLayout(ObjectStore(tmp), "bench", "warm-up")
        stage_requests(ticket_rows(WARM_UP_ROWS), spec, warm_up, key_field="ticket_id", cache_setting="1h")
        layout = RunLayout(ObjectStore(tmp), "bench", "staging")
        started, cpu_started = time.perf_counter(), cpu_seconds()
        manifest = stage_requests(ticket_rows(count), spec, layout, key_field="ticket_id", cache_setting="1h")
        seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    assert manifest.staged_requests == count, manifest.rejected_by_reason
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "bytes": sum(shard.bytes for shard in manifest.shards),
        "shards": len(manifest.shards),
        "peak_mb": peak_rss_mb() - baseline,
        "rss_mb": peak_rss_mb(),
    }


def median_runs(count: int) -> tuple[dict, dict, float]:
    """The floor's and staging's runs of median time, and the median ratio of ``RUNS`` pairs run in turn."""
    floors, stagings = [], []
    for _ in range(RUNS):
        floors.append(run_isolated("bench.bench_staging", "measure_floor", count=count))
        stagings.append(run_isolated("bench.bench_staging", "measure_staging", count=count))
    ratios = sorted(
        floor["seconds"] / staged["seconds"] for floor, staged in zip(floors, stagings, strict=True)
    )
    floors.sort(key=lambda run: run["seconds"])
    stagings.sort(key=lambda run: run["seconds"])
    return floors[RUNS // 2], stagings[RUNS // 2], ratios[RUNS // 2]


def main() -> None:
    rows = []
    for count in row_counts():
        floor, staged, ratio = median_runs(count)
        rows.append(
            {
                "rows": count,
                "staging rows/s": count / staged["seconds"],
                "floor rows/s": count / floor["seconds"],
                "staging / floor": ratio,
                "staging CPU us/row": staged["cpu_seconds"] / count * 1e6,
                "floor CPU us/row": floor["cpu_seconds"] / count * 1e6,
                "staging MB/s": staged["bytes"] / 1e6 / staged["seconds"],
                "floor MB/s": floor["bytes"] / 1e6 / floor["seconds"],
                "staging MB written": staged["bytes"] / 1e6,
                "shards": staged["shards"],
                "staging peak MB": staged["peak_mb"],
                "staging peak RSS MB": staged["rss_mb"],
                "floor peak MB": floor["peak_mb"],
                "load average": os.getloadavg()[0],
            }
        )
    growth = rows[-1]["staging peak MB"] / max(rows[0]["staging peak MB"], 0.1)
    markdown = (
        "### Staging: rows rendered into request shards vs the orjson floor\n\n"
        + markdown_table(rows, list(rows[0]))
        + "\n\nPeak memory (above the RSS after imports) at "
        f"{rows[-1]['rows']:,} vs {rows[0]['rows']:,} rows: "
        f"{growth:.2f}x (targets: under 400 MB at 1,000,000 rows, at most 1.2x the 100,000 figure; "
        "throughput at least half the floor's rows/s). Each request repeats the system prompt and the "
        "schema, so staging writes several times the floor's bytes: MB/s shows that side. CPU us/row is "
        "user + system time of the whole process (staging hashes and writes on a second thread, so on a "
        "busy machine, where that thread finds no free core, the ratio falls towards the CPU ratio). Load "
        "average: the machine's 1-minute load after the row's runs."
    )
    write_results("staging", rows, markdown)


if __name__ == "__main__":
    main()
