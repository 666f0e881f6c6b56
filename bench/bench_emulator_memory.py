"""Emulator memory and speed while it holds one big batch (100,000 requests, ~200 MB body).

The emulator runs in its own process (``claude-batch-emulator``); this script posts one batch,
samples the emulator's RSS (psutil, every 20 ms) while the body is uploaded and parsed, while
it holds the batch, and while the results are streamed back; it also times the create and the
download. Two request shapes:

- ``shared``: a ~1.1 KB system prompt with cache_control, identical in every request (the
  normal batch workload), plus a unique ~0.5 KB ticket: ~2.1 KB per request;
- ``unique``: every request carries ~1.9 KB of its own text (the worst case for the emulator,
  which then must keep all of it): ~2.3 KB per request.

    python -m bench.bench_emulator_memory            # BENCH_SCALE=small: 20,000 requests
    BENCH_SCALE=full python -m bench.bench_emulator_memory   # 100,000 requests
    python -m bench.bench_emulator_memory --requests 100000
"""

from __future__ import annotations

import argparse
import random
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import orjson
import psutil

from bench.common import markdown_table, scale, write_results

API_KEY = "sk-ant-bench-emulator-key-0123456789"
HEADERS = {"x-api-key": API_KEY, "anthropic-version": "2023-06-01", "content-type": "application/json"}
BIN = Path(sys.executable).parent
MB = 1 << 20

_WORDS = (
    "order invoice refund charged twice account login password crash error app screen payment card "
    "delivery package late support please help thanks urgent broken feature request export report data "
    "customer billing cycle subscription plan upgrade downgrade cancel renewal receipt tax amount total"
).split()


class RssSampler:
    """Samples one process's RSS in a thread; ``peak`` since the last ``restart``."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def current(self) -> int:
        return self.process.memory_info().rss

    def cpu_seconds(self) -> float:
        """CPU time the process has used (user + system): unlike wall time, not inflated by other load."""
        times = self.process.cpu_times()
        return times.user + times.system

    def restart(self) -> None:
        self.peak = self.current()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def emulator(**options: object):
    args = [str(BIN / "claude-batch-emulator"), "--host", "127.0.0.1", "--port", "0", "--api-key", API_KEY]
    for key, value in options.items():
        flag = f"--{key.replace('_', '-')}"
        args += [flag] if value is True else [flag, str(value)]  # True: a flag without a value
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        match = re.search(r"http://[\d.]+:\d+", proc.stdout.readline())
        if not match:
            raise RuntimeError("emulator did not start")
        yield proc.pid, match.group(0)
    finally:
        proc.terminate()
        proc.wait(10)


def body_chunks(body: bytes, size: int = 1 << 20):
    """The body as 1 MB pieces (sent chunked, as the pipeline streams a shard): httpx sending one
    200 MB ``bytes`` body spends about 2.5 s of its own CPU, which would be counted as the create's."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


def build_body(count: int, shape: str) -> bytes:
    """The create body, built the way a client would send it (one JSON document)."""
    rng = random.Random(7)
    sentences = [" ".join(rng.choices(_WORDS, k=12)).capitalize() + "." for _ in range(2000)]
    system = [{"type": "text", "text": " ".join(sentences[:13]), "cache_control": {"type": "ephemeral"}}]
    schema = {
        "type": "object",
        "properties": {
            "category": {"type": "string", "enum": ["billing", "bug", "account", "shipping", "other"]},
            "priority": {"type": "integer", "minimum": 1, "maximum": 5},
            "summary": {"type": "string", "maxLength": 120},
        },
        "required": ["category", "priority", "summary"],
        "additionalProperties": False,
    }
    sentences_per_request = 6 if shape == "shared" else 22
    requests = []
    for index in range(count):
        text = f"Ticket {index}: " + " ".join(rng.choices(sentences, k=sentences_per_request))
        params = {
            "model": "claude-haiku-4-5",
            "max_tokens": 256,
            "messages": [{"role": "user", "content": text}],
            "output_config": {"format": {"type": "json_schema", "schema": schema}},
        }
        if shape == "shared":
            params["system"] = system
        requests.append({"custom_id": f"ticket-{index:07d}", "params": params})
    return orjson.dumps({"requests": requests})


