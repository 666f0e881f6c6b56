"""Peak memory while submitting one shard: ours (streamed from S3) vs the official operator (a list).

Ours twice: a shard of unknown origin (every line parsed) and a staged one (its manifest's
sha256 known, so custom_ids are read off the lines), each with its client CPU per request.

Each measurement runs in a fresh interpreter against the emulator and a moto S3 server in
their own processes, so only the submitter's memory is counted: peak RSS minus the RSS after
imports. Sizes: 10,000 and 100,000 requests of about 2 KB each (the 100,000-request shard is
about 200 MB). Run: ``python -m bench.bench_submit``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

from bench.common import (
    API_KEY,
    cpu_seconds,
    current_rss_mb,
    emulator_process,
    markdown_table,
    moto_process,
    peak_rss_mb,
    run_isolated,
    write_results,
)

REQUEST_TEXT_BYTES = 1900
SIZES = (10_000, 100_000)


def _write_shard(path: Path, count: int) -> int:
    import orjson

    filler = ("Please classify this support ticket about a billing problem. " * 40)[:REQUEST_TEXT_BYTES]
    with path.open("wb") as handle:
        for i in range(count):
            request = {
                "custom_id": f"ticket-{i:07d}",
                "params": {
                    "model": "claude-haiku-4-5",
                    "max_tokens": 64,
                    "messages": [{"role": "user", "content": f"{i} {filler}"}],
                },
            }
            handle.write(orjson.dumps(request) + b"\n")
    return path.stat().st_size


def _connections(emulator_url: str, moto_url: str) -> None:
    os.environ["AIRFLOW_CONN_ANTHROPIC_DEFAULT"] = json.dumps(
        {"conn_type": "anthropic", "host": emulator_url, "password": API_KEY}
    )
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")


def measure_ours(emulator_url: str, moto_url: str, bucket: str, key: str, sha256: str | None = None) -> dict:
    """Submit the shard at s3://bucket/key with ClaudeBatchOperator's submitter.

    :param sha256: the digest staging would record for the shard (the operator reads it from the
        manifest): the scan then reads custom_ids off the lines instead of parsing each one.
    """
    _connections(emulator_url, moto_url)
    from claude_batch.hooks import ClaudeBatchHook
    from claude_batch.storage import ObjectStore
    from claude_batch.submission import BatchSubmitter, StoredShard

    store = ObjectStore(f"s3://{bucket}", key="bench", secret="bench", endpoint_url=moto_url)
    hook = ClaudeBatchHook()
    _ = hook.conn
    store.exists(key)  # warm up: s3fs and botocore load lazily on first use
    baseline = current_rss_mb()
    started, cpu_started = time.perf_counter(), cpu_seconds()
    result = BatchSubmitter(hook, store, f"state/{key}.{bool(sha256)}.json").submit(
        StoredShard(store, key, sha256)
    )
    return {
        "seconds": time.perf_counter() - started,
        "cpu": cpu_seconds() - cpu_started,
        "peak_mb": peak_rss_mb() - baseline,
        "batch_id": result.batch_id,
        "count": result.request_count,
    }


def measure_official(emulator_url: str, shard_path: str) -> dict:
    """The official provider's AnthropicBatchOperator, given the same requests as a list."""
    _connections(emulator_url, "")
    import orjson
    from airflow.providers.anthropic.operators.batch import AnthropicBatchOperator

    class _TaskInstance:
        def xcom_push(self, key, value):
            pass

    baseline = current_rss_mb()
    started = time.perf_counter()
    with open(shard_path, "rb") as handle:
        requests = [orjson.loads(line) for line in handle]
    official = AnthropicBatchOperator(task_id="official", requests=requests, wait_for_completion=False)
    batch_id = official.execute({"ti": _TaskInstance()})
    return {
        "seconds": time.perf_counter() - started,
        "peak_mb": peak_rss_mb() - baseline,
        "batch_id": batch_id,
        "count": len(requests),
    }


def main() -> None:
    import boto3

    rows = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        moto_process() as moto_url,
        emulator_process(processing_seconds=86_400 * 2) as emulator_url,
    ):
        s3 = boto3.client(
            "s3",
            endpoint_url=moto_url,
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
            region_name="us-east-1",
        )
        s3.create_bucket(Bucket="bench")
        for count in SIZES:
            shard = Path(tmp) / f"shard-{count}.jsonl"
            size = _write_shard(shard, count)
            key = f"requests/part-{count}.jsonl"
            s3.upload_file(str(shard), "bench", key)
            ours = run_isolated(
                "bench.bench_submit",
                "measure_ours",
                emulator_url=emulator_url,
                moto_url=moto_url,
                bucket="bench",
                key=key,
            )
            staged = run_isolated(
                "bench.bench_submit",
                "measure_ours",
                emulator_url=emulator_url,
                moto_url=moto_url,
                bucket="bench",
                key=key,
                sha256=hashlib.sha256(shard.read_bytes()).hexdigest(),
            )
            official = run_isolated(
                "bench.bench_submit", "measure_official", emulator_url=emulator_url, shard_path=str(shard)
            )
            assert ours["count"] == official["count"] == count
            rows.append(
                {
                    "requests": count,
                    "shard MB": size / 1e6,
                    "ours peak MB": ours["peak_mb"],
                    "ours s": ours["seconds"],
                    "ours CPU us/request": ours["cpu"] / count * 1e6,
                    "staged shard peak MB": staged["peak_mb"],
                    "staged shard CPU us/request": staged["cpu"] / count * 1e6,
                    "official peak MB": official["peak_mb"],
                    "official s": official["seconds"],
                    "official / ours": official["peak_mb"] / max(ours["peak_mb"], 0.1),
                }
            )
            shard.unlink()
    growth = rows[-1]["ours peak MB"] / max(rows[0]["ours peak MB"], 0.1)
    markdown = (
        "### Submit: peak memory above the interpreter's baseline\n\n"
        + markdown_table(rows, list(rows[0]))
        + f"\n\nOurs at {SIZES[-1]:,} vs {SIZES[0]:,} requests: {growth:.2f}x, "
        f"{rows[-1]['ours peak MB'] - rows[0]['ours peak MB']:+.1f} MB "
        "(target: under 150 MB at 100,000 and at most 1.2x the 10,000 figure)."
    )
    write_results("submit", rows, markdown)


if __name__ == "__main__":
    main()
