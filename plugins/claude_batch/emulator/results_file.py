"""A batch's results file: its lines made once, in request order, and kept zlib-compressed.

Making a result line runs the responder (the default one reads the prompt and builds an answer
that satisfies the schema), tens of microseconds a line; serving a line that is already made
is a memory copy. So each batch's lines are made once and kept, in blocks of ``BLOCK_LINES``
lines compressed with zlib (about a tenth of their size), and every download streams the blocks.

The lines are made as if every request ran to its end (succeeded, or errored / expired when a
fault decided so at create time). Which requests a cancel or the 24-hour expiry cut short is
only known when the batch ends; those lines are swapped for ``canceled`` / ``expired`` ones as
the blocks are served.

Who makes them: a worker thread (``ResultsWorker``) starts on each batch as soon as it is
created, in creation order, a few dozen lines at a time, and pauses while any HTTP request is
being served, so it never slows an answer; a download that reaches a block not made yet makes
it itself (on a worker thread of the server). One lock keeps the responder to one caller at a
time.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

BLOCK_LINES = 1024  # lines per compressed block; a block of 600-byte lines is ~600 KB raw
STEP_LINES = 64  # lines the background worker makes between checks for waiting requests
_ZLIB_LEVEL = 1  # about 300 MB/s and a tenth of the size on result lines; level 6 saves little more


class ResultsFile:
    """The lines of one batch's results: finished blocks (compressed) plus the block being made."""

    __slots__ = ("size", "blocks", "next_index", "context", "_pending")

    def __init__(self, size: int) -> None:
        self.size = size
        self.blocks: list[bytes] = []
        self.next_index = 0  # the next request whose line is to be made
        self.context: dict[str, Any] = {}  # what the maker caches for the batch (parsed templates...)
        self._pending: list[bytes] = []

    @property
    def block_count(self) -> int:
        return -(-self.size // BLOCK_LINES)

    @property
    def complete(self) -> bool:
        return self.next_index >= self.size

    def block_span(self, block: int) -> tuple[int, int]:
        """The request indexes (start, end) of a block's lines."""
        start = block * BLOCK_LINES
        return start, min(start + BLOCK_LINES, self.size)

    def next_step(self, limit: int) -> tuple[int, int]:
        """The indexes (start, end) to make next: at most ``limit`` lines, not past a block's end."""
        start = self.next_index
        return start, min(start + limit, (start // BLOCK_LINES + 1) * BLOCK_LINES, self.size)

    def add_lines(self, lines: list[bytes]) -> None:
        """Append the lines (each ending in a newline) for the requests from ``next_index`` on."""
        self._pending.extend(lines)
        self.next_index += len(lines)
        if self.next_index % BLOCK_LINES == 0 or self.next_index >= self.size:
            self.blocks.append(zlib.compress(b"".join(self._pending), _ZLIB_LEVEL))
            self._pending.clear()
            if self.complete:
                self.context.clear()

    def block(self, block: int) -> bytes:
        """The block's lines, decompressed; it must have been made."""
        return zlib.decompress(self.blocks[block])

    @property
    def stored_bytes(self) -> int:
        return sum(map(len, self.blocks)) + sum(map(len, self._pending))


class ResultsWorker:
    """One background thread making results files, batch after batch, while the server is idle.

    The thread runs only while there is work: ``submit`` starts it, and it ends once its queue
    has been empty for ``linger`` seconds. ``busy()`` is polled between steps; while it is true
    the thread sleeps ``pause`` seconds at a time.
    """

    def __init__(
        self, step: Callable[[Any], bool], busy: Callable[[], bool], pause: float = 0.002, linger: float = 1.0
    ) -> None:
        self._step = step  # step(batch) -> True once the batch's file is complete (or gone)
        self._busy = busy
        self._pause = pause
        self._linger = linger
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._queue: deque[Any] = deque()
        self._running = False
        self._closed = False

    def submit(self, batch: Any) -> None:
        with self._lock:
            if self._closed:
                return
            self._queue.append(batch)
            if self._running:
                self._wakeup.notify()
            else:
                self._running = True
                threading.Thread(target=self._run, name="claude-batch-emulator-results", daemon=True).start()

    def clear(self) -> None:
        with self._lock:
            self._queue.clear()

    def close(self) -> None:
        """Stop: drop the queue and take no more work (the thread ends after its current step)."""
        with self._lock:
            self._closed = True
            self._queue.clear()
            self._wakeup.notify_all()

    def reopen(self) -> None:
        with self._lock:
            self._closed = False

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    def _next(self) -> Any:
        """The batch to work on, or None when the thread is to end."""
        with self._lock:
            if not self._queue and not self._closed:
                self._wakeup.wait(self._linger)
            if self._closed or not self._queue:
                self._running = False
                return None
            return self._queue[0]

    def _run(self) -> None:
        while (batch := self._next()) is not None:
            while not self._closed:
                if self._busy():
                    time.sleep(self._pause)
                    continue
                try:
                    if self._step(batch):
                        break
                except Exception:  # an emulator bug: the download that needs these lines will report it
                    log.exception("claude-batch emulator: making the results of a batch failed")
                    break
                with self._lock:
                    if not self._queue or self._queue[0] is not batch:
                        break  # cleared (reset) meanwhile
            with self._lock:
                if self._queue and self._queue[0] is batch:
                    self._queue.popleft()
