"""Workloads (task specs): what is sent to Claude for each row, and what comes back.

A workload is data a data engineer can read: a system prompt (sent with ``cache_control`` so a
whole batch shares one cached prefix), a user template filled from the row, a model (or a rule
routing rows to models), ``max_tokens``, an output schema (a Pydantic model sent as structured
output) and business rules applied to the validated answer. Its prompt version is a hash of
everything that shapes the request, recorded on every result row.
"""

from __future__ import annotations

import enum
import hashlib
import inspect
import re
import string
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

import anthropic
import orjson
import pyarrow as pa
from pydantic import BaseModel

from claude_batch.costs import (
    CacheSetting,
    PriceTable,
    estimate_tokens,
)

if TYPE_CHECKING:
    from claude_batch.staging.wire import RequestEncoder

CachePolicy = Literal["off", "5m", "1h", "auto"]
OutputMode = Literal["json_schema", "tool"]
RuleType = Literal["bool", "int", "float", "str"]

PROMPT_VERSION_FORMAT = 1
TOOL_NAME = "record_output"
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
_COLUMN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
_TEMPLATE_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_CACHE_CONTROL: dict[CacheSetting, dict[str, str] | None] = {
    "off": None,
    "5m": {"type": "ephemeral"},
    "1h": {"type": "ephemeral", "ttl": "1h"},
}
# Columns every validated row carries; schema fields and rule names may not reuse them.
RESERVED_COLUMNS = frozenset(
    {
        "custom_id", "record_key", "prompt_version", "batch_id", "run_id", "model", "outcome", "status",
        "reason_code", "reason", "error_type", "stop_reason", "raw_text", "output_json", "input_tokens",
        "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "cost_usd", "loaded_at",
    }
)  # fmt: skip
_RULE_ARROW_TYPES: dict[str, pa.DataType] = {
    "bool": pa.bool_(),
    "int": pa.int64(),
    "float": pa.float64(),
    "str": pa.string(),
}


class WorkloadError(ValueError):
    """A workload definition that cannot work (bad name, template, schema or rule)."""


@dataclass(frozen=True)
class Rule:
    """A business rule: a plain function of the validated answer giving one derived column.

    :param name: the derived column's name, e.g. ``approval_required``.
    :param fn: called with the validated output (an instance of the output schema).
    :param dtype: the column type: ``bool`` (a flag), ``int``, ``float`` or ``str``.
    """

    name: str
    fn: Callable[[Any], Any]
    dtype: RuleType = "bool"


@dataclass(frozen=True)
class CacheObservation:
    """One recent run of a workload, as the caching policy and the cost estimate read it.

    :param setting: the cache setting whose hit rate the run measured: the run's own setting, or
        its probe's when the run went with caching off and probed (``off``: nothing measured).
    :param cache_read_tokens: cache reads of the run (all of them the probe's for a probe run).
    :param cache_write_tokens: cache writes of the run.
    :param runs_ago: how many runs of the workload were recorded after this one (0: the latest).
    :param probe: whether the measurement came from a probe.
    :param prefix_tokens: the cached prefix's tokens per request as the run counted them.
    :param answers: the run's answers (valid and invalid), for the output tokens per answer.
    :param output_tokens: the run's output tokens.
    :param prompt_version: the run's prompt version.
    :param run_setting: the setting the run's other requests used.
    :param batches: the batches the measured requests were in.
    """

    setting: CacheSetting
    cache_read_tokens: int
    cache_write_tokens: int
    runs_ago: int = 0
    probe: bool = False
    prefix_tokens: int | None = None
    answers: int = 0
    output_tokens: int = 0
    prompt_version: str | None = None
    run_setting: CacheSetting | None = None
    run_id: str | None = None
    batches: int | None = None  # the batches its cached requests were in (each starts with a write)

    @property
    def hit_rate(self) -> float | None:
        total = self.cache_read_tokens + self.cache_write_tokens
        return self.cache_read_tokens / total if total else None


