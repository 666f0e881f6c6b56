"""Rewriting a staged run without the items it could not claim.

A shard that loses items is written anew under the next revision's name
(``part-NNNNN.rK.jsonl`` and its keys), never over the file the current manifest names, and
the manifest is written last: a gate that dies midway leaves the old manifest and shards
intact, and simply does it again.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from claude_batch.staging.manifest import (
    S3_BLOCK_SIZE,
    Manifest,
    ShardManifest,
    iter_shard_lines,
    read_shard_keys,
    relative_path,
)

if TYPE_CHECKING:
    from claude_batch.storage import RunLayout


def restrict_to_claimed(
    layout: RunLayout, manifest: Manifest, not_claimed: Mapping[int | None, set[str]]
) -> Manifest:
    """Drop the items this run could not claim from its shards and manifest, and write the manifest.

    An item another live run holds (or one that became final meanwhile) must not be sent by this
    run. Each shard that lost items is rewritten under a new name (``part-NNNNN.rK.jsonl`` with
    its keys), never over the file the current manifest names, so a gate that dies midway leaves
    the old manifest and shards intact and simply does it again. Counts, bytes, checksums and the
    cost estimate follow; rejected rows another run holds leave the run's counts too.

    :param layout: the run's layout.
    :param manifest: the manifest as staged.
    :param not_claimed: shard part (None: rejected rows) -> record keys not claimed.
    :returns: the manifest the rest of the run uses.
    """
    shards: list[ShardManifest] = []
    dropped = 0
    for shard in manifest.shards:
        drop = not_claimed.get(shard.part)
        if not drop:
            shards.append(shard)
            continue
        rewritten = rewrite_shard(layout, shard, drop)
        dropped += shard.count - (rewritten.count if rewritten else 0)
        if rewritten is not None:
            shards.append(rewritten)
    dropped_rejects = len(not_claimed.get(None, ()))
    staged = sum(shard.count for shard in shards)
    scale = staged / manifest.staged_requests if manifest.staged_requests else 0.0
    estimate = {
        key: (value * scale if key.startswith("cost_usd") and isinstance(value, int | float) else value)
        for key, value in (manifest.estimate or {}).items()
    }
    restricted = replace(
        manifest,
        shards=shards,
        models=sorted({model for shard in shards for model in shard.models}),
        extracted_rows=manifest.extracted_rows - dropped - dropped_rejects,
        staged_requests=staged,
        rejected_rows=manifest.rejected_rows - dropped_rejects,
        estimate=estimate,
    )
    layout.store.write_json(layout.manifest, restricted.to_dict())
    return restricted


def rewrite_shard(layout: RunLayout, shard: ShardManifest, drop: set[str]) -> ShardManifest | None:
    """The shard without the items whose record keys are in ``drop`` (None when none is left)."""
    keys = read_shard_keys(layout, shard)
    keep = pc.invert(pc.is_in(keys.column("record_key"), value_set=pa.array(sorted(drop), pa.string())))
    kept_keys = keys.filter(keep)
    if kept_keys.num_rows == 0:
        return None
    mask = keep.to_pylist() if isinstance(keep, pa.Array) else keep.combine_chunks().to_pylist()
    revision = next_revision(shard.requests)
    digest = hashlib.sha256()
    size = 0
    models: dict[str, int] = {}
    for model in kept_keys.column("model").to_pylist():
        models[model] = models.get(model, 0) + 1
    with layout.store.open(layout.requests(shard.part, revision), "wb", block_size=S3_BLOCK_SIZE) as out:
        for line, wanted in zip(iter_shard_lines(layout, shard), mask, strict=True):
            if wanted:
                data = line + b"\n"
                digest.update(data)
                size += len(data)
                out.write(data)
    with layout.store.open(layout.shard_keys(shard.part, revision), "wb") as handle:
        pq.write_table(kept_keys, handle)
    return ShardManifest(
        part=shard.part,
        requests=relative_path(layout, layout.requests(shard.part, revision)),
        keys=relative_path(layout, layout.shard_keys(shard.part, revision)),
        count=kept_keys.num_rows,
        bytes=size,
        sha256=digest.hexdigest(),
        models=dict(sorted(models.items())),
    )


def next_revision(requests_path: str) -> int:
    """The revision after the one in a shard's name (``part-NNNNN.jsonl`` is revision 0)."""
    match = re.search(r"\.r(\d+)\.jsonl$", requests_path)
    return int(match.group(1)) + 1 if match else 1
