"""Duplicate record keys within one extract, remembered in 8 bytes per key.

The first row with a key is the item; staging rejects every later row with the same key (as
``duplicate_key``), so a duplicate is reported, never silently dropped.
"""

from __future__ import annotations

import numpy as np


class SeenKeys:
    """Which record keys this extract has already produced, in 8 bytes per key.

    Keys are remembered by their 64-bit hash in sorted numpy runs: new keys join an open run,
    which is frozen once it holds ``_RUN_KEYS`` keys; beyond a few frozen runs, the newest merge
    while the older is no bigger (as in a log-structured merge tree), so a lookup searches a
    handful of runs and memory grows by 8 bytes a key. A hash collision (about 1 in 10^7 at a
    million keys) would mark a row as a duplicate, which is reported, never silently dropped.
    """

    _RUN_KEYS = 262_144
    _MERGE_ABOVE_RUNS = 4

    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []
        self._open = np.empty(0, dtype=np.int64)

    @staticmethod
    def _found(run: np.ndarray, wanted: np.ndarray, positions: np.ndarray | None = None) -> np.ndarray:
        if not len(run):
            return np.zeros(len(wanted), dtype=bool)
        if positions is None:
            positions = np.searchsorted(run, wanted)
        return run[np.minimum(positions, len(run) - 1)] == wanted

    def repeated(self, keys: list[str]) -> list[int]:
        """Indexes of the keys seen before, earlier in this chunk or in an earlier one."""
        if not keys:
            return []
        hashes = np.fromiter(map(hash, keys), dtype=np.int64, count=len(keys))
        order = np.argsort(hashes, kind="stable")
        ordered = hashes[order]
        # Sorted stably, a key's later rows in this chunk follow its first one.
        known = np.zeros(len(keys), dtype=bool)
        known[1:] = ordered[1:] == ordered[:-1]
        for run in self._runs:
            known |= self._found(run, ordered)
        positions = np.searchsorted(self._open, ordered)
        known |= self._found(self._open, ordered, positions)
        fresh = ~known
        self._open = np.insert(self._open, positions[fresh], ordered[fresh])
        if len(self._open) >= self._RUN_KEYS:
            self._runs.append(self._open)
            self._open = np.empty(0, dtype=np.int64)
            # Merging costs a copy of the runs it joins: only once a lookup would search many.
            while len(self._runs) > self._MERGE_ABOVE_RUNS and len(self._runs[-2]) <= len(self._runs[-1]):
                newer, older = self._runs.pop(), self._runs.pop()
                merged = np.concatenate((older, newer))
                merged.sort(kind="stable")  # timsort: two sorted runs merge in linear time
                self._runs.append(merged)
        return np.sort(order[known]).tolist()
