"""Token estimates before a run, and what a run cost against what it would have cost.

The prices themselves, and pricing one message's usage, are :mod:`claude_batch.prices`
(re-exported here). A prefix shorter than the model's minimum cacheable length is never
cached, so an estimate that assumed caching there would be wrong.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from claude_batch.prices import (
    CHARS_PER_TOKEN,
    DEFAULT_PRICES_PATH,
    PRICES_ENV_VAR,
    REQUEST_OVERHEAD_TOKENS,
    CacheSetting,
    ModelPrice,
    PriceTable,
    UnknownModelError,
    Usage,
    base_model_id,
    cost_array,
    default_prices,
    list_price_usd,
    realtime_equivalent,
    usage_cost,
)

__all__ = [
    "CHARS_PER_TOKEN",
    "DEFAULT_PRICES_PATH",
    "PRICES_ENV_VAR",
    "REQUEST_OVERHEAD_TOKENS",
    "CacheSetting",
    "CostEstimate",
    "ModelEstimate",
    "ModelPrice",
    "PriceTable",
    "RunCosts",
    "TokenTotals",
    "UnknownModelError",
    "Usage",
    "apportion_tokens",
    "base_model_id",
    "cache_break_even_hit_rate",
    "cost_array",
    "default_prices",
    "estimate_tokens",
    "list_price_usd",
    "prefix_cost_factor",
    "realtime_equivalent",
    "run_costs",
    "uncached_cost",
    "usage_cost",
]


def estimate_tokens(text: str) -> int:
    """A rough token count for ``text`` (about four characters a token)."""
    return -(-len(text) // CHARS_PER_TOKEN)


def cache_break_even_hit_rate(setting: CacheSetting, prices: PriceTable | None = None) -> float:
    """The hit rate above which ``setting`` costs less than no caching.

    A hit costs ``read`` and a miss ``write`` times the plain input price, so caching pays when
    ``h * read + (1 - h) * write < 1``, i.e. ``h > (write - 1) / (write - read)``.
    """
    table = prices or default_prices()
    if setting == "off":
        return 0.0
    write = table.cache_write_multiplier(setting)
    return (write - 1.0) / (write - table.read)


def prefix_cost_factor(setting: CacheSetting, hit_rate: float, prices: PriceTable | None = None) -> float:
    """The expected price of a cached prefix token relative to plain input."""
    table = prices or default_prices()
    if setting == "off":
        return 1.0
    return hit_rate * table.read + (1.0 - hit_rate) * table.cache_write_multiplier(setting)


@dataclass
class ModelEstimate:
    """Token totals staged for one model (before submission)."""

    requests: int = 0
    prefix_tokens_per_request: int = 0
    variable_input_tokens: int = 0
    max_output_tokens: int = 0
    expected_output_tokens: int = 0
    content_chars: int = 0  # characters of the user messages (what count_tokens calibrates)


@dataclass
class CostEstimate:
    """A token and cost estimate for the staged requests of a run.

    ``cost_usd_max`` assumes every answer uses ``max_tokens`` and every cacheable prefix is a
    cache write (the worst case); ``cost_usd_expected`` uses the expected output length and the
    assumed cache hit rate.
    """

    cache_setting: CacheSetting
    assumed_cache_hit_rate: float
    per_model: dict[str, ModelEstimate] = field(default_factory=dict)

    def add(
        self, model: str, prefix_tokens: int, variable_tokens: int, max_output: int, expected_output: int
    ) -> None:
        entry = self.per_model.get(model)
        if entry is None:
            entry = self.per_model[model] = ModelEstimate(prefix_tokens_per_request=prefix_tokens)
        entry.requests += 1
        entry.variable_input_tokens += variable_tokens
        entry.max_output_tokens += max_output
        entry.expected_output_tokens += expected_output

    def _cost(self, prices: PriceTable, *, worst: bool, batch: bool) -> float:
        total = 0.0
        for model, entry in self.per_model.items():
            price = prices.for_model(model)
            prefix_total = entry.prefix_tokens_per_request * entry.requests
            cached = (
                self.cache_setting != "off" and entry.prefix_tokens_per_request >= price.min_cacheable_tokens
            )
            if cached:
                hit_rate = 0.0 if worst else self.assumed_cache_hit_rate
                prefix_price = prefix_total * prefix_cost_factor(self.cache_setting, hit_rate, prices)
            else:
                prefix_price = prefix_total
            output = entry.max_output_tokens if worst else entry.expected_output_tokens
            total += list_price_usd(price, prefix_price + entry.variable_input_tokens, output)
        return total * prices.batch_discount if batch else total

    def to_dict(self, prices: PriceTable | None = None) -> dict[str, Any]:
        """The estimate as it goes into the manifest."""
        table = prices or default_prices()
        return {
            "prices_read_on": table.read_on,
            "cache_setting": self.cache_setting,
            "assumed_cache_hit_rate": self.assumed_cache_hit_rate,
            "input_tokens": sum(
                e.prefix_tokens_per_request * e.requests + e.variable_input_tokens
                for e in self.per_model.values()
            ),
            "max_output_tokens": sum(e.max_output_tokens for e in self.per_model.values()),
            "expected_output_tokens": sum(e.expected_output_tokens for e in self.per_model.values()),
            "cost_usd_max": round(self._cost(table, worst=True, batch=True), 6),
            "cost_usd_expected": round(self._cost(table, worst=False, batch=True), 6),
            "realtime_cost_usd_expected": round(self._cost(table, worst=False, batch=False), 6),
            "per_model": {
                model: {
                    "requests": e.requests,
                    "prefix_tokens_per_request": e.prefix_tokens_per_request,
                    "cacheable": self.cache_setting != "off"
                    and e.prefix_tokens_per_request >= table.for_model(model).min_cacheable_tokens,
                    "variable_input_tokens": e.variable_input_tokens,
                    "max_output_tokens": e.max_output_tokens,
                    "content_chars": e.content_chars,
                }
                for model, e in sorted(self.per_model.items())
            },
        }


# --- what a run cost, against what it would have cost -------------------------------------


@dataclass(frozen=True)
class TokenTotals:
    """A run's billed tokens for one model (cache writes and reads apart from plain input)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_write_tokens: int = 0
    cache_read_tokens: int = 0

    @property
    def all_input_tokens(self) -> int:
        """Every input token, cached or not: what a request without caching is billed for."""
        return self.input_tokens + self.cache_write_tokens + self.cache_read_tokens

    def __add__(self, other: TokenTotals) -> TokenTotals:
        return TokenTotals(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cache_write_tokens + other.cache_write_tokens,
            self.cache_read_tokens + other.cache_read_tokens,
        )


