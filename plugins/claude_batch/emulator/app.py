"""The emulator's HTTP face: a Starlette app serving the Message Batches API and the admin API.

API (auth by ``x-api-key`` or ``Authorization: Bearer``, ``anthropic-version`` required):
  POST   /v1/messages/batches                  create
  GET    /v1/messages/batches                  list (limit, after_id, before_id)
  GET    /v1/messages/batches/{id}             retrieve
  POST   /v1/messages/batches/{id}/cancel      cancel
  DELETE /v1/messages/batches/{id}             delete
  GET    /v1/messages/batches/{id}/results     results (JSONL stream, application/x-jsonl)
  POST   /v1/messages                          messages
  POST   /v1/messages/count_tokens             count_tokens
Admin (same API key):
  GET /_emulator/stats, GET|POST /_emulator/config, POST /_emulator/reset,
  POST /_emulator/advance {"seconds": N}; GET /_emulator/health needs no key.

Every response carries a ``request-id`` header; errors have the API's JSON error body.
A create with more than ``max_requests_per_batch`` requests is a 400 (the API schema's
``requests.maxItems``); a body over ``max_body_bytes`` a 413 ``request_too_large`` (which the
real API's edge answers before the API itself, see the README).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio.to_thread
import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError, error_body
from .ids import random_id, rfc3339
from .parser import BodyError, RequestsBodyParser
from .store import BatchBuilder, BatchStore, paused_gc
from .validation import ItemError

log = logging.getLogger(__name__)

_VERSION_RE = re.compile(r"\d{4}-\d{2}-\d{2}")
_PARSE_CHUNK_BYTES = 1 << 20  # parse the create body in ~1 MB steps, off the event loop
RESULTS_MEDIA_TYPE = "application/x-jsonl"  # what the API (and its OpenAPI document) serves results as


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class CuttableStreamingResponse(StreamingResponse):
    """A streaming response that can stop without finishing, so the client sees a broken body."""

    def __init__(self, content: AsyncIterator[bytes], cut_state: dict, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._cut_state = cut_state

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self.body_iterator:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if self._cut_state.get("cut"):
            return  # no final empty chunk: the server closes the connection mid-body
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class RequestIdMiddleware:
    """Gives every request an id (``request.state.request_id``) and every response the header.

    It also counts the requests being served in ``store.in_flight`` (until the response's last
    byte is sent): the background results worker waits while any are.
    """

    def __init__(self, app: ASGIApp, id_source: Callable[[], str], store: BatchStore) -> None:
        self.app = app
        self.id_source = id_source
        self.store = store

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = self.id_source()
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        self.store.in_flight += 1
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.store.in_flight -= 1


def _request_id(request: Request) -> str:
    return getattr(request.state, "request_id", None) or "req_unknown"


def _error_response(request: Request, error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(_request_id(request)), status_code=error.status, headers=error.headers)


def _api_key_of(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key
    authorization = request.headers.get("authorization", "")
    if authorization[:7].lower() == "bearer ":
        return authorization[7:].strip() or None
    return None


async def _json_object(request: Request) -> dict:
    body = await request.body()
    try:
        value = orjson.loads(body) if body.strip() else {}
    except orjson.JSONDecodeError as error:
        raise ApiError(400, f"Request body is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise ApiError(400, "Request body must be a JSON object")
    return value


async def _drain(request: Request) -> None:
    """Read and drop the rest of a body we refuse, so the client gets to read our answer."""
    async for _ in request.stream():
        pass


def create_app(store: BatchStore, api_key: str) -> ASGIApp:
    """The ASGI app serving ``store`` to clients that present ``api_key``."""

    def base_url(request: Request) -> str:
        return store.config.public_base_url or str(request.base_url).rstrip("/")

    def endpoint(
        name: str | None, handler: Callable[[Request], Awaitable[Response]], *, admin: bool = False
    ) -> Callable[[Request], Awaitable[Response]]:
        """Wrap a handler with counting, auth, version check, latency and fault injection."""

        async def wrapped(request: Request) -> Response:
            if name is not None:
                store.count_http(name)
            try:
                key = _api_key_of(request)
                if key is None:
                    raise ApiError(401, "x-api-key header is required")
                if not hmac.compare_digest(key.encode(), api_key.encode()):
                    raise ApiError(401, "invalid x-api-key")
                if not admin:
                    version = request.headers.get("anthropic-version")
                    if not version:
                        raise ApiError(400, "anthropic-version: header is required")
                    if not _VERSION_RE.fullmatch(version):
                        raise ApiError(400, f"anthropic-version: invalid version {version!r}")
                if name is not None:
                    latency = store.latency_for(name)
                    if latency > 0:
                        await asyncio.sleep(latency)
                    store.check_faults(name)
                return await handler(request)
            except ApiError as error:
                return _error_response(request, error)
            except ClientDisconnect:
                return Response(status_code=499)  # nobody is listening any more
            except Exception:
                log.exception("emulator failed on %s %s", request.method, request.url.path)
                return _error_response(request, ApiError(500, "Internal server error (emulator bug)."))

        return wrapped

    # ---- batches ------------------------------------------------------------------------------
    async def create(request: Request) -> Response:
        config = store.config
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > config.max_body_bytes:
            await _drain(request)
            raise _too_large(config.max_body_bytes)
        builder = store.new_builder()
        parser = RequestsBodyParser()
        pending = bytearray()
        received = 0
        failure: ApiError | None = None
        async for chunk in request.stream():
            received += len(chunk)
            if failure is not None:
                continue  # keep reading, so the client finishes sending and sees our answer
            if received > config.max_body_bytes:
                failure = _too_large(config.max_body_bytes)
                continue
            pending += chunk
            if len(pending) >= _PARSE_CHUNK_BYTES:
                data = bytes(pending)
                pending.clear()
                failure = await anyio.to_thread.run_sync(_parse_step, parser, builder, data, False)
        if failure is None:
            data = bytes(pending)
            if len(data) >= _PARSE_CHUNK_BYTES // 4:
                failure = await anyio.to_thread.run_sync(_parse_step, parser, builder, data, True)
            else:
                failure = _parse_step(parser, builder, data, True)
        if failure is not None:
            raise failure
        batch = store.commit(builder)
        return JSONResponse(store.describe_new(batch, base_url(request)))

    async def list_batches(request: Request) -> Response:
        query = request.query_params
        raw_limit = query.get("limit", "20")
        try:
            limit = int(raw_limit)
        except ValueError:
            raise ApiError(400, f"limit: Input should be a valid integer, got {raw_limit!r}") from None
        if not 1 <= limit <= 1000:
            raise ApiError(400, "limit: Input should be between 1 and 1000")
        after_id, before_id = query.get("after_id"), query.get("before_id")
        if after_id and before_id:
            raise ApiError(400, "after_id and before_id cannot both be given")
        page = store.list(
            limit=limit, after_id=after_id or None, before_id=before_id or None, base_url=base_url(request)
        )
        return JSONResponse(page)

    async def retrieve(request: Request) -> Response:
        return JSONResponse(store.retrieve(request.path_params["batch_id"], base_url(request)))

    async def cancel(request: Request) -> Response:
        return JSONResponse(store.cancel(request.path_params["batch_id"], base_url(request)))

    async def delete(request: Request) -> Response:
        return JSONResponse(store.delete(request.path_params["batch_id"]))

    async def results(request: Request) -> Response:
        batch, cut = store.results_source(request.path_params["batch_id"])
        cut_state: dict[str, bool] = {}

        async def body() -> AsyncIterator[bytes]:
            """The results file block by block (~1,000 lines each), made first where still missing."""
            lines_allowed, mid_line = cut if cut is not None else (None, False)
            served = 0
            results = batch.results
            if results is None:
                return
            for block in range(results.block_count):
                if len(results.blocks) <= block:
                    await anyio.to_thread.run_sync(store.result_lines.make_results_block, batch, block)
                if batch.results is None:  # deleted (or reset) meanwhile: the connection just closes
                    cut_state["cut"] = True
                    return
                data, count = store.result_lines.results_block(batch, block)
                if lines_allowed is not None and served + count > lines_allowed:
                    keep = lines_allowed - served
                    lines = data.split(b"\n")
                    data = b"".join(line + b"\n" for line in lines[:keep])
                    if mid_line:
                        data += lines[keep][: max(1, len(lines[keep]) // 2)]
                    cut_state["cut"] = True
                    if data:
                        yield data
                    store.count_results_served(keep)
                    return
                yield data
                store.count_results_served(count)
                served += count
                await asyncio.sleep(0)  # let other requests in between blocks

        return CuttableStreamingResponse(body(), cut_state, media_type=RESULTS_MEDIA_TYPE)

    # ---- real-time ----------------------------------------------------------------------------
    async def messages(request: Request) -> Response:
        return JSONResponse(store.create_message(await _json_object(request)))

    async def count_tokens(request: Request) -> Response:
        return JSONResponse(store.count_tokens(await _json_object(request)))

    # ---- admin --------------------------------------------------------------------------------
    async def stats(request: Request) -> Response:
        return JSONResponse(store.stats())

    async def get_config(request: Request) -> Response:
        return JSONResponse(store.config.to_dict() | {"seed": store.seed})

    async def set_config(request: Request) -> Response:
        changes = await _json_object(request)
        try:
            store.configure(**changes)
        except (ValueError, TypeError, KeyError) as error:
            raise ApiError(400, f"config: {error}") from None
        return JSONResponse(store.config.to_dict() | {"seed": store.seed})

    async def reset(request: Request) -> Response:
        store.reset()
        return JSONResponse({"status": "reset"})

    async def advance(request: Request) -> Response:
        body = await _json_object(request)
        try:
            now = store.advance(float(body.get("seconds", 0)))
        except (ValueError, TypeError) as error:
            raise ApiError(400, f"seconds: {error}") from None
        return JSONResponse({"emulated_now": rfc3339(now)})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        error_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        body = error_body(error_type, message, _request_id(request))
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    routes = [
        Route("/v1/messages/batches", endpoint("create", create), methods=["POST"]),
        Route("/v1/messages/batches", endpoint("list", list_batches), methods=["GET"]),
        Route("/v1/messages/batches/{batch_id}", endpoint("retrieve", retrieve), methods=["GET"]),
        Route("/v1/messages/batches/{batch_id}", endpoint("delete", delete), methods=["DELETE"]),
        Route("/v1/messages/batches/{batch_id}/cancel", endpoint("cancel", cancel), methods=["POST"]),
        Route("/v1/messages/batches/{batch_id}/results", endpoint("results", results), methods=["GET"]),
        Route("/v1/messages", endpoint("messages", messages), methods=["POST"]),
        Route("/v1/messages/count_tokens", endpoint("count_tokens", count_tokens), methods=["POST"]),
        Route("/_emulator/stats", endpoint(None, stats, admin=True), methods=["GET"]),
        Route("/_emulator/config", endpoint(None, get_config, admin=True), methods=["GET"]),
        Route("/_emulator/config", endpoint(None, set_config, admin=True), methods=["POST"]),
        Route("/_emulator/reset", endpoint(None, reset, admin=True), methods=["POST"]),
        Route("/_emulator/advance", endpoint(None, advance, admin=True), methods=["POST"]),
        Route("/_emulator/health", health, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    return RequestIdMiddleware(app, lambda: random_id("req_", store.request_id_rng), store)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"Request body exceeds the batch size limit of {limit} bytes.")


def _parse_step(
    parser: RequestsBodyParser, builder: BatchBuilder, data: bytes, final: bool
) -> ApiError | None:
    """Feed one piece of the create body; returns the error to answer with, if any.

    Past ``max_requests_per_batch`` the items are only counted (the 400 names how many there
    were, as the API's validation does), and the rest of the body is still parsed.
    """
    try:
        with paused_gc():
            for items in parser.feed_lists(data):
                builder.add_many(items)
            if final:
                for items in parser.finish_lists():
                    builder.add_many(items)
    except (BodyError, ItemError) as error:
        return ApiError(400, str(error))
    return None
