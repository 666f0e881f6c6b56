"""Result lines as the API writes them, and submitting a shard with the SDK directly."""

from __future__ import annotations

from typing import Any

import orjson
import pyarrow as pa
from claude_batch.costs import default_prices
from claude_batch.results import ResultRows, results_table
from claude_batch.staging import iter_shard_requests


def succeeded(
    custom_id: str,
    text: str | None = None,
    *,
    stop_reason: str = "end_turn",
    tool_input=None,
    model: str = "claude-haiku-4-5-20251001",
    usage: dict | None = None,
) -> dict[str, Any]:
    content: list[dict] = []
    if text is not None:
        content.append({"type": "text", "text": text})
    if tool_input is not None:
        content.append({"type": "tool_use", "id": "toolu_1", "name": "record_output", "input": tool_input})
    message = {
        "id": "msg_1", "type": "message", "role": "assistant", "model": model, "content": content,
        "stop_reason": stop_reason, "stop_sequence": None,
        "usage": usage or {"input_tokens": 100, "output_tokens": 20, "cache_creation_input_tokens": 0,
                           "cache_read_input_tokens": 0},
    }  # fmt: skip
    return {"custom_id": custom_id, "result": {"type": "succeeded", "message": message}}


def errored(custom_id: str, error_type: str = "api_error", message: str = "boom") -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "result": {
            "type": "errored",
            "error": {
                "type": "error",
                "error": {"type": error_type, "message": message},
                "request_id": "req_1",
            },
        },
    }


def ended(custom_id: str, kind: str) -> dict[str, Any]:
    return {"custom_id": custom_id, "result": {"type": kind}}


def results_batch(
    lines: list[dict], prompt_version: str = "pv_test", batch_id: str = "msgbatch_1"
) -> pa.RecordBatch:
    """Result lines as collect turns them into Parquet rows (record key = custom_id)."""
    rows = ResultRows()
    rows.add_lines(orjson.dumps(line) for line in lines)
    fields = rows.columns()
    table = results_table(fields, fields["custom_id"], prompt_version, batch_id, default_prices())
    return table.combine_chunks().to_batches()[0]


def submit_shard(client, layout, shard) -> str:
    """Send a staged shard as a batch with the SDK (the submit operator's job, done plainly here)."""
    batch = client.messages.batches.create(requests=list(iter_shard_requests(layout, shard)))
    return batch.id


def write_results_part(layout, manifest, part: int, outcome_for) -> None:
    """Write ``results/part-NNNNN.parquet`` as collect would.

    Its lines are ``outcome_for(record_key, custom_id)``.
    """
    import pyarrow.parquet as pq
    from claude_batch.staging import read_shard_keys

    keys = read_shard_keys(layout, manifest.shard(part))
    rows = ResultRows()
    rows.add_lines(
        orjson.dumps(outcome_for(record_key, custom_id))
        for record_key, custom_id in zip(
            keys.column("record_key").to_pylist(), keys.column("custom_id").to_pylist(), strict=True
        )
    )
    table = results_table(
        rows.columns(),
        keys.column("record_key"),
        manifest.prompt_version,
        f"msgbatch_{manifest.run_id}_{part}",
        default_prices(),
    )
    with layout.store.open(layout.results_parquet(part), "wb") as handle:
        pq.write_table(table, handle)
