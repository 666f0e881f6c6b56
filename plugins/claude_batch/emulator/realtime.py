"""The real-time endpoints: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

A message is answered at once by the store's responder, with ``service_tier`` ``standard``;
its prompt-cache use (read when the prefix is warm, else a write that warms it) goes through
the same prompt cache as the batches (``BatchStore.note_message``). A ``ResponderError`` is
answered with the HTTP status of its error type.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ERROR_TYPE_BY_STATUS, ApiError, invalid_request
from .responder import (
    ResponderError,
    ResponseContext,
    base_usage,
    finish_message,
    requested_inference_geo,
)
from .tokens import analyse_prompt
from .validation import params_error

if TYPE_CHECKING:
    from .store import BatchStore

_STATUS_BY_ERROR_TYPE = {error_type: status for status, error_type in ERROR_TYPE_BY_STATUS.items()}


def create_message(store: BatchStore, params: dict) -> dict:
    problem = params_error(params, in_batch=False)
    if problem:
        raise invalid_request(problem)
    shape = analyse_prompt(params)
    model = store.config.resolve_model(params["model"])
    cache_code, message_id = store.note_message(shape, model)
    context = ResponseContext(
        custom_id=None,
        batch_id=None,
        request_index=None,
        service_tier="standard",
        model=model,
        input_tokens=shape.total_tokens,
        message_id=message_id,
    )
    usage = base_usage(
        total_tokens=shape.total_tokens,
        cache_outcome=cache_code,
        cache_prefix_tokens=shape.cache_prefix_tokens,
        cache_1h_tokens=shape.cache_1h_tokens,
        service_tier="standard",
        inference_geo=requested_inference_geo(params),
    )
    try:
        reply = store.responder(params, context)
    except ResponderError as error:
        status = _STATUS_BY_ERROR_TYPE.get(error.error_type, 500)
        raise ApiError(status, error.message, error_type=error.error_type) from None
    return finish_message(reply, params, context, usage)


def count_tokens(params: dict) -> dict:
    problem = params_error(params, in_batch=False, count_tokens=True)
    if problem:
        raise invalid_request(problem)
    return {"input_tokens": analyse_prompt(params).total_tokens}
