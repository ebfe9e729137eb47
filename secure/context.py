"""What every party of one secure round agrees on: the federation, the round, the sites, the graph.

The label binds every key, share and signature of a round to the federation's uuid and the round
number, so a message of another round or federation never verifies or opens here. With
`neighbours` (SecAgg+) each site masks with, and shares its secrets among, its neighbours in a
k-regular circulant graph over the collaborators shuffled by a seed that the uuid and the round
give; the graph is public, so `random.Random` is fine for it (nothing secret is drawn).
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Mapping
from dataclasses import dataclass

from foedus.plans.schema import SecureAggregationSettings
from foedus.secure.ring import FixedPoint

WEIGHT_TENSOR = "foedus.secure.weight"  # the masked weight's tensor in a secure upload, shape (1,)
PROTOCOL = b"foedus secure aggregation v1"
_LENGTH_BYTES = 8


def framed(*parts: bytes) -> bytes:
    """`parts` joined with each one's length before it, so no two different lists join the same."""
    return b"".join(len(part).to_bytes(_LENGTH_BYTES, "big") + part for part in parts)


def text(value: str) -> bytes:
    """A name as the bytes the labels and signatures hold (UTF-8)."""
    return value.encode("utf-8")


@dataclass(frozen=True)
class RoundContext:
    """One secure round: the federation, the round number, the plan's collaborators and settings.

    `collaborators` is kept sorted (C in the protocol), whatever order it is given in.
    """

    federation_uuid: str
    round_number: int
    collaborators: tuple[str, ...]
    settings: SecureAggregationSettings

    def __post_init__(self) -> None:
        """Sort the collaborators once and refuse a list no round can run with."""
        names = tuple(sorted(self.collaborators))
        if len(set(names)) != len(names):
            raise ValueError(f"the collaborators {list(names)} name a site twice")
        if not names:
            raise ValueError("a secure round needs collaborators")
        object.__setattr__(self, "collaborators", names)

    @property
    def label(self) -> bytes:
        """`foedus secure aggregation v1 | uuid | round`, lengths prefixed: every derivation's prefix."""
        return framed(PROTOCOL, text(self.federation_uuid), str(self.round_number).encode())

    @property
    def threshold(self) -> int:
        """t: how many shares rebuild a secret, and how many sites must survive the round."""
        return self.settings.threshold

    @property
    def quorum(self) -> int:
        """How many survivors must confirm the same survivor list before any reveals a share:
        the threshold, and more than half the collaborators. Honest sites each sign one list a
        round, so two lists can never both gather a majority: an aggregator cannot name a site
        a survivor to some (its seed's shares) and dropped to others (its mask key's) and so
        unmask it, whatever the threshold or the neighbours."""
        return self.settings.quorum(len(self.collaborators))

    @functools.cached_property
    def fixed_point(self) -> FixedPoint:
        """The round's ring and fixed point (the settings and the number of collaborators fix it)."""
        return FixedPoint.for_federation(self.settings, len(self.collaborators))

    def point(self, name: str) -> int:
        """The Shamir point (x) of `name`'s shares: its index among the sorted collaborators plus 1."""
        return self._index[self._known(name)] + 1

    def neighbours(self, name: str) -> tuple[str, ...]:
        """The peers `name` masks with and shares its secrets with, sorted, without `name`."""
        return self._graph[self._known(name)]

    def holders(self, owner: str) -> tuple[str, ...]:
        """Who holds a share of `owner`'s secrets: its neighbours and itself, sorted."""
        return tuple(sorted((*self.neighbours(owner), owner)))

    def _known(self, name: str) -> str:
        if name not in self._index:
            raise ValueError(f"{name!r} is not one of the plan's collaborators")
        return name

    @functools.cached_property
    def _index(self) -> Mapping[str, int]:
        return {name: index for index, name in enumerate(self.collaborators)}

    @functools.cached_property
    def _graph(self) -> Mapping[str, tuple[str, ...]]:
        """Everyone's neighbours: all others, or the k/2 nearest on each side of a seeded shuffle."""
        names = self.collaborators
        k = self.settings.neighbours
        if k is None or k >= len(names) - 1:
            return {name: tuple(peer for peer in names if peer != name) for name in names}
        digest = hashlib.sha256(framed(self.label, b"graph")).digest()
        order = list(names)
        random.Random(int.from_bytes(digest, "big")).shuffle(order)
        size = len(order)
        graph: dict[str, tuple[str, ...]] = {}
        for position, name in enumerate(order):
            near = {order[(position + step) % size] for step in range(1, k // 2 + 1)}
            near |= {order[(position - step) % size] for step in range(1, k // 2 + 1)}
            graph[name] = tuple(sorted(near))
        return graph
