"""The cost estimate: count_tokens on a sample, the cached prefix at its measured hit rate, the minimum kept.

Against the emulator (its count_tokens and its billing use the same token counts) and a local store.
"""

from __future__ import annotations

import random

import pytest
from claude_batch.caching import CacheDecision, Evidence
from claude_batch.costs import default_prices, prefix_cost_factor
from claude_batch.emulator.tokens import analyse_prompt
from claude_batch.estimates import (
    FIRST_RUN_OUTPUT_SHARE,
    RowSample,
    _regression_total,
    build_estimate,
    estimate_run,
    measure_tokens,
    output_tokens,
)
from claude_batch.pipeline import BudgetExceeded, RunOptions, run_gate, run_stage
from claude_batch.staging import iter_shard_requests, read_manifest, stage_requests
from claude_batch.storage import RunLayout
from claude_batch.warehouse import RECORD_KEY_COLUMN, Warehouse
from claude_batch.workloads import CacheObservation

from tests.batchcore.conftest import RecordingLog
from tests.pipeline.cost_helpers import client_for, config_for, interval, night, rows, workload
from tests.services import create_tickets

PRICES = default_prices()


def staged_rows(count: int) -> list[dict]:
    return [{**row, RECORD_KEY_COLUMN: row["id"]} for row in rows(count)]


def stage(layout, work, setting: str, count: int, sample: RowSample | None = None):
    source = staged_rows(count)
    return stage_requests(sample.wrap(source) if sample else source, work, layout,
                          key_field=RECORD_KEY_COLUMN, cache_setting=setting)  # fmt: skip


def measured(setting: str, hit_rate: float, requests: int = 2_000, prefix: int = 1_500) -> Evidence:
    reads = round((requests - 1) * hit_rate)
    return Evidence(setting, 1, reads * prefix, (requests - reads) * prefix, float(requests), 0, batches=1,
                    reads=float(reads))  # fmt: skip


def test_the_row_sample_is_uniform_and_passes_every_row():
    sample = RowSample(size=50, seed="run-1")
    assert list(sample.wrap(range(10_000))) == list(range(10_000))
    assert sample.seen == 10_000 and len(set(sample.rows)) == 50
    first_half = 0
    for seed in range(200):
        drawn = RowSample(size=50, seed=str(seed))
        for _ in drawn.wrap(range(10_000)):
            pass
        first_half += sum(row < 5_000 for row in drawn.rows)
    assert first_half / (200 * 50) == pytest.approx(0.5, abs=0.02)
    small = RowSample(size=50)
    assert list(small.wrap(range(7))) == list(range(7)) and small.rows == list(range(7))


def test_the_regression_estimate_is_exact_when_tokens_follow_characters():
    rng = random.Random(1)
    chars = [float(rng.randint(10, 2_000)) for _ in range(200)]
    extra = [3 + c / 4 for c in chars]
    total, error = _regression_total(chars, extra, 10_000, 9_000_000)
    assert total == pytest.approx(10_000 * 3 + 9_000_000 / 4) and error == pytest.approx(0, abs=1e-6)


def test_a_sample_of_200_counts_the_run_within_a_percent_and_the_prefix_exactly(emulator, local_store):
    work = workload(cache="5m")
    layout = RunLayout(local_store, "cost_dag", "run-1")
    sample = RowSample(seed="run-1")
    manifest = stage(layout, work, "5m", 1_000, sample)
    decision = CacheDecision("5m", "5m", "fixed", evidence={"5m": measured("5m", 0.8)})
    manifest = estimate_run(layout, manifest, work, decision, [], PRICES, sample=sample,
                            client=client_for(emulator), key_column=RECORD_KEY_COLUMN)  # fmt: skip
    requests = [
        request["params"] for shard in manifest.shards for request in iter_shard_requests(layout, shard)
    ]
    counted = sum(analyse_prompt(params).total_tokens for params in requests)  # what the emulator bills
    estimate = manifest.estimate
    assert estimate["method"] == "count_tokens"
    assert estimate["basis"]["sample"] == {"requests": 200, "of": 1_000, "count_calls": 203}
    assert estimate["input_tokens"] == pytest.approx(counted, rel=0.01)
    entry = estimate["per_model"]["claude-sonnet-4-6"]
    assert entry["prefix_tokens_per_request"] == analyse_prompt(requests[0]).cache_prefix_tokens
    assert entry["cacheable"] is True


