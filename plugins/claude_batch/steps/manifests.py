"""Reading a staged run's manifest as the steps after the stage need it.

Every step after ``stage`` works from the manifest the stage (or the gate, or a requeue) wrote
under its round's prefix (``storage.RunLayout.manifest``; the layout: ``docs/layout.md``). A
missing manifest means the stage has not run: :func:`require_manifest` says so instead of
letting a step go on with nothing. The estimate's figures are read with the fallbacks an older
manifest needs (no estimate: cost 0; no band: the expected cost is its own band).
"""

from __future__ import annotations

from claude_batch.staging import Manifest, read_manifest
from claude_batch.storage import RunLayout


def require_manifest(layout: RunLayout) -> Manifest:
    """The round's manifest; FileNotFoundError, naming its key, when the stage has not written it."""
    manifest = read_manifest(layout)
    if manifest is None:
        raise FileNotFoundError(
            f"No manifest at {layout.store.uri(layout.manifest)}: the stage task has not run."
        )
    return manifest


def estimated_cost(manifest: Manifest) -> float:
    """The run's expected cost in batches (see :mod:`claude_batch.estimates`)."""
    return float((manifest.estimate or {}).get("cost_usd_expected", 0.0))


def estimate_band(manifest: Manifest) -> tuple[float, float]:
    """(low, high) of the estimate; an estimate without a band (an older manifest) is its own band."""
    estimate = manifest.estimate or {}
    expected = estimated_cost(manifest)
    return float(estimate.get("cost_usd_low", expected)), float(estimate.get("cost_usd_high", expected))
