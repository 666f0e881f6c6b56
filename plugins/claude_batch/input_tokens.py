"""A staged run's input tokens, measured with ``count_tokens`` on a sample, or from characters.

Input tokens are counted by the API's free ``count_tokens`` endpoint on a uniform random
sample of the run's requests (:data:`SAMPLE_REQUESTS`, 200, reservoir-sampled from the rows as
staging reads them). Three more calls per model count what every request shares: the request
with a one-character message (the fixed part) and the tools and system prompt alone (the
prefix a cache breakpoint covers). The rest of each request grows with its message, so the
run's variable tokens are a regression estimate on the message's characters, which staging
counts for *every* request: exact where the sample's tokens per character hold. Two standard
errors of that estimate (with the finite-population correction), plus 2% for ``count_tokens``
being an estimate itself, are the input band. 200 requests keep the calls bounded (about 200
calls, four at a time, per run) and put the variable part within a few percent even for
text whose length varies widely; the shared prefix, usually most of the tokens, is counted
exactly. Without a client, or when counting fails, the estimate falls back to about four
characters a token, with a band of 25%.

The sample itself and the rest of the estimate are :mod:`claude_batch.estimates`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from claude_batch.costs import CHARS_PER_TOKEN, REQUEST_OVERHEAD_TOKENS, CacheSetting, estimate_tokens
from claude_batch.workloads import Workload

COUNT_WORKERS = 4
COUNT_BAND = 0.02  # count_tokens is itself an estimate of what is billed
CHARACTER_BAND = 0.25  # the fallback: about four characters a token
_COUNTED_PARAMS = ("model", "messages", "system", "tools", "tool_choice", "output_config", "thinking")


@dataclass
class ModelTokens:
    """The input tokens of one model's requests in a run.

    :param fixed_tokens: a request of the run with a one-character message (what every request has).
    :param prefix_tokens: the tools and system prompt: what the cache breakpoint covers.
    :param variable_tokens: the tokens beyond ``fixed_tokens``, over all the model's requests.
    :param variable_error: one standard error of ``variable_tokens``.
    """

    model: str
    requests: int
    content_chars: int
    fixed_tokens: float
    prefix_tokens: int
    variable_tokens: float
    variable_error: float
    sampled: int = 0
    method: str = "count_tokens"

    @property
    def input_tokens(self) -> float:
        return self.requests * self.fixed_tokens + self.variable_tokens

    def band(self) -> float:
        """The input band, relative: two standard errors of the variable part, plus the count's own."""
        base = CHARACTER_BAND if self.method == "characters" else COUNT_BAND
        return base + (2 * self.variable_error / self.input_tokens if self.input_tokens else 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "sampled": self.sampled,
            "fixed_tokens": round(self.fixed_tokens, 1),
            "prefix_tokens": self.prefix_tokens,
            "variable_tokens": round(self.variable_tokens),
            "input_tokens_per_request": round(self.input_tokens / self.requests, 1) if self.requests else 0,
            "input_band": round(self.band(), 4),
            "method": self.method,
        }


def count_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """What ``count_tokens`` takes of a request's params (not ``max_tokens``, sampling or metadata)."""
    return {key: params[key] for key in _COUNTED_PARAMS if key in params}


def _with_message(params: Mapping[str, Any], text: str) -> dict[str, Any]:
    return {**count_params(params), "messages": [{"role": "user", "content": text}]}


def _prefix_only(params: Mapping[str, Any], text: str) -> dict[str, Any]:
    """The part a cache breakpoint on the system block covers (tools, then system), and a message."""
    kept = {key: params[key] for key in ("model", "system", "tools") if key in params}
    return {**kept, "messages": [{"role": "user", "content": text}]}


def _bare(model: str, text: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}]}


