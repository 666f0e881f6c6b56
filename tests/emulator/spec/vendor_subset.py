"""Rebuild ``anthropic-openapi-subset.json`` from Anthropic's public OpenAPI 3.1 document.

The document is read from a git clone of the stackql-registry/stackql-provider-anthropic
repository (``SOURCE_PATH``, JSON despite its ``.yml`` name). The subset keeps the operations the
emulator serves (the Message Batches API, ``POST /v1/messages`` and ``count_tokens``) and every
component schema they reference, transitively, unchanged; ``x-vendored-from`` names the
source repository, path and commit.

    python -m tests.emulator.spec.vendor_subset /path/to/clone [--commit HEAD]
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path
from typing import Any

SOURCE_REPOSITORY = "github.com/stackql-registry/stackql-provider-anthropic"
SOURCE_PATH = "stackql_anthropic_provider/provider-dev/downloaded/anthropic-openapi.yml"
SUBSET_FILE = Path(__file__).with_name("anthropic-openapi-subset.json")
PATHS = (
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/messages/batches",
    "/v1/messages/batches/{message_batch_id}",
    "/v1/messages/batches/{message_batch_id}/cancel",
    "/v1/messages/batches/{message_batch_id}/results",
)


def _refs(value: Any, found: set[str]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "$ref" and isinstance(item, str):
                found.add(item)
            else:
                _refs(item, found)
    elif isinstance(value, list):
        for item in value:
            _refs(item, found)


def subset(document: dict, header: dict) -> dict:
    """The operations in PATHS and the closure of the component schemas they reference."""
    paths = {path: document["paths"][path] for path in PATHS}
    schemas = document["components"]["schemas"]
    pending: set[str] = set()
    _refs(paths, pending)
    names: set[str] = set()
    while pending:
        ref = pending.pop()
        prefix = "#/components/schemas/"
        if not ref.startswith(prefix):
            raise ValueError(f"unexpected reference {ref!r}")
        name = ref[len(prefix) :]
        if name in names:
            continue
        names.add(name)
        _refs(schemas[name], pending)
    return {
        "x-vendored-from": header,
        "openapi": document["openapi"],
        "info": document["info"],
        "servers": document.get("servers", []),
        "paths": paths,
        "components": {"schemas": {name: schemas[name] for name in sorted(names)}},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("git_dir", help="a clone (or bare mirror) of the source repository")
    parser.add_argument("--commit", default="HEAD")
    args = parser.parse_args(argv)
    commit = subprocess.run(
        ["git", "-C", args.git_dir, "rev-parse", args.commit], check=True, capture_output=True, text=True
    ).stdout.strip()
    text = subprocess.run(
        ["git", "-C", args.git_dir, "show", f"{commit}:{SOURCE_PATH}"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    header = {
        "repository": SOURCE_REPOSITORY,
        "path": SOURCE_PATH,
        "commit": commit,
        "note": "A subset of the source document: the operations under paths, and every component schema "
        "they reference (transitively), copied unchanged. Rebuild with "
        "python -m tests.emulator.spec.vendor_subset <clone>.",
    }
    SUBSET_FILE.write_text(json.dumps(subset(json.loads(text), header), indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {SUBSET_FILE} from {SOURCE_REPOSITORY}@{commit}")


if __name__ == "__main__":
    main()
