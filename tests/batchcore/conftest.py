"""Shared helpers for the batch-core tests."""

from __future__ import annotations

from tests.dags.batchcore_dags import make_requests

__all__ = ["make_requests"]


class RecordingLog:
    """A logger that keeps the formatted lines (info and warning), for asserting what was said."""

    def __init__(self):
        self.lines = []

    def info(self, *args):
        self.lines.append(args[0] % args[1:])

    warning = info
