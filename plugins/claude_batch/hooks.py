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
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime

import anthropic
from airflow.providers.anthropic.hooks.anthropic import AnthropicHook
from anthropic.types.messages import MessageBatch

# The error classes and helpers live in claude_batch.errors (Airflow-free) and paging in
# claude_batch.paging; they are re-exported here, their old home, for existing imports.
from claude_batch.errors import (
    NOT_CREATED_STATUS,
    TRANSIENT_STATUS,
    AmbiguousCreateError,
    ClaudeBatchAuthError,
    ClaudeBatchBillingError,
    ClaudeBatchError,
    ClaudeBatchQueueFullError,
    ClaudeBatchRateLimitError,
    ClaudeBatchValidationError,
    describe_briefly,
    explain_api_error,
    is_queue_full,
    is_transient,
    queue_full_error,
    retry_after_seconds,
)
from claude_batch.paging import LIST_PAGE_LIMIT, iter_batches_since, list_params

__all__ = [
    "DEFAULT_CREATE_MAX_SLEEP",
    "DEFAULT_READ_RETRIES",
    "LIST_PAGE_LIMIT",
    "NOT_CREATED_STATUS",
    "TRANSIENT_STATUS",
    "AmbiguousCreateError",
    "ClaudeBatchAuthError",
    "ClaudeBatchBillingError",
    "ClaudeBatchError",
    "ClaudeBatchHook",
    "ClaudeBatchQueueFullError",
    "ClaudeBatchRateLimitError",
    "ClaudeBatchValidationError",
    "explain_api_error",
    "is_queue_full",
    "is_transient",
    "iter_batches_since",
    "queue_full_error",
    "shared_async_client",
]

# Reads (retrieve, list, results) are safe to retry; the SDK does it with backoff and
# honours retry-after. A create is not: see create_batch_from_body.
DEFAULT_READ_RETRIES = 4
# The longest a create sleeps in the worker, in all, between its short retries (request-rate
# 429, 529, 5xx). A full processing queue is not waited for here at all: see
# ClaudeBatchQueueFullError and claude_batch.batch_queue.
DEFAULT_CREATE_MAX_SLEEP = 120.0


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
            delay = retry_after_seconds(last_error, attempt)
            if slept + delay > max_sleep:
                self.log.warning(
                    "Creating a batch failed (%s); not sleeping %.1f s more in the worker "
                    "(%.1f s of %.0f s used).",
                    describe_briefly(last_error),
                    delay,
                    slept,
                    max_sleep,
                )
                break
            self.log.warning(
                "Creating a batch failed (%s); attempt %d of %d, retrying in %.1f s.",
                describe_briefly(last_error),
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
        return iter_batches_since(self.list_page, created_after)

    def list_page(self, after_id: str | None = None, limit: int = LIST_PAGE_LIMIT):
        """One page of batches, newest first."""
        try:
            return self.conn.messages.batches.list(**list_params(after_id, limit))
        except anthropic.APIError as exc:
            raise explain_api_error(exc, self.conn_id, "listing batches") from exc


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