@pytest.mark.parametrize(
    ("model", "cacheable"),
    [("claude-sonnet-4-6", True), ("claude-haiku-4-5", False)],  # minimum 1,024 and 4,096; the prefix ~1,500
)
def test_the_estimate_with_and_without_a_cached_prefix_under_and_over_the_minimum(
    emulator, local_store, model, cacheable
):
    work = workload(cache="5m", model=model)
    layout = RunLayout(local_store, "cost_dag", f"run-{model}")
    sample = RowSample(seed="x")
    manifest = stage(layout, work, "5m", 400, sample)
    sampled = [(row, model) for row in sample.rows]
    per_model = {model: (400, manifest.estimate["per_model"][model]["content_chars"])}
    tokens = measure_tokens(client_for(emulator), work, "5m", sampled, per_model)
    counted = tokens[model]
    out = output_tokens(work, [])
    assert out.point == FIRST_RUN_OUTPUT_SHARE * work.max_tokens and (out.low, out.high) == (
        0,
        work.max_tokens,
    )
    off = build_estimate(work, CacheDecision("5m", "off", "test"), tokens, out, PRICES)
    decision = CacheDecision("5m", "5m", "test", evidence={"5m": measured("5m", 0.8)})
    cached = build_estimate(work, decision, tokens, out, PRICES)
    assert cached["per_model"][model]["cacheable"] is cacheable
    price = PRICES.for_model(model)
    assert off["cost_usd_expected"] == pytest.approx(
        (price.input * counted.input_tokens + price.output * 400 * out.point) / 1e6 / 2, rel=1e-5
    )
    if not cacheable:  # the API would not cache it: priced as if caching were off
        assert cached["cost_usd_expected"] == off["cost_usd_expected"]
        return
    hit_rate = decision.hit_rate("5m").point
    assert hit_rate == pytest.approx(0.8, abs=1e-3)
    factor = prefix_cost_factor("5m", hit_rate * 399 / 400)  # one batch: its first request writes
    prefix = 400 * counted.prefix_tokens
    assert counted.prefix_tokens >= price.min_cacheable_tokens
    assert cached["cost_usd_expected"] == pytest.approx(
        (price.input * (counted.input_tokens - prefix + prefix * factor) + price.output * 400 * out.point)
        / 1e6
        / 2,
        rel=1e-5,
    )
    assert (
        cached["cost_usd_low"]
        < cached["cost_usd_expected"]
        < cached["cost_usd_high"]
        < cached["cost_usd_max"]
    )
    assert cached["cost_usd_uncached"] == off["cost_usd_expected"]


def test_without_count_tokens_the_estimate_counts_characters_and_says_so(local_store):
    class Broken:
        class messages:  # noqa: N801 (the SDK's shape)
            @staticmethod
            def count_tokens(**params):
                raise ConnectionError("no route to the API")

    work = workload(cache="off")
    layout = RunLayout(local_store, "cost_dag", "run-1")
    sample = RowSample()
    manifest = stage(layout, work, "off", 50, sample)
    log = RecordingLog()
    manifest = estimate_run(layout, manifest, work, CacheDecision("off", "off", "fixed"), [], PRICES,
                            sample=sample, client=Broken(), key_column=RECORD_KEY_COLUMN,
                            log=log)  # fmt: skip
    assert manifest.estimate["method"] == "characters"
    assert any("count_tokens failed (ConnectionError" in line for line in log.lines)


