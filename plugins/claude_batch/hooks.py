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


class ClaudeBatchError(Exception):
    """An API failure explained for the person who has to fix it. Never carries secrets."""


class ClaudeBatchAuthError(ClaudeBatchError):
    """The API key (or workspace permission) was refused."""


class ClaudeBatchBillingError(ClaudeBatchError):
    """The organisation cannot be billed."""


class ClaudeBatchRateLimitError(ClaudeBatchError):
    """Rate-limited or overloaded after every retry."""


class ClaudeBatchValidationError(ClaudeBatchError):
    """The API rejected the request itself (fix the input, do not retry)."""


class AmbiguousCreateError(ClaudeBatchError):
    """A create failed in a way that may or may not have created the batch."""


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth retrying: connection trouble, 408/409/429/5xx/529."""
    if isinstance(exc, anthropic.APIConnectionError):
        return True
    return isinstance(exc, anthropic.APIStatusError) and exc.status_code in TRANSIENT_STATUS


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
        return ClaudeBatchError(f"Could not reach the Claude API while {action} (connection {conn_id!r}): {exc}")
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
    ) -> MessageBatch:
        """Create one batch from a streamed JSON body, never creating it twice.

        The SDK would retry a failed create blindly, and the API has no idempotency key, so
        this sends with SDK retries off. After a 429 or 529 the batch certainly was not
        created and the body is sent again after ``retry-after``. After anything ambiguous (a
        timeout, a dropped connection, a 5xx) ``recover`` is asked first whether the batch
        exists after all; only if it says no is the body sent again.

        :param body: a re-iterable of the bytes of ``{"requests": [...]}``.
        :param body_bytes: the body's exact length (sent as Content-Length).
        :param request_count: the number of requests in the body (for messages).
        :param recover: returns the batch this create made, if the API has it, else ``None``.
        :param max_attempts: sends at most this many times.
        """
        client = self.conn.with_options(max_retries=0)
        last_error: BaseException | None = None
        for attempt in range(max_attempts):
            try:
                return client.post(
                    "/v1/messages/batches",
                    content=body,
                    cast_to=MessageBatch,
                    options={"headers": {"Content-Type": "application/json", "Content-Length": str(body_bytes)}},
                )
            except anthropic.APIStatusError as exc:
                if exc.status_code not in TRANSIENT_STATUS:
                    raise explain_api_error(exc, self.conn_id, f"creating a batch of {request_count} requests") from exc
                last_error = exc
            except anthropic.APIConnectionError as exc:
                last_error = exc
            ambiguous = not (
                isinstance(last_error, anthropic.APIStatusError) and last_error.status_code in NOT_CREATED_STATUS
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
            delay = _retry_after_seconds(last_error, attempt)
            self.log.warning(
                "Creating a batch failed (%s); attempt %d of %d, retrying in %.1f s.",
                _describe(last_error),
                attempt + 1,
                max_attempts,
                delay,
            )
            time.sleep(delay)
        assert last_error is not None
        raise explain_api_error(last_error, self.conn_id, f"creating a batch of {request_count} requests")

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
