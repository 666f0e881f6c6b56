"""The Claude batch hook: one place for connections and API calls.

Built on the official Anthropic provider's hook, so the ``anthropic`` connection type, its UI
form, gateways (``host`` as base URL), Bedrock and Vertex come from there. This adds what the
batch pipeline needs and the provider lacks: a streamed ``create`` whose body is read from a
shard instead of a list, a create that is never retried blindly (the API has no idempotency
key), paging through ``list`` to find batches, one shared async client per connection and
event loop, and errors that say what to do.
"""

from __future__ import annotations

import asyncio
import random
import re
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from datetime import datetime
from typing import Any

import anthropic
from airflow.providers.anthropic.hooks.anthropic import AnthropicHook
from anthropic.types.messages import MessageBatch

# Reads (retrieve, list, results) are safe to retry; the SDK does it with backoff and
# honours retry-after. A create is not: see create_batch_from_body.
DEFAULT_READ_RETRIES = 4
TRANSIENT_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
# Statuses after which the API certainly did not create a batch, so the create can be re-sent.
NOT_CREATED_STATUS = frozenset({429, 529})
LIST_PAGE_LIMIT = 1000
# The longest a create sleeps in the worker, in all, between its short retries (request-rate
# 429, 529, 5xx). A full processing queue is not waited for here at all: see
# ClaudeBatchQueueFullError and claude_batch.batch_queue.
DEFAULT_CREATE_MAX_SLEEP = 120.0
# A 429 whose message names the processing queue is "the queue is full", not "too many calls".
_QUEUE_WORDS = re.compile(r"\bqueue", re.IGNORECASE)
_QUEUE_LIMIT = re.compile(r"limit of ([\d,_]+) (?:batch )?requests", re.IGNORECASE)
_QUEUE_WAITING = re.compile(
    r"\(([\d,_]+) (?:requests )?(?:are )?(?:waiting|in processing|processing)", re.IGNORECASE
)


class ClaudeBatchError(Exception):
    """An API failure explained for the person who has to fix it. Never carries secrets."""


class ClaudeBatchAuthError(ClaudeBatchError):
    """The API key (or workspace permission) was refused."""


class ClaudeBatchBillingError(ClaudeBatchError):
    """The organisation cannot be billed."""


class ClaudeBatchRateLimitError(ClaudeBatchError):
    """Rate-limited or overloaded after every retry."""


class ClaudeBatchQueueFullError(ClaudeBatchRateLimitError):
    """The API refused a create because its processing queue has no room: nothing was created.

    The organisation's queue holds a fixed number of requests in processing (by tier); it
    drains over hours, so this is waited for outside the worker (see
    :mod:`claude_batch.batch_queue`), not slept through.

    :param request_count: the requests of the refused create.
    :param retry_after: the server's ``retry-after`` in seconds, if it sent one.
    :param queue_limit: the queue's limit, when the API's message states it.
    :param queued: the requests in processing when refused, when the message states it.
    :param maybe_created_before: an earlier send of this create failed ambiguously (a timeout,
        a 5xx) and was only judged not to have created the batch by listing: whoever resumes
        should let the submission state's recovery ask the API again.
    """

    def __init__(
        self,
        message: str,
        *,
        request_count: int,
        retry_after: float | None = None,
        queue_limit: int | None = None,
        queued: int | None = None,
        maybe_created_before: bool = False,
    ) -> None:
        super().__init__(message)
        self.request_count = request_count
        self.retry_after = retry_after
        self.queue_limit = queue_limit
        self.queued = queued
        self.maybe_created_before = maybe_created_before


class ClaudeBatchValidationError(ClaudeBatchError):
    """The API rejected the request itself (fix the input, do not retry)."""


