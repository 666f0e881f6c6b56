"""Collect and validate throughput and peak memory.

Setup (not measured): the rows of ``bench_staging`` are staged (with a short system prompt, to
keep the emulator's memory small) and submitted to the emulator (its own process) as batches
of at most 100,000 requests, which it ends. The emulator writes each result as it is
downloaded, at a few thousand lines a second, so its speed would hide ours: the results are
downloaded once (the download-only figure) and then served again, byte for byte, by a small
replay server (its own process) that answers the two calls collect makes (retrieve the batch,
GET its ``results_url``). Measured, in a fresh interpreter (after a warm-up that pays pyarrow's
one-off pandas import, timed apart), for every shard: ``collect_results``
(stream the results over HTTP into raw JSONL and Parquet on a local-directory store) and
``validate_part`` (schema, rules, validated Parquet); once against the replay server and once
against the emulator itself. Sizes: 10,000 and 100,000 (``BENCH_SCALE=full``: 100,000 and
1,000,000). Run: ``python -m bench.bench_collect``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from bench.bench_staging import ticket_rows
from bench.common import (
    API_KEY,
    REPO,
    current_rss_mb,
    emulator_process,
    markdown_table,
    peak_rss_mb,
    row_counts,
    run_isolated,
    server_process,
    write_results,
)

RUN_ID = "collect"
RUNS = 3


def reset_peak_rss() -> None:
    """Start the peak resident memory (``VmHWM``) again from the current RSS (Linux)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def workload():
    import dataclasses

    from bench.bench_staging import workload as staging_workload

    return dataclasses.replace(staging_workload(), system_prompt="Triage the support ticket.")


def _client(emulator_url: str):
    import anthropic

    return anthropic.Anthropic(api_key=API_KEY, base_url=emulator_url, max_retries=2, timeout=600)


def prepare(emulator_url: str, root: str, count: int) -> dict:
    """Stage ``count`` rows and submit every shard; returns the batch ids (not measured)."""
    import orjson
    from claude_batch.staging import iter_shard_lines, stage_requests
    from claude_batch.storage import ObjectStore, RunLayout

    layout = RunLayout(ObjectStore(root), "bench", RUN_ID)
    manifest = stage_requests(
        ticket_rows(count), workload(), layout, key_field="ticket_id", cache_setting="off"
    )
    client = _client(emulator_url)
    batch_ids = []
    for shard in manifest.shards:
        requests = [orjson.loads(line) for line in iter_shard_lines(layout, shard)]
        batch_ids.append(client.messages.batches.create(requests=requests).id)
        del requests
    for batch_id in batch_ids:
        while client.messages.batches.retrieve(batch_id).processing_status != "ended":
            time.sleep(0.2)
    return {"batch_ids": batch_ids}


def measure_download(emulator_url: str, batch_ids: list[str], replay_dir: str) -> dict:
    """Download every batch's results once, saving them (and the batch) for the replay server."""
    import os

    client = _client(emulator_url)
    started = time.perf_counter()
    lines = size = 0
    for batch_id in batch_ids:
        batch = client.messages.batches.retrieve(batch_id)
        with open(os.path.join(replay_dir, f"{batch_id}.json"), "w") as handle:
            handle.write(batch.model_dump_json())
        with (
            client.messages.batches.with_streaming_response.results(batch_id) as response,
            open(os.path.join(replay_dir, f"{batch_id}.jsonl"), "wb") as handle,
        ):
            for chunk in response.iter_bytes(1 << 20):
                handle.write(chunk)
                size += len(chunk)
                lines += chunk.count(b"\n")
    return {"seconds": time.perf_counter() - started, "lines": lines, "bytes": size}


