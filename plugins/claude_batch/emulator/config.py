"""The emulator's run-time settings: one dataclass, readable and writable as JSON.

``GET /_emulator/config`` returns ``EmulatorConfig.to_dict()``; ``POST /_emulator/config`` and
``EmulatorServer.configure(**kw)`` update the keys they name (``faults`` is replaced whole).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .faults import FaultConfig

# Model alias -> dated snapshot the API answers with in Message.model. Unknown names pass through.
DEFAULT_MODEL_ALIASES: dict[str, str] = {
    "claude-haiku-4-5": "claude-haiku-4-5-20251001",
    "claude-sonnet-4-5": "claude-sonnet-4-5-20250929",
    "claude-opus-4-5": "claude-opus-4-5-20251101",
    "claude-opus-4-1": "claude-opus-4-1-20250805",
    "claude-opus-4-0": "claude-opus-4-20250514",
    "claude-sonnet-4-0": "claude-sonnet-4-20250514",
    "claude-3-7-sonnet-latest": "claude-3-7-sonnet-20250219",
    "claude-3-5-haiku-latest": "claude-3-5-haiku-20241022",
}

# Minimum cacheable prompt length in tokens, by model-name prefix (the longest matching prefix
# wins, "" is the fallback). A shorter cache prefix is silently not cached.
DEFAULT_MIN_CACHEABLE_TOKENS: dict[str, int] = {
    "": 1024,
    "claude-haiku-4-5": 4096,
    "claude-opus-4-5": 4096,
    "claude-haiku-3": 2048,
    "claude-3-5-haiku": 2048,
    "claude-3-haiku": 2048,
    "claude-sonnet": 1024,
    "claude-opus": 1024,
}

DAY = 86_400.0


@dataclass
class EmulatorConfig:
    """Settings that may change while the emulator runs."""

    time_scale: float = 1.0  # emulated seconds per wall-clock second
    processing_seconds: float = 60.0  # emulated time a batch takes to process
    processing_jitter: float = 0.1  # each batch takes processing_seconds * (1 +- jitter), seeded
    cancel_seconds: float = 5.0  # emulated time from cancel to ended
    expiry_seconds: float = DAY  # a batch expires this long after created_at
    archive_seconds: float = 29 * DAY  # results are gone this long after created_at
    cache_hit_rate: float = 0.9  # share of batch requests that read a warm cache prefix
    min_cacheable_tokens: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_MIN_CACHEABLE_TOKENS))
    model_aliases: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_MODEL_ALIASES))
    max_requests_per_batch: int = 100_000
    max_body_bytes: int = 256 * 1024 * 1024
    max_queued_requests: int | None = None  # requests still processing across batches; over it, create is 429
    batch_requests_per_minute: int | None = None  # per emulated minute on the batch endpoints; over it, 429
    public_base_url: str | None = None  # base of results_url; default: the URL the client used
    # Make each batch's result lines in the background from its creation on (while no request
    # is being served), so downloads stream stored lines; off: a download makes what is missing.
    precompute_results: bool = True
    faults: FaultConfig = field(default_factory=FaultConfig)

    def updated(self, **changes: Any) -> EmulatorConfig:
        """A copy with ``changes`` applied and checked; raises ValueError on a bad key or value."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = set(changes) - known
        if unknown:
            raise ValueError(f"unknown config key(s): {', '.join(sorted(unknown))}")
        values = dataclasses.asdict(self) | {"faults": self.faults}
        for key, value in changes.items():
            if key == "faults":
                value = value if isinstance(value, FaultConfig) else FaultConfig.from_dict(value)
            values[key] = value
        config = EmulatorConfig(**values)
        config._check()
        return config

    def _check(self) -> None:
        if self.time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        for name in ("processing_seconds", "cancel_seconds", "expiry_seconds", "archive_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if not 0 <= self.processing_jitter <= 1:
            raise ValueError("processing_jitter must be between 0 and 1")
        if not 0 <= self.cache_hit_rate <= 1:
            raise ValueError("cache_hit_rate must be between 0 and 1")
        if self.max_requests_per_batch < 1 or self.max_body_bytes < 1:
            raise ValueError("max_requests_per_batch and max_body_bytes must be >= 1")
        if not isinstance(self.min_cacheable_tokens, dict) or not isinstance(self.model_aliases, dict):
            raise ValueError("min_cacheable_tokens and model_aliases must be objects")
        self.time_scale = float(self.time_scale)
        self.processing_seconds = float(self.processing_seconds)

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["min_cacheable_tokens"] = dict(self.min_cacheable_tokens)
        data["model_aliases"] = dict(self.model_aliases)
        data["faults"] = self.faults.to_dict()
        return data

    def resolve_model(self, model: str) -> str:
        return self.model_aliases.get(model, model)

    def min_cacheable_for(self, model: str) -> int:
        best_prefix = ""
        for prefix in self.min_cacheable_tokens:
            if model.startswith(prefix) and len(prefix) >= len(best_prefix):
                best_prefix = prefix
        return self.min_cacheable_tokens.get(best_prefix, 1024)
