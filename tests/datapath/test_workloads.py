"""Workloads: rendering, the fast encoder, prompt versions and the caching policy."""

from __future__ import annotations

import enum
import json
import random
from datetime import date
from typing import Literal

import orjson
import pyarrow as pa
import pytest
from claude_batch.workloads import CacheObservation, Rule, WorkloadError, strict_json_schema
from pydantic import BaseModel

from tests.datapath.conftest import Invoice, make_workload


def test_render_sends_the_system_prompt_with_cache_control_and_the_schema_as_structured_output():
    workload = make_workload()
    params = workload.render({"id": "t1", "body": "hello"}, "1h")
    assert params["model"] == "claude-haiku-4-5"
    assert params["max_tokens"] == 300
    assert params["system"] == [
        {"type": "text", "text": workload.system_prompt, "cache_control": {"type": "ephemeral", "ttl": "1h"}}
    ]
    assert params["messages"] == [{"role": "user", "content": "Ticket t1: hello"}]
    schema = params["output_config"]["format"]
    assert schema["type"] == "json_schema"
    assert schema["schema"]["additionalProperties"] is False
    assert set(schema["schema"]["required"]) == {"category", "total_amount", "summary"}
    assert workload.render({"id": "t1", "body": "x"}, "5m")["system"][0]["cache_control"] == {
        "type": "ephemeral"
    }
    assert "cache_control" not in workload.render({"id": "t1", "body": "x"}, "off")["system"][0]


def test_tool_mode_forces_the_tool():
    params = make_workload(output_mode="tool").render({"id": "a", "body": "b"})
    assert params["tool_choice"] == {"type": "tool", "name": params["tools"][0]["name"]}
    assert params["tools"][0]["input_schema"]["properties"]["category"]["enum"] == ["billing", "bug", "other"]
    assert "output_config" not in params


def test_strict_schema_closes_nested_objects():
    class Line(BaseModel):
        sku: str

    class Order(BaseModel):
        lines: list[Line]

    schema = strict_json_schema(Order)
    assert schema["additionalProperties"] is False
    assert schema["$defs"]["Line"]["additionalProperties"] is False


@pytest.mark.parametrize("setting", ["off", "5m", "1h"])
def test_the_encoder_writes_exactly_what_render_returns(setting):
    workload = make_workload(temperature=0.2)
    encoder = workload.encoder(setting)
    rng = random.Random(7)
    alphabet = 'ab "\\\n\r\t/é€😀\u2028{}[]:,'
    for _ in range(200):
        body = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        row = {"id": "k1", "body": body}
        line = encoder.encode("k1", workload.user_content(row), workload.model_for(row))
        assert line.endswith(b"\n")
        assert orjson.loads(line) == {"custom_id": "k1", "params": workload.render(row, setting)}
        assert json.loads(line) == orjson.loads(line)


def test_prompt_version_is_a_hash_of_what_is_sent():
    base = make_workload()
    assert base.prompt_version == make_workload().prompt_version
    assert base.prompt_version.startswith("pv_")
    changed = [
        make_workload(system_prompt="other"),
        make_workload(user_template="T {id}: {body}"),
        make_workload(model="claude-sonnet-4-5"),
        make_workload(max_tokens=301),
        make_workload(cache="1h"),
        make_workload(output_mode="tool"),
        make_workload(temperature=0.0),
        make_workload(output_schema=type("Other", (Invoice,), {"__annotations__": {"extra": int}})),
    ]
    versions = {w.prompt_version for w in changed}
    assert base.prompt_version not in versions and len(versions) == len(changed)
    # Business rules are applied to answers, not sent: they do not change the version.
    assert make_workload(rules=()).prompt_version == base.prompt_version


