"""Create-time validation (400/413), asynchronous params validation (errored results), the body parser."""

from __future__ import annotations

import anthropic
import orjson
import pytest
from anthropic.types.messages import MessageBatchIndividualResponse
from anthropic.types.shared import ErrorResponse
from claude_batch.emulator.parser import BodyError, RequestsBodyParser

from .helpers import finish, items, request_item


def post_batch(http, body: bytes | dict, **kwargs):
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return http.post("/v1/messages/batches", content=content, **kwargs)


def assert_error(response, status: int, error_type: str, message_part: str = "") -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == error_type
    assert body["request_id"] == response.headers["request-id"]
    assert message_part in body["error"]["message"]
    if error_type != "request_too_large":  # the SDK's error union has no model for 413 bodies
        ErrorResponse.model_validate(body)
    return body["error"]["message"]


def test_empty_requests_list_is_400(http, emu):
    assert_error(post_batch(http, {"requests": []}), 400, "invalid_request_error", "at least 1 item")


def test_too_many_requests_is_400_naming_the_count(http, client, emu):
    # The API schema's requests.maxItems: a validation error, not the edge's 413 (that is for bytes).
    emu.configure(max_requests_per_batch=5)
    assert post_batch(http, {"requests": items(5)}).status_code == 200
    message = assert_error(post_batch(http, {"requests": items(8)}), 400, "invalid_request_error")
    assert message == "requests: List should have at most 5 items after validation, not 8"
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.batches.create(requests=items(6))
    assert caught.value.status_code == 400 and "at most 5 items" in caught.value.message
    assert emu.stats()["batches_created"] == 1


def test_too_many_requests_in_a_broken_body_is_a_json_error(http, emu):
    emu.configure(max_requests_per_batch=2)
    body = orjson.dumps({"requests": items(4)})[:-3]  # cut inside the last item
    assert_error(post_batch(http, body), 400, "invalid_request_error", "not valid JSON")


def test_body_over_the_size_limit_is_413_declared_or_streamed(http, emu):
    emu.configure(max_body_bytes=10_000)
    body = orjson.dumps({"requests": items(100)})
    assert len(body) > 10_000
    assert_error(post_batch(http, body), 413, "request_too_large", "10000 bytes")

    def chunks():  # no Content-Length: the limit is enforced while reading
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    assert_error(http.post("/v1/messages/batches", content=chunks()), 413, "request_too_large")
    assert post_batch(http, {"requests": items(10)}).status_code == 200


@pytest.mark.parametrize(
    ("custom_id", "message"),
    [
        ("has space", "should match pattern"),
        ("", "should match pattern"),
        ("x" * 65, "should match pattern"),
        ("dot.not.allowed", "should match pattern"),
        (17, "valid string"),
    ],
)
def test_bad_custom_id_names_the_index(http, emu, custom_id, message):
    requests = items(20)
    requests[17]["custom_id"] = custom_id
    text = assert_error(post_batch(http, {"requests": requests}), 400, "invalid_request_error", message)
    assert text.startswith("requests.17.custom_id: ")


def test_longest_allowed_custom_id_passes(http, emu):
    assert post_batch(http, {"requests": [request_item("A-z_9" * 12 + "abcd")]}).status_code == 200


