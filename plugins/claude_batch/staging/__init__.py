"""Staging: extracted rows -> request shards on S3, with a manifest (see docs/architecture.md).

The package's modules, each with its contract in its docstring:

- :mod:`~claude_batch.staging.manifest`: the shard and manifest format, and reading them back;
- :mod:`~claude_batch.staging.stager`: :func:`stage_requests`, the engine driving the rest;
- :mod:`~claude_batch.staging.screening`: every check on a row, and the reason for each reject;
- :mod:`~claude_batch.staging.wire`: the request-line wire format (reference and fast builder);
- :mod:`~claude_batch.staging.kernels`: the numpy text kernels;
- :mod:`~claude_batch.staging.writers`: shard and rejects writers, and the I/O thread;
- :mod:`~claude_batch.staging.chunks`, :mod:`~claude_batch.staging.dedup`: chunks of rows, and
  duplicate keys;
- :mod:`~claude_batch.staging.rewrite`: a staged run without the items it could not claim.

Every name the single module ``claude_batch.staging`` had is importable from here. The manifest
names are imported at once; the engine's load on first use, so that importing
``claude_batch.staging.manifest`` (as collect, validate, load and the warehouse do) does not
pull in numpy or the writers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from claude_batch.staging.manifest import (
    DEFAULT_MAX_SHARD_BYTES,
    MANIFEST_FORMAT,
    MAX_SHARD_BYTES_LIMIT,
    SHARD_KEYS_SCHEMA,
    Manifest,
    ShardManifest,
    StagingError,
    StagingLimits,
    iter_rejections,
    iter_shard_lines,
    iter_shard_requests,
    read_manifest,
    read_shard_keys,
    rejects_path,
    shard_keys_path,
)

if TYPE_CHECKING:
    from claude_batch.contracts import AS_IS_CUSTOM_ID as _AS_IS_CUSTOM_ID
    from claude_batch.staging.dedup import SeenKeys as _SeenKeys
    from claude_batch.staging.kernels import inspect_text_column as _inspect_text_column
    from claude_batch.staging.kernels import rows_with_control_chars as _rows_with_control_chars
    from claude_batch.staging.rewrite import next_revision as _next_revision
    from claude_batch.staging.rewrite import restrict_to_claimed
    from claude_batch.staging.rewrite import rewrite_shard as _rewrite_shard
    from claude_batch.staging.stager import stage_requests
    from claude_batch.staging.wire import keys_not_usable_as_is as _keys_not_usable_as_is

# name -> (module, name there): loaded on first access. The underscore names are the old
# module's, still imported by other modules and tests.
_LAZY = {
    "stage_requests": ("claude_batch.staging.stager", "stage_requests"),
    "restrict_to_claimed": ("claude_batch.staging.rewrite", "restrict_to_claimed"),
    "_rewrite_shard": ("claude_batch.staging.rewrite", "rewrite_shard"),
    "_next_revision": ("claude_batch.staging.rewrite", "next_revision"),
    "_SeenKeys": ("claude_batch.staging.dedup", "SeenKeys"),
    "_inspect_text_column": ("claude_batch.staging.kernels", "inspect_text_column"),
    "_rows_with_control_chars": ("claude_batch.staging.kernels", "rows_with_control_chars"),
    "_keys_not_usable_as_is": ("claude_batch.staging.wire", "keys_not_usable_as_is"),
    "_AS_IS_CUSTOM_ID": ("claude_batch.contracts", "AS_IS_CUSTOM_ID"),
}


def __getattr__(name: str) -> Any:
    try:
        module, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "MANIFEST_FORMAT",
    "MAX_SHARD_BYTES_LIMIT",
    "SHARD_KEYS_SCHEMA",
    "Manifest",
    "ShardManifest",
    "StagingError",
    "StagingLimits",
    "iter_rejections",
    "iter_shard_lines",
    "iter_shard_requests",
    "read_manifest",
    "read_shard_keys",
    "rejects_path",
    "restrict_to_claimed",
    "shard_keys_path",
    "stage_requests",
    # The old module's private names, which other modules and tests still import.
    "_AS_IS_CUSTOM_ID",
    "_SeenKeys",
    "_inspect_text_column",
    "_keys_not_usable_as_is",
    "_next_revision",
    "_rewrite_shard",
    "_rows_with_control_chars",
]