def test_routing_sends_rows_to_models_and_changes_the_version():
    def route(row):
        return "claude-haiku-4-5" if len(row["body"]) < 20 else "claude-sonnet-4-5"

    workload = make_workload(route=route, route_models=("claude-sonnet-4-5",))
    assert workload.render({"id": "a", "body": "short"})["model"] == "claude-haiku-4-5"
    assert workload.render({"id": "a", "body": "long " * 10})["model"] == "claude-sonnet-4-5"
    assert workload.models == ("claude-haiku-4-5", "claude-sonnet-4-5")
    assert workload.prompt_version != make_workload().prompt_version


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": "Bad-Name"}, "workload name"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"user_template": "{row.__class__}"}, "plain"),
        ({"user_template": "{body!r}"}, "plain"),
        ({"user_template": "no fields"}, "no row field"),
        ({"cache": "always"}, "cache"),
        ({"rules": (Rule("summary", lambda o: 1),)}, "rule name"),
        ({"text_fields": ("missing",)}, "text_fields"),
        ({"system_prompt": "bell \x07"}, "control"),
    ],
)
def test_bad_workloads_are_refused(changes, message):
    with pytest.raises(WorkloadError, match=message):
        make_workload(**changes)


def test_null_optional_fields_render_empty():
    workload = make_workload(user_template="{id} [{note}] {body}", text_fields=("body",))
    assert workload.user_content({"id": 1, "note": None, "body": "x"}) == "1 [] x"


def test_output_columns_are_typed():
    class Kind(enum.Enum):
        A = "a"

    class Out(BaseModel):
        name: str
        count: int
        share: float | None
        ok: bool
        kind: Kind
        label: Literal["x", "y"]
        day: date
        tags: list[str]

    columns = {c.name: c for c in make_workload(output_schema=Out, rules=()).output_columns}
    assert columns["count"].arrow_type == pa.int64()
    assert columns["share"].arrow_type == pa.float64()
    assert columns["ok"].arrow_type == pa.bool_()
    assert columns["kind"].arrow_type == pa.string()
    assert columns["label"].arrow_type == pa.string()
    assert columns["day"].arrow_type == pa.date32()
    assert columns["tags"].as_json


class TestCachePolicy:
    big_prompt = "Long shared instructions with many examples. " * 500  # ~5,600 tokens

    def test_a_prefix_under_the_minimum_is_never_cached(self):
        assert make_workload(cache="1h").choose_cache_setting() == "off"
        # Sonnet 4.5's minimum is 1,024 tokens, Haiku 4.5's 4,096.
        medium = "x" * 4 * 2000
        assert (
            make_workload(system_prompt=medium, cache="1h", model="claude-sonnet-4-5").choose_cache_setting()
            == "1h"
        )
        assert make_workload(system_prompt=medium, cache="1h").choose_cache_setting() == "off"

    def test_fixed_policies_are_used_as_they_are(self):
        for policy in ("off", "5m", "1h"):
            assert make_workload(system_prompt=self.big_prompt, cache=policy).choose_cache_setting() == policy

    def test_auto_starts_with_caching_off_when_nothing_is_measured(self):
        assert make_workload(system_prompt=self.big_prompt, cache="auto").choose_cache_setting([]) == "off"

    @staticmethod
    def measured(setting, hit_rate, requests=500, prefix=5_600):
        """A run that measured ``setting`` over ``requests`` cached requests of ``prefix`` tokens."""
        reads = round(requests * hit_rate)
        return CacheObservation(setting, reads * prefix, (requests - reads) * prefix, prefix_tokens=prefix)

    @pytest.mark.parametrize(
        ("measured", "expected"),
        [
            ([("1h", 0.60)], "1h"),  # 60% > 53%: 1h pays, even at the low end of its interval
            ([("1h", 0.50)], "off"),  # 50% < 53%: it would have cost more
            ([("5m", 0.30)], "5m"),  # 30% > 22%
            ([("5m", 0.20)], "off"),
            ([("1h", 0.95), ("5m", 0.40)], "1h"),
            ([("1h", 0.55), ("5m", 0.90)], "5m"),
            ([("off", 0.0)], "off"),
        ],
    )
    def test_auto_never_picks_a_setting_that_cost_more_than_no_caching(self, measured, expected):
        workload = make_workload(system_prompt=self.big_prompt, cache="auto")
        observations = [self.measured(setting, rate) for setting, rate in measured]
        assert workload.choose_cache_setting(observations) == expected

    def test_auto_does_not_commit_on_a_handful_of_requests(self):
        workload = make_workload(system_prompt=self.big_prompt, cache="auto")
        assert workload.choose_cache_setting([self.measured("1h", 0.60, requests=10)]) == "off"