def measure(count: int, shape: str) -> dict:
    body = build_body(count, shape)
    row: dict = {"shape": shape, "requests": count, "body_mb": len(body) / MB}
    with emulator(time_scale=1000, processing_seconds=5) as (pid, base_url):
        sampler = RssSampler(pid)
        client = httpx.Client(base_url=base_url, headers=HEADERS, timeout=600)
        try:
            time.sleep(0.3)
            row["idle_rss_mb"] = sampler.current() / MB
            sampler.restart()
            started, cpu_before = time.perf_counter(), sampler.cpu_seconds()
            response = client.post("/v1/messages/batches", content=body_chunks(body))
            response.raise_for_status()
            row["create_s"] = time.perf_counter() - started
            row["create_cpu_s"] = sampler.cpu_seconds() - cpu_before
            row["create_peak_rss_mb"] = sampler.peak / MB
            del body
            batch_id = response.json()["id"]
            while client.get(f"/v1/messages/batches/{batch_id}").json()["processing_status"] != "ended":
                time.sleep(0.05)
            time.sleep(0.3)
            row["holding_rss_mb"] = sampler.current() / MB
            sampler.restart()
            started, cpu_before = time.perf_counter(), sampler.cpu_seconds()
            lines = size = 0
            with client.stream("GET", f"/v1/messages/batches/{batch_id}/results") as stream:
                for line in stream.iter_lines():
                    lines += 1
                    size += len(line) + 1
            row["results_s"] = time.perf_counter() - started
            row["results_cpu_s"] = sampler.cpu_seconds() - cpu_before
            row["results_mb"] = size / MB
            row["results_peak_rss_mb"] = sampler.peak / MB
            if lines != count:
                raise RuntimeError(f"expected {count} result lines, got {lines}")
        finally:
            client.close()
            sampler.stop()
    return row


def measure_list_page(batches: int = 1000, rounds: int = 20) -> dict:
    """Time one list call returning a page of ``batches`` in-progress batches (the poller's call)."""
    params = {"model": "claude-haiku-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    body = orjson.dumps({"requests": [{"custom_id": "r0", "params": params}]})
    with (
        emulator(processing_seconds=86_400) as (_pid, base_url),
        httpx.Client(base_url=base_url, headers=HEADERS) as client,
    ):
        for _ in range(batches):
            client.post("/v1/messages/batches", content=body).raise_for_status()
        timings = []
        for _ in range(rounds):
            started = time.perf_counter()
            page = client.get("/v1/messages/batches", params={"limit": batches}).json()
            timings.append((time.perf_counter() - started) * 1000)
            if len(page["data"]) != batches:
                raise RuntimeError("short page")
    timings.sort()
    return {"batches": batches, "median_ms": timings[len(timings) // 2], "max_ms": timings[-1]}


COLUMNS = [
    "shape", "requests", "body_mb", "idle_rss_mb", "create_s", "create_cpu_s", "create_peak_rss_mb",
    "holding_rss_mb", "results_s", "results_cpu_s", "results_mb", "results_peak_rss_mb",
]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=100_000 if scale() == "full" else 20_000)
    parser.add_argument("--shape", choices=["shared", "unique", "both"], default="both")
    args = parser.parse_args(argv if argv is not None else [])
    shapes = ["shared", "unique"] if args.shape == "both" else [args.shape]
    rows = [measure(args.requests, shape) for shape in shapes]
    listing = measure_list_page()
    title = (
        f"### Emulator memory holding one batch of {args.requests:,} requests\n\n"
        "RSS in MB; times in s: wall clock, and the emulator process's CPU time (*_cpu_s).\n\n"
    )
    markdown = title + markdown_table(rows, COLUMNS)
    markdown += "\n\nList call returning a page of 1,000 in-progress batches (ms, 20 calls):\n\n"
    markdown += markdown_table([listing], ["batches", "median_ms", "max_ms"])
    write_results("emulator_memory", rows + [listing], markdown)


if __name__ == "__main__":
    main(sys.argv[1:])
