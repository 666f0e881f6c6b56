"""The caching policy: auto is never dearer than caching off by construction, and keeps its evidence.

The policy reads the run history the warehouse keeps (``record_run`` / ``recent_cache_observations``,
over DuckDB and PostgreSQL); its first run and its probe go through ``run_stage`` against the emulator.
"""

from __future__ import annotations

import datetime as dt

import orjson
import pytest
from claude_batch.caching import (
    DEFAULT_PROBE_SHARE,
    MAX_PROBE_REQUESTS,
    REMEASURE_AFTER_RUNS,
    decide,
)
from claude_batch.costs import default_prices
from claude_batch.pipeline import RunOptions, run_stage
from claude_batch.staging import Manifest, ShardManifest, iter_shard_requests, read_manifest, read_shard_keys
from claude_batch.storage import RunLayout
from claude_batch.warehouse import AccountingReport, LoadSummary, Warehouse

from tests.batchcore.conftest import RecordingLog
from tests.pipeline.cost_helpers import client_for, config_for, interval, night, rows, workload
from tests.services import create_tickets

MODEL = "claude-sonnet-4-6"
PREFIX = 1_500  # tokens per request of the cached prefix in the recorded runs


def record(warehouse: Warehouse, work, run: int, setting: str, hit_rate: float = 0.0, *,
           requests: int = 1_000, probe: tuple[str, int] | None = None) -> None:  # fmt: skip
    """A run in the history: ``requests`` answered, the cached ones (all, or the probe's) at ``hit_rate``."""
    cached = probe[1] if probe else (requests if setting != "off" else 0)
    reads = round((cached - 1) * hit_rate) if cached else 0
    plan = {"policy": work.cache, "setting": setting, "prefix_tokens": PREFIX,
            "probe": {"setting": probe[0], "requests": probe[1], "part": 1} if probe else None}  # fmt: skip
    shards = [ShardManifest(0, "requests/part-00000.jsonl", "k", requests, 1, "x", {MODEL: requests})]
    if probe:
        shards.append(ShardManifest(1, "requests/part-00001.jsonl", "k", probe[1], 1, "x", {MODEL: probe[1]}))
    manifest = Manifest(
        workload=work.name, prompt_version=work.prompt_version, dag_id="cost_dag", run_id=f"run-{run:03d}",
        cache_setting=setting, key_field="id", models=[MODEL], extracted_rows=requests,
        staged_requests=requests,
        rejected_rows=0, rejected_by_reason={}, rejects="requests/rejects.jsonl", shards=shards, limits={},
        estimate={"per_model": {MODEL: {"requests": requests}}, "cache_plan": plan, "cost_usd_expected": 1.0},
        created_at=dt.datetime.now(dt.UTC).isoformat(),
    )  # fmt: skip
    load = LoadSummary(
        manifest.run_id, rows=requests, by_status={"valid": requests}, input_tokens=requests * 400,
        output_tokens=requests * 60, cache_creation_input_tokens=(cached - reads) * PREFIX,
        cache_read_input_tokens=reads * PREFIX, cost_usd=1.0,
    )  # fmt: skip
    warehouse.record_run(
        work, manifest, load, AccountingReport(manifest.run_id, requests, {"succeeded": requests})
    )


@pytest.fixture
def history(warehouse_conn):
    work = workload(cache="auto")
    warehouse = Warehouse(warehouse_conn)
    warehouse.ensure_tables(work)
    return warehouse, work


def test_auto_starts_off_with_a_probe_bounded_by_a_share_of_the_run(warehouse_conn, local_store, emulator):
    work = workload(cache="auto")
    create_tickets(warehouse_conn, rows(1_000))
    config = config_for(work, local_store)
    layout = RunLayout(local_store, "cost_dag", "run-1")
    log = RecordingLog()
    summary = run_stage(config, Warehouse(warehouse_conn), layout, RunOptions(), interval(0),
                        client=client_for(emulator), log=log)  # fmt: skip
    manifest = read_manifest(layout)
    assert manifest.cache_setting == "off" and manifest.staged_requests == 1_000
    plan = manifest.estimate["cache_plan"]
    probe = plan["probe"]
    assert probe["setting"] == "5m" and probe["reason"] == "never measured"
    assert 10 <= probe["requests"] <= MAX_PROBE_REQUESTS
    # Even if every probe request were a cache write, the run would cost at most 1% more than caching off.
    assert probe["max_extra_usd"] <= DEFAULT_PROBE_SHARE * manifest.estimate["cost_usd_uncached"] * 1.0001
    assert summary["cache_probe"]["requests"] == probe["requests"]
    # The probe is a shard of its own whose requests carry the 5-minute cache_control; the others none.
    *rest, probe_shard = manifest.shards
    assert probe_shard.part == probe["part"] and probe_shard.count == probe["requests"]
    for shard in manifest.shards:
        systems = [request["params"]["system"][0] for request in iter_shard_requests(layout, shard)]
        expected = {"type": "ephemeral"} if shard is probe_shard else None
        assert all(system.get("cache_control") == expected for system in systems)
    keys = [
        key
        for shard in manifest.shards
        for key in read_shard_keys(layout, shard).column("record_key").to_pylist()
    ]
    assert sorted(keys) == sorted(row["id"] for row in rows(1_000))  # every request once, none lost
    assert any(line.startswith("Caching (auto): off") and "probing 5m on" in line for line in log.lines)


