"""The report answers "what did this save me?": against plain real-time calls, batching and caching apart.

The definitions (``claude_batch.costs.RunCosts``) are the same in ``report.json``, the run history in
the warehouse, the metrics and the demo's printout; checked here on a run where caching lost money
(the 1-hour cache at no hits) and one where it saved (at 90%).
"""

from __future__ import annotations

import pytest
from claude_batch.costs import RunCosts, TokenTotals, Usage, default_prices, run_costs, usage_cost
from claude_batch.demo import describe_report

from tests.datapath.conftest import query
from tests.pipeline.cost_helpers import config_for, night, rows, workload
from tests.services import create_tickets

MODEL = "claude-sonnet-4-6"


def test_the_definitions_on_tokens_priced_by_hand():
    # 1,000 requests: 400 uncached input, a 5,000-token prefix as 1-hour writes, 60 output tokens each.
    tokens = {MODEL: TokenTotals(400_000, 60_000, 5_000_000, 0)}
    actual = usage_cost(Usage(400_000, 60_000, 5_000_000, 0, 0, 5_000_000), MODEL)
    costs = run_costs(actual, tokens, default_prices(),
                      {"cost_usd_expected": 15.0, "cost_usd_low": 14.0, "cost_usd_high": 17.0,
                       "method": "count_tokens"})  # fmt: skip
    # Sonnet 4.6: $3 in, $15 out. Plain real-time: 5.4M input, 60k output; batch halves it.
    assert costs.realtime_uncached_usd == pytest.approx((5_400_000 * 3 + 60_000 * 15) / 1e6)
    assert costs.batch_uncached_usd == pytest.approx(costs.realtime_uncached_usd / 2)
    assert costs.actual_usd == pytest.approx((400_000 * 3 + 5_000_000 * 3 * 2 + 60_000 * 15) / 1e6 / 2)
    assert costs.saving_from_batching_usd == pytest.approx(costs.realtime_uncached_usd / 2)
    assert costs.saving_from_caching_usd == pytest.approx(
        -5_000_000 * 3 / 1e6 / 2
    )  # every write at 2x: a loss
    assert costs.saving_usd == pytest.approx(costs.saving_from_batching_usd + costs.saving_from_caching_usd)
    data = costs.to_dict()
    assert data["estimate"]["gap_usd"] == pytest.approx(15.0 - actual, abs=1e-6)
    assert data["estimate"]["gap_pct"] == pytest.approx(100 * (15.0 - actual) / actual, abs=0.01)
    assert data["share_of_realtime"] == pytest.approx(actual / costs.realtime_uncached_usd, abs=1e-4)
    assert RunCosts(1.0, 2.0, 1.0).to_dict()["estimate"]["gap_pct"] is None  # no estimate, no gap


def check_report(report: dict, warehouse_conn, run_id: str) -> dict:
    """The report's cost fields hold together, and the warehouse's run line has the same numbers."""
    costs = report["costs"]
    tokens = report["tokens"]
    every_input = tokens["input"] + tokens["cache_write"] + tokens["cache_read"]
    assert costs["realtime_uncached_usd"] == pytest.approx(
        (every_input * 3 + tokens["output"] * 15) / 1e6, abs=2e-6
    )
    assert costs["batch_uncached_usd"] == pytest.approx(costs["realtime_uncached_usd"] / 2, abs=2e-6)
    assert costs["actual_usd"] == report["cost_usd"]
    assert costs["saving_from_batching_usd"] == pytest.approx(
        costs["realtime_uncached_usd"] - costs["batch_uncached_usd"], abs=2e-6
    )
    assert costs["saving_from_caching_usd"] == pytest.approx(
        costs["batch_uncached_usd"] - costs["actual_usd"], abs=2e-6
    )
    assert costs["saving_usd"] == pytest.approx(
        costs["realtime_uncached_usd"] - costs["actual_usd"], abs=2e-6
    )
    assert (
        report["realtime_cost_usd"] == costs["realtime_uncached_usd"]
        and report["saving_usd"] == costs["saving_usd"]
    )
    assert costs["estimate"]["expected_usd"] == report["estimated_cost_usd"]
    assert costs["exact"] is True
    line = query(
        warehouse_conn,
        "SELECT cost_usd, realtime_cost_usd, batch_uncached_cost_usd, batching_saving_usd, "
        "caching_saving_usd, estimated_cost_usd, estimate_low_usd, estimate_high_usd "
        "FROM claude_batch_runs WHERE run_id = ?",
        (run_id,),
    )[0]
    assert line == pytest.approx((
        costs["actual_usd"], costs["realtime_uncached_usd"], costs["batch_uncached_usd"],
        costs["saving_from_batching_usd"], costs["saving_from_caching_usd"],
        costs["estimate"]["expected_usd"], costs["estimate"]["low_usd"], costs["estimate"]["high_usd"],
    ), abs=2e-6)  # fmt: skip
    return costs


