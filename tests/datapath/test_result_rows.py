"""Result lines into rows: the typed decoder gives each line the row (or the error) of the reference parse."""

from __future__ import annotations

import json

import orjson
import pyarrow as pa
import pytest
from claude_batch import result_rows
from claude_batch.result_rows import ResultRows

_USAGE = {
    "input_tokens": 339,
    "cache_creation_input_tokens": 12,
    "cache_read_input_tokens": 7,
    "cache_creation": {"ephemeral_5m_input_tokens": 4, "ephemeral_1h_input_tokens": 8},
    "output_tokens": 34,
    "output_tokens_details": {"thinking_tokens": 0},
    "service_tier": "batch",
}


def _succeeded(content=None, usage=None, **message) -> dict:
    body = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-haiku-4-5-20251001"}
    body |= {"content": content if content is not None else [{"type": "text", "text": '{"a": 1}'}]}
    body |= {"stop_reason": "end_turn", "usage": usage if usage is not None else _USAGE, **message}
    return {"custom_id": "T1", "result": {"type": "succeeded", "message": body}}


def _lines() -> list[bytes]:
    """Result lines as the API sends them, and lines that bend or break each field collect reads."""
    records = [
        _succeeded(),
        _succeeded(content=[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]),
        _succeeded(content=[{"type": "text"}]),
        _succeeded(content=[{"type": "text"}, {"type": "text", "text": "b"}]),
        _succeeded(content=[{"type": "text", "text": None}]),
        _succeeded(content=[{"type": "text", "text": None}, {"type": "text", "text": "b"}]),
        _succeeded(content=[{"text": "untyped"}]),
        _succeeded(content=[{"type": 5, "text": "x"}]),
        _succeeded(content=[{"type": "thinking", "thinking": "hm"}, {"type": "text", "text": "t"}]),
        _succeeded(content=[{"type": "tool_use", "input": {"b": [1, 2.5, None], "a": "é"}}]),
        _succeeded(content=[{"type": "tool_use"}, {"type": "tool_use", "input": {"second": 1}}]),
        _succeeded(content=[{"type": "tool_use", "input": None}]),
        _succeeded(content=[]),
        _succeeded(content={"type": "text"}),
        _succeeded(content=["text"]),
        _succeeded(usage={}),
        _succeeded(usage={"input_tokens": None, "output_tokens": 0, "cache_creation": {}}),
        _succeeded(usage={"cache_creation_input_tokens": 9, "cache_creation": None}),
        _succeeded(usage={"cache_creation_input_tokens": 9, "cache_creation": {}}),
        _succeeded(usage={"cache_creation_input_tokens": 9, "cache_creation": {"other": 1}}),
        _succeeded(usage={"cache_creation": {"ephemeral_5m_input_tokens": "4"}}),
        _succeeded(usage={"cache_creation": {"ephemeral_1h_input_tokens": True}}),
        _succeeded(usage={"cache_creation": []}),
        _succeeded(usage={"input_tokens": True}),
        _succeeded(usage={"input_tokens": False}),
        _succeeded(usage={"input_tokens": 3.0}),
        _succeeded(usage={"input_tokens": "3"}),
        _succeeded(usage={"input_tokens": 2**63 - 1}),
        _succeeded(usage={"input_tokens": 2**63}),
        _succeeded(usage={"input_tokens": -(2**63) - 1}),
        _succeeded(usage=[]),
        _succeeded(stop_reason=None, model=None),
        _succeeded(stop_reason=3),
        _succeeded(model=["m"]),
        {
            "custom_id": "T2",
            "result": {"type": "errored", "error": {"type": "error", "error": {"type": "x"}}},
        },
        {"custom_id": "T2", "result": {"type": "errored", "error": {"type": "overloaded", "message": "m"}}},
        {"custom_id": "T2", "result": {"type": "errored", "error": {"error": "flat"}}},
        {"custom_id": "T2", "result": {"type": "errored", "error": None}},
        {"custom_id": "T2", "result": {"type": "errored", "error": []}},
        {"custom_id": "T2", "result": {"type": "errored", "error": ["x"]}},
        {"custom_id": "T2", "result": {"type": "errored"}},
        {"custom_id": "T3", "result": {"type": "expired"}},
        {"custom_id": "T3", "result": {"type": "canceled", "error": "ignored", "message": None}},
        {"custom_id": "T3", "result": {"type": "later_kind"}},
        {"custom_id": "T3", "result": {"type": None}},
        {"custom_id": "T3", "result": {"type": 7}},
        {"custom_id": "T4", "result": {"type": "succeeded"}},
        {"custom_id": "T4", "result": {"type": "succeeded", "message": None}},
        {"custom_id": "T4", "result": {"type": "succeeded", "message": "text"}},
        {"custom_id": None, "result": {"type": "expired"}},
        {"custom_id": 5, "result": {"type": "expired"}},
        {"result": {"type": "expired"}},
        {"custom_id": "T5"},
        {"custom_id": "T5", "result": []},
        [],
        "line",
    ]
    lines = [json.dumps(record).encode() for record in records]  # json: ints past 64 bits too
    whole = orjson.dumps(records[0])
    lines += [
        whole[: len(whole) // 2],  # cut mid-line
        whole.replace(b'"msg_1"', b'"\xff"'),  # not UTF-8 in a field collect skips
        whole.replace(b'"msg_1"', b'"\\ud800"'),
        whole.replace(b'"msg_1"', b"123456789012345678901234567890"),
        whole.replace(b'"msg_1"', b"[" * 600 + b"]" * 600),
        whole.replace(b'"msg_1"', b"[" * 1100 + b"]" * 1100),
        whole.replace(b'"output_tokens":34', b'"output_tokens":12345678901234567890123'),
        whole.replace(b'"end_turn"', b'"caf\xc3\xa9"'),
        whole.replace(b'"custom_id":"T1"', b'"custom_id":"T0","custom_id":"T1"'),
        whole + b" ",
        whole + b"{}",
        b"",
    ]
    return lines


def _outcome(function, line: bytes):
    try:
        return "row", function(line)
    except Exception as exc:
        return "error", type(exc).__name__


def _typed(line: bytes):
    rows: list = []
    result_rows._parse_lines([line], rows.append)
    (row,) = rows
    return row


@pytest.mark.parametrize("line", _lines())
def test_each_line_gets_the_row_or_error_of_the_reference_parse(line):
    assert _outcome(_typed, line) == _outcome(result_rows._line_row, line)


def test_the_typed_decoder_reads_an_api_line_itself(monkeypatch):
    """The common lines must not fall back to the reference parse (which would double their cost)."""
    monkeypatch.setattr(result_rows, "_line_row", lambda line: pytest.fail(f"fell back on {line!r}"))
    lines = [
        orjson.dumps(_succeeded()),
        orjson.dumps(_succeeded(content=[{"type": "tool_use", "input": {}}])),
    ]
    lines.append(orjson.dumps({"custom_id": "T2", "result": {"type": "errored", "error": {"type": "x"}}}))
    rows: list = []
    result_rows._parse_lines(lines, rows.append)
    result_rows._parse_block(b"\n".join(lines) + b"\n", rows.append)
    assert [row[1] for row in rows] == ["succeeded", "succeeded", "errored"] * 2
    assert rows[0][6:12] == (339, 34, 12, 7, 4, 8) and rows[1][3] == "{}"


def test_a_call_with_a_line_not_utf8_keeps_the_rows_before_it():
    good = orjson.dumps(_succeeded())
    rows = ResultRows()
    with pytest.raises(orjson.JSONDecodeError):
        rows.add_lines([good, good.replace(b'"msg_1"', b'"\xff"'), good])
    assert len(rows) == 1


def test_rows_that_arrow_refuses_raise_as_before():
    rows = ResultRows()
    with pytest.raises(pa.ArrowException):
        rows.add_lines([orjson.dumps({"custom_id": 5, "result": {"type": "expired"}})])


def _reference_rows(block: bytes) -> tuple[list, str | None]:
    """The rows of a block's non-empty lines as the reference parse makes them, to its first error."""
    rows = []
    for line in block.split(b"\n"):
        if line:
            try:
                rows.append(result_rows._line_row(line))
            except Exception as exc:
                return rows, type(exc).__name__
    return rows, None


def _block_rows(block: bytes) -> tuple[list, str | None]:
    rows: list = []
    try:
        result_rows._parse_block(block, rows.append)
    except Exception as exc:
        return rows, type(exc).__name__
    return rows, None


_GOOD = orjson.dumps(_succeeded())
_ERRORED = orjson.dumps({"custom_id": "T2", "result": {"type": "errored", "error": {"type": "x"}}})


@pytest.mark.parametrize(
    "block",
    [
        _GOOD + b"\n" + _ERRORED + b"\n" + _GOOD + b"\n",
        _GOOD + b"\n" + _GOOD,  # the last line unended
        _GOOD,
        b"",
        b"\n" + _GOOD + b"\n\n" + _GOOD + b"\n",  # empty lines
        _GOOD + b"\r\n" + _GOOD + b"\r\n",
        _GOOD + b" \n" + _GOOD + b"\n",
        _GOOD + b"\n \n" + _GOOD + b"\n",  # a line of blanks
        _GOOD + _GOOD + b"\n" + _GOOD[:-4] + b"\n" + _GOOD[-4:] + b"\n",  # two values a line, one on two
        _GOOD + b"\n" + _GOOD[:40] + b"\n" + _GOOD[40:] + b"\n",
        b"\n".join(_lines()) + b"\n",
        b"\n".join(line for line in _lines() if b"\xff" not in line) + b"\n",
        b"\n".join(reversed(_lines())) + b"\n",
    ],
)
def test_a_block_gets_the_rows_and_error_of_its_lines_parsed_one_by_one(block):
    assert _block_rows(block) == _reference_rows(block)


def test_a_block_of_whole_lines_is_decoded_at_once(monkeypatch):
    monkeypatch.setattr(result_rows, "_split_lines", lambda block: pytest.fail("split the block"))
    rows = ResultRows()
    rows.add_block(b"\n".join([_GOOD, _ERRORED] * 50) + b"\n")
    assert len(rows) == 100