def test_a_probe_runs_only_when_the_run_is_big_enough_and_probes_are_on(local_store, monkeypatch):
    from claude_batch.caching import CacheDecision, size_probe

    small = size_probe(CacheDecision("auto", "off", "x", probe_setting="5m"), staged_requests=30,
                       uncached_cost_usd=0.3, extra_per_request_usd=0.002)  # fmt: skip
    assert small.probe_requests == 0 and "too small to probe" in small.probe_reason
    monkeypatch.setenv("CLAUDE_BATCH_CACHE_PROBE_SHARE", "0")
    off = size_probe(CacheDecision("auto", "off", "x", probe_setting="5m"), staged_requests=100_000,
                     uncached_cost_usd=800.0, extra_per_request_usd=0.002)  # fmt: skip
    assert off.probe_requests == 0 and "probes are turned off" in off.probe_reason


def test_a_probe_that_pays_makes_auto_use_the_setting_next(history):
    warehouse, work = history
    record(warehouse, work, 1, "off", 0.6, probe=("5m", 90))
    decision = decide(work, warehouse.recent_cache_observations(work), default_prices())
    assert decision.setting == "5m" and decision.probe_setting is None
    assert decision.evidence["5m"].probes == 1 and decision.factors["5m"]["conclusion"] == "pays"


def test_auto_after_a_streak_of_off_runs_keeps_its_evidence(history):
    warehouse, work = history
    record(warehouse, work, 1, "off", 0.05, probe=("5m", 90))  # 5m conclusively does not pay
    record(warehouse, work, 2, "off", 0.10, probe=("1h", 40))  # nor does 1h
    for run in range(3, 3 + REMEASURE_AFTER_RUNS - 2):
        record(warehouse, work, run, "off")
        decision = decide(work, warehouse.recent_cache_observations(work), default_prices())
        # Off, and no new probe: the evidence of runs 1 and 2 is still there, however many off runs
        # came after.
        assert decision.setting == "off" and decision.probe_setting is None, (run, decision.describe())
        assert set(decision.evidence) == {"5m", "1h"}
    record(warehouse, work, 99, "off")
    decision = decide(work, warehouse.recent_cache_observations(work), default_prices())
    # Now the 5-minute evidence is REMEASURE_AFTER_RUNS runs old: it is measured again, at the probe's
    # bounded cost.
    assert (
        decision.probe_setting == "5m"
        and decision.probe_reason == f"last measured {REMEASURE_AFTER_RUNS} runs ago"
    )


def test_a_setting_that_pays_is_taken_up_again_after_off_runs(history):
    warehouse, work = history
    for run in range(1, 4):
        record(warehouse, work, run, "5m", 0.7)
    for run in range(4, 12):  # the workload ran with caching off for a while (say, a fixed policy)
        record(warehouse, work, run, "off")
    decision = decide(work, warehouse.recent_cache_observations(work), default_prices())
    assert decision.setting == "5m"
    assert decision.evidence["5m"].runs == 3 and decision.evidence["5m"].runs_ago == 8
    assert decision.evidence["5m"].hit_rate == pytest.approx(0.7, abs=0.001)


def test_after_5m_does_not_pay_auto_probes_1h_then_settles(history):
    warehouse, work = history
    record(warehouse, work, 1, "off", 0.0, probe=("5m", 90))
    first = decide(work, warehouse.recent_cache_observations(work), default_prices())
    assert first.setting == "off" and first.probe_setting == "1h"
    record(warehouse, work, 2, "off", 0.0, probe=("1h", 25))
    settled = decide(work, warehouse.recent_cache_observations(work), default_prices())
    assert settled.setting == "off" and settled.probe_setting is None
    assert {s: f["conclusion"] for s, f in settled.factors.items()} == {
        "5m": "does not pay",
        "1h": "does not pay",
    }


def test_the_run_history_records_the_decision_and_the_probe(warehouse_conn, local_store, emulator):
    emulator.configure(cache_hit_rate=0.9)
    create_tickets(warehouse_conn, [*rows(1_000, day=0), *rows(1_000, day=1)])
    config = config_for(workload(cache="auto"), local_store)
    report, manifest = night(config, warehouse_conn, local_store, emulator, 0)
    from tests.datapath.conftest import query

    probe_setting, probe_requests, policy, decision = query(
        warehouse_conn,
        "SELECT cache_probe_setting, cache_probe_requests, cache_policy, cache_decision "
        "FROM claude_batch_runs",
    )[0]
    plan = orjson.loads(decision)
    assert (probe_setting, policy) == ("5m", "auto") and probe_requests == manifest.estimate["cache_plan"][
        "probe"
    ]["requests"]
    assert plan["probe"]["setting"] == "5m" and plan["cached_batches"] == 1 and plan["prefix_tokens"] > 1_024
    assert report["cache"]["probe"]["requests"] == probe_requests
    # The probe measured the 5-minute cache at about 90%: the next night uses it for everything.
    second, second_manifest = night(config, warehouse_conn, local_store, emulator, 1)
    assert second_manifest.cache_setting == "5m" and second["cache"]["probe"] is None
    assert second["costs"]["actual_usd"] < report["costs"]["actual_usd"] / 2


def test_fixed_policies_are_used_as_they_are_and_a_short_prefix_is_never_cached():
    for policy in ("off", "5m", "1h"):
        assert decide(workload(cache=policy)).setting == policy
    short = decide(workload(cache="auto", model="claude-haiku-4-5"))  # ~1,500 tokens, minimum 4,096
    assert short.setting == "off" and not short.cacheable and short.probe_setting is None
