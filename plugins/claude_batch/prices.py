"""Prices, and what tokens cost at them.

Prices are data (``include/prices.json``, with the date they were read), never code. The Batch
API halves every list price, cache writes cost 1.25x (5-minute) or 2x (1-hour) the input price
and cache reads 0.1x. Every cost figure is built from :func:`list_price_usd` (tokens at a
model's list prices); the batch discount is applied on top.
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


def list_price_usd(price: ModelPrice, input_tokens: float, output_tokens: float) -> float:
    """Tokens at the model's list (real-time) prices, in USD.

    :param input_tokens: input tokens, cache writes and reads already weighted by their multipliers.
    """
    return (price.input * input_tokens + price.output * output_tokens) / 1_000_000


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
    weighted_input = (
        usage.input_tokens
        + writes_5m * table.write_5m
        + writes_1h * table.write_1h
        + usage.cache_read_input_tokens * table.read
    )
    total = list_price_usd(price, weighted_input, usage.output_tokens)
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
