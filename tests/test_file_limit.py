"""The open-file limit the aggregator lifts at start (`foedus.aggregator.file_limit`)."""

from __future__ import annotations

import logging
import resource
from collections.abc import Iterator

import pytest

from foedus.aggregator.file_limit import files_needed, raise_open_file_limit

LOW = 256


@pytest.fixture
def limits() -> Iterator[tuple[int, int]]:
    """This process's (soft, hard) open-file limits, put back afterwards."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        yield before
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


def test_the_soft_limit_is_lifted_to_the_hard_one(limits: tuple[int, int]) -> None:
    """A soft limit of 256 under a higher hard one becomes the hard one."""
    hard = limits[1]
    if hard != resource.RLIM_INFINITY and hard <= LOW:
        pytest.skip(f"the hard limit here is {hard}, not above {LOW}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (LOW, hard))
    assert raise_open_file_limit(files_needed(10)) == hard
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)


def test_a_hard_limit_short_of_the_collaborators_is_told(
    limits: tuple[int, int], caplog: pytest.LogCaptureFixture
) -> None:
    """When even the hard limit is below what the plan's collaborators need, a warning says so."""
    hard = limits[1]
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard limit here")
    collaborators = hard  # two files each: twice the limit
    with caplog.at_level(logging.WARNING, logger="foedus.aggregator.file_limit"):
        assert raise_open_file_limit(files_needed(collaborators)) == hard
    assert f"the open-file limit is {hard}, and {collaborators} collaborators" in caplog.text


def test_enough_files_say_nothing(
    limits: tuple[int, int], caplog: pytest.LogCaptureFixture
) -> None:
    """Under a limit that suffices, nothing is logged."""
    with caplog.at_level(logging.DEBUG, logger="foedus.aggregator.file_limit"):
        raise_open_file_limit(files_needed(1))
    assert caplog.text == ""
