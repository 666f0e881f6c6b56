"""Listing and paging in both directions, authentication, headers and error bodies."""

from __future__ import annotations

import anthropic
import httpx
import orjson
import pytest
from anthropic.types.messages import MessageBatch
from anthropic.types.shared import ErrorResponse

from .helpers import API_KEY, items


def create_batches(http: httpx.Client, count: int) -> list[str]:
    """Create ``count`` one-request batches; returns their ids, oldest first."""
    ids = []
    for index in range(count):
        response = http.post(
            "/v1/messages/batches", content=orjson.dumps({"requests": items(1, f"b{index}")})
        )
        assert response.status_code == 200, response.text
        ids.append(response.json()["id"])
    return ids


def validated_page(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    page = response.json()
    assert set(page) == {"data", "has_more", "first_id", "last_id"}
    for batch in page["data"]:
        MessageBatch.model_validate(batch)
    return page


def test_list_is_newest_first_with_default_limit_20(http, emu):
    ids = create_batches(http, 25)
    page = validated_page(http.get("/v1/messages/batches"))
    assert [b["id"] for b in page["data"]] == ids[::-1][:20]
    assert page["has_more"] is True
    assert page["first_id"] == ids[-1] and page["last_id"] == ids[5]


def test_list_pages_forward_with_after_id(http, emu):
    ids = create_batches(http, 12)
    newest_first = ids[::-1]
    seen, after = [], None
    while True:
        params = {"limit": 5} | ({"after_id": after} if after else {})
        page = validated_page(http.get("/v1/messages/batches", params=params))
        seen += [b["id"] for b in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == newest_first
    assert len(seen) == 12


def test_list_pages_backward_with_before_id(http, emu):
    ids = create_batches(http, 12)
    # Start from the oldest batch and walk towards the newest, as the SDK does with before_id.
    page = validated_page(http.get("/v1/messages/batches", params={"limit": 5, "before_id": ids[0]}))
    assert [b["id"] for b in page["data"]] == ids[1:6][::-1]  # the five just newer, newest first
    assert page["has_more"] is True
    page = validated_page(
        http.get("/v1/messages/batches", params={"limit": 5, "before_id": page["first_id"]})
    )
    assert [b["id"] for b in page["data"]] == ids[6:11][::-1]
    page = validated_page(
        http.get("/v1/messages/batches", params={"limit": 5, "before_id": page["first_id"]})
    )
    assert [b["id"] for b in page["data"]] == [ids[11]]
    assert page["has_more"] is False


def test_sdk_auto_pagination_both_directions(client, http, emu):
    ids = create_batches(http, 9)
    assert [b.id for b in client.messages.batches.list(limit=2)] == ids[::-1]
    backwards = client.messages.batches.list(limit=3, before_id=ids[0])
    assert [b.id for page in backwards.iter_pages() for b in page.data] == ids[1:4][::-1] + ids[4:7][
        ::-1
    ] + ids[7:9][::-1]


def test_list_limit_bounds_and_bad_cursors(http, emu):
    create_batches(http, 3)
    for limit in ("0", "1001", "abc"):
        response = http.get("/v1/messages/batches", params={"limit": limit})
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert len(validated_page(http.get("/v1/messages/batches", params={"limit": 1000}))["data"]) == 3
    assert len(validated_page(http.get("/v1/messages/batches", params={"limit": 1}))["data"]) == 1
    both = http.get("/v1/messages/batches", params={"after_id": "x", "before_id": "y"})
    assert both.status_code == 400
    unknown = http.get("/v1/messages/batches", params={"after_id": "msgbatch_01nope"})
    assert unknown.status_code == 400


def test_empty_list(http, emu):
    page = validated_page(http.get("/v1/messages/batches"))
    assert page == {"data": [], "has_more": False, "first_id": None, "last_id": None}


def test_deleted_batch_still_works_as_a_cursor(client, http, emu):
    ids = create_batches(http, 5)
    emu.advance(120)
    client.messages.batches.delete(ids[2])
    page = validated_page(http.get("/v1/messages/batches", params={"after_id": ids[2]}))
    assert [b["id"] for b in page["data"]] == [ids[1], ids[0]]


def test_a_thousand_batch_page(http, emu):
    ids = create_batches(http, 1000)
    page = validated_page(http.get("/v1/messages/batches", params={"limit": 1000}))
    assert [b["id"] for b in page["data"]] == ids[::-1]
    assert page["has_more"] is False
    assert emu.stats()["http_requests"]["list"] == 1


@pytest.mark.parametrize(
    "headers",
    [{"x-api-key": API_KEY}, {"authorization": f"Bearer {API_KEY}"}],
    ids=["x-api-key", "bearer"],
)
def test_both_auth_headers_are_accepted(emu, headers):
    response = httpx.get(
        f"{emu.base_url}/v1/messages/batches", headers=headers | {"anthropic-version": "2023-06-01"}
    )
    assert response.status_code == 200


@pytest.mark.parametrize(
    "headers",
    [{}, {"x-api-key": "sk-wrong"}, {"authorization": "Bearer sk-wrong"}, {"authorization": "Basic abc"}],
    ids=["missing", "wrong-key", "wrong-bearer", "not-bearer"],
)
def test_bad_or_missing_key_is_401(emu, headers):
    response = httpx.get(
        f"{emu.base_url}/v1/messages/batches", headers=headers | {"anthropic-version": "2023-06-01"}
    )
    assert response.status_code == 401
    body = response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "authentication_error"
    assert body["request_id"] == response.headers["request-id"]
    ErrorResponse.model_validate(body)


def test_sdk_with_wrong_key_raises_authentication_error(emu):
    with anthropic.Anthropic(api_key="sk-wrong", base_url=emu.base_url, max_retries=0) as client:
        with pytest.raises(anthropic.AuthenticationError):
            client.messages.batches.list()


def test_missing_anthropic_version_is_400(emu):
    response = httpx.get(f"{emu.base_url}/v1/messages/batches", headers={"x-api-key": API_KEY})
    assert response.status_code == 400
    assert "anthropic-version" in response.json()["error"]["message"]


def test_every_response_has_a_request_id_and_errors_the_api_shape(http, emu):
    for response in (
        http.get("/v1/messages/batches"),
        http.get("/v1/messages/batches/msgbatch_01missing"),
        http.get("/v1/no/such/route"),
        http.put("/v1/messages/batches"),
        http.post("/v1/messages", content=b"not json"),
    ):
        request_id = response.headers["request-id"]
        assert request_id.startswith("req_")
        if response.status_code >= 400:
            body = response.json()
            assert set(body) == {"type", "error", "request_id"}
            assert set(body["error"]) == {"type", "message"}
            assert body["request_id"] == request_id
    assert http.get("/v1/no/such/route").json()["error"]["type"] == "not_found_error"
    assert http.put("/v1/messages/batches").status_code == 405
