"""The one backoff every client of ours waits by: capped, exponential, with full jitter."""

from __future__ import annotations

import grpc

from foedus.retry.backoff import RETRYABLE, Backoff, backoff_delay


def test_backoff_grows_to_its_cap_with_full_jitter() -> None:
    """Delays double from the initial one, stop at the cap, and jitter over [0, 1) of it."""
    half = Backoff(0.1, 1.0, random=lambda: 0.5)
    assert [round(half.next_delay(), 3) for _ in range(6)] == [0.05, 0.1, 0.2, 0.4, 0.5, 0.5]
    low = Backoff(0.1, 1.0, random=lambda: 0.0)
    assert [low.next_delay() for _ in range(3)] == [0.0, 0.0, 0.0]
    high = Backoff(0.1, 1.0, random=lambda: 0.999)
    delays = [high.next_delay() for _ in range(100)]
    assert max(delays) <= 1.0
    high.reset()
    assert high.next_delay() < 0.1


def test_at_cap_waits_the_cap_and_stays_finite() -> None:
    """A caller told to wait at the cap waits the cap (jittered), however long it goes on."""
    backoff = Backoff(0.5, 30.0, random=lambda: 1.0)
    backoff.at_cap()
    assert [backoff.next_delay() for _ in range(3)] == [30.0, 30.0, 30.0]
    assert backoff_delay(10_000, 1e-300, 1e300, lambda: 1.0) < float("inf")


def test_only_statuses_that_say_nothing_of_the_request_are_retried() -> None:
    """UNAVAILABLE and DEADLINE_EXCEEDED are retried; a refusal such as PERMISSION_DENIED is not."""
    assert grpc.StatusCode.UNAVAILABLE in RETRYABLE
    assert grpc.StatusCode.DEADLINE_EXCEEDED in RETRYABLE
    for code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT):
        assert code not in RETRYABLE