def strict_json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema as the API takes it for structured output.

    The SDK's own ``transform_schema`` closes every object (``additionalProperties: false``) and
    moves the constraints the API refuses (``minimum``, ``maxLength``...) into descriptions, where
    the model still reads them; the Pydantic model keeps enforcing them when answers are validated.
    """
    return anthropic.transform_schema(model)


def unwrap_optional(annotation: Any) -> Any:
    """``X`` for ``X | None`` (and ``Optional[X]``); any other annotation as it is."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def arrow_type_for(annotation: Any) -> pa.DataType | None:
    """The Arrow column type for a schema field's annotation; None means "store as JSON text"."""
    annotation = unwrap_optional(annotation)
    if typing.get_origin(annotation) is Literal:
        values = typing.get_args(annotation)
        kinds = {type(v) for v in values}
        if kinds <= {str}:
            return pa.string()
        if kinds <= {int}:
            return pa.int64()
        return None
    if isinstance(annotation, type):
        if issubclass(annotation, bool):
            return pa.bool_()
        if issubclass(annotation, enum.Enum):
            return pa.string()
        if issubclass(annotation, int):
            return pa.int64()
        if issubclass(annotation, float | Decimal):
            return pa.float64()
        if issubclass(annotation, str):
            return pa.string()
        if issubclass(annotation, datetime):
            return None
        if issubclass(annotation, date):
            return pa.date32()
    return None


@dataclass(frozen=True)
class OutputColumn:
    """One top-level field of the output schema as a results-table column."""

    name: str
    arrow_type: pa.DataType
    as_json: bool  # nested or unusual types are stored as their JSON text


