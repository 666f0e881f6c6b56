"""The emulated clock and the API clock the API's timestamps are reported on.

Emulated time runs ``time_scale`` times faster than the wall clock and can be jumped forward
(``advance``); the batch lifecycle runs on it. The *API clock* runs at wall-clock speed, starts
at the wall-clock time and moves by ``seconds / time_scale`` on ``advance``: an emulated
interval shows on it divided by ``time_scale``, so a client computing ``now - created_at`` or
``expires_at - now`` with its own clock gets how long a batch has really run and how long it
really has left. At ``time_scale`` 1 the two clocks are the same. See the README's "Time".
"""

from __future__ import annotations

import threading
import time


class EmulatedClock:
    """Wall-clock time scaled by ``time_scale``, plus any explicit jumps forward.

    Also keeps the *API clock* the API's timestamps are reported on: it runs at wall-clock
    speed and moves by ``seconds / time_scale`` on ``advance`` (see the module docstring).
    """

    def __init__(self, time_scale: float, start: float | None = None) -> None:
        self._lock = threading.Lock()
        self._anchor_real = time.monotonic()
        self._anchor_emulated = time.time() if start is None else start
        self._anchor_api = self._anchor_emulated
        self._scale = time_scale

    def now(self) -> float:
        with self._lock:
            return self._anchor_emulated + (time.monotonic() - self._anchor_real) * self._scale

    def api_now(self) -> float:
        with self._lock:
            return self._anchor_api + (time.monotonic() - self._anchor_real)

    def readings(self) -> tuple[float, float, float]:
        """(emulated now, API-clock now, time_scale), read together."""
        with self._lock:
            elapsed = time.monotonic() - self._anchor_real
            return self._anchor_emulated + elapsed * self._scale, self._anchor_api + elapsed, self._scale

    @property
    def time_scale(self) -> float:
        return self._scale

    def set_time_scale(self, time_scale: float) -> None:
        with self._lock:
            real = time.monotonic()
            self._anchor_emulated += (real - self._anchor_real) * self._scale
            self._anchor_api += real - self._anchor_real
            self._anchor_real = real
            self._scale = time_scale

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("emulated time only moves forward")
        with self._lock:
            self._anchor_emulated += seconds
            self._anchor_api += seconds / self._scale

    def restart(self, time_scale: float) -> None:
        """Both clocks back to the wall-clock time (a reset: no batch is left to see the jump back)."""
        with self._lock:
            self._anchor_real = time.monotonic()
            self._anchor_emulated = self._anchor_api = time.time()
            self._scale = time_scale