def uncached_cost(
    tokens: Mapping[str, TokenTotals], prices: PriceTable | None = None, *, batch: bool
) -> float:
    """The same tokens with no caching at all: every input token at the plain input price.

    :param tokens: billed tokens by the model that answered (dated snapshots are fine).
    :param batch: batch prices (the discount applied) or plain real-time list prices.
    """
    table = prices or default_prices()
    total = 0.0
    for model, counts in tokens.items():
        price = table.for_model(model)
        total += list_price_usd(price, counts.all_input_tokens, counts.output_tokens)
    return total * table.batch_discount if batch else total


@dataclass(frozen=True)
class RunCosts:
    """What a run cost and what the same tokens would have cost otherwise (the report's definitions).

    - ``actual_usd``: what the batches cost, priced from every result's usage (exact).
    - ``realtime_uncached_usd``: the same tokens sent as plain real-time Messages calls, no caching.
    - ``batch_uncached_usd``: the same tokens in batches with caching off.
    - ``saving_from_batching_usd`` = real-time uncached - batch uncached (the batch discount).
    - ``saving_from_caching_usd`` = batch uncached - actual; negative when caching cost money.
    - ``saving_usd`` = real-time uncached - actual: the two savings together.
    - the estimate made before anything was sent, its band, and its gap to the actual cost.

    :param exact: False when the references had to apportion a multi-model run's tokens.
    """

    actual_usd: float
    realtime_uncached_usd: float
    batch_uncached_usd: float
    estimated_usd: float | None = None
    estimate_low_usd: float | None = None
    estimate_high_usd: float | None = None
    estimate_method: str | None = None
    exact: bool = True

    @property
    def saving_from_batching_usd(self) -> float:
        return self.realtime_uncached_usd - self.batch_uncached_usd

    @property
    def saving_from_caching_usd(self) -> float:
        return self.batch_uncached_usd - self.actual_usd

    @property
    def saving_usd(self) -> float:
        return self.realtime_uncached_usd - self.actual_usd

    @property
    def estimate_gap_usd(self) -> float | None:
        return None if self.estimated_usd is None else self.estimated_usd - self.actual_usd

    @property
    def estimate_gap_pct(self) -> float | None:
        """(estimate - actual) / actual, in percent (None without an estimate or a cost)."""
        gap = self.estimate_gap_usd
        return None if gap is None or not self.actual_usd else 100.0 * gap / self.actual_usd

    def to_dict(self) -> dict[str, Any]:
        def money(value: float | None) -> float | None:
            return None if value is None else round(value, 6)

        share = self.actual_usd / self.realtime_uncached_usd if self.realtime_uncached_usd else None
        gap_pct = self.estimate_gap_pct
        return {
            "actual_usd": money(self.actual_usd),
            "realtime_uncached_usd": money(self.realtime_uncached_usd),
            "batch_uncached_usd": money(self.batch_uncached_usd),
            "saving_from_batching_usd": money(self.saving_from_batching_usd),
            "saving_from_caching_usd": money(self.saving_from_caching_usd),
            "saving_usd": money(self.saving_usd),
            "share_of_realtime": None if share is None else round(share, 4),
            "estimate": {
                "expected_usd": money(self.estimated_usd),
                "low_usd": money(self.estimate_low_usd),
                "high_usd": money(self.estimate_high_usd),
                "gap_usd": money(self.estimate_gap_usd),
                "gap_pct": None if gap_pct is None else round(gap_pct, 2),
                "method": self.estimate_method,
            },
            "exact": self.exact,
        }