def test_duplicate_custom_id_is_400(http, client, emu):
    requests = items(5)
    requests[4]["custom_id"] = requests[1]["custom_id"]
    text = assert_error(post_batch(http, {"requests": requests}), 400, "invalid_request_error", "duplicate")
    assert text.startswith("requests.4.custom_id") and "requests.1" in text
    with pytest.raises(anthropic.BadRequestError):
        client.messages.batches.create(requests=requests)
    assert emu.stats()["batches_created"] == 0


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ({"params": {}}, "requests.2.custom_id: Field required"),
        ({"custom_id": "x"}, "requests.2.params: Field required"),
        ({"custom_id": "x", "params": "text"}, "requests.2.params: Input should be a valid dictionary"),
        ({"custom_id": "x", "params": []}, "requests.2.params: Input should be a valid dictionary"),
        ("just a string", "requests.2: Input should be a valid dictionary"),
        ({"custom_id": "x", "params": {}, "extra": 1}, "requests.2.extra: Extra inputs are not permitted"),
    ],
)
def test_malformed_items_are_400(http, emu, item, expected):
    requests = items(2) + [item]
    assert assert_error(post_batch(http, {"requests": requests}), 400, "invalid_request_error") == expected


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"requests": [', "not valid JSON"),
        (b"[]", "must be a JSON object"),
        (b"{}", "requests: Field required"),
        (b'{"requests": {}}', "requests: Input should be a valid list"),
        (b'{"requests": []} trailing', "extra data"),
        (b"\xff\xfe", "UTF-8"),
    ],
)
def test_malformed_bodies_are_400(http, emu, body, message):
    assert_error(post_batch(http, body), 400, "invalid_request_error", message)


BAD_PARAMS = {
    "no-model": ({"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}, "model: Field required"),
    "no-messages": ({"model": "claude-haiku-4-5", "max_tokens": 5}, "messages: Field required"),
    "no-max-tokens": (
        {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
        "max_tokens: Field required",
    ),
    "zero-max-tokens": (
        {"model": "m", "max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]},
        "max_tokens: Input should be greater than or equal to 1",
    ),
    "stream": (
        {"model": "m", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "hi"}]},
        "stream: Streaming is not supported",
    ),
    "messages-not-list": (
        {"model": "m", "max_tokens": 5, "messages": "hi"},
        "messages: Input should be a valid list",
    ),
    "bad-role": (
        {"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "hi"}]},
        "messages.0.role: Input should be 'user' or 'assistant'",
    ),
    "bad-tool-choice": (
        {
            "model": "m",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}],
            "tool_choice": {"type": "tool", "name": "x"},
        },
        "tool_choice.name",
    ),
    "temperature": (
        {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "temperature": 3},
        "temperature",
    ),
}


def test_bad_params_inside_an_accepted_batch_end_errored(client, http, emu):
    requests = [request_item("good-0"), request_item("good-1")]
    requests += [{"custom_id": name, "params": params} for name, (params, _) in BAD_PARAMS.items()]
    created = post_batch(http, {"requests": requests})
    assert created.status_code == 200, created.text
    finish(emu)
    batch = client.messages.batches.retrieve(created.json()["id"])
    assert batch.request_counts.errored == len(BAD_PARAMS)
    assert batch.request_counts.succeeded == 2
    lines = [orjson.loads(line) for line in http.get(batch.results_url).content.splitlines()]
    by_id = {line["custom_id"]: line for line in lines}
    for name, (_, message) in BAD_PARAMS.items():
        line = by_id[name]
        MessageBatchIndividualResponse.model_validate(line)
        result = line["result"]
        assert result["type"] == "errored"
        assert result["error"]["type"] == "error"  # the error object is nested twice
        assert result["error"]["error"]["type"] == "invalid_request_error"
        assert message in result["error"]["error"]["message"]
        assert result["error"]["request_id"].startswith("req_")


@pytest.mark.parametrize("name", sorted(BAD_PARAMS))
def test_the_same_params_are_a_400_on_messages(http, emu, name):
    params, message = BAD_PARAMS[name]
    response = http.post("/v1/messages", content=orjson.dumps(params))
    if name == "stream":
        message = "stream: streaming responses are not supported"
    assert_error(response, 400, "invalid_request_error", message)


def test_sdk_sees_a_bad_request_on_messages(client):
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        client.messages.create(
            model="claude-haiku-4-5", max_tokens=0, messages=[{"role": "user", "content": "hi"}]
        )


# ---- the streaming parser on its own ------------------------------------------------------------
def parse_in_chunks(body: bytes, size: int) -> tuple[list, RequestsBodyParser]:
    parser = RequestsBodyParser()
    found = []
    for start in range(0, len(body), size):
        found.extend(parser.feed(body[start : start + size]))
    found.extend(parser.finish())
    return found, parser


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64, 1 << 20])
def test_parser_gives_the_same_items_whatever_the_chunking(chunk_size):
    requests = [
        {"custom_id": "a", "params": {"n": 12345, "x": -1.5e3, "t": True, "f": False, "z": None}},
        {
            "custom_id": "b",
            "params": {"text": 'naïve café ☕ \u00e9\\"quoted\\" [brackets] {braces}', "list": [1, [2, [3]]]},
        },
        {"custom_id": "c", "params": {}},
    ]
    body = (
        b'{"meta": {"k": [1, 2]}, "requests" :\n [ '
        + b" ,\n".join(orjson.dumps(r) for r in requests)
        + b' ] , "n": 7 }\n'
    )
    found, parser = parse_in_chunks(body, chunk_size)
    assert found == requests
    assert parser.items_seen == 3


