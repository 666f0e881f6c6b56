"""Fault injection: what can go wrong, how often, and the deterministic dice that decide it.

The fault configuration is plain JSON, set at start (constructor / CLI) or at run time through
``POST /_emulator/config {"faults": {...}}`` (which replaces the whole fault configuration)::

    {
      "http": [                      # HTTP errors answered instead of the real response
        {"endpoint": "create", "status": 429, "rate": 0.5, "times": 3, "retry_after": 1.0}
      ],
      "latency": {"retrieve": 0.2, "*": 0.01},   # extra real seconds before answering
      "batch": {                     # decided per request when a batch is created
        "errored_rate": 0.05,        # share of requests ending errored ...
        "error_types": ["api_error", "overloaded_error"],   # ... with these types, in turn
        "expired_rate": 0.01,        # share of requests ending expired
        "stall_rate": 0.0            # share of batches that never finish (they expire at 24 h)
      },
      "results_cut": {"after_lines": 10, "fraction": null, "times": 1, "mid_line": true}
    }

Endpoint names: create, retrieve, list, cancel, delete, results, messages, count_tokens, or
``*`` for all of them. ``rate`` is the chance per request (1.0 = every request); ``times`` caps
how many faults a rule injects (null = no cap). The dice are seeded, so a run with the same
seed and the same sequence of requests sees the same faults.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .errors import DEFAULT_MESSAGE_BY_STATUS, ERROR_TYPE_BY_STATUS, ApiError

ENDPOINTS = ("create", "retrieve", "list", "cancel", "delete", "results", "messages", "count_tokens")
BATCH_ERROR_TYPES = ("api_error", "overloaded_error", "timeout_error", "rate_limit_error")
_STATUSES_WITH_RETRY_AFTER = (429, 529)


def _rate(value: Any, name: str) -> float:
    rate = float(value)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"{name} must be between 0 and 1, got {value!r}")
    return rate


def _optional_count(value: Any, name: str) -> int | None:
    if value is None:
        return None
    count = int(value)
    if count < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return count


def _endpoint(value: Any) -> str:
    if value != "*" and value not in ENDPOINTS:
        raise ValueError(f"unknown endpoint {value!r}; expected one of {', '.join(ENDPOINTS)} or '*'")
    return str(value)


def _reject_unknown(data: dict, allowed: set[str], where: str) -> None:
    unknown = set(data) - allowed
    if unknown:
        raise ValueError(f"unknown {where} key(s): {', '.join(sorted(unknown))}")


@dataclass
class HttpFault:
    """Answer requests to ``endpoint`` with HTTP ``status`` at ``rate``, at most ``times`` times."""

    endpoint: str
    status: int
    rate: float = 1.0
    times: int | None = None
    retry_after: float | None = None

    @classmethod
    def from_dict(cls, data: dict) -> HttpFault:
        _reject_unknown(data, {"endpoint", "status", "rate", "times", "retry_after"}, "http fault")
        status = int(data["status"])
        if status not in ERROR_TYPE_BY_STATUS:
            raise ValueError(
                f"unsupported fault status {status}; expected one of {sorted(ERROR_TYPE_BY_STATUS)}"
            )
        retry_after = data.get("retry_after")
        return cls(
            endpoint=_endpoint(data.get("endpoint", "*")),
            status=status,
            rate=_rate(data.get("rate", 1.0), "rate"),
            times=_optional_count(data.get("times"), "times"),
            retry_after=None if retry_after is None else float(retry_after),
        )

    @classmethod
    def from_spec(cls, spec: str) -> HttpFault:
        """Parse the CLI form ``ENDPOINT:STATUS[:RATE[:TIMES]]``, e.g. ``create:429:0.5``."""
        parts = spec.split(":")
        if not 2 <= len(parts) <= 4:
            raise ValueError(f"bad fault spec {spec!r}; expected ENDPOINT:STATUS[:RATE[:TIMES]]")
        data: dict[str, Any] = {"endpoint": parts[0], "status": int(parts[1])}
        if len(parts) > 2:
            data["rate"] = float(parts[2])
        if len(parts) > 3:
            data["times"] = int(parts[3])
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        return {
            "endpoint": self.endpoint,
            "status": self.status,
            "rate": self.rate,
            "times": self.times,
            "retry_after": self.retry_after,
        }


@dataclass
class BatchFaults:
    """Per-request outcomes forced inside otherwise healthy batches."""

    errored_rate: float = 0.0
    error_types: tuple[str, ...] = ("api_error", "overloaded_error")
    expired_rate: float = 0.0
    stall_rate: float = 0.0

    @classmethod
    def from_dict(cls, data: dict) -> BatchFaults:
        _reject_unknown(data, {"errored_rate", "error_types", "expired_rate", "stall_rate"}, "batch fault")
        error_types = tuple(data.get("error_types") or cls.error_types)
        for error_type in error_types:
            if error_type not in BATCH_ERROR_TYPES:
                raise ValueError(
                    f"unsupported batch error type {error_type!r}; expected one of {BATCH_ERROR_TYPES}"
                )
        faults = cls(
            errored_rate=_rate(data.get("errored_rate", 0.0), "errored_rate"),
            error_types=error_types,
            expired_rate=_rate(data.get("expired_rate", 0.0), "expired_rate"),
            stall_rate=_rate(data.get("stall_rate", 0.0), "stall_rate"),
        )
        if faults.errored_rate + faults.expired_rate > 1.0:
            raise ValueError("errored_rate + expired_rate must not exceed 1")
        return faults

    def to_dict(self) -> dict:
        return {
            "errored_rate": self.errored_rate,
            "error_types": list(self.error_types),
            "expired_rate": self.expired_rate,
            "stall_rate": self.stall_rate,
        }


@dataclass
class ResultsCut:
    """Close results downloads early: after ``after_lines`` lines or a ``fraction`` of them."""

    after_lines: int | None = None
    fraction: float | None = None
    times: int | None = None
    mid_line: bool = True  # also send half of the next line, as a dropped connection would

    @classmethod
    def from_dict(cls, data: dict) -> ResultsCut:
        _reject_unknown(data, {"after_lines", "fraction", "times", "mid_line"}, "results_cut")
        cut = cls(
            after_lines=_optional_count(data.get("after_lines"), "after_lines"),
            fraction=None if data.get("fraction") is None else _rate(data["fraction"], "fraction"),
            times=_optional_count(data.get("times"), "times"),
            mid_line=bool(data.get("mid_line", True)),
        )
        if cut.after_lines is None and cut.fraction is None:
            raise ValueError("results_cut needs after_lines or fraction")
        return cut

    def lines_to_send(self, total_lines: int) -> int:
        if self.after_lines is not None:
            return min(self.after_lines, total_lines)
        return min(total_lines, math.floor(total_lines * (self.fraction or 0.0)))

    def to_dict(self) -> dict:
        return {
            "after_lines": self.after_lines,
            "fraction": self.fraction,
            "times": self.times,
            "mid_line": self.mid_line,
        }


@dataclass
class FaultConfig:
    """Everything that can be made to go wrong; the JSON form is documented in the module docstring."""

    http: list[HttpFault] = field(default_factory=list)
    latency: dict[str, float] = field(default_factory=dict)
    batch: BatchFaults = field(default_factory=BatchFaults)
    results_cut: ResultsCut | None = None

    @classmethod
    def from_dict(cls, data: dict | None) -> FaultConfig:
        if not data:
            return cls()
        if not isinstance(data, dict):
            raise ValueError("faults must be an object")
        _reject_unknown(data, {"http", "latency", "batch", "results_cut"}, "faults")
        latency = {}
        for endpoint, seconds in (data.get("latency") or {}).items():
            latency[_endpoint(endpoint)] = max(0.0, float(seconds))
        cut = data.get("results_cut")
        return cls(
            http=[HttpFault.from_dict(rule) for rule in data.get("http") or []],
            latency=latency,
            batch=BatchFaults.from_dict(data.get("batch") or {}),
            results_cut=ResultsCut.from_dict(cut) if cut else None,
        )

    def to_dict(self) -> dict:
        return {
            "http": [rule.to_dict() for rule in self.http],
            "latency": dict(self.latency),
            "batch": self.batch.to_dict(),
            "results_cut": self.results_cut.to_dict() if self.results_cut else None,
        }


class FaultInjector:
    """Rolls the seeded dice for HTTP faults and results cuts, and counts what it injected."""

    def __init__(self, config: FaultConfig, seed: int) -> None:
        self.config = config
        # One generator per rule keeps each rule's sequence independent of traffic to other endpoints.
        self._rule_rngs = [random.Random(f"{seed}:http:{index}") for index in range(len(config.http))]
        self._rule_injected = [0] * len(config.http)
        self._cuts_done = 0

    def latency_for(self, endpoint: str) -> float:
        latency = self.config.latency
        return latency.get(endpoint, latency.get("*", 0.0))

    def http_fault_for(self, endpoint: str) -> ApiError | None:
        """The error to answer with instead of serving ``endpoint``, or None."""
        for index, rule in enumerate(self.config.http):
            if rule.endpoint not in (endpoint, "*"):
                continue
            if rule.times is not None and self._rule_injected[index] >= rule.times:
                continue
            if self._rule_rngs[index].random() >= rule.rate:
                continue
            self._rule_injected[index] += 1
            return _http_error(rule)
        return None

    def results_cut_for(self, total_lines: int) -> tuple[int, bool] | None:
        """(lines to send, cut mid-line) when this download is to be cut short, else None."""
        cut = self.config.results_cut
        if cut is None or (cut.times is not None and self._cuts_done >= cut.times):
            return None
        lines = cut.lines_to_send(total_lines)
        if lines >= total_lines:
            return None  # nothing left to cut off
        self._cuts_done += 1
        return lines, cut.mid_line


def _http_error(rule: HttpFault) -> ApiError:
    headers = {}
    if rule.status in _STATUSES_WITH_RETRY_AFTER or rule.retry_after is not None:
        retry_after = 1.0 if rule.retry_after is None else rule.retry_after
        headers["retry-after"] = str(max(0, math.ceil(retry_after)))
        # The SDK prefers the more precise header, which lets tests retry without sleeping a second.
        headers["retry-after-ms"] = str(int(retry_after * 1000))
    message = DEFAULT_MESSAGE_BY_STATUS.get(rule.status, f"Injected fault (HTTP {rule.status}).")
    return ApiError(rule.status, message, headers=headers)


class BatchCallWindow:
    """The emulated ``batch_requests_per_minute`` limit: the batch API calls of the last emulated
    minute, and the 429 for one too many (its retry-after in wall-clock seconds)."""

    def __init__(self) -> None:
        self._calls: deque[float] = deque()

    def refusal(self, now: float, limit: int, time_scale: float) -> ApiError | None:
        """None (and the call counted) while under ``limit``, else the 429 to answer."""
        calls = self._calls
        while calls and calls[0] <= now - 60.0:
            calls.popleft()
        if len(calls) >= limit:
            wait = max((calls[0] + 60.0 - now) / time_scale, 0.001)
            return ApiError(
                429,
                f"Number of batch API requests has exceeded the rate limit of {limit} per minute (emulated).",
                headers={
                    "retry-after": str(math.ceil(wait)),
                    "retry-after-ms": str(int(wait * 1000)),
                },
            )
        calls.append(now)
        return None
