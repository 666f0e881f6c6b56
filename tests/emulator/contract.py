"""The API contract: emulator answers checked against Anthropic's OpenAPI 3.1 document.

``spec/anthropic-openapi-subset.json`` is a vendored subset of the public document (its
``x-vendored-from`` names the source repository, path and commit). Answers are validated with
JSON Schema 2020-12 (the dialect of OpenAPI 3.1), formats (``date-time``) checked, in two ways:

- as the document states it: its ``required`` lists, and ``additionalProperties`` where it
  gives one (``DirectCaller`` is closed, ``tool_use.input`` open...);
- closed: every object schema with ``properties`` and no ``additionalProperties`` of its own is
  closed too, so the emulator sends no field the document does not declare.

``check(response, operation_id)`` picks the schema the document gives for the operation and the
status (``200``, ``4XX``; the document declares no ``5XX``, whose bodies have the same error
envelope), checks the content type it names (``application/x-jsonl`` for results, each line
validated), and validates the body. Two error types the document's ``ErrorResponse`` does not
list are checked against the same envelope: ``request_too_large`` (413, which the API's edge
answers before the API, per the errors documentation) and ``conflict_error`` (409, emulated
faults only).
"""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import orjson
from anthropic.types import Message, MessageTokensCount
from anthropic.types.messages import DeletedMessageBatch, MessageBatch, MessageBatchIndividualResponse
from anthropic.types.shared import ErrorResponse
from jsonschema import Draft202012Validator, FormatChecker
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_PATH = Path(__file__).parent / "spec" / "anthropic-openapi-subset.json"
SPEC: dict = json.loads(SPEC_PATH.read_text())
_URI = "urn:anthropic-openapi-subset"
# Error types the API uses that the document's ErrorResponse does not list, with their status.
ERROR_TYPES_OUTSIDE_THE_DOCUMENT = {"request_too_large": 413, "conflict_error": 409}
_OUTSIDE = "EmulatorErrorResponseOutsideTheDocument"


def _closed(value: Any) -> Any:
    """A copy where every object schema with properties and no additionalProperties is closed."""
    if isinstance(value, dict):
        closed = {key: _closed(item) for key, item in value.items()}
        if isinstance(value.get("properties"), dict) and "additionalProperties" not in value:
            closed["additionalProperties"] = False
        return closed
    if isinstance(value, list):
        return [_closed(item) for item in value]
    return value


def _with_outside_errors(document: dict) -> dict:
    """The document plus an error envelope for the error types it does not list."""
    document = copy.deepcopy(document)
    schemas = document["components"]["schemas"]
    envelope = copy.deepcopy(schemas["ErrorResponse"])
    options = []
    for error_type in ERROR_TYPES_OUTSIDE_THE_DOCUMENT:
        option = copy.deepcopy(schemas["InvalidRequestError"])
        option["properties"]["type"] = {"const": error_type, "type": "string"}
        options.append(option)
    envelope["properties"]["error"] = {"oneOf": options}
    schemas[_OUTSIDE] = envelope
    return document


@cache
def _validators(closed: bool) -> dict[str, Draft202012Validator]:
    document = _with_outside_errors(SPEC)
    if closed:
        document = _closed(document)
    registry = Registry().with_resource(
        _URI, Resource.from_contents(document, default_specification=DRAFT202012)
    )
    return {
        name: Draft202012Validator(
            {"$ref": f"{_URI}#/components/schemas/{name}"}, registry=registry, format_checker=FormatChecker()
        )
        for name in document["components"]["schemas"]
    }


def validate(schema_name: str, instance: Any) -> None:
    """Validate against a component schema, as the document states it and closed."""
    for closed in (False, True):
        errors = sorted(
            _validators(closed)[schema_name].iter_errors(instance), key=lambda e: list(e.absolute_path)
        )
        if errors:
            how = "closed (no undeclared fields)" if closed else "as the document states it"
            details = "\n".join(
                f"  at {'/'.join(map(str, error.absolute_path)) or '(root)'}: {error.message[:300]}"
                for error in errors[:8]
            )
            raise AssertionError(
                f"{schema_name} ({how}) rejects the answer:\n{details}\n{str(instance)[:1500]}"
            )