@pytest.mark.parametrize(
    "body",
    [
        b'{"requests": [{"a": 1} {"b": 2}]}',
        b'{"requests": [{"a": 1},]}',
        b'{"requests": [1, 2',
        b'{"requests" [1]}',
    ],
)
def test_parser_rejects_broken_json(body):
    with pytest.raises(BodyError):
        parse_in_chunks(body, 4)


def test_parser_does_not_cut_numbers_at_chunk_boundaries():
    found, _ = parse_in_chunks(b'{"requests": [123456789, 9876]}', 2)
    assert found == [123456789, 9876]


def _slow_items(body: bytes) -> list:
    """The items as the one-by-one path decodes them (chunks too small for the bulk path)."""
    found, _ = parse_in_chunks(body, 997)
    return found


@pytest.mark.parametrize("separator", [b",", b", ", b",\n  "])
def test_parser_bulk_path_gives_the_same_items_as_one_by_one(separator):
    trap = '},{"custom_id": "not-an-item"'  # an item boundary look-alike inside a string
    requests = []
    for index in range(3000):
        params = {
            "text": f"item {index} " + (trap if index % 7 == 0 else "x" * (index % 50)),
            "n": index * 1.5,
        }
        if index % 11 == 0:
            params["nested"] = [
                {"custom_id": "inner", "params": {}},
                {"custom_id": "inner2"},
            ]  # nested look-alikes
        requests.append({"custom_id": f"r{index}", "params": params})
    body = b'{"requests": [' + separator.join(orjson.dumps(r) for r in requests) + b"]}"
    assert len(body) > 1 << 18
    found, parser = parse_in_chunks(body, 1 << 16)
    assert found == requests == _slow_items(body)
    assert parser.items_seen == 3000


def test_parser_falls_back_for_what_orjson_refuses():
    filler = [{"custom_id": f"f{i}", "params": {"text": "y" * 100}} for i in range(600)]
    items_json = [orjson.dumps(item) for item in filler]
    items_json[300] = b'{"custom_id": "nan", "params": {"t": NaN, "big": 123456789012345678901234567890}}'
    body = b'{"requests": [' + b",".join(items_json) + b"]}"
    found, _ = parse_in_chunks(body, 1 << 20)
    assert found[300]["params"]["big"] == 123456789012345678901234567890
    assert found[300]["params"]["t"] != found[300]["params"]["t"]  # NaN
    assert found[:300] == filler[:300] and found[301:] == filler[301:]


def test_parser_bulk_path_reports_broken_items_like_one_by_one():
    good = b",".join(orjson.dumps({"custom_id": f"g{i}", "params": {"t": "z" * 200}}) for i in range(400))
    body = b'{"requests": [' + good + b',{"custom_id": "bad", "params": {"t": tru}},' + good + b"]}"
    with pytest.raises(BodyError) as bulk:
        parse_in_chunks(body, 1 << 20)
    with pytest.raises(BodyError) as slow:
        parse_in_chunks(body, 997)
    # the same message (the position in it counts from the parser's buffer, which depends on chunking)
    assert str(bulk.value).split(": line")[0] == str(slow.value).split(": line")[0]
    assert str(bulk.value).startswith("Request body is not valid JSON: Expecting value")
