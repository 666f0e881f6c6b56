"""Prices as data, batch and cache pricing, estimates that know the minimum cacheable prefix."""

from __future__ import annotations

import math

import numpy as np
import pytest
from claude_batch.costs import (
    CostEstimate,
    PriceTable,
    UnknownModelError,
    Usage,
    base_model_id,
    cache_break_even_hit_rate,
    cost_array,
    default_prices,
    realtime_equivalent,
    usage_cost,
)


def test_the_table_is_data_with_the_date_it_was_read():
    prices = default_prices()
    assert prices.read_on == "2026-11-22"
    assert prices.batch_discount == 0.5
    assert (prices.write_5m, prices.write_1h, prices.read) == (1.25, 2.0, 0.1)


@pytest.mark.parametrize(
    ("model", "price_in", "price_out"),
    [
        ("claude-haiku-4-5", 1.0, 5.0),
        ("claude-haiku-4-5-20251001", 1.0, 5.0),
        ("claude-sonnet-4-5-20250929", 3.0, 15.0),
        ("claude-opus-4-7", 5.0, 25.0),
        ("claude-opus-5", 5.0, 25.0),
        ("claude-opus-5-5", 4.0, 20.0),
        ("claude-opus-5-5-20261001", 4.0, 20.0),
        ("claude-sonnet-5-latest", 2.0, 10.0),
        ("claude-haiku-5-5", 0.1, 0.5),
    ],
)
def test_model_ids_match_their_entry_including_dated_snapshots(model, price_in, price_out):
    price = default_prices().for_model(model)
    assert (price.input, price.output) == (price_in, price_out)


def test_an_unknown_model_is_an_error_naming_it():
    with pytest.raises(UnknownModelError, match="claude-3-opus"):
        default_prices().for_model("claude-3-opus-20240229")
    assert base_model_id("claude-3-opus-20240229") == "claude-3-opus"


def test_batch_cost_is_half_of_list_and_cache_tokens_are_priced_as_the_api_prices_them():
    usage = Usage(
        input_tokens=1_000_000,
        output_tokens=1_000_000,
        cache_creation_input_tokens=3_000_000,
        cache_read_input_tokens=1_000_000,
        cache_creation_5m_input_tokens=1_000_000,
        cache_creation_1h_input_tokens=2_000_000,
    )
    # Haiku 4.5 list: 1 in, 5 out; writes 1.25 (5m) and 2.0 (1h); reads 0.1.
    listed = 1.0 + 5.0 + 1.25 * 1.0 + 2 * 2.0 * 1.0 + 0.1 * 1.0
    assert realtime_equivalent(usage, "claude-haiku-4-5-20251001") == pytest.approx(listed)
    assert usage_cost(usage, "claude-haiku-4-5-20251001") == pytest.approx(listed / 2)


def test_usage_from_the_api_without_a_split_prices_writes_as_5m():
    usage = Usage.from_api({"input_tokens": 10, "output_tokens": 2, "cache_creation_input_tokens": 100})
    assert usage.split_cache_writes() == (100, 0)


def test_cost_array_matches_usage_cost_and_marks_unknown_models():
    costs = cost_array(
        ["claude-haiku-4-5-20251001", None, "mystery-model"],
        np.array([1000, 0, 5]),
        np.array([200, 0, 5]),
        np.array([4096, 0, 0]),
        np.array([0, 0, 0]),
        np.array([0, 0, 0]),
    )
    expected = usage_cost(Usage(1000, 200, 4096, 0, 4096, 0), "claude-haiku-4-5-20251001")
    assert costs[0] == pytest.approx(expected)
    assert costs[1] == 0.0
    assert math.isnan(costs[2])


def test_break_even_hit_rates():
    assert cache_break_even_hit_rate("1h") == pytest.approx(1 / 1.9)  # ~53%
    assert cache_break_even_hit_rate("5m") == pytest.approx(0.25 / 1.15)  # ~22%


def test_estimate_does_not_count_caching_under_the_minimum_prefix():
    prices = default_prices()
    short = CostEstimate("1h", assumed_cache_hit_rate=0.9)
    short.add("claude-haiku-4-5", prefix_tokens=1000, variable_tokens=100, max_output=50, expected_output=20)
    plain = CostEstimate("off", assumed_cache_hit_rate=0.0)
    plain.add("claude-haiku-4-5", prefix_tokens=1000, variable_tokens=100, max_output=50, expected_output=20)
    assert short.to_dict(prices)["cost_usd_expected"] == plain.to_dict(prices)["cost_usd_expected"]
    assert short.to_dict(prices)["per_model"]["claude-haiku-4-5"]["cacheable"] is False

    long = CostEstimate("1h", assumed_cache_hit_rate=0.9)
    for _ in range(10):
        long.add(
            "claude-haiku-4-5", prefix_tokens=5000, variable_tokens=100, max_output=50, expected_output=20
        )
    estimate = long.to_dict(prices)
    assert estimate["per_model"]["claude-haiku-4-5"]["cacheable"] is True
    # Worst case: every prefix a 1h write (2x); expected: 90% reads.
    assert estimate["cost_usd_max"] == pytest.approx(
        (10 * (5000 * 2 + 100) * 1.0 + 10 * 50 * 5.0) / 1e6 / 2, rel=1e-6
    )
    assert estimate["cost_usd_expected"] < estimate["cost_usd_max"]
    assert estimate["realtime_cost_usd_expected"] == pytest.approx(
        2 * estimate["cost_usd_expected"], rel=1e-6
    )


def test_a_table_can_be_read_from_another_file(tmp_path, monkeypatch):
    path = tmp_path / "prices.json"
    path.write_text(
        '{"read_on": "2030-01-01", "batch_discount": 0.5, '
        '"cache_multipliers": {"write_5m": 1.25, "write_1h": 2, "read": 0.1}, '
        '"models": [{"name": "X", "ids": ["claude-x"], "input": 1, "output": 2,'
        ' "min_cacheable_tokens": 1024, "context_window": 1000}]}'
    )
    table = PriceTable.load(path)
    assert table.read_on == "2030-01-01"
    assert table.for_model("claude-x-20300101").output == 2.0
