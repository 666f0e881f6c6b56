"""Airflow-free API error handling: which failures are transient, and what each one means.

Shared by the hook, the poller, the trigger and collect, none of which owns it: the classes
here say what to do next and never carry secrets; ``is_transient`` decides what is retried;
the ``retry-after`` readers decide how long to wait. Imports only the SDK, so the plain-asyncio
poller and the collect step can use it without importing Airflow.
"""

from __future__ import annotations

import random
import re

import anthropic

# The connection used unless one is named: the Anthropic provider's ``default_conn_name``,
# restated here so that the Airflow-free steps (collect) can name it without importing Airflow.
DEFAULT_CONN_ID = "anthropic_default"
TRANSIENT_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
# Statuses after which the API certainly did not create a batch, so the create can be re-sent.
NOT_CREATED_STATUS = frozenset({429, 529})

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


def retry_after_seconds(exc: BaseException, attempt: int) -> float:
    """Seconds to wait before retrying: the server's retry-after, else capped jittered backoff."""
    if isinstance(exc, anthropic.APIStatusError):
        header = exc.response.headers.get("retry-after")
        try:
            if header is not None:
                return min(float(header), 60.0)
        except ValueError:
            pass
    return min(0.5 * 2**attempt, 8.0) * (0.75 + random.random() / 2)


def describe_briefly(exc: BaseException | None) -> str:
    """The failure in a few words for a log line: its HTTP status, else its type."""
    if isinstance(exc, anthropic.APIStatusError):
        return f"HTTP {exc.status_code}"
    return type(exc).__name__
