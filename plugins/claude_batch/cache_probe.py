"""The cache probe's shard: a few of a run's requests moved into a part of their own.

:func:`claude_batch.caching.decide` may name a setting to *probe*, and
:func:`claude_batch.caching.size_probe` how many requests measure it; this module cuts those
requests out of a staged shard. The run's requests and custom_ids are unchanged (same lines,
same keys, same counts overall): only the probe's system block carries the probe's
``cache_control``. No staged file is overwritten: the shard that gives its requests is written
again under a new revision (``part-NNNNN.rK.jsonl``), and the manifest, written last, names
the new files (docs/architecture.md, section 3: the S3 layout).
"""

from __future__ import annotations

import hashlib
from collections.abc import Generator
from contextlib import ExitStack, closing
from dataclasses import replace
from typing import TYPE_CHECKING, cast

import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from claude_batch.costs import CacheSetting
    from claude_batch.staging import Manifest
    from claude_batch.storage import RunLayout
    from claude_batch.workloads import Workload


def split_probe(
    layout: RunLayout, manifest: Manifest, workload: Workload, probe_setting: CacheSetting, requests: int
) -> tuple[Manifest, dict[str, int]]:
    """Move a shard's last ``requests`` requests into a shard of their own, sent with ``probe_setting``.

    The smallest shard holding enough requests gives them: its other lines are written under a
    new name (``part-NNNNN.rK.jsonl``, never over the file the manifest names) and the probe's
    lines, their system block now carrying the probe's ``cache_control``, become a new part. The
    manifest is written with both; counts and checksums follow. The run's requests and custom_ids
    are unchanged: only how the probe's prefix is cached differs.

    :returns: (the manifest, the probe's requests by model).
    """
    from claude_batch.staging import (
        SHARD_KEYS_SCHEMA,
        ShardManifest,
        StagingError,
        _next_revision,
        iter_shard_lines,
        read_shard_keys,
    )

    candidates = [shard for shard in manifest.shards if shard.count >= requests]
    if not candidates:
        raise StagingError(f"no shard of run {manifest.run_id} holds {requests} requests for a probe")
    source = min(candidates, key=lambda shard: (shard.count, -shard.part))
    keep = source.count - requests
    keys = read_shard_keys(layout, source).cast(SHARD_KEYS_SCHEMA)
    if keys.num_rows != source.count:
        raise StagingError(f"shard {source.requests}: {keys.num_rows} keys for {source.count} requests")
    plain = workload.encoder(manifest.cache_setting)
    probing = workload.encoder(probe_setting)
    part = max(shard.part for shard in manifest.shards) + 1
    prefix_length = len(layout.prefix) + 1

    class _Out:
        def __init__(self, part: int, revision: int | None = None) -> None:
            self.path = layout.requests(part, revision)
            self.keys_path = layout.shard_keys(part, revision)
            self.digest = hashlib.sha256()
            self.size = 0
            self.count = 0

    main = _Out(source.part, _next_revision(source.requests)) if keep else None
    probe = _Out(part)
    with ExitStack() as stack:
        handles = {"probe": stack.enter_context(layout.store.open(probe.path, "wb"))}
        if main is not None:
            handles["main"] = stack.enter_context(
                layout.store.open(main.path, "wb", block_size=8 * 1024 * 1024)
            )
        models = keys.column("model").to_pylist()
        # A generator (annotated as an Iterator): closing it closes the shard's file.
        shard_lines = cast(Generator[bytes, None, None], iter_shard_lines(layout, source))
        with closing(shard_lines) as lines:
            for index, line in enumerate(lines):
                if index < keep:
                    out, name, data = main, "main", line + b"\n"
                else:
                    model = models[index]
                    old, new = plain.prefix(model), probing.prefix(model)
                    if old not in line:
                        raise StagingError(
                            f"a request of {source.requests} does not carry the run's system block"
                        )
                    out, name, data = probe, "probe", line.replace(old, new, 1) + b"\n"
                assert out is not None
                handles[name].write(data)
                out.digest.update(data)
                out.size += len(data)
                out.count += 1
    if (main.count if main else 0) + probe.count != source.count:
        raise StagingError(f"shard {source.requests} was cut short while taking its probe")

    def shard_for(out: _Out, number: int, table: pa.Table) -> ShardManifest:
        with layout.store.open(out.keys_path, "wb") as handle:
            pq.write_table(table, handle)
        counts: dict[str, int] = {}
        for model in table.column("model").to_pylist():
            counts[model] = counts.get(model, 0) + 1
        return ShardManifest(
            part=number,
            requests=out.path[prefix_length:],
            keys=out.keys_path[prefix_length:],
            count=out.count,
            bytes=out.size,
            sha256=out.digest.hexdigest(),
            models=dict(sorted(counts.items())),
        )

    shards = []
    for shard in manifest.shards:
        if shard.part != source.part:
            shards.append(shard)
        elif main is not None:
            shards.append(shard_for(main, source.part, keys.slice(0, keep)))
    probe_shard = shard_for(probe, part, keys.slice(keep))
    shards.append(probe_shard)
    split = replace(manifest, shards=shards)
    layout.store.write_json(layout.manifest, split.to_dict())
    return split, dict(probe_shard.models)