@dataclass(frozen=True, kw_only=True)
class Workload:
    """A task spec: what to send for each row and how to judge the answer.

    :param name: lowercase identifier; the results table is ``<name>_results``.
    :param system_prompt: the shared instructions, sent with ``cache_control``.
    :param user_template: ``str.format`` template over the row's fields, e.g. ``"Ticket: {text}"``;
        only plain ``{field}`` references are allowed.
    :param model: the model id (or the default when ``route`` is given).
    :param max_tokens: the answer's token limit.
    :param output_schema: a Pydantic model the answer must match (sent as structured output).
    :param rules: business rules giving derived columns.
    :param route: optional ``row -> model id``; one batch may then mix models.
    :param route_models: the models ``route`` may return (checked at staging, part of the version).
    :param cache: ``off``, ``5m``, ``1h`` or ``auto`` (choose from measured hit rates).
    :param output_mode: ``json_schema`` (``output_config.format``) or ``tool`` (forced tool use).
    :param text_fields: fields that must hold non-empty text; default: every template field.
    :param expected_output_tokens: typical answer length for the cost estimate (default max_tokens).
    :param control_characters: ``reject`` rows holding control characters, or ``strip`` them.
    """

    name: str
    system_prompt: str
    user_template: str
    model: str
    max_tokens: int
    output_schema: type[BaseModel]
    rules: tuple[Rule, ...] = ()
    route: Callable[[Mapping[str, Any]], str] | None = None
    route_models: tuple[str, ...] = ()
    cache: CachePolicy = "auto"
    output_mode: OutputMode = "json_schema"
    temperature: float | None = None
    text_fields: tuple[str, ...] | None = None
    expected_output_tokens: int | None = None
    control_characters: Literal["reject", "strip"] = "reject"
    description: str = ""
    template_fields: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise WorkloadError(f"workload name {self.name!r} must match {_NAME.pattern}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise WorkloadError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not (isinstance(self.output_schema, type) and issubclass(self.output_schema, BaseModel)):
            raise WorkloadError("output_schema must be a Pydantic model class")
        if self.cache not in ("off", "5m", "1h", "auto"):
            raise WorkloadError(f"cache must be off, 5m, 1h or auto, got {self.cache!r}")
        if self.output_mode not in ("json_schema", "tool"):
            raise WorkloadError(f"output_mode must be json_schema or tool, got {self.output_mode!r}")
        fields = []
        for literal, name, spec, conversion in string.Formatter().parse(self.user_template):
            del literal
            if name is None:
                continue
            if not _COLUMN.fullmatch(name) or spec or conversion:
                raise WorkloadError(f"template field {{{name}}} must be a plain {{column}} reference")
            if name not in fields:
                fields.append(name)
        if not fields:
            raise WorkloadError("user_template references no row field")
        if _TEMPLATE_CONTROL.search(self.user_template) or _TEMPLATE_CONTROL.search(self.system_prompt):
            raise WorkloadError("prompts may not hold control characters other than tab and newline")
        object.__setattr__(self, "template_fields", tuple(fields))
        if self.text_fields is not None:
            unknown = set(self.text_fields) - set(fields)
            if unknown:
                raise WorkloadError(f"text_fields {sorted(unknown)} are not in the template")
        seen = set(self.output_columns_by_name)
        for rule in self.rules:
            if not _COLUMN.fullmatch(rule.name) or rule.name in RESERVED_COLUMNS or rule.name in seen:
                raise WorkloadError(f"rule name {rule.name!r} is not a free column name")
            if rule.dtype not in _RULE_ARROW_TYPES:
                raise WorkloadError(f"rule {rule.name!r} has unknown dtype {rule.dtype!r}")
            seen.add(rule.name)

    # -- what is sent ---------------------------------------------------------------------

    @cached_property
    def json_schema(self) -> dict[str, Any]:
        """The output schema as sent to the API."""
        return strict_json_schema(self.output_schema)

    @property
    def required_text_fields(self) -> tuple[str, ...]:
        return self.text_fields if self.text_fields is not None else self.template_fields

    @property
    def models(self) -> tuple[str, ...]:
        """Every model a request of this workload may go to."""
        return tuple(dict.fromkeys((self.model, *self.route_models)))

    def model_for(self, row: Mapping[str, Any]) -> str:
        """The model for ``row`` (the routing rule, or the workload's model)."""
        return self.route(row) if self.route is not None else self.model

    @property
    def optional_fields(self) -> tuple[str, ...]:
        """Template fields that may be NULL (rendered as empty text)."""
        required = set(self.required_text_fields)
        return tuple(name for name in self.template_fields if name not in required)

    def template_values(self, row: Mapping[str, Any]) -> Mapping[str, Any]:
        """``row`` with NULL or missing template fields as empty text."""
        blanks = {name: "" for name in self.template_fields if row.get(name) is None}
        return {**row, **blanks} if blanks else row

    def user_content(self, row: Mapping[str, Any]) -> str:
        """The user message for ``row``: the template filled with the row's fields."""
        return self.user_template.format_map(self.template_values(row))

    def static_params(self, cache_setting: CacheSetting) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """(system blocks, params after ``messages``), shared by every request."""
        system_block: dict[str, Any] = {"type": "text", "text": self.system_prompt}
        cache_control = _CACHE_CONTROL[cache_setting]
        if cache_control is not None:
            system_block["cache_control"] = cache_control
        tail: dict[str, Any] = {}
        if self.output_mode == "json_schema":
            tail["output_config"] = {"format": {"type": "json_schema", "schema": self.json_schema}}
        else:
            tail["tools"] = [
                {
                    "name": TOOL_NAME,
                    "description": f"Record the structured output for workload {self.name}.",
                    "input_schema": self.json_schema,
                }
            ]
            tail["tool_choice"] = {"type": "tool", "name": TOOL_NAME}
        if self.temperature is not None:
            tail["temperature"] = self.temperature
        return [system_block], tail

    def render(self, row: Mapping[str, Any], cache_setting: CacheSetting = "off") -> dict[str, Any]:
        """The Messages ``params`` for ``row`` (what one batch request carries).

        :param row: the row's fields (the template's fields at least).
        :param cache_setting: the run's resolved cache setting (``off``, ``5m`` or ``1h``).
        """
        system, tail = self.static_params(cache_setting)
        return {
            "model": self.model_for(row),
            "max_tokens": self.max_tokens,
            "system": system,
            "messages": [{"role": "user", "content": self.user_content(row)}],
            **tail,
        }

    def encoder(self, cache_setting: CacheSetting) -> RequestEncoder:
        """A fast encoder of request lines for staging (same bytes meaning as :meth:`render`)."""
        from claude_batch.staging.wire import RequestEncoder

        return RequestEncoder(self, cache_setting)

    # -- versions and caching -------------------------------------------------------------

    @cached_property
    def prompt_version(self) -> str:
        """A hash of what is sent: prompts, template, models and routing, limits, schema, caching.

        The cache *policy* is hashed, not the setting ``auto`` resolves to in a run, so an auto
        flip between runs does not make done items look new (and pay for them again).
        """
        routing = None
        if self.route is not None:
            try:
                rule_text = inspect.getsource(self.route)
            except (OSError, TypeError):
                rule_text = getattr(self.route, "__qualname__", repr(self.route))
            routing = {"models": list(self.route_models), "rule": rule_text}
        described = {
            "format": PROMPT_VERSION_FORMAT,
            "system": self.system_prompt,
            "template": self.user_template,
            "model": self.model,
            "routing": routing,
            "max_tokens": self.max_tokens,
            "schema": self.json_schema,
            "output_mode": self.output_mode,
            "temperature": self.temperature,
            "cache": self.cache,
        }
        digest = hashlib.sha256(orjson.dumps(described, option=orjson.OPT_SORT_KEYS)).hexdigest()
        return f"pv_{digest[:16]}"

    @cached_property
    def prefix_tokens(self) -> int:
        """Estimated tokens of the shared prefix (system prompt plus schema or tool)."""
        return estimate_tokens(self.system_prompt) + estimate_tokens(orjson.dumps(self.json_schema).decode())

    def choose_cache_setting(
        self,
        observations: Iterable[CacheObservation] = (),
        prices: PriceTable | None = None,
    ) -> CacheSetting:
        """Resolve the caching policy for a run (see :func:`claude_batch.caching.decide`).

        A prefix under the smallest minimum cacheable length of the workload's models is never
        cached; a fixed policy is used as is. ``auto`` uses a setting only when its measured hit
        rate makes it cheaper than no caching even at the low end of its confidence interval;
        otherwise caching is off (and :func:`~claude_batch.caching.decide` names what to probe).

        :param observations: recent runs (see ``Warehouse.recent_cache_observations``).
        :param prices: the price table (cache multipliers, minimum cacheable lengths).
        """
        from claude_batch.caching import decide

        return decide(self, observations, prices).setting

    # -- what comes back ------------------------------------------------------------------

    @cached_property
    def output_columns_by_name(self) -> dict[str, OutputColumn]:
        """Top-level schema fields as typed columns (nested ones as JSON text)."""
        columns: dict[str, OutputColumn] = {}
        for name, info in self.output_schema.model_fields.items():
            if not _COLUMN.fullmatch(name) or name in RESERVED_COLUMNS:
                raise WorkloadError(
                    f"output field {name!r} cannot be a results column (reserved or not an identifier)"
                )
            arrow_type = arrow_type_for(info.annotation)
            columns[name] = OutputColumn(name, arrow_type or pa.string(), as_json=arrow_type is None)
        return columns

    @property
    def output_columns(self) -> tuple[OutputColumn, ...]:
        return tuple(self.output_columns_by_name.values())

    def rule_columns(self) -> tuple[tuple[str, pa.DataType], ...]:
        """(name, Arrow type) of each derived column."""
        return tuple((rule.name, _RULE_ARROW_TYPES[rule.dtype]) for rule in self.rules)

    @property
    def results_table(self) -> str:
        """The warehouse table holding this workload's valid rows."""
        return f"{self.name}_results"


def __getattr__(name: str) -> Any:
    # RequestEncoder moved to claude_batch.staging.wire (the wire format's module); loaded on
    # use, as importing it here would pull the staging engine into every workload import.
    if name == "RequestEncoder":
        from claude_batch.staging.wire import RequestEncoder

        return RequestEncoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
