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


def test_the_package_makes_the_c_librarys_malloc_arrows_pool_unless_one_is_chosen():
    import os
    import subprocess
    import sys

    code = "import claude_batch.results, pyarrow; print(pyarrow.default_memory_pool().backend_name)"
    env = {key: value for key, value in os.environ.items() if key != "ARROW_DEFAULT_MEMORY_POOL"}
    chosen = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert chosen.stdout.strip() == "system"
    kept = subprocess.run(
        [sys.executable, "-c", code], env={**env, "ARROW_DEFAULT_MEMORY_POOL": "mimalloc"},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert kept.stdout.strip() == "mimalloc"


def test_freed_memory_goes_back_whichever_pool_arrow_has():
    import pyarrow as pa

    pa.array(["x"] * 100_000)
    tuning.release_arrow_memory()
    tuning.return_freed_memory()
