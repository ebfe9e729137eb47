"""Retry only what says nothing about the request, after a capped exponential backoff with full jitter.

UNAVAILABLE and DEADLINE_EXCEEDED mean the server was not reached or did not answer in time: the
same request may succeed later. Every other status is a refusal a retry cannot change.

The delay before retry n (counted from 0) is `min(cap, initial * 2**n) * random()`, "full
jitter": clients that failed together (an aggregator restarting under a whole federation) spread
their retries over the whole window instead of arriving again together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from random import random as uniform_random
from typing import Final

import grpc

# Only these say nothing about the request: the server was not reached or did not answer in time.
RETRYABLE: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# 2**64 times any sane initial backoff is far past any cap; the bound keeps the float finite.
MAX_EXPONENT: Final = 64


def backoff_delay(
    failures: int, initial: float, cap: float, random: Callable[[], float] = uniform_random
) -> float:
    """The wait after `failures` failed attempts (1 or more): full jitter of min(cap, initial * 2**(failures-1))."""
    exponent = min(max(failures - 1, 0), MAX_EXPONENT)
    return min(cap, initial * 2.0**exponent) * random()


@dataclass
class Backoff:
    """The delays of one caller that retries until it gets through; `reset` once it has."""

    initial: float
    cap: float
    random: Callable[[], float] = uniform_random
    failures: int = 0

    def next_delay(self) -> float:
        """The delay before the next attempt after one more failure."""
        self.failures = min(self.failures + 1, MAX_EXPONENT + 1)
        return backoff_delay(self.failures, self.initial, self.cap, self.random)

    def at_cap(self) -> None:
        """The next delays are the cap's (jittered): for a refusal that may be fixed, not soon."""
        self.failures = MAX_EXPONENT

    def reset(self) -> None:
        """A call went through: the next failure starts from `initial` again."""
        self.failures = 0
