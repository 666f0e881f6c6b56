"""The cost estimate of a staged run, made before anything is sent, with the band it is good to.

Three things set a run's cost: its input tokens, its output tokens and how its cached prefix is
billed. Each is measured where it can be, and stated where it cannot:

- **Input tokens** are counted by the API's free ``count_tokens`` endpoint on a uniform random
  sample of the run's requests (:data:`SAMPLE_REQUESTS`, 200, reservoir-sampled from the rows as
  staging reads them) and extended to every request by a regression on the characters staging
  counts; without a client, about four characters a token (:mod:`claude_batch.input_tokens`
  says how, and what the band is).
- **Output tokens** per answer are measured in the workload's last runs of the same prompt
  version (band: their spread, at least 10%); on a first run, the workload's
  ``expected_output_tokens`` if it states one (band: from nothing to twice that), else a quarter
  of ``max_tokens`` (the workloads in ``dags/`` state 20 to 30% of theirs), the band from
  nothing to ``max_tokens``.
- **The cached prefix** is priced at the hit rate measured for the run's setting
  (:meth:`claude_batch.caching.CacheDecision.hit_rate`), only where the counted prefix reaches
  the model's minimum cacheable length; a probe's requests at the probe setting's.

Then the batch discount. ``cost_usd_expected`` is the estimate; ``cost_usd_low`` and
``cost_usd_high`` take every input at the end of its band that lowers or raises the cost (the
gate refuses a budget only when even ``cost_usd_low`` is over it); ``cost_usd_max`` is the worst
case (every answer ``max_tokens`` long, every cached prefix a write).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, overload

import pyarrow as pa
import pyarrow.compute as pc

from claude_batch.caching import CacheDecision, size_probe, split_probe
from claude_batch.costs import CacheSetting, PriceTable, prefix_cost_factor
from claude_batch.input_tokens import (
    CHARACTER_BAND,
    COUNT_BAND,
    COUNT_WORKERS,
    ModelTokens,
    _regression_total,
    character_tokens,
    count_params,
    measure_tokens,
)
from claude_batch.staging import Manifest, read_shard_keys
from claude_batch.staging.chunks import peek_rows
from claude_batch.storage import RunLayout
from claude_batch.workloads import CacheObservation, Workload

SAMPLE_REQUESTS = 200
FIRST_RUN_OUTPUT_SHARE = 0.25
STATED_OUTPUT_FACTOR = 2.0  # a stated expectation: answers from none to twice as long
MEASURED_OUTPUT_BAND = 0.10
OUTPUT_HISTORY_RUNS = 3

# The input-token names stay importable from here (input_tokens.py holds them).
__all__ = [
    "CHARACTER_BAND",
    "COUNT_BAND",
    "COUNT_WORKERS",
    "FIRST_RUN_OUTPUT_SHARE",
    "MEASURED_OUTPUT_BAND",
    "OUTPUT_HISTORY_RUNS",
    "SAMPLE_REQUESTS",
    "STATED_OUTPUT_FACTOR",
    "ModelTokens",
    "OutputTokens",
    "RowSample",
    "_regression_total",
    "build_estimate",
    "character_tokens",
    "count_params",
    "estimate_run",
    "measure_tokens",
    "output_tokens",
]


# --- the sample -----------------------------------------------------------------------------------


class RowSample:
    """A uniform random sample of the rows a run stages, taken while staging reads them.

    :meth:`wrap` passes every row through and keeps ``size`` of them (Vitter's reservoir, algorithm
    L: a random number only where a row is taken, so the rows that pass cost a comparison each).
    Rows may come as mappings or as Arrow record batches; of a batch, only the rows taken become
    mappings, and the same rows are taken either way.

    :param seed: makes the sample the same on a re-run of the same run.
    """

    def __init__(self, size: int = SAMPLE_REQUESTS, seed: str = "") -> None:
        self.size = size
        self.rows: list[Mapping[str, Any]] = []
        self.seen = 0
        self._rng = random.Random(seed)

    def _unit(self) -> float:
        return self._rng.random() or 0.5

    @overload
    def wrap(self, rows: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]: ...
    @overload
    def wrap(self, rows: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]: ...
    def wrap(self, rows: Iterable[Any]) -> Iterator[Any]:
        """``rows`` passed through as they are (mappings, or record batches), sampled on the way."""
        as_batches, iterator = peek_rows(rows)
        if as_batches is None:
            self.seen = 0
            return
        if as_batches:
            yield from self._wrap_batches(iterator)
        else:
            yield from self._wrap_mappings(iterator)

    def _wrap_mappings(self, rows: Iterator[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
        size, sample = self.size, self.rows
        seen = 0
        try:
            if size <= 0:
                for row in rows:
                    seen += 1
                    yield row
                return
            for row in rows:
                sample.append(row)
                seen += 1
                yield row
                if len(sample) >= size:
                    break
            else:
                return
            weight = math.exp(math.log(self._unit()) / size)
            take = seen + math.floor(math.log(self._unit()) / math.log(1 - weight))
            for row in rows:
                if seen == take:
                    sample[self._rng.randrange(size)] = row
                    weight *= math.exp(math.log(self._unit()) / size)
                    take += math.floor(math.log(self._unit()) / math.log(1 - weight)) + 1
                seen += 1
                yield row
        finally:
            self.seen = seen

    def _wrap_batches(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        # The mapping path's draws, in its order: ``take`` is the index (from the first row) of
        # the next row to take, so each batch costs a comparison unless a row of it is taken.
        size, sample = self.size, self.rows
        seen, take, weight = 0, -1, 0.0
        try:
            for batch in batches:
                count = batch.num_rows
                if 0 < size and len(sample) < size:
                    filled = min(size - len(sample), count)
                    sample.extend(batch.slice(0, filled).to_pylist())
                    if len(sample) >= size:
                        weight = math.exp(math.log(self._unit()) / size)
                        take = seen + filled + math.floor(math.log(self._unit()) / math.log(1 - weight))
                while seen <= take < seen + count:
                    sample[self._rng.randrange(size)] = batch.slice(take - seen, 1).to_pylist()[0]
                    weight *= math.exp(math.log(self._unit()) / size)
                    take += math.floor(math.log(self._unit()) / math.log(1 - weight)) + 1
                seen += count
                yield batch
        finally:
            self.seen = seen


# --- output tokens -------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputTokens:
    """Output tokens per answer: the point the estimate takes, its band, where it comes from."""

    point: float
    low: float
    high: float
    source: str

    def to_dict(self) -> dict[str, Any]:
        return {"per_answer": round(self.point, 2), "low": round(self.low, 2), "high": round(self.high, 2),
                "source": self.source}  # fmt: skip


def output_tokens(workload: Workload, observations: Iterable[CacheObservation]) -> OutputTokens:
    """Measured in the last runs of the same prompt version; else stated; else a quarter of max_tokens."""
    limit = float(workload.max_tokens)
    runs = [
        o for o in sorted(observations, key=lambda o: o.runs_ago)
        if o.prompt_version == workload.prompt_version and o.answers > 0
    ][:OUTPUT_HISTORY_RUNS]  # fmt: skip
    if runs:
        answers = sum(o.answers for o in runs)
        point = sum(o.output_tokens for o in runs) / answers
        spread = max(abs(o.output_tokens / o.answers - point) / point for o in runs) if point else 0.0
        band = max(MEASURED_OUTPUT_BAND, spread)
        return OutputTokens(point, point * (1 - band), min(limit, point * (1 + band)),
                            f"measured: {answers:,} answers over {len(runs)} run(s)")  # fmt: skip
    if workload.expected_output_tokens:
        point = float(min(workload.expected_output_tokens, workload.max_tokens))
        return OutputTokens(point, 0.0, min(limit, point * STATED_OUTPUT_FACTOR),
                            "first run: the workload's expected_output_tokens")  # fmt: skip
    return OutputTokens(limit * FIRST_RUN_OUTPUT_SHARE, 0.0, limit,
                        f"first run: assumed {FIRST_RUN_OUTPUT_SHARE:.0%} of max_tokens")  # fmt: skip


# --- the estimate --------------------------------------------------------------------------------


@dataclass
class _Costs:
    expected: float = 0.0
    low: float = 0.0
    high: float = 0.0
    worst: float = 0.0
    uncached: float = 0.0  # at list prices
    input_tokens: float = 0.0
    output_tokens: float = 0.0
    max_output_tokens: float = 0.0
    parts: list[dict[str, Any]] = field(default_factory=list)


def _price_part(
    costs: _Costs, tokens: ModelTokens, requests: int, setting: CacheSetting, decision: CacheDecision,
    output: OutputTokens, workload: Workload, prices: PriceTable, name: str, batches: int,
) -> None:  # fmt: skip
    """Add ``requests`` of the model's requests, in ``batches`` batches, at ``setting`` to ``costs``.

    At list prices (the batch discount comes after).

    Each batch's first request writes the prefix; the hit rate applies to the others.
    """
    if not requests:
        return
    price = prices.for_model(tokens.model)
    share = requests / tokens.requests if tokens.requests else 0.0
    input_tokens = tokens.input_tokens * share
    band = tokens.band()
    prefix = requests * tokens.prefix_tokens
    cacheable = setting != "off" and tokens.prefix_tokens >= price.min_cacheable_tokens
    rate = decision.hit_rate(setting) if cacheable else None

    def cost(inputs: float, factor: float, per_answer: float) -> float:
        billed = inputs - prefix + prefix * factor if cacheable else inputs
        return (price.input * billed + price.output * requests * per_answer) / 1_000_000

    point, low, high = (rate.point, rate.low, rate.high) if rate else (0.0, 0.0, 0.0)
    warm = max(requests - max(batches, 1), 0) / requests  # the share of requests that can read

    def factor(hit_rate: float) -> float:
        return prefix_cost_factor(setting, hit_rate * warm, prices) if cacheable else 1.0

    costs.expected += cost(input_tokens, factor(point), output.point)
    costs.low += cost(input_tokens * (1 - band), factor(high), output.low)
    costs.high += cost(input_tokens * (1 + band), factor(low), output.high)
    costs.worst += cost(input_tokens, factor(0.0), workload.max_tokens)
    costs.uncached += (price.input * input_tokens + price.output * requests * output.point) / 1_000_000
    costs.input_tokens += input_tokens
    costs.output_tokens += requests * output.point
    costs.max_output_tokens += requests * workload.max_tokens
    costs.parts.append({
        "part": name, "model": tokens.model, "requests": requests, "batches": batches, "setting": setting,
        "cacheable": cacheable,
        "hit_rate": rate.to_dict() if rate else None,
        "prefix_factor": round(factor(point), 4),
    })  # fmt: skip


def build_estimate(
    workload: Workload,
    decision: CacheDecision,
    tokens: Mapping[str, ModelTokens],
    output: OutputTokens,
    prices: PriceTable,
    probe_requests: Mapping[str, int] | None = None,
    batches: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The manifest's ``estimate``: costs with their band, what they rest on, and the cache plan.

    :param probe_requests: the probe's requests by model (they are priced at the probe's setting,
        in a batch of their own).
    :param batches: the batches each model's other requests go in (default one).
    """
    probe_requests = probe_requests or {}
    batches = batches or {}
    costs = _Costs()
    for model, counted in sorted(tokens.items()):
        probed = probe_requests.get(model, 0)
        _price_part(costs, counted, counted.requests - probed, decision.setting, decision, output, workload,
                    prices, "main", batches.get(model, 1))  # fmt: skip
        if probed and decision.probe_setting is not None:
            _price_part(
                costs, counted, probed, decision.probe_setting, decision, output, workload, prices, "probe", 1
            )
    discount = prices.batch_discount
    main_rate = decision.hit_rate(decision.setting)
    methods = sorted({counted.method for counted in tokens.values()}) or ["count_tokens"]
    sampled = sum(counted.sampled for counted in tokens.values())
    return {
        "prices_read_on": prices.read_on,
        "method": "+".join(methods),
        "cache_setting": decision.setting,
        "assumed_cache_hit_rate": round(main_rate.point, 4) if main_rate else 0.0,
        "input_tokens": round(costs.input_tokens),
        "max_output_tokens": round(costs.max_output_tokens),
        "expected_output_tokens": round(costs.output_tokens),
        "cost_usd_max": round(costs.worst * discount, 6),
        "cost_usd_expected": round(costs.expected * discount, 6),
        "cost_usd_low": round(costs.low * discount, 6),
        "cost_usd_high": round(costs.high * discount, 6),
        "cost_usd_uncached": round(costs.uncached * discount, 6),
        "cost_usd_realtime_uncached": round(costs.uncached, 6),
        "realtime_cost_usd_expected": round(costs.expected, 6),
        "per_model": {
            model: {
                "requests": counted.requests,
                "prefix_tokens_per_request": counted.prefix_tokens,
                "cacheable": decision.setting != "off"
                and counted.prefix_tokens >= prices.for_model(model).min_cacheable_tokens,
                "variable_input_tokens": round(counted.variable_tokens),
                "max_output_tokens": counted.requests * workload.max_tokens,
                "content_chars": counted.content_chars,
                **counted.to_dict(),
            }
            for model, counted in sorted(tokens.items())
        },
        "basis": {
            "sample": {
                "requests": sampled,
                "of": sum(counted.requests for counted in tokens.values()),
                "count_calls": sampled + 3 * len(tokens) if "count_tokens" in methods else 0,
            },  # fmt: skip
            "output_tokens": output.to_dict(),
            "parts": costs.parts,
        },
        "cache_plan": decision.to_dict(),
    }