@cache
def _operations() -> dict[str, tuple[str, str, dict]]:
    found = {}
    for path, item in SPEC["paths"].items():
        for method, operation in item.items():
            if isinstance(operation, dict) and "operationId" in operation:
                found[operation["operationId"]] = (method.upper(), path, operation)
    return found


def operation_ids() -> list[str]:
    return sorted(_operations())


def _declared(operation_id: str, status: int) -> tuple[str, str]:
    """(media type, schema name) the document gives for the operation's answer with ``status``."""
    _method, _path, operation = _operations()[operation_id]
    responses = operation["responses"]
    key = str(status) if str(status) in responses else f"{str(status)[0]}XX"
    declared = responses.get(key) or responses["4XX"]  # no 5XX in the document: the same error envelope
    ((media_type, content),) = declared["content"].items()
    return media_type, content["schema"]["$ref"].rsplit("/", 1)[1]


def check(response: httpx.Response, operation_id: str) -> Any:
    """Check one answer of ``operation_id`` against the document; returns the parsed body.

    Results (``application/x-jsonl``) are returned as the list of parsed lines.
    """
    status = response.status_code
    assert response.headers["request-id"].startswith("req_"), response.headers
    media_type, schema_name = _declared(operation_id, status)
    content_type = response.headers.get("content-type", "").split(";")[0].strip()
    assert content_type == media_type, (
        f"{operation_id} {status}: content-type {content_type!r}, not {media_type!r}"
    )
    if media_type == "application/x-jsonl":
        text = response.content
        assert text.endswith(b"\n") and b"\r" not in text, "results must be newline-terminated JSON lines"
        lines = [orjson.loads(line) for line in text.split(b"\n")[:-1]]
        for line in lines:
            validate(schema_name, line)
        return lines
    body = response.json()
    if status >= 400:
        check_error_body(body, status, response.headers["request-id"])
    else:
        validate(schema_name, body)
    return body


def check_error_body(body: dict, status: int, request_id: str | None = None) -> None:
    """An HTTP error body: the document's ErrorResponse, or the same envelope for the types it omits."""
    error_type = body.get("error", {}).get("type")
    if error_type in ERROR_TYPES_OUTSIDE_THE_DOCUMENT:
        assert ERROR_TYPES_OUTSIDE_THE_DOCUMENT[error_type] == status, (error_type, status)
        validate(_OUTSIDE, body)
    else:
        validate("ErrorResponse", body)
    if request_id is not None:
        assert body["request_id"] == request_id


# ---- calls checked against the document and the SDK's models --------------------------------
SDK_MODEL = {
    "message_batches_post": MessageBatch,
    "message_batches_retrieve": MessageBatch,
    "message_batches_cancel": MessageBatch,
    "message_batches_delete": DeletedMessageBatch,
    "message_batches_results": MessageBatchIndividualResponse,
    "messages_post": Message,
    "messages_count_tokens_post": MessageTokensCount,
}


def checked(response: httpx.Response, operation_id: str, status: int = 200):
    """The parsed body, checked against the document and, for successes, parsed by the SDK's model."""
    assert response.status_code == status, response.text
    body = check(response, operation_id)
    if status == 200:
        if operation_id == "message_batches_list":
            for batch in body["data"]:
                MessageBatch.model_validate(batch)
        else:
            for value in body if isinstance(body, list) else [body]:
                SDK_MODEL[operation_id].model_validate(value)
    elif body["error"]["type"] not in ERROR_TYPES_OUTSIDE_THE_DOCUMENT:
        ErrorResponse.model_validate(body)
    return body


def create(http: httpx.Client, requests: list[dict]) -> dict:
    return checked(
        http.post("/v1/messages/batches", content=orjson.dumps({"requests": requests})),
        "message_batches_post",
    )


def retrieve(http: httpx.Client, batch_id: str) -> dict:
    return checked(http.get(f"/v1/messages/batches/{batch_id}"), "message_batches_retrieve")


def results(http: httpx.Client, batch_id: str) -> list[dict]:
    return checked(http.get(f"/v1/messages/batches/{batch_id}/results"), "message_batches_results")
