"""Prices, token estimates and costs.

Prices are data (``include/prices.json``, with the date they were read), never code. The Batch
API halves every list price, cache writes cost 1.25x (5-minute) or 2x (1-hour) the input price
and cache reads 0.1x. A prefix shorter than the model's minimum cacheable length is never
cached, so an estimate that assumed caching there would be wrong.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import orjson

CacheSetting = Literal["off", "5m", "1h"]

# The table lives in the repository's include/; a wheel carries a copy beside this module
# (pyproject's force-include). CLAUDE_BATCH_PRICES points elsewhere.
_REPOSITORY_PRICES = Path(__file__).resolve().parents[2] / "include" / "prices.json"
_PACKAGED_PRICES = Path(__file__).resolve().parent / "prices.json"
DEFAULT_PRICES_PATH = _REPOSITORY_PRICES if _REPOSITORY_PRICES.exists() else _PACKAGED_PRICES
PRICES_ENV_VAR = "CLAUDE_BATCH_PRICES"
CHARS_PER_TOKEN = 4
# Role markers and the JSON around the content: a few tokens per request the text does not show.
REQUEST_OVERHEAD_TOKENS = 8
_SNAPSHOT_SUFFIX = re.compile(r"-(\d{8}|latest)$")


class UnknownModelError(KeyError):
    """A model id that no entry of the price table matches."""


def base_model_id(model_id: str) -> str:
    """The model id without a dated snapshot or ``-latest`` suffix.

    :param model_id: e.g. ``claude-haiku-4-5-20251001``.
    """
    return _SNAPSHOT_SUFFIX.sub("", model_id)


@dataclass(frozen=True)
class ModelPrice:
    """List prices (USD per million tokens) and caching facts for one model family."""

    name: str
    ids: tuple[str, ...]
    input: float
    output: float
    min_cacheable_tokens: int
    context_window: int
    list_price_max_input_tokens: int | None = None


@dataclass(frozen=True)
class PriceTable:
    """The price table as read from JSON.

    :param read_on: the date the prices were read (ISO date).
    :param batch_discount: the factor batch prices apply to list prices (0.5).
    """

    read_on: str
    batch_discount: float
    write_5m: float
    write_1h: float
    read: float
    models: tuple[ModelPrice, ...]
    source: str = ""
    _by_id: dict[str, ModelPrice] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for model in self.models:
            for model_id in model.ids:
                self._by_id[model_id] = model

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PriceTable:
        """Build the table from the parsed ``prices.json``."""
        multipliers = data["cache_multipliers"]
        models = tuple(
            ModelPrice(
                name=entry["name"],
                ids=tuple(entry["ids"]),
                input=float(entry["input"]),
                output=float(entry["output"]),
                min_cacheable_tokens=int(entry["min_cacheable_tokens"]),
                context_window=int(entry["context_window"]),
                list_price_max_input_tokens=entry.get("list_price_max_input_tokens"),
            )
            for entry in data["models"]
        )
        return cls(
            read_on=str(data["read_on"]),
            batch_discount=float(data["batch_discount"]),
            write_5m=float(multipliers["write_5m"]),
            write_1h=float(multipliers["write_1h"]),
            read=float(multipliers["read"]),
            models=models,
            source=str(data.get("source", "")),
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> PriceTable:
        """Read the table from ``path``, ``$CLAUDE_BATCH_PRICES`` or ``include/prices.json``.

        :param path: a JSON file in the ``include/prices.json`` shape.
        """
        resolved = Path(path or os.environ.get(PRICES_ENV_VAR) or DEFAULT_PRICES_PATH)
        return cls.from_dict(orjson.loads(resolved.read_bytes()))

    def find(self, model_id: str) -> ModelPrice | None:
        """The entry for ``model_id`` (dated snapshots included), or None."""
        return self._by_id.get(model_id) or self._by_id.get(base_model_id(model_id))

    def for_model(self, model_id: str) -> ModelPrice:
        """The entry for ``model_id``; raises :class:`UnknownModelError` when none matches."""
        price = self.find(model_id)
        if price is None:
            raise UnknownModelError(f"no price for model {model_id!r} in the table read on {self.read_on}")
        return price

    def cache_write_multiplier(self, setting: CacheSetting) -> float:
        """What a cache write costs relative to plain input for ``setting``."""
        return {"5m": self.write_5m, "1h": self.write_1h}.get(setting, 1.0)


@lru_cache(maxsize=4)
def _cached_default(path: str) -> PriceTable:
    return PriceTable.load(path)


def default_prices() -> PriceTable:
    """The table from ``$CLAUDE_BATCH_PRICES`` or ``include/prices.json``, read once per process."""
    return _cached_default(str(os.environ.get(PRICES_ENV_VAR) or DEFAULT_PRICES_PATH))


@dataclass(frozen=True)
class Usage:
    """Token usage of one message as the API reports it.

    ``cache_creation_input_tokens`` is the total written; the 5m/1h split, when the API gives
    it, prices the writes exactly. Without the split, writes are priced as 5-minute writes,
    the API's default TTL.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_5m_input_tokens: int | None = None
    cache_creation_1h_input_tokens: int | None = None

    @classmethod
    def from_api(cls, usage: Any) -> Usage:
        """Build from an API ``usage`` object (dict or SDK model)."""
        data = usage if isinstance(usage, Mapping) else usage.model_dump()
        creation = data.get("cache_creation") or {}
        return cls(
            input_tokens=int(data.get("input_tokens") or 0),
            output_tokens=int(data.get("output_tokens") or 0),
            cache_creation_input_tokens=int(data.get("cache_creation_input_tokens") or 0),
            cache_read_input_tokens=int(data.get("cache_read_input_tokens") or 0),
            cache_creation_5m_input_tokens=creation.get("ephemeral_5m_input_tokens"),
            cache_creation_1h_input_tokens=creation.get("ephemeral_1h_input_tokens"),
        )

    def split_cache_writes(self) -> tuple[int, int]:
        """(5-minute, 1-hour) cache write tokens."""
        if self.cache_creation_5m_input_tokens is None and self.cache_creation_1h_input_tokens is None:
            return self.cache_creation_input_tokens, 0
        return (self.cache_creation_5m_input_tokens or 0), (self.cache_creation_1h_input_tokens or 0)