def run_costs(
    actual_usd: float,
    tokens: Mapping[str, TokenTotals],
    prices: PriceTable | None = None,
    estimate: Mapping[str, Any] | None = None,
    *,
    exact: bool = True,
) -> RunCosts:
    """The report's cost figures for a run.

    :param actual_usd: the run's cost as priced from every result (``LoadSummary.cost_usd``).
    :param tokens: the run's billed tokens by answering model.
    :param estimate: the manifest's estimate (``cost_usd_expected``, ``cost_usd_low``, ...).
    """
    table = prices or default_prices()
    estimate = estimate or {}

    def number(key: str) -> float | None:
        value = estimate.get(key)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    return RunCosts(
        actual_usd=actual_usd,
        realtime_uncached_usd=uncached_cost(tokens, table, batch=False),
        batch_uncached_usd=uncached_cost(tokens, table, batch=True),
        estimated_usd=number("cost_usd_expected"),
        estimate_low_usd=number("cost_usd_low"),
        estimate_high_usd=number("cost_usd_high"),
        estimate_method=estimate.get("method") if isinstance(estimate.get("method"), str) else None,
        exact=exact,
    )


def apportion_tokens(total: TokenTotals, shares: Mapping[str, float]) -> dict[str, TokenTotals]:
    """``total`` split over models in proportion to ``shares`` (for multi-model runs known only in total).

    One model (or no shares) gets everything, which is exact.
    """
    weights = {model: max(float(share), 0.0) for model, share in shares.items()}
    if len(weights) <= 1 or not sum(weights.values()):
        return {next(iter(weights), "unknown"): total}
    whole = sum(weights.values())
    return {
        model: TokenTotals(
            round(total.input_tokens * weight / whole),
            round(total.output_tokens * weight / whole),
            round(total.cache_write_tokens * weight / whole),
            round(total.cache_read_tokens * weight / whole),
        )
        for model, weight in weights.items()
    }