def _regression_total(
    chars: list[float], extra: list[float], requests: int, content_chars: int
) -> tuple[float, float]:
    """(total, standard error) of the variable tokens: a regression estimate on characters.

    ``extra[i]`` is a sampled request's tokens beyond the fixed part, ``chars[i]`` its message's
    characters; ``content_chars`` is the characters of all ``requests``' messages.
    """
    n = len(extra)
    if n == 0:
        return 0.0, 0.0
    mean_c = sum(chars) / n
    mean_v = sum(extra) / n
    var_c = sum((c - mean_c) ** 2 for c in chars)
    if n >= 3 and var_c > 0:
        slope = sum((c - mean_c) * (v - mean_v) for c, v in zip(chars, extra, strict=True)) / var_c
        intercept = mean_v - slope * mean_c
        total = requests * intercept + slope * content_chars
        residual = sum((v - intercept - slope * c) ** 2 for c, v in zip(chars, extra, strict=True)) / (n - 2)
    else:
        total = requests * mean_v
        residual = sum((v - mean_v) ** 2 for v in extra) / (n - 1) if n > 1 else 0.0
    correction = max(0.0, 1.0 - n / requests) if requests else 0.0
    error = requests * math.sqrt(correction * residual / n) if requests else 0.0
    return max(total, 0.0), error


def measure_tokens(
    client: Any,
    workload: Workload,
    setting: CacheSetting,
    sampled: list[tuple[Mapping[str, Any], str]],
    per_model: Mapping[str, tuple[int, int]],
) -> dict[str, ModelTokens]:
    """Count the sample's input tokens with ``count_tokens`` and extend them to every request.

    :param sampled: (row, model) of each sampled request that was staged.
    :param per_model: model -> (staged requests, characters of their messages).
    :returns: the input tokens by model.
    """
    requests = []
    for row, model in sampled:
        params = workload.render(row, setting)
        params["model"] = model
        requests.append(params)
    template = requests[0] if requests else {**workload.render({}, setting), "model": workload.model}
    calls: list[dict[str, Any]] = [count_params(params) for params in requests]
    base_of: dict[str, tuple[int, int, int]] = {}
    for model in per_model:
        example = next(
            (params for params in requests if params["model"] == model), {**template, "model": model}
        )
        first = len(calls)
        calls += [_with_message(example, "x"), _prefix_only(example, "x"), _bare(model, "x")]
        base_of[model] = (first, first + 1, first + 2)

    def count(params: dict[str, Any]) -> int:
        return int(client.messages.count_tokens(**params).input_tokens)

    with ThreadPoolExecutor(COUNT_WORKERS) as pool:
        counted = list(pool.map(count, calls))
    measured: dict[str, ModelTokens] = {}
    all_chars: list[float] = []
    all_extra: list[float] = []
    by_model: dict[str, tuple[list[float], list[float]]] = {}
    for index, params in enumerate(requests):
        fixed_index, _, _ = base_of[params["model"]]
        chars = float(len(params["messages"][0]["content"]) - 1)  # beyond the one-character message
        extra = float(counted[index] - counted[fixed_index])
        by_model.setdefault(params["model"], ([], []))
        by_model[params["model"]][0].append(chars)
        by_model[params["model"]][1].append(extra)
        all_chars.append(chars)
        all_extra.append(extra)
    for model, (staged, content_chars) in per_model.items():
        fixed_index, prefix_index, bare_index = base_of[model]
        model_chars, model_extra = by_model.get(model, ([], []))
        if len(model_extra) < 3:  # too few of this model's requests sampled: the run's tokens per character
            model_chars, model_extra = all_chars, all_extra
        beyond = max(content_chars - staged, 0)
        total, error = _regression_total(model_chars, model_extra, staged, beyond)
        measured[model] = ModelTokens(
            model, staged, content_chars, float(counted[fixed_index]),
            max(counted[prefix_index] - counted[bare_index], 0), total, error,
            sampled=len(by_model.get(model, ([], []))[1]),
        )  # fmt: skip
    return measured


def character_tokens(workload: Workload, per_model: Mapping[str, tuple[int, int]]) -> dict[str, ModelTokens]:
    """The fallback: about four characters a token (what staging's own estimate assumes)."""
    system = estimate_tokens(workload.system_prompt)
    tools = estimate_tokens(str(workload.json_schema)) if workload.output_mode == "tool" else 0
    return {
        model: ModelTokens(
            model,
            staged,
            chars,
            float(workload.prefix_tokens + REQUEST_OVERHEAD_TOKENS),
            system + tools,
            chars / CHARS_PER_TOKEN,
            0.0,
            method="characters",
        )  # fmt: skip
        for model, (staged, chars) in per_model.items()
    }