def usage_cost(usage: Usage, model: str, prices: PriceTable | None = None, *, batch: bool = True) -> float:
    """The cost in USD of one message's usage.

    :param usage: the message's usage.
    :param model: the model id the API answered with (dated snapshots are fine).
    :param prices: the price table (default: :func:`default_prices`).
    :param batch: batch prices (half of list) when True, list (real-time) prices when False.
    """
    table = prices or default_prices()
    price = table.for_model(model)
    writes_5m, writes_1h = usage.split_cache_writes()
    input_cost = price.input * (
        usage.input_tokens
        + writes_5m * table.write_5m
        + writes_1h * table.write_1h
        + usage.cache_read_input_tokens * table.read
    )
    total = (input_cost + price.output * usage.output_tokens) / 1_000_000
    return total * table.batch_discount if batch else total


def realtime_equivalent(usage: Usage, model: str, prices: PriceTable | None = None) -> float:
    """What the same usage would have cost through the real-time Messages API."""
    return usage_cost(usage, model, prices, batch=False)


def cost_array(
    models: Sequence[str | None],
    input_tokens: np.ndarray,
    output_tokens: np.ndarray,
    cache_write_5m_tokens: np.ndarray,
    cache_write_1h_tokens: np.ndarray,
    cache_read_tokens: np.ndarray,
    prices: PriceTable | None = None,
    *,
    batch: bool = True,
) -> np.ndarray:
    """Vectorised :func:`usage_cost` for a column of results; NaN where the model is unknown.

    :param models: the answering model per row (None for rows without a message).
    """
    table = prices or default_prices()
    per_model: dict[str | None, tuple[float, float]] = {}
    input_price = np.empty(len(models), dtype=np.float64)
    output_price = np.empty(len(models), dtype=np.float64)
    for index, model in enumerate(models):
        pair = per_model.get(model)
        if pair is None:
            found = table.find(model) if model else None
            # No message means nothing billed; an unknown model means an unknown cost.
            pair = (
                (0.0, 0.0)
                if model is None
                else ((found.input, found.output) if found else (math.nan, math.nan))
            )
            per_model[model] = pair
        input_price[index], output_price[index] = pair
    weighted_input = (
        input_tokens
        + cache_write_5m_tokens * table.write_5m
        + cache_write_1h_tokens * table.write_1h
        + cache_read_tokens * table.read
    )
    cost = (input_price * weighted_input + output_price * output_tokens) / 1_000_000
    return cost * table.batch_discount if batch else cost


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
            total += (
                price.input * (prefix_price + entry.variable_input_tokens) + price.output * output
            ) / 1_000_000
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
        total += (price.input * counts.all_input_tokens + price.output * counts.output_tokens) / 1_000_000
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