def serve_replay(replay_dir: str, port: int) -> None:
    """Answer ``GET /v1/messages/batches/{id}`` and its results from files (runs until killed)."""
    import json
    import os
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            parts = self.path.split("?")[0].strip("/").split("/")
            if len(parts) == 4 and parts[:3] == ["v1", "messages", "batches"]:
                with open(os.path.join(replay_dir, f"{parts[3]}.json")) as handle:
                    batch = json.load(handle)
                batch["results_url"] = f"http://127.0.0.1:{port}/v1/messages/batches/{parts[3]}/results"
                body = json.dumps(batch).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            path = os.path.join(replay_dir, f"{parts[3]}.jsonl")
            self.send_response(200)
            self.send_header("Content-Type", "application/x-jsonl")  # as the API and the emulator answer
            self.send_header("Content-Length", str(os.path.getsize(path)))
            self.end_headers()
            with open(path, "rb") as handle:
                while block := handle.read(1 << 20):
                    self.wfile.write(block)

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


def replay_process(replay_dir: str):
    """The replay server in its own process; yields its base URL."""
    import sys

    return server_process(
        lambda port: [
            sys.executable,
            "-c",
            f"from bench.bench_collect import serve_replay; serve_replay({replay_dir!r}, {port})",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def measure_collect(emulator_url: str, root: str, batch_ids: list[str]) -> dict:
    """Collect and validate every shard; time each stage (wall clock and CPU) and the peak memory."""
    # The package before pyarrow, as a DAG file imports it: it chooses Arrow's memory pool.
    import claude_batch  # noqa: F401
    import pyarrow as pa
    from claude_batch.results import collect_results
    from claude_batch.staging import read_manifest
    from claude_batch.storage import ObjectStore, RunLayout
    from claude_batch.validation import validate_part

    spec = workload()
    layout = RunLayout(ObjectStore(root), "bench", RUN_ID)
    manifest = read_manifest(layout)
    client = _client(emulator_url)
    # pyarrow imports pandas the first time it converts a Python list (0.2-0.4 s and 35 MB here):
    # a one-off cost of the process, timed apart so the rates are the stages' own.
    started = time.perf_counter()
    pa.array(["warm-up"])
    warm_up_seconds = time.perf_counter() - started
    baseline = current_rss_mb()
    collect_seconds = validate_seconds = collect_cpu = validate_cpu = 0.0
    collect_peak = validate_peak = 0.0
    lines = valid = 0
    for shard, batch_id in zip(manifest.shards, batch_ids, strict=True):
        reset_peak_rss()
        started, cpu = time.perf_counter(), time.process_time()
        summary = collect_results(client, layout, shard.part, batch_id, manifest=manifest)
        collect_seconds += time.perf_counter() - started
        collect_cpu += time.process_time() - cpu
        collect_peak = max(collect_peak, peak_rss_mb() - baseline)
        reset_peak_rss()
        started, cpu = time.perf_counter(), time.process_time()
        validated = validate_part(spec, layout, shard.part)
        validate_seconds += time.perf_counter() - started
        validate_cpu += time.process_time() - cpu
        validate_peak = max(validate_peak, peak_rss_mb() - baseline)
        lines += summary.lines
        valid += validated.by_status["valid"]
    return {
        "collect_seconds": collect_seconds,
        "validate_seconds": validate_seconds,
        "collect_cpu_seconds": collect_cpu,
        "validate_cpu_seconds": validate_cpu,
        "warm_up_seconds": warm_up_seconds,
        "lines": lines,
        "valid": valid,
        "collect_peak_mb": collect_peak,
        "validate_peak_mb": validate_peak,
        "peak_mb": max(collect_peak, validate_peak),
        "rss_mb": baseline + max(collect_peak, validate_peak),
        "arrow_pool": pa.default_memory_pool().backend_name,
    }


def main() -> None:
    rows = []
    for count in row_counts():
        root = tempfile.mkdtemp(prefix="bench-collect-")
        replay_dir = os.path.join(root, "replay")
        os.makedirs(replay_dir)
        try:
            with emulator_process(processing_seconds=1, time_scale=3600) as emulator_url:
                batch_ids = run_isolated(
                    "bench.bench_collect", "prepare", emulator_url=emulator_url, root=root, count=count
                )["batch_ids"]
                download = run_isolated(
                    "bench.bench_collect",
                    "measure_download",
                    emulator_url=emulator_url,
                    batch_ids=batch_ids,
                    replay_dir=replay_dir,
                )
                with replay_process(replay_dir) as replay_url:
                    runs = [
                        run_isolated(
                            "bench.bench_collect",
                            "measure_collect",
                            emulator_url=replay_url,
                            root=root,
                            batch_ids=batch_ids,
                        )
                        for _ in range(RUNS)
                    ]
                    load_average = os.getloadavg()[0]
                # Against the emulator itself only at the smaller sizes: it serves a few thousand
                # lines a second.
                end_to_end = (
                    run_isolated(
                        "bench.bench_collect",
                        "measure_collect",
                        emulator_url=emulator_url,
                        root=root,
                        batch_ids=batch_ids,
                    )
                    if count <= 100_000
                    else None
                )
        finally:
            shutil.rmtree(root, ignore_errors=True)
        # Rates from the run of median time; memory from the run that used the most.
        runs.sort(key=lambda run: run["collect_seconds"] + run["validate_seconds"])
        measured = runs[len(runs) // 2]
        peak = max(runs, key=lambda run: run["peak_mb"])
        assert all(run["lines"] == download["lines"] == count for run in runs)
        both = measured["collect_seconds"] + measured["validate_seconds"]
        rows.append(
            {
                "rows": count,
                "batches": len(batch_ids),
                "collect+validate rows/s": count / both,
                "collect rows/s": count / measured["collect_seconds"],
                "validate rows/s": count / measured["validate_seconds"],
                "collect+validate rows per CPU s": count
                / (measured["collect_cpu_seconds"] + measured["validate_cpu_seconds"]),
                "one-off import s": measured["warm_up_seconds"],
                "peak MB": peak["peak_mb"],
                "collect peak MB": peak["collect_peak_mb"],
                "validate peak MB": peak["validate_peak_mb"],
                "peak RSS MB": peak["rss_mb"],
                "results MB": download["bytes"] / 1e6,
                "emulator download-only rows/s": count / download["seconds"],
                "collect+validate from the emulator rows/s": (
                    count / (end_to_end["collect_seconds"] + end_to_end["validate_seconds"])
                    if end_to_end
                    else "-"
                ),
                "load average": load_average,
                "pool": measured["arrow_pool"],
            }
        )
    growth = rows[-1]["peak MB"] / max(rows[0]["peak MB"], 0.1)
    markdown = (
        "### Collect and validate: results streamed to JSONL + Parquet, then validated\n\n"
        + markdown_table(rows, [column for column in rows[0] if column != "pool"])
        + "\n\nPeak memory (above the RSS after imports) at "
        f"{rows[-1]['rows']:,} vs {rows[0]['rows']:,} rows: "
        f"{growth:.2f}x (targets: at most 40 MB above baseline at the smaller size, at most 1.2x that at "
        f"the larger; 50,000 rows/s or more). Each size is measured {RUNS} times, each in a fresh "
        "interpreter: the rates are the run of median time, the peaks the largest of the runs (collect's "
        "and validate's apart, "
        "each above the RSS after imports). Arrow's pool in these runs: "
        f"{rows[-1]['pool']}. Load average: the machine's 1-minute load after the runs. The first "
        "columns are against the replay server (the emulator's own results, served again from files); the "
        "last two show the emulator itself, which writes results at a few thousand lines a second. Rows per "
        "CPU second count this process's CPU (threads included), steadier than wall clock on a shared "
        "machine. The one-off import (pyarrow's first list conversion imports pandas) is timed apart."
    )
    write_results("collect", rows, markdown)


if __name__ == "__main__":
    main()