def _sampled_requests(
    layout: RunLayout, manifest: Manifest, sample: RowSample, key_column: str
) -> list[tuple[Mapping[str, Any], str]]:
    """The sampled rows that were staged, with the model staging gave each (rejected rows drop out)."""
    wanted = {str(row.get(key_column)): row for row in sample.rows if row.get(key_column) is not None}
    if not wanted:
        return []
    value_set = pa.array(sorted(wanted), pa.string())
    found: list[tuple[Mapping[str, Any], str]] = []
    for shard in manifest.shards:
        keys = read_shard_keys(layout, shard).select(["record_key", "model"])
        hits = keys.filter(pc.is_in(keys.column("record_key"), value_set=value_set))
        for record_key, model in zip(
            hits.column("record_key").to_pylist(), hits.column("model").to_pylist(), strict=True
        ):
            row = wanted.pop(record_key, None)
            if row is not None:
                found.append((row, model))
    return found


def estimate_run(
    layout: RunLayout,
    manifest: Manifest,
    workload: Workload,
    decision: CacheDecision,
    observations: Iterable[CacheObservation],
    prices: PriceTable,
    *,
    sample: RowSample | None = None,
    client: Any = None,
    key_column: str,
    log: Any = None,
) -> Manifest:
    """Measure the staged run's tokens, size and split off the probe, and write the estimate.

    :param manifest: the manifest as staging wrote it (its own estimate counts characters).
    :param sample: the rows sampled while staging (None: a retried stage, which has none).
    :param client: an ``anthropic.Anthropic`` client for ``count_tokens`` (None: characters only).
    :param key_column: the row field holding the record key (as the shard keys record it).
    :returns: the manifest with the estimate (and the probe's shard), as written.
    """
    observations = list(observations)
    per_model = {
        model: (int(entry["requests"]), int(entry.get("content_chars") or 0))
        for model, entry in (manifest.estimate or {}).get("per_model", {}).items()
    }
    tokens: dict[str, ModelTokens] | None = None
    if per_model and client is not None and sample is not None:
        sampled = _sampled_requests(layout, manifest, sample, key_column)
        if sampled:
            try:
                tokens = measure_tokens(client, workload, decision.setting, sampled, per_model)
            except Exception as exc:  # never fail a run over its estimate: say so and count characters
                if log is not None:
                    log.warning("count_tokens failed (%s: %s); the estimate counts characters instead.",
                                type(exc).__name__, str(exc)[:200])  # fmt: skip
    if tokens is None:
        tokens = character_tokens(workload, per_model)
    output = output_tokens(workload, observations)
    prefix = max((counted.prefix_tokens for counted in tokens.values()), default=0)
    decision.prefix_tokens = prefix
    probe_requests: dict[str, int] = {}
    if decision.probe_setting is not None and tokens:
        cacheable = [
            m for m, c in tokens.items() if c.prefix_tokens >= prices.for_model(m).min_cacheable_tokens
        ]
        if not cacheable:
            decision.probe_reason += "; the counted prefix is under the minimum cacheable length"
        else:
            plain = build_estimate(
                workload, replace(decision, setting="off", probe_setting=None), tokens, output, prices
            )
            extra = max(
                tokens[m].prefix_tokens * (prices.cache_write_multiplier(decision.probe_setting) - 1.0)
                * prices.for_model(m).input / 1_000_000 * prices.batch_discount
                for m in cacheable
            )  # fmt: skip
            size_probe(decision, staged_requests=manifest.staged_requests,
                       uncached_cost_usd=float(plain["cost_usd_expected"]),
                       extra_per_request_usd=extra)  # fmt: skip
            if decision.probe_requests:
                manifest, probe_requests = split_probe(layout, manifest, workload, decision.probe_setting,
                                                       decision.probe_requests)  # fmt: skip
    probe_shard = manifest.shards[-1].part if probe_requests else None
    batches: dict[str, int] = {}
    for shard in manifest.shards:
        if shard.part != probe_shard:
            for model in shard.models:
                batches[model] = batches.get(model, 0) + 1
    estimate = build_estimate(workload, decision, tokens, output, prices, probe_requests, batches)
    if probe_shard is not None:
        estimate["cache_plan"]["probe"]["part"] = probe_shard
    manifest = replace(manifest, estimate=estimate)
    layout.store.write_json(layout.manifest, manifest.to_dict())
    if log is not None:
        log.info("%s", decision.describe())
        log.info(
            "Estimate (%s): $%.4f in batches, between $%.4f and $%.4f (at most $%.4f); input %s tokens, "
            "output %.0f per answer (%s); caching off it would be $%.4f, plain real-time calls $%.4f.",
            estimate["method"], estimate["cost_usd_expected"], estimate["cost_usd_low"],
            estimate["cost_usd_high"],
            estimate["cost_usd_max"], f"{estimate['input_tokens']:,}", output.point, output.source,
            estimate["cost_usd_uncached"], estimate["cost_usd_realtime_uncached"],
        )  # fmt: skip
    return manifest
