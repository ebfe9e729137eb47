"""Tune glibc's allocator for a server that moves its bytes in buffers of a few megabytes.

Every chunk of an upload or a download (2 MiB) passes through buffers that gRPC's and Python's
threads allocate and free. `tune_allocator`, called at start, makes three settings:

* two arenas: glibc gives threads up to 8 per core, each keeping what was freed in it, so after a
  round of 8 collaborators' 100 MB uploads the aggregator held hundreds of megabytes it no longer
  used (peak in `make bench`'s round 775 MB, against 521 MB with two);
* buffers under 8 MiB come from the arenas (`M_MMAP_THRESHOLD`). Above glibc's 128 KiB each was a
  mapping of its own, its pages faulted in and zeroed anew for every chunk: 13% of the
  aggregator's CPU in the round (page faults, `clear_page`);
* up to 16 MiB free at the top of a heap is kept for the next buffers, more is given back at once
  (`M_TRIM_THRESHOLD`; giving everything back at once meant faulting it in again).

Setting a threshold also turns off glibc's own moving of them. In `make bench`'s round (8 x 100
MB, this machine, three runs of each): two arenas and giving back at once, round 5.2-6.6 s,
aggregator CPU 5.3-6.4 s, peak 307-384 MB; with the thresholds above, 4.4-4.6 s, 4.1-4.6 s and
358-413 MB.

What is freed in the middle of a heap stays with the process; `release_free_memory`, called
before and after each round's close, gives that back too (13-26 ms each): after a round the
aggregator held ~330 MB where it had held 60 MB before it, ~75 MB with it.

Only glibc has these settings; elsewhere nothing changes.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Final

logger = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD: Final = -1
M_MMAP_THRESHOLD: Final = -3
M_ARENA_MAX: Final = -8
ARENAS: Final = 2
MMAP_THRESHOLD_BYTES: Final = 8 * 1024 * 1024
TRIM_THRESHOLD_BYTES: Final = 16 * 1024 * 1024


def tune_allocator() -> bool:
    """Make the settings above; False where that is not glibc, or it refused one.

    Call it before threads start: arenas are made as threads first allocate.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    settings = (
        (M_ARENA_MAX, ARENAS),
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
        (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
    )
    done = all([bool(mallopt(parameter, value)) for parameter, value in settings])
    if not done:
        logger.debug("mallopt refused a setting; the allocator keeps its default for it")
    return done


def release_free_memory() -> bool:
    """Give the free memory inside glibc's heaps back to the system; False where that is not glibc."""
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    malloc_trim.argtypes = (ctypes.c_size_t,)
    malloc_trim.restype = ctypes.c_int
    malloc_trim(0)
    return True