def test_output_tokens_come_from_the_runs_of_the_same_prompt_version():
    work = workload(expected_output_tokens=60)
    history = [
        CacheObservation(
            "off", 0, 0, runs_ago=0, answers=1_000, output_tokens=41_000, prompt_version=work.prompt_version
        ),
        CacheObservation(
            "off", 0, 0, runs_ago=1, answers=1_000, output_tokens=39_000, prompt_version=work.prompt_version
        ),
        CacheObservation("off", 0, 0, runs_ago=2, answers=10, output_tokens=9_000, prompt_version="pv_other"),
    ]
    out = output_tokens(work, history)
    assert out.point == pytest.approx(40.0) and out.source.startswith("measured: 2,000 answers over 2 run(s)")
    stated = output_tokens(work, history[2:])
    assert stated.point == 60 and "expected_output_tokens" in stated.source


def test_the_estimate_is_within_10_percent_once_the_hit_rate_is_measured(
    warehouse_conn, local_store, emulator
):
    emulator.configure(cache_hit_rate=0.9)
    create_tickets(warehouse_conn, [*rows(300, day=0), *rows(300, day=1)])
    config = config_for(workload(cache="1h"), local_store)
    first, _ = night(config, warehouse_conn, local_store, emulator, 0)
    estimate = first["costs"]["estimate"]
    # Nothing measured yet: the prefix priced at break-even, the band from no hits to all hits.
    assert estimate["low_usd"] <= first["costs"]["actual_usd"] <= estimate["high_usd"]
    second, _ = night(config, warehouse_conn, local_store, emulator, 1)
    assert abs(second["costs"]["estimate"]["gap_pct"]) < 10
    assert (
        second["costs"]["estimate"]["low_usd"]
        <= second["costs"]["actual_usd"]
        <= second["costs"]["estimate"]["high_usd"]
    )


def test_the_budget_guard_at_a_high_hit_rate_goes_by_the_measured_estimate(
    warehouse_conn, local_store, emulator
):
    emulator.configure(cache_hit_rate=0.9)
    create_tickets(warehouse_conn, [*rows(300, day=0), *rows(300, day=1)])
    config = config_for(workload(cache="1h"), local_store)
    night(config, warehouse_conn, local_store, emulator, 0)  # measures the 1-hour cache's hit rate
    warehouse = Warehouse(warehouse_conn)
    layout = RunLayout(local_store, "cost_dag", "scheduled__day1")
    run_stage(
        config, warehouse, layout, RunOptions(), interval(1), client=client_for(emulator), log=RecordingLog()
    )
    estimate = read_manifest(layout).estimate
    expected, low, high, all_writes = (
        estimate[k] for k in ("cost_usd_expected", "cost_usd_low", "cost_usd_high", "cost_usd_max")
    )
    assert (
        low < expected < high < all_writes / 2
    )  # every prefix a write would be more than twice the estimate
    with pytest.raises(BudgetExceeded, match="Even the low end of the estimate is over it"):
        run_gate(config, warehouse, layout, RunOptions(budget_usd=low * 0.95), None, None, RecordingLog())
    log = RecordingLog()
    between = (expected + high) / 2
    assert run_gate(
        config, warehouse, layout, RunOptions(budget_usd=between), None, None, log
    )  # goes, with a warning
    assert any("may go over the budget" in line for line in log.lines)


def test_a_stage_retried_after_staging_writes_its_estimate_without_a_sample(duckdb_conn, local_store):
    work = workload(cache="auto")
    warehouse = Warehouse(duckdb_conn)
    warehouse.ensure_tables(work)
    layout = RunLayout(local_store, "cost_dag", "scheduled__day0")
    stage(layout, work, "off", 100)  # what a stage task that died before its estimate left behind
    summary = run_stage(
        config_for(work, local_store), warehouse, layout, RunOptions(), interval(0), log=RecordingLog()
    )
    estimate = read_manifest(layout).estimate
    assert estimate["method"] == "characters" and estimate["cache_plan"]["setting"] == "off"
    assert estimate["cache_plan"]["probe"] is None  # no probe on a manifest already staged
    assert summary["estimated_cost_usd"] == estimate["cost_usd_expected"] and summary["staged"] == 100
