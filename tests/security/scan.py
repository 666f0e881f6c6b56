"""Look for secrets in bytes, text, files, tables and objects, in the forms a leak would take."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus


def leak_forms(secret: str) -> list[bytes]:
    """The secret as written, URL-encoded, JSON-escaped and base64-encoded."""
    forms = {secret, quote(secret, safe=""), quote_plus(secret), secret.replace("/", "\\/")}
    encoded = {form.encode() for form in forms}
    encoded.add(base64.b64encode(secret.encode()).rstrip(b"="))
    return sorted(encoded)


@dataclass
class Findings:
    """Where each secret was found, and how much was looked at (a scan of nothing proves nothing)."""

    secrets: tuple[str, ...]
    found: list[str] = field(default_factory=list)
    items: int = 0
    bytes: int = 0

    def check(self, where: str, data: bytes | str) -> None:
        blob = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
        self.items += 1
        self.bytes += len(blob)
        for number, secret in enumerate(self.secrets):
            if any(form in blob for form in leak_forms(secret)):
                self.found.append(f"secret #{number} in {where}")

    def check_files(self, root: Path) -> int:
        """Every file under ``root`` (Parquet files also decoded); returns how many."""
        count = 0
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            data = path.read_bytes()
            self.check(str(path), data)
            if path.suffix == ".parquet":
                self.check(f"{path} (decoded)", parquet_text(data))
            count += 1
        return count

    def check_values(self, where: str, rows: Iterable[Iterable[Any]]) -> None:
        self.check(where, "\n".join(repr(tuple(row)) for row in rows))


def parquet_text(data: bytes) -> str:
    """Every value of a Parquet file as text (its pages may be compressed)."""
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data))
    return repr(table.to_pylist())


def store_objects(store) -> Iterator[tuple[str, bytes]]:
    """(path, bytes) of every object under the store's bucket (all runs, all prefixes)."""
    bucket = store.root_path.split("/", 1)[0]
    for path in sorted(store.fs.find(bucket)):
        yield path, store.fs.cat_file(path)
