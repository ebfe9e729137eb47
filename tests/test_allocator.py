"""The allocator setting the aggregator makes at start (`foedus.aggregator.allocator`)."""

from __future__ import annotations

import platform

import pytest

from foedus.aggregator.allocator import release_free_memory, tune_allocator


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_glibc_accepts_the_settings() -> None:
    """On glibc (CI's, this machine's) every setting is taken; elsewhere the call is a no-op."""
    assert tune_allocator() is True


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_glibc_gives_free_memory_back() -> None:
    """malloc_trim is there and called (what it frees depends on the heap; bench measures it)."""
    assert release_free_memory() is True
