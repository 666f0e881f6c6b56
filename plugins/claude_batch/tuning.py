"""Process settings for the bulk stages, which stream hundreds of MB through Python.

Two defaults of CPython and glibc cost the data path a third to half of its CPU, measured on
staging (``bench/bench_staging.py``):

- the cyclic garbage collector: a chunk keeps thousands of row dicts alive, so young
  collections keep promoting them and full collections walk every object of the worker,
  Airflow's included. The data path builds no reference cycles; reference counting frees it.
- glibc's allocator maps each multi-megabyte buffer fresh and unmaps it when freed, so every
  page faults again on first touch (about a quarter of staging's CPU on a VM). Fixed
  thresholds keep such buffers in the heap for reuse.

A third costs memory: pyarrow's default pool (mimalloc) keeps what it freed in per-thread heaps,
so collect and validate held three to four times the Arrow memory they used (about 110 MB above
baseline for 100,000 results, where Arrow itself never held more than 20 MB). Importing the
package makes the C library's malloc Arrow's pool (``ARROW_DEFAULT_MEMORY_POOL=system``, set in
``claude_batch/__init__.py``): it reuses what Arrow frees for the next row group, or for Python, at
no measurable cost in CPU (``bench/bench_collect.py``). pyarrow reads the variable when it is first
imported, so a process that imported pyarrow before the package keeps mimalloc;
:func:`release_arrow_memory` then gives the pool's spare memory back after each row group. A pool
chosen in the environment is kept.
"""

from __future__ import annotations

import ctypes
import gc
import platform
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow as pa

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Buffers up to this size come from the heap and are reused; the heap returns memory to the
# system only when this much is free at its top.
MMAP_THRESHOLD_BYTES = 64 * 1024 * 1024
TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024

_buffers_kept = False


def keep_freed_buffers() -> bool:
    """Let glibc reuse freed multi-megabyte buffers; once per process. True if it took effect.

    A no-op where the C library is not glibc (macOS, musl).
    """
    global _buffers_kept
    if _buffers_kept:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        _buffers_kept = bool(
            libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
            and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
        )
    except (OSError, AttributeError):
        return False
    return _buffers_kept


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a stage streams rows; restore it after."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@contextmanager
def bulk_processing() -> Iterator[None]:
    """Both settings, for a stage streaming rows: staging, collect, load."""
    keep_freed_buffers()
    with gc_paused():
        yield


def release_arrow_memory() -> None:
    """Have Arrow's pool give back what it keeps, after each row group (collect, validate).

    Only where Arrow kept a pool of its own (pyarrow was imported before the package): the C
    library's malloc reuses freed memory itself, and ``malloc_trim``, its release, costs
    milliseconds a call.
    """
    pool = pa.default_memory_pool()
    if pool.backend_name != "system":
        pool.release_unused()


def return_freed_memory() -> None:
    """Give what the process has freed back to the system, at the end of a shard's stage.

    With the C library's pool this is ``malloc_trim``, for Python's freed memory as much as
    Arrow's: once a shard, so the next shard, or the next task, starts from the same level.
    """
    pa.default_memory_pool().release_unused()