class AmbiguousCreateError(ClaudeBatchError):
    """A create failed in a way that may or may not have created the batch."""


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth retrying: connection trouble, 408/409/429/5xx/529."""
    if isinstance(exc, anthropic.APIConnectionError):
        return True
    return isinstance(exc, anthropic.APIStatusError) and exc.status_code in TRANSIENT_STATUS


def is_queue_full(exc: BaseException) -> bool:
    """Whether ``exc`` is the API refusing a create because the processing queue is full.

    Both this and the request-rate limit answer HTTP 429 ``rate_limit_error``; the queue's
    message names the processing queue ("... would exceed the limit of N requests waiting in
    the processing queue ..."), the request-rate one names requests per minute.
    """
    return (
        isinstance(exc, anthropic.APIStatusError)
        and exc.status_code == 429
        and bool(_QUEUE_WORDS.search(_api_message(exc)))
    )


def queue_full_error(
    exc: anthropic.APIStatusError, conn_id: str, request_count: int, maybe_created_before: bool = False
) -> ClaudeBatchQueueFullError:
    """The :class:`ClaudeBatchQueueFullError` for a queue-full 429, with what its message states."""
    message = _api_message(exc)
    request_id = exc.response.headers.get("request-id", "unknown")
    return ClaudeBatchQueueFullError(
        f"The API's processing queue has no room for a batch of {request_count:,} requests "
        f"(HTTP 429, request-id {request_id}): {message}. Nothing was created. Wait for the queue to "
        f"drain (ClaudeBatchOperator defers until it does) or submit smaller shards; connection {conn_id!r}.",
        request_count=request_count,
        retry_after=_server_retry_after(exc),
        queue_limit=_first_int(_QUEUE_LIMIT, message),
        queued=_first_int(_QUEUE_WAITING, message),
        maybe_created_before=maybe_created_before,
    )


def _first_int(pattern: re.Pattern[str], text: str) -> int | None:
    match = pattern.search(text)
    if not match:
        return None
    try:
        return int(match.group(1).replace(",", "").replace("_", ""))
    except ValueError:
        return None


def _server_retry_after(exc: anthropic.APIStatusError) -> float | None:
    """The server's ``retry-after-ms`` / ``retry-after`` in seconds (uncapped), if any."""
    headers = exc.response.headers
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(float(value) / scale, 0.0)
        except ValueError:
            continue
    return None


def explain_api_error(exc: BaseException, conn_id: str, action: str) -> ClaudeBatchError:
    """Turn an SDK exception into a :class:`ClaudeBatchError` with a clear next step.

    :param exc: the exception raised by the SDK.
    :param conn_id: the Airflow connection in use (named so the user knows what to check).
    :param action: what was being done, e.g. ``"creating a batch"``.
    """
    if isinstance(exc, anthropic.APIStatusError):
        status = exc.status_code
        api_message = _api_message(exc)
        request_id = exc.response.headers.get("request-id", "unknown")
        suffix = f"(HTTP {status}, request-id {request_id}): {api_message}"
        if status == 401:
            return ClaudeBatchAuthError(
                f"Authentication failed while {action} {suffix}. Check the API key in the password "
                f"field of Airflow connection {conn_id!r}."
            )
        if status == 403:
            return ClaudeBatchAuthError(
                f"Permission denied while {action} {suffix}. The key of connection {conn_id!r} has no "
                "access to this workspace or resource."
            )
        if status == 402:
            return ClaudeBatchBillingError(
                f"Billing error while {action} {suffix}. Check the organisation's credit balance."
            )
        if status in (429, 529):
            return ClaudeBatchRateLimitError(
                f"Still rate-limited or overloaded after retries while {action} {suffix}. Reduce "
                "concurrent submissions (a smaller Airflow pool) or try later."
            )
        if status in (400, 404, 413, 422):
            return ClaudeBatchValidationError(f"The API rejected the request while {action} {suffix}.")
        return ClaudeBatchError(f"API error while {action} {suffix}.")
    if isinstance(exc, anthropic.APIConnectionError):
        return ClaudeBatchError(
            f"Could not reach the Claude API while {action} (connection {conn_id!r}): {exc}"
        )
    return ClaudeBatchError(f"Unexpected error while {action}: {exc}")


def _api_message(exc: anthropic.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    return exc.message


def _retry_after_seconds(exc: BaseException, attempt: int) -> float:
    """Seconds to wait before retrying: the server's retry-after, else capped jittered backoff."""
    if isinstance(exc, anthropic.APIStatusError):
        header = exc.response.headers.get("retry-after")
        try:
            if header is not None:
                return min(float(header), 60.0)
        except ValueError:
            pass
    return min(0.5 * 2**attempt, 8.0) * (0.75 + random.random() / 2)


def iter_batches_since(
    fetch_page: Callable[[str | None], Any], created_after: datetime, max_pages: int = 50
) -> Iterator[MessageBatch]:
    """Yield batches newest first until one created before ``created_after``.

    :param fetch_page: ``after_id -> page`` (a SyncPage of MessageBatch, newest first).
    :param created_after: stop once batches are older than this (timezone-aware).
    :param max_pages: a bound on the pages read.
    """
    after_id: str | None = None
    for _ in range(max_pages):
        page = fetch_page(after_id)
        for batch in page.data:
            if batch.created_at < created_after:
                return
            yield batch
        if not page.has_more or not page.data:
            return
        after_id = page.data[-1].id


class ClaudeBatchHook(AnthropicHook):
    """Hook for the Claude Message Batches API on an ``anthropic`` connection.

    Connection fields as for the official provider: the API key in *password*, an optional base
    URL in *host* (a gateway, or the emulator), extras ``anthropic_client_kwargs`` for client
    options such as ``timeout`` or ``max_retries``.

    :param conn_id: the Airflow connection id.
    """

    hook_name = "Claude Batch"

    def _with_read_retries(self, client):
        # Reads retry more than the SDK's default two: a batch wait lasts hours, and a
        # throttled poll must not fail it. A connection that sets max_retries wins.
        if "max_retries" in self._connection.extra_dejson.get("anthropic_client_kwargs", {}):
            return client
        return client.with_options(max_retries=max(client.max_retries, DEFAULT_READ_RETRIES))

    def get_conn(self) -> anthropic.Anthropic:
        """The synchronous client (SDK retries on, for reads)."""
        return self._with_read_retries(super().get_conn())

    async def get_async_conn(self) -> anthropic.AsyncAnthropic:
        """A new asynchronous client; prefer :func:`shared_async_client` in triggers."""
        return self._with_read_retries(await super().get_async_conn())

    # --- create ------------------------------------------------------------------------

    def create_batch_from_body(
        self,
        body: Iterable[bytes],
        body_bytes: int,
        request_count: int,
        recover: Callable[[], MessageBatch | None],
        max_attempts: int = 8,
        max_sleep: float = DEFAULT_CREATE_MAX_SLEEP,
    ) -> MessageBatch:
        """Create one batch from a streamed JSON body, never creating it twice.

        The SDK would retry a failed create blindly, and the API has no idempotency key, so
        this sends with SDK retries off. After a request-rate 429 or a 529 the batch certainly
        was not created and the body is sent again after ``retry-after``. After anything
        ambiguous (a timeout, a dropped connection, a 5xx) ``recover`` is asked first whether
        the batch exists after all; only if it says no is the body sent again. These short
        retries sleep in the worker for at most ``max_sleep`` seconds in all.

        A 429 for a full processing queue is not retried here: the queue drains over hours,
        and sleeping for it would hold a worker slot. It raises
        :class:`ClaudeBatchQueueFullError` at once (nothing was created), for the caller to
        wait elsewhere (ClaudeBatchOperator defers).

        :param body: a re-iterable of the bytes of ``{"requests": [...]}``.
        :param body_bytes: the body's exact length (sent as Content-Length).
        :param request_count: the number of requests in the body (for messages).
        :param recover: returns the batch this create made, if the API has it, else ``None``.
        :param max_attempts: sends at most this many times.
        :param max_sleep: the most seconds slept between sends, in all.
        :raises ClaudeBatchQueueFullError: the processing queue has no room for this batch.
        """
        client = self.conn.with_options(max_retries=0)
        action = f"creating a batch of {request_count} requests"
        last_error: BaseException | None = None
        maybe_created_before = False
        slept = 0.0
        for attempt in range(max_attempts):
            try:
                return client.post(
                    "/v1/messages/batches",
                    content=body,
                    cast_to=MessageBatch,
                    options={
                        "headers": {"Content-Type": "application/json", "Content-Length": str(body_bytes)}
                    },
                )
            except anthropic.APIStatusError as exc:
                if is_queue_full(exc):
                    raise queue_full_error(exc, self.conn_id, request_count, maybe_created_before) from exc
                if exc.status_code not in TRANSIENT_STATUS:
                    raise explain_api_error(exc, self.conn_id, action) from exc
                last_error = exc
            except anthropic.APIConnectionError as exc:
                last_error = exc
            ambiguous = not (
                isinstance(last_error, anthropic.APIStatusError)
                and last_error.status_code in NOT_CREATED_STATUS
            )
            if ambiguous:
                found = recover()
                if found is not None:
                    self.log.warning(
                        "The create call failed (%s) but batch %s exists: adopting it, not resending.",
                        type(last_error).__name__,
                        found.id,
                    )
                    return found
                maybe_created_before = True
            if attempt + 1 >= max_attempts:
                break
            delay = _retry_after_seconds(last_error, attempt)
            if slept + delay > max_sleep:
                self.log.warning(
                    "Creating a batch failed (%s); not sleeping %.1f s more in the worker (%.1f s of %.0f s used).",
                    _describe(last_error),
                    delay,
                    slept,
                    max_sleep,
                )
                break
            self.log.warning(
                "Creating a batch failed (%s); attempt %d of %d, retrying in %.1f s.",
                _describe(last_error),
                attempt + 1,
                max_attempts,
                delay,
            )
            time.sleep(delay)
            slept += delay
        assert last_error is not None
        raise explain_api_error(last_error, self.conn_id, action) from last_error

    # --- reads ---------------------------------------------------------------------------

    def retrieve_batch(self, batch_id: str) -> MessageBatch:
        """Retrieve one batch, with clear errors."""
        try:
            return self.conn.messages.batches.retrieve(batch_id)
        except anthropic.APIError as exc:
            raise explain_api_error(exc, self.conn_id, f"retrieving batch {batch_id}") from exc

    def cancel_batch(self, batch_id: str) -> MessageBatch:
        """Ask the API to cancel a batch; a batch that has already ended is returned as is."""
        try:
            return self.conn.messages.batches.cancel(batch_id)
        except anthropic.APIStatusError as exc:
            if exc.status_code in (400, 409):
                return self.retrieve_batch(batch_id)
            raise explain_api_error(exc, self.conn_id, f"cancelling batch {batch_id}") from exc

    def batches_created_since(self, created_after: datetime) -> Iterator[MessageBatch]:
        """Batches created at or after ``created_after``, newest first, paged 1,000 at a time."""

        def fetch(after_id: str | None):
            kwargs: dict[str, Any] = {"limit": LIST_PAGE_LIMIT}
            if after_id:
                kwargs["after_id"] = after_id
            try:
                return self.conn.messages.batches.list(**kwargs)
            except anthropic.APIError as exc:
                raise explain_api_error(exc, self.conn_id, "listing batches") from exc

        return iter_batches_since(fetch, created_after)

    def list_page(self, after_id: str | None = None, limit: int = LIST_PAGE_LIMIT):
        """One page of batches, newest first."""
        kwargs: dict[str, Any] = {"limit": limit}
        if after_id:
            kwargs["after_id"] = after_id
        try:
            return self.conn.messages.batches.list(**kwargs)
        except anthropic.APIError as exc:
            raise explain_api_error(exc, self.conn_id, "listing batches") from exc


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, anthropic.APIStatusError):
        return f"HTTP {exc.status_code}"
    return type(exc).__name__


# --- one async client per connection and event loop ------------------------------------------

# Keyed by the loop object (weakly), not id(loop): a closed loop's id can be reused.
_shared_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, anthropic.AsyncAnthropic]] = (
    weakref.WeakKeyDictionary()
)


async def shared_async_client(conn_id: str) -> anthropic.AsyncAnthropic:
    """The one ``AsyncAnthropic`` (one connection pool) that every trigger on this loop shares.

    :param conn_id: the Airflow connection id.
    """
    clients = _shared_clients.setdefault(asyncio.get_running_loop(), {})
    client = clients.get(conn_id)
    if client is None:
        client = await ClaudeBatchHook(conn_id=conn_id).get_async_conn()
        # Another trigger may have built one while this one awaited the connection lookup.
        client = clients.setdefault(conn_id, client)
    return client


async def aiter_list_pages(
    client: anthropic.AsyncAnthropic, max_pages: int, limit: int = LIST_PAGE_LIMIT
) -> AsyncIterator[Any]:
    """Async pages of batches, newest first, at most ``max_pages`` of them."""
    after_id: str | None = None
    for _ in range(max_pages):
        kwargs: dict[str, Any] = {"limit": limit}
        if after_id:
            kwargs["after_id"] = after_id
        page = await client.messages.batches.list(**kwargs)
        yield page
        if not page.has_more or not page.data:
            return
        after_id = page.data[-1].id
