"""What a secure round's parties agree on: the label, the points, the neighbour graph, the
secrets file."""

from __future__ import annotations

import json

import pytest

from foedus.plans.schema import SecureAggregationSettings
from foedus.secure.context import RoundContext
from foedus.secure.errors import SecretsFileError
from foedus.secure.site_secrets import SiteSecrets

NAMES = tuple(f"site{index:02d}" for index in range(12))


def round_of(round_number: int = 1, neighbours: int | None = 4, uuid: str = "f-1") -> RoundContext:
    """A round of twelve sites, SecAgg+ with `neighbours`."""
    settings = SecureAggregationSettings(enabled=True, threshold=3, neighbours=neighbours)
    return RoundContext(uuid, round_number, tuple(reversed(NAMES)), settings)


def test_the_label_binds_the_federation_and_the_round() -> None:
    """Another round or federation, another label; the collaborators are kept sorted."""
    labels = {round_of(1).label, round_of(2).label, round_of(1, uuid="f-2").label}
    assert len(labels) == 3
    assert round_of().collaborators == NAMES
    assert [round_of().point(name) for name in NAMES] == list(range(1, 13))


def test_the_neighbour_graph_is_k_regular_symmetric_and_the_rounds() -> None:
    """Each site has k neighbours, never itself; j is i's neighbour when i is j's; the same
    round gives the same graph, another round mostly another."""
    context = round_of(5)
    for name in NAMES:
        peers = context.neighbours(name)
        assert len(peers) == 4 and name not in peers and list(peers) == sorted(peers)
        assert all(name in context.neighbours(peer) for peer in peers)
        assert context.holders(name) == tuple(sorted((*peers, name)))
    assert all(round_of(5).neighbours(n) == context.neighbours(n) for n in NAMES)
    assert any(round_of(6).neighbours(n) != context.neighbours(n) for n in NAMES)


def test_without_neighbours_everyone_is_a_neighbour() -> None:
    """No `neighbours`: all other collaborators."""
    context = round_of(neighbours=None)
    assert context.neighbours("site03") == tuple(n for n in NAMES if n != "site03")


def test_a_stranger_has_no_point_nor_neighbours() -> None:
    """A name outside the plan is refused, not given a place."""
    with pytest.raises(ValueError, match="'mallory' is not one of the plan's collaborators"):
        round_of().point("mallory")
    with pytest.raises(ValueError, match="name a site twice"):
        RoundContext("f", 1, ("a", "a"), SecureAggregationSettings())


def valid_document() -> dict[str, object]:
    """A secrets file as written, as JSON."""
    loaded: dict[str, object] = json.loads(SiteSecrets.generate().to_bytes())
    return loaded


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(format="other"), "not a secure round's secrets file"),
        (lambda d: d.update(version=2), "version 2; this foedus reads version 1"),
        (lambda d: d.pop("seed"), "seed is missing or not hex"),
        (lambda d: d.update(mask_private="zz"), "mask_private is missing or not hex"),
        (lambda d: d.update(encryption_private="00"), "encryption_private is not 32 bytes"),
        (lambda d: d.update(revealed={"bob": "BOTH"}), "revealed is not a map"),
        (lambda d: d.update(confirmed="alice"), "confirmed is not a list"),
    ],
)
def test_a_corrupt_secrets_file_is_one_line(change: object, message: str) -> None:
    """Each damage named in one line (SecretsFileError), never a traceback of json or bytes."""
    document = valid_document()
    change(document)  # type: ignore[operator]
    with pytest.raises(SecretsFileError, match=message):
        SiteSecrets.from_bytes(json.dumps(document).encode())
    with pytest.raises(SecretsFileError, match="not a secure round's secrets file"):
        SiteSecrets.from_bytes(b"\xff\xfe")
    with pytest.raises(SecretsFileError, match="not a secure round's secrets file"):
        SiteSecrets.from_bytes(b"[1, 2]")
