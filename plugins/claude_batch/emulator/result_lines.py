"""Making a batch's result lines, and the served bytes of its results file, block by block.

Each line is made once, as if its request ran to its end (``batch.py`` decided succeeded,
errored or expired at create time): a succeeded line runs the responder on the request's
params (its template's params plus its own messages) and finishes the message with the usage
the create worked out. The lines go into the batch's ``ResultsFile`` (``results_file.py``),
compressed; the requests a cancel or the expiry cut short (``completion > done_fraction``) are
swapped for ``canceled`` / ``expired`` lines as the blocks are served, since that is only known
once the batch has ended. One lock keeps the responder to one caller at a time (responders need
not be thread-safe).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import orjson

from .batch import FATE_ERRORED, FATE_EXPIRED, FATE_INVALID, FATE_SUCCEEDED, Batch, paused_gc
from .errors import error_body, not_found
from .ids import derived_id
from .responder import (
    Responder,
    ResponderError,
    ResponseContext,
    base_usage,
    finish_message,
    requested_inference_geo,
)
from .results_file import BLOCK_LINES, ResultsFile

_BATCH_ERROR_MESSAGES = {
    "api_error": "Internal server error (emulated).",
    "overloaded_error": "Overloaded",
    "timeout_error": "Request timed out (emulated).",
    "rate_limit_error": "Rate limited (emulated).",
}


class ResultLineMaker:
    """Makes and serves the result lines of batches with the responder ``responder()`` returns."""

    def __init__(self, responder: Callable[[], Responder]) -> None:
        self._responder = responder  # read at each batch's first line: the store's may be replaced
        self._lock = threading.Lock()  # one maker of result lines at a time

    def make_result_lines(self, batch: Batch, limit: int) -> bool:
        """Make up to ``limit`` more lines of the batch's results file; True once it is complete."""
        with self._lock, paused_gc():
            results = batch.results
            if results is None or results.complete:
                return True
            start, end = results.next_step(limit)
            results.add_lines(self._lines(batch, results, start, end))
            return results.complete

    def make_results_block(self, batch: Batch, block: int) -> None:
        """Make the results file up to the end of ``block`` (what a download waits for)."""
        while True:
            results = batch.results
            if results is None or len(results.blocks) > block:
                return
            self.make_result_lines(batch, BLOCK_LINES)

    def results_block(self, batch: Batch, block: int) -> tuple[bytes, int]:
        """The served bytes of one made block, and its line count.

        The stored lines are those of requests that ran to their end; the ones a cancel or the
        expiry cut short (``completion > done_fraction``) are swapped for canceled / expired.
        """
        results = batch.results
        if results is None:
            raise not_found(f"No Message Batch found with id {batch.id!r}.")
        raw = results.block(block)
        start, end = results.block_span(block)
        done = batch.done_fraction
        completion = batch.completion
        if done >= 1.0 or not any(completion[index] > done for index in range(start, end)):
            return raw, end - start
        unfinished = b'{"type":"' + batch.unfinished_result().encode() + b'"}}'
        custom_ids = batch.custom_ids
        lines = raw.split(b"\n")  # the last item is the empty text after the final newline
        for offset, index in enumerate(range(start, end)):
            if completion[index] > done:
                lines[offset] = b'{"custom_id":"' + custom_ids[index].encode() + b'","result":' + unfinished
        return b"\n".join(lines), end - start

    def result_lines(self, batch: Batch) -> Iterator[bytes]:
        """One JSON line (without newline) per request, in request order, as a download serves them."""
        results = batch.results
        for block in range(results.block_count if results is not None else 0):
            self.make_results_block(batch, block)
            data, _count = self.results_block(batch, block)
            yield from data.split(b"\n")[:-1]

    def _lines(self, batch: Batch, results: ResultsFile, start: int, end: int) -> list[bytes]:
        """The result lines (newline-terminated) of requests start..end, as if each ran to its end."""
        context = results.context
        if not context:
            context["templates"] = {}
            context["responder"] = self._responder()
        responder = context["responder"]
        templates = context["templates"]
        custom_ids, fates = batch.custom_ids, batch.fates
        lines = []
        for index in range(start, end):
            fate = fates[index]
            if fate == FATE_SUCCEEDED:
                result = orjson.dumps(self._succeeded_result(batch, index, templates, responder))
            elif fate == FATE_EXPIRED:
                result = b'{"type":"expired"}'
            elif fate == FATE_INVALID:
                result = orjson.dumps(_errored(batch, index, "invalid_request_error", batch.invalid[index]))
            else:
                error_type = batch.error_types[fate - FATE_ERRORED]
                message = _BATCH_ERROR_MESSAGES.get(error_type, error_type)
                result = orjson.dumps(_errored(batch, index, error_type, message))
            # custom_id matches ^[a-zA-Z0-9_-]{1,64}$: nothing in it needs escaping.
            lines.append(b'{"custom_id":"' + custom_ids[index].encode() + b'","result":' + result + b"}\n")
        return lines

    def _succeeded_result(self, batch: Batch, index: int, templates: dict, responder: Responder) -> dict:
        template_id = batch.template_ids[index]
        template = templates.get(template_id)
        if template is None:
            template_params = orjson.loads(batch.templates[template_id])
            model = batch.config.resolve_model(template_params["model"])
            template = templates[template_id] = (
                template_params,
                model,
                requested_inference_geo(template_params),
            )
        template_params, model, inference_geo = template
        params = dict(template_params)
        params["messages"] = orjson.loads(batch.messages[index])
        context = ResponseContext(
            custom_id=batch.custom_ids[index],
            batch_id=batch.id,
            request_index=index,
            service_tier="batch",
            model=model,
            input_tokens=batch.input_tokens[index],
            message_id=derived_id("msg_", batch.id, index),
        )
        usage = base_usage(
            total_tokens=batch.input_tokens[index],
            cache_outcome=batch.cache_codes[index],
            cache_prefix_tokens=batch.cache_tokens[index],
            cache_1h_tokens=batch.cache_1h_tokens[index],
            service_tier="batch",
            inference_geo=inference_geo,
        )
        try:
            message = finish_message(responder(params, context), params, context, usage)
        except ResponderError as error:
            return _errored(batch, index, error.error_type, error.message)
        except Exception as error:  # a broken custom responder shows up in the results, not as a dead stream
            return _errored(batch, index, "api_error", f"responder failed: {error!r}")
        return {"type": "succeeded", "message": message}


def _errored(batch: Batch, index: int, error_type: str, message: str) -> dict:
    request_id = derived_id("req_", batch.id, index)
    return {"type": "errored", "error": error_body(error_type, message, request_id)}
