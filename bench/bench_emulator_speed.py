"""Emulator speed: a 100,000-request create, and results served, in lines per second.

The emulator runs in its own process (``claude-batch-emulator``), its RSS and CPU sampled with
psutil. For each request shape (``shared``: a cached ~1.1 KB system prompt in every request plus
a unique ticket; ``unique``: ~1.9 KB of text of its own per request, see bench_emulator_memory):

- create: one pre-encoded body POSTed with httpx in 1 MB pieces (the emulator's time: upload,
  parse, accept; a single ``bytes`` body would add ~2.5 s of httpx's own CPU),
  and the same requests through the SDK's ``messages.batches.create`` (the SDK's own encoding
  of 100,000 dicts included: what a pipeline that used it would wait);
- made: how long the emulator's background worker takes to make every result line after the
  create (it starts at once and pauses while requests are served);
- served: the results downloaded with raw httpx streaming (bytes counted, lines split by
  nothing but the newline count: the server's speed) and through the SDK's ``results()``
  (which parses each line into pydantic models: the client's speed);
- on download: the same against an emulator started with ``--no-precompute-results``, whose
  first download makes the lines as it serves them (and whose second serves stored ones).

    python -m bench.bench_emulator_speed                 # BENCH_SCALE=small: 20,000 requests
    BENCH_SCALE=full python -m bench.bench_emulator_speed    # 100,000 requests
    python -m bench.bench_emulator_speed --requests 100000 --shape shared
"""

from __future__ import annotations

import argparse
import sys
import time

import anthropic
import httpx
import orjson

from bench.bench_emulator_memory import API_KEY, HEADERS, MB, RssSampler, body_chunks, build_body, emulator
from bench.common import markdown_table, peak_rss_mb, scale, write_results

EMULATOR_OPTIONS = {"time_scale": 1000, "processing_seconds": 5}  # a batch ends 5 ms (wall) after its create
TARGET_LINES_PER_SECOND = 100_000
TARGET_CREATE_SECONDS = 3.0


def _wait_ended(client: httpx.Client, batch_id: str) -> None:
    while client.get(f"/v1/messages/batches/{batch_id}").json()["processing_status"] != "ended":
        time.sleep(0.01)


