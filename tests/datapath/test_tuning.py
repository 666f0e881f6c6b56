"""The bulk-processing settings: the collector paused and restored, glibc told to keep buffers."""

from __future__ import annotations

import gc
import platform

import pytest
from claude_batch import tuning


def test_the_collector_is_paused_inside_and_restored_after_even_on_error():
    assert gc.isenabled()
    with pytest.raises(RuntimeError), tuning.bulk_processing():
        assert not gc.isenabled()
        raise RuntimeError("a stage failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with tuning.gc_paused():
            pass
        assert not gc.isenabled(), "a collector the caller had disabled stays disabled"
    finally:
        gc.enable()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_accepts_the_allocator_thresholds():
    assert tuning.keep_freed_buffers() is True
    assert tuning.keep_freed_buffers() is True  # once per process, then a no-op
