"""Queue-aware submission: 1,000,000 requests in 10 shards through a queue that holds 300,000.

The emulator runs in its own process with ``max_queued_requests`` set and batches that end
(and so leave the queue) about ``BATCH_WALL_SECONDS`` of wall time after their creation.
Ten shards are submitted by ClaudeBatchOperator's own code, driven in-process as Airflow
would: a pool of ``WORKER_SLOTS`` worker slots runs ``execute`` / ``execute_after_queue_wait``
(each on a fresh operator, as after a real deferral); a deferral frees its slot and hands the
trigger, rebuilt from its serialised kwargs, to one triggerer event loop, whose event queues
the resume. It runs twice: with only the API's own queue-full 429, and with ``queue_budget``
set to the queue's size (the budget check then refuses before sending a body). A sampler reads
``requests_processing`` from the emulator every 50 ms for the peak queue use.

BENCH_SCALE=full: 10 x 100,000 requests on a 300,000 queue; small: 10 x 10,000 on 30,000.
Run: ``python -m bench.bench_queue``.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.common import API_KEY, REPO, emulator_process, markdown_table, run_isolated, scale, write_results

SHARDS = 10
WORKER_SLOTS = 4
TIME_SCALE = 60.0
BATCH_WALL_SECONDS = 12.0  # each batch stays in the queue about this long (wall clock)
POLL_INTERVAL = 1.0
RECHECK_INTERVAL = 30.0
WALL_LIMIT = 900.0  # a run that has not finished by then is a failure, not a hang


def sizes() -> tuple[int, int]:
    """(requests per shard, queue size)."""
    return (100_000, 300_000) if scale() == "full" else (10_000, 30_000)


def _write_shards(root: Path, per_shard: int) -> list[str]:
    import orjson

    relpaths = []
    for shard in range(SHARDS):
        relpath = f"bench_queue/run/requests/part-{shard:05d}.jsonl"
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:
            for i in range(per_shard):
                request = {
                    "custom_id": f"s{shard}-r{i:07d}",
                    "params": {
                        "model": "claude-haiku-4-5",
                        "max_tokens": 16,
                        "messages": [
                            {"role": "user", "content": f"Classify ticket {shard}-{i}: charged twice"}
                        ],
                    },
                }
                handle.write(orjson.dumps(request) + b"\n")
        relpaths.append(relpath)
    return relpaths


class _Sampler(threading.Thread):
    """Reads the emulator's requests in processing every 50 ms; keeps the peak."""

    def __init__(self, emulator_url: str) -> None:
        super().__init__(daemon=True)
        self.url = f"{emulator_url}/_emulator/stats"
        self.peak = 0
        self.samples = 0
        self._halt = threading.Event()

    def run(self) -> None:
        with httpx.Client(headers={"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}) as client:
            while not self._halt.is_set():
                try:
                    processing = client.get(self.url, timeout=5).json()["requests_processing"]
                    self.peak = max(self.peak, processing)
                    self.samples += 1
                except httpx.HTTPError:
                    pass
                self._halt.wait(0.05)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def measure(emulator_url: str, root: str, relpaths: list[str], queue_budget: int | None) -> dict:
    """Submit every shard with the operator's submit/resume methods; count what happened."""
    os.environ["AIRFLOW_CONN_ANTHROPIC_DEFAULT"] = json.dumps(
        {
            "conn_type": "anthropic",
            "host": emulator_url,
            "password": API_KEY,
            "extra": {"anthropic_client_kwargs": {"timeout": 600}},
        }
    )
    os.environ.setdefault("AIRFLOW_HOME", str(REPO / ".airflow" / "bench"))
    os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    import logging

    logging.disable(logging.INFO)  # a worker writes these to task logs; not what we time
    from airflow.sdk._shared.module_loading import import_string
    from airflow.sdk.exceptions import TaskDeferred
    from claude_batch.operators import ClaudeBatchOperator

    class _TaskInstance:
        dag_id = "bench_queue"
        task_id = "submit"
        try_number = 1

        def __init__(self, map_index: int) -> None:
            self.map_index = map_index
            self.xcom: dict[str, object] = {}

        def xcom_push(self, key: str, value: object) -> None:
            self.xcom[key] = value

    def operator(shard: int) -> ClaudeBatchOperator:
        # A fresh instance for every attempt and resume, as the task runner builds one.
        return ClaudeBatchOperator(
            task_id="submit",
            shard=relpaths[shard],
            storage_root=root,
            wait="none",
            queue_budget=queue_budget,
            queue_poll_interval=POLL_INTERVAL,
            queue_recheck_interval=RECHECK_INTERVAL,
            queue_wait_timeout=WALL_LIMIT,
        )

    loop = asyncio.new_event_loop()  # the triggerer: every waiting trigger on one loop
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def first_event(trigger):
        async for event in trigger.run():
            return event.payload
        return None

    slots = threading.Semaphore(WORKER_SLOTS)
    lock = threading.Lock()
    counts = {"deferrals": 0, "worker_seconds": 0.0, "trigger_events": {}}
    batch_ids: dict[int, str] = {}
    errors: list[str] = []

    def run_shard(shard: int) -> None:
        event = None
        try:
            while True:
                with slots:
                    started = time.perf_counter()
                    context = {"ti": _TaskInstance(shard), "run_id": "run"}
                    try:
                        if event is None:
                            batch_ids[shard] = operator(shard).execute(context)
                        else:
                            batch_ids[shard] = operator(shard).execute_after_queue_wait(context, event=event)
                        return
                    except TaskDeferred as deferred:
                        classpath, kwargs = deferred.trigger.serialize()
                        trigger = import_string(classpath)(**kwargs)
                        with lock:
                            counts["deferrals"] += 1
                    finally:
                        with lock:
                            counts["worker_seconds"] += time.perf_counter() - started
                event = asyncio.run_coroutine_threadsafe(first_event(trigger), loop).result(WALL_LIMIT)
                with lock:
                    status = (event or {}).get("status", "none")
                    counts["trigger_events"][status] = counts["trigger_events"].get(status, 0) + 1
        except Exception as exc:  # reported, and the run counts as failed
            errors.append(f"shard {shard}: {type(exc).__name__}: {exc}")

    started = time.perf_counter()
    threads = [
        threading.Thread(target=run_shard, args=(shard,), daemon=True) for shard in range(len(relpaths))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WALL_LIMIT)
    wall = time.perf_counter() - started
    loop.call_soon_threadsafe(loop.stop)
    if errors or len(batch_ids) != len(relpaths):
        raise RuntimeError(f"not every shard was submitted: {errors or sorted(batch_ids)}")
    return {
        "wall_seconds": wall,
        "deferrals": counts["deferrals"],
        "worker_seconds": counts["worker_seconds"],
        "trigger_events": counts["trigger_events"],
        "batch_ids": [batch_ids[shard] for shard in sorted(batch_ids)],
    }


def _stats(client: httpx.Client, url: str) -> dict:
    return client.get(f"{url}/_emulator/stats").json()


def main() -> None:
    per_shard, queue_size = sizes()
    processing_seconds = BATCH_WALL_SECONDS * TIME_SCALE
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        relpaths = _write_shards(Path(tmp), per_shard)
        for label, budget in (("API 429 only", None), (f"queue_budget={queue_size:,}", queue_size)):
            root = Path(tmp) / f"store-{len(rows)}"
            root.mkdir()
            for relpath in relpaths:  # the same shards, a fresh state folder
                target = root / relpath
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(Path(tmp) / relpath)
            with (
                emulator_process(
                    time_scale=TIME_SCALE,
                    processing_seconds=processing_seconds,
                    max_queued_requests=queue_size,
                ) as url,
                httpx.Client(headers={"x-api-key": API_KEY, "anthropic-version": "2023-06-01"}) as client,
            ):
                sampler = _Sampler(url)
                sampler.start()
                try:
                    result = run_isolated(
                        "bench.bench_queue",
                        "measure",
                        emulator_url=url,
                        root=str(root),
                        relpaths=relpaths,
                        queue_budget=budget,
                    )
                finally:
                    sampler.stop()
                stats = _stats(client, url)
            assert stats["batches_created"] == SHARDS, stats
            assert stats["requests_received"] == SHARDS * per_shard, stats
            assert len(set(result["batch_ids"])) == SHARDS
            assert sampler.peak <= queue_size
            rows.append(
                {
                    "mode": label,
                    "requests": SHARDS * per_shard,
                    "shards": SHARDS,
                    "queue": queue_size,
                    "create calls": stats["http_requests"]["create"],
                    "429s (queue full)": stats["faults_injected"].get("queue_full", 0),
                    "deferrals": result["deferrals"],
                    "batches created": stats["batches_created"],
                    "peak queue use": sampler.peak,
                    "peak / queue": sampler.peak / queue_size,
                    "list calls": stats["http_requests"]["list"],
                    "worker s": result["worker_seconds"],
                    "wall s": result["wall_seconds"],
                }
            )
    markdown = (
        f"### Queue-aware submit: {SHARDS * per_shard:,} requests in {SHARDS} shards through a "
        f"{queue_size:,}-request processing queue\n\n"
        + markdown_table(rows, list(rows[0]))
        + f"\n\nEach batch leaves the queue about {BATCH_WALL_SECONDS:.0f} s (wall) after its creation; "
        f"{WORKER_SLOTS} worker slots; triggers poll the queue every {POLL_INTERVAL:.0f} s. Every shard was "
        "created exactly once (batches created = shards), and no worker slot was held while waiting "
        '("worker s" is the total time tasks held a slot: scanning, checking and sending, never sleeping). '
        "With a budget the check refuses before a body is sent, so 429s and create calls drop to the races "
        "between concurrent checks."
    )
    write_results("queue", rows, markdown)


if __name__ == "__main__":
    main()
