"""Shared helpers for the batch-core tests."""

from __future__ import annotations

from tests.dags.batchcore_dags import make_requests

__all__ = ["make_requests"]
