"""1,000 triggers on one event loop: ours (shared poller) vs the official AnthropicBatchTrigger.

The emulator runs in its own process with 1,000 in-progress batches. Each side runs its
1,000 triggers on one event loop for a fixed window with a 2 s poll interval, while a
sampler measures event-loop lag (how late a 10 ms sleep wakes). Reported per poll round:
API calls (from the emulator's own counters), CPU per batch, and lag p50/p99/max.
Run: ``python -m bench.bench_trigger``.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time

import httpx

from bench.common import API_KEY, emulator_process, markdown_table, run_isolated, scale, write_results

BATCHES = 1_000
INTERVAL = 2.0


def _connections(emulator_url: str) -> None:
    os.environ["AIRFLOW_CONN_ANTHROPIC_DEFAULT"] = json.dumps(
        {"conn_type": "anthropic", "host": emulator_url, "password": API_KEY}
    )


def _api_calls(emulator_url: str) -> int:
    stats = httpx.get(f"{emulator_url}/_emulator/stats", headers={"x-api-key": API_KEY}).json()
    return sum(stats["http_requests"].get(name, 0) for name in ("list", "retrieve"))


def measure(emulator_url: str, which: str, batch_ids: list[str], window: float) -> dict:
    """Run ``which`` (ours|official) triggers for ``window`` seconds on one loop."""
    _connections(emulator_url)
    import logging

    logging.disable(logging.WARNING)  # a real triggerer writes these to task logs; not what we time
    if which == "ours":
        from claude_batch.triggers import ClaudeBatchTrigger

        triggers = [
            ClaudeBatchTrigger(batch_ids=[bid], min_poll_interval=INTERVAL, max_poll_interval=INTERVAL)
            for bid in batch_ids
        ]
    else:
        from airflow.providers.anthropic.triggers.batch import AnthropicBatchTrigger

        triggers = [
            AnthropicBatchTrigger(
                conn_id="anthropic_default", batch_id=bid, poll_interval=INTERVAL, end_time=time.time() + 3600
            )
            for bid in batch_ids
        ]

    lags: list[float] = []

    async def sample_lag(stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - started - 0.01)

    async def main() -> tuple[int, float, float]:
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_lag(stop))
        calls_before = _api_calls(emulator_url)
        cpu_before, wall_before = time.process_time(), time.perf_counter()
        tasks = [asyncio.create_task(anext(t.run())) for t in triggers]
        await asyncio.sleep(window)
        cpu, wall = time.process_time() - cpu_before, time.perf_counter() - wall_before
        finished = [task.result().payload for task in tasks if task.done() and not task.cancelled()]
        if finished:  # every batch is in progress: any event here is a polling failure
            raise RuntimeError(f"{len(finished)} triggers fired early, e.g. {finished[0]}")
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        stop.set()
        await sampler
        return _api_calls(emulator_url) - calls_before, cpu, wall

    calls, cpu, wall = asyncio.run(main())
    rounds = wall / INTERVAL
    lags.sort()
    return {
        "triggers": len(triggers),
        "rounds": rounds,
        "api_calls_per_round": calls / rounds,
        "cpu_ms_per_batch_per_round": cpu * 1000 / (rounds * len(triggers)),
        # what one batch's status costs to learn: ours learns every batch each round, the
        # official trigger one batch per retrieve (its thread pool cannot finish a round)
        "cpu_ms_per_status_learned": cpu
        * 1000
        / (rounds * len(triggers) if which == "ours" else max(calls, 1)),
        "lag_p50_ms": statistics.median(lags) * 1000,
        "lag_p99_ms": lags[int(len(lags) * 0.99)] * 1000,
        "lag_max_ms": lags[-1] * 1000,
    }


def main() -> None:
    import anthropic

    window = 20.0 if scale() == "full" else 10.0
    rows = []
    with emulator_process(processing_seconds=86_400 * 2) as emulator_url:
        client = anthropic.Anthropic(base_url=emulator_url, api_key=API_KEY)
        request = {
            "custom_id": "r0",
            "params": {
                "model": "claude-haiku-4-5",
                "max_tokens": 8,
                "messages": [{"role": "user", "content": "hi"}],
            },
        }
        batch_ids = [client.messages.batches.create(requests=[request]).id for _ in range(BATCHES)]
        for which in ("ours", "official"):
            result = run_isolated(
                "bench.bench_trigger",
                "measure",
                emulator_url=emulator_url,
                which=which,
                batch_ids=batch_ids,
                window=window,
            )
            rows.append({"trigger": which, **result})
    ours, official = rows
    ratio = official["cpu_ms_per_status_learned"] / max(ours["cpu_ms_per_status_learned"], 1e-9)
    markdown = (
        f"### Trigger: {BATCHES:,} in-progress batches on one event loop, {INTERVAL:.0f} s interval, "
        f"{window:.0f} s window\n\n"
        + markdown_table(rows, list(rows[0]))
        + f"\n\nOfficial / ours CPU per batch status learned: {ratio:.1f}x "
        "(targets: at most 5 API calls per round, "
        "ours at most a tenth of the official CPU per batch, lag p99 under 100 ms)."
    )
    write_results("trigger", rows, markdown)


if __name__ == "__main__":
    main()
