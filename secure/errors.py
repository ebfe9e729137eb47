"""The two ways the secure aggregation protocol fails in plain Python (no status codes here)."""

from __future__ import annotations


class ProtocolViolation(Exception):  # noqa: N818 (the design's name: a violation, not a bug)
    """What the aggregator or a peer sent breaks the protocol: a site refuses to go on, the
    aggregator closes the round untrained; the message is one line naming the site (or the
    aggregator) and what failed."""


class TooFewSites(ProtocolViolation):
    """A stage closed, or the survivors were named, with fewer sites than the threshold: the round
    cannot be unmasked and the site reveals nothing. It need not be malice (the others left): a
    caller may skip to the next round where it would leave on another violation."""


class SecretsFileError(Exception):
    """A site's round secrets file cannot be read back: one line naming what is wrong with it."""