def test_a_run_where_caching_lost_money(warehouse_conn, local_store, emulator):
    emulator.configure(cache_hit_rate=0.0)
    create_tickets(warehouse_conn, rows(300))
    report, _ = night(config_for(workload(cache="1h"), local_store), warehouse_conn, local_store, emulator, 0)
    costs = check_report(report, warehouse_conn, report["run_id"])
    assert report["cache_setting"] == "1h" and report["cache_hit_rate"] == 0.0
    # Every prefix a 1-hour write at 2x: caching cost money, and the report says how much, apart from
    # batching.
    assert costs["saving_from_caching_usd"] < 0 < costs["saving_from_batching_usd"]
    assert costs["actual_usd"] > costs["batch_uncached_usd"]
    assert costs["saving_usd"] < costs["saving_from_batching_usd"]
    assert costs["saving_usd"] != pytest.approx(
        costs["actual_usd"]
    )  # the old report's saving was the cost itself
    text = describe_report(report)
    assert f"caching cost ${-costs['saving_from_caching_usd']:.4f} more than caching off" in text
    assert f"plain real-time calls without caching ${costs['realtime_uncached_usd']:.4f}" in text


def test_a_run_where_caching_saved(warehouse_conn, local_store, emulator):
    emulator.configure(cache_hit_rate=0.9)
    create_tickets(warehouse_conn, rows(300))
    report, _ = night(config_for(workload(cache="1h"), local_store), warehouse_conn, local_store, emulator, 0)
    costs = check_report(report, warehouse_conn, report["run_id"])
    assert costs["saving_from_caching_usd"] > 0 and costs["saving_from_batching_usd"] > 0
    assert costs["actual_usd"] < costs["batch_uncached_usd"] / 2  # most of the prefix read at 0.1x
    assert costs["share_of_realtime"] < 0.25
    text = describe_report(report)
    share = costs["saving_usd"] / costs["realtime_uncached_usd"]
    assert (
        f"saving          ${costs['saving_usd']:.4f} ({share:.0%}): "
        f"batching ${costs['saving_from_batching_usd']:.4f}, "
        f"caching ${costs['saving_from_caching_usd']:.4f}"
    ) in text
    assert f"estimate ${costs['estimate']['expected_usd']:.4f} (between $" in text


def test_the_metrics_carry_the_same_definitions(monkeypatch):
    from claude_batch import pipeline

    sent = {}

    class Stats:
        @staticmethod
        def gauge(name, value, tags=None):
            sent[name] = value

        @staticmethod
        def timing(name, value, tags=None):
            sent[name] = value

    import airflow.sdk.observability.stats as stats_module

    monkeypatch.setattr(stats_module, "Stats", Stats)
    costs = run_costs(
        2.0, {MODEL: TokenTotals(1_000_000, 10_000, 0, 0)}, default_prices(), {"cost_usd_expected": 2.1}
    ).to_dict()
    pipeline._emit_metrics(
        "w", {"ledger": {"succeeded": 1}, "cost_usd": 2.0, "saving_usd": costs["saving_usd"], "costs": costs}
    )
    assert sent["claude_batch.saving_usd"] == costs["saving_usd"]
    assert sent["claude_batch.saving_from_caching_usd"] == costs["saving_from_caching_usd"]
    assert sent["claude_batch.saving_from_batching_usd"] == costs["saving_from_batching_usd"]
    assert sent["claude_batch.realtime_uncached_usd"] == costs["realtime_uncached_usd"]
    assert sent["claude_batch.estimate_gap_pct"] == costs["estimate"]["gap_pct"]


def route_by_key(row):
    return "claude-haiku-4-5" if row["id"].endswith(("0", "1", "2")) else "claude-sonnet-4-6"


def test_a_multi_model_run_is_priced_per_model_from_its_results(warehouse_conn, local_store, emulator):
    import pyarrow.parquet as pq
    from claude_batch.storage import RunLayout

    create_tickets(warehouse_conn, rows(200))
    work = workload(cache="off", route=route_by_key, route_models=("claude-haiku-4-5",))
    report, manifest = night(config_for(work, local_store), warehouse_conn, local_store, emulator, 0)
    assert manifest.models == ["claude-haiku-4-5", "claude-sonnet-4-6"]
    layout = RunLayout(local_store, "cost_dag", report["run_id"])
    expected = 0.0
    prices = {"claude-haiku-4-5": (1.0, 5.0), "claude-sonnet-4-6": (3.0, 15.0)}
    for shard in manifest.shards:
        with local_store.open(layout.results_parquet(shard.part), "rb") as handle:
            table = pq.read_table(handle).to_pylist()
        for row in table:
            base = "claude-haiku-4-5" if row["model"].startswith("claude-haiku") else "claude-sonnet-4-6"
            price_in, price_out = prices[base]
            every_input = (
                row["input_tokens"] + row["cache_creation_input_tokens"] + row["cache_read_input_tokens"]
            )
            expected += (price_in * every_input + price_out * row["output_tokens"]) / 1e6
    costs = report["costs"]
    assert costs["exact"] is True and costs["realtime_uncached_usd"] == pytest.approx(expected, abs=2e-6)
    assert costs["batch_uncached_usd"] == pytest.approx(
        costs["actual_usd"], abs=2e-6
    )  # caching off: no difference
    decision = query(warehouse_conn, "SELECT cache_decision FROM claude_batch_runs")[0][0]
    assert '"costs_exact":false' in decision  # the run history apportions a multi-model run's tokens