def _wait_made(client: httpx.Client, started: float, timeout: float = 600.0) -> float | None:
    """Seconds from ``started`` until the emulator has made every result line (None: it cannot say)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = client.get("/_emulator/stats", headers={"x-api-key": API_KEY}).json()
        pending = stats.get("results_lines_pending")
        if pending is None:
            return None
        if pending == 0:
            return time.perf_counter() - started
        time.sleep(0.05)
    raise RuntimeError("the emulator did not finish making the results")


def _raw_download(
    client: httpx.Client, batch_id: str, sampler: RssSampler, keep: list[bytes] | None = None
) -> tuple[int, int, float, float, str]:
    """(lines, bytes, seconds, emulator CPU seconds, content type) of one download with httpx streaming."""
    sampler.restart()
    started, cpu_before = time.perf_counter(), sampler.cpu_seconds()
    lines = size = 0
    with client.stream("GET", f"/v1/messages/batches/{batch_id}/results") as response:
        response.raise_for_status()
        content_type = response.headers["content-type"]
        for chunk in response.iter_raw(1 << 20):
            lines += chunk.count(b"\n")
            size += len(chunk)
            if keep is not None:
                keep.append(chunk)
    return lines, size, time.perf_counter() - started, sampler.cpu_seconds() - cpu_before, content_type


def _sdk_parse_only(chunks: list[bytes]) -> float:
    """Lines/s of the SDK's results decoder over bytes already in memory: the client's own ceiling."""
    from anthropic._decoders.jsonl import JSONLDecoder
    from anthropic.types.messages import MessageBatchIndividualResponse

    started = time.perf_counter()
    decoder = JSONLDecoder(
        raw_iterator=iter(chunks), line_type=MessageBatchIndividualResponse, http_response=None
    )
    lines = sum(1 for _ in decoder)
    return lines / (time.perf_counter() - started)


def measure(count: int, shape: str, modes: tuple[str, ...] = ("background", "on download")) -> list[dict]:
    body = build_body(count, shape)
    requests = orjson.loads(body)["requests"]
    rows = []
    for mode in modes:
        options = dict(EMULATOR_OPTIONS)
        if mode == "on download":
            options["no_precompute_results"] = True
        row: dict = {"shape": shape, "made": mode, "requests": count, "body_mb": len(body) / MB}
        with emulator(**options) as (pid, base_url):
            sampler = RssSampler(pid)
            client = httpx.Client(base_url=base_url, headers=HEADERS, timeout=600)
            try:
                time.sleep(0.3)
                sampler.restart()
                started, cpu_before = time.perf_counter(), sampler.cpu_seconds()
                response = client.post("/v1/messages/batches", content=body_chunks(body))
                response.raise_for_status()
                created = time.perf_counter()
                row["create_s"] = created - started
                row["create_cpu_s"] = sampler.cpu_seconds() - cpu_before
                row["create_peak_rss_mb"] = sampler.peak / MB
                batch_id = response.json()["id"]
                _wait_ended(client, batch_id)
                if mode == "background":
                    made = _wait_made(client, created)
                    row["made_s"] = made if made is not None else "-"
                    row["made_lines_per_s"] = count / made if made else "-"
                chunks: list[bytes] = []
                lines, size, seconds, cpu, row["content_type"] = _raw_download(
                    client, batch_id, sampler, chunks
                )
                if lines != count:
                    raise RuntimeError(f"expected {count} result lines, got {lines}")
                row["results_mb"] = size / MB
                stats = client.get("/_emulator/stats", headers={"x-api-key": API_KEY}).json()
                if "results_stored_bytes" in stats:  # the results file of this one batch, compressed
                    row["stored_mb"] = stats["results_stored_bytes"] / MB
                row["raw_lines_per_s"] = lines / seconds
                row["raw_download_s"] = seconds
                row["raw_cpu_s"] = cpu
                if mode == "on download":
                    lines, _size, seconds, _cpu, _type = _raw_download(client, batch_id, sampler)
                    row["again_lines_per_s"] = lines / seconds
                else:
                    with anthropic.Anthropic(
                        api_key=API_KEY, base_url=base_url, max_retries=0, timeout=600
                    ) as sdk:
                        started = time.perf_counter()
                        parsed = sum(1 for _ in sdk.messages.batches.results(batch_id))
                        row["sdk_lines_per_s"] = parsed / (time.perf_counter() - started)
                        if parsed != count:
                            raise RuntimeError(f"the SDK parsed {parsed} lines, not {count}")
                        row["sdk_parse_only_lines_per_s"] = _sdk_parse_only(chunks)
                        row["serve_peak_rss_mb"] = sampler.peak / MB
                        started = time.perf_counter()
                        sdk.messages.batches.create(requests=requests)
                        row["sdk_create_s"] = time.perf_counter() - started
                del chunks
                row.setdefault("serve_peak_rss_mb", sampler.peak / MB)
            finally:
                client.close()
                sampler.stop()
        rows.append(row)
    return rows


COLUMNS = [
    "shape", "made", "requests", "body_mb", "create_s", "create_cpu_s", "create_peak_rss_mb", "sdk_create_s",
    "made_s", "made_lines_per_s", "raw_lines_per_s", "again_lines_per_s", "raw_download_s", "raw_cpu_s",
    "sdk_lines_per_s", "sdk_parse_only_lines_per_s", "results_mb", "stored_mb", "serve_peak_rss_mb",
]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=100_000 if scale() == "full" else 20_000)
    parser.add_argument("--shape", choices=["shared", "unique", "both"], default="both")
    parser.add_argument("--mode", choices=["background", "on download", "both"], default="both")
    args = parser.parse_args(argv if argv is not None else [])
    shapes = ["shared", "unique"] if args.shape == "both" else [args.shape]
    modes = ("background", "on download") if args.mode == "both" else (args.mode,)
    rows = [row for shape in shapes for row in measure(args.requests, shape, modes)]
    served = [row["raw_lines_per_s"] for row in rows if row["made"] == "background"] or [0.0]
    creates = [row["create_s"] for row in rows]
    markdown = (
        f"### Emulator speed: a create of {args.requests:,} requests and its results served\n\n"
        "Times in s (wall clock; *_cpu_s: the emulator process's CPU), RSS in MB, lines per second. "
        "`made`: background = the emulator's worker makes the result lines from the create on "
        "(made_s: until the last, after the create's answer), on download = started with "
        "`--no-precompute-results` (the first download makes them; again = the second download). "
        "raw = httpx streaming, newlines counted; sdk = `client.messages.batches.results()`, each line "
        "parsed into the SDK's models (sdk_parse_only: the SDK's decoder over the same bytes in memory, "
        "no server: the client's ceiling); sdk_create_s includes the SDK encoding the requests.\n\n"
        + markdown_table(rows, COLUMNS)
        + f"\n\nServed from made results: {min(served):,.0f} lines/s at least (target: at least "
        f"{TARGET_LINES_PER_SECOND:,}); create accepted in {max(creates):.2f} s at most (target: under "
        f"{TARGET_CREATE_SECONDS:.0f} s). Results served as "
        f"{', '.join(sorted({row['content_type'] for row in rows}))}. This process's peak RSS: "
        f"{peak_rss_mb():,.0f} MB."
    )
    write_results("emulator_speed", rows, markdown)


if __name__ == "__main__":
    main(sys.argv[1:])
