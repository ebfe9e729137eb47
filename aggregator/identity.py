"""Who is calling: one check for every RPC, from the TLS certificate and the message header.

The rules are OpenFL's (see the wire reference), answered with a status instead of an `assert`: the
certificate's common name must be an authorised collaborator and equal `header.sender`,
`header.receiver` must be this aggregator and `header.federation_uuid` this federation. And the
certificate must be a collaborator's (its role mark, `foedus.pki.roles`), not a person's of the same
name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from foedus.pki.requests import Role
from foedus.pki.roles import PeerCertificate, role_refusal
from foedus.refusals.errors import AuthorizationError
from foedus.serving.identity import caller_name


@dataclass(frozen=True)
class Header:
    """The identity fields of a message header, free of protobuf."""

    sender: str
    receiver: str
    federation_uuid: str


@dataclass(frozen=True)
class Gatekeeper:
    """Decides whether a caller may speak to this aggregator; immutable, so swapped whole on reload."""

    aggregator_id: str
    federation_uuid: str
    collaborators: frozenset[str]
    tls: bool = True

    def identify(
        self, peer_common_names: Sequence[str], certificate: PeerCertificate | None
    ) -> str | None:
        """The authorised collaborator behind a TLS peer, or None when the server runs insecure."""
        if not self.tls:
            return None
        name = caller_name(
            peer_common_names, service="the aggregator", issuer="this federation's CA"
        )
        if name not in self.collaborators:
            raise AuthorizationError(
                f"certificate common name {name!r} is not an authorised collaborator of "
                f"federation {self.federation_uuid!r}"
            )
        refusal = role_refusal(
            certificate,
            name=name,
            expected=Role.COLLABORATOR,
            listed_as="the plan's collaborators",
            reissue=f"pki certify --role collaborator --name {name}, or pki setup --plan PLAN for "
            "a local federation",
        )
        if refusal is not None:
            raise AuthorizationError(refusal)
        return name

    def check_header(self, peer: str | None, header: Header) -> str:
        """The collaborator a request speaks for, once its header agrees with its certificate."""
        if peer is not None and header.sender != peer:
            raise AuthorizationError(
                f"header.sender {header.sender!r} does not match the certificate's common name {peer!r}"
            )
        if peer is None and header.sender not in self.collaborators:
            raise AuthorizationError(
                f"header.sender {header.sender!r} is not an authorised collaborator of "
                f"federation {self.federation_uuid!r}"
            )
        if header.receiver != self.aggregator_id:
            raise AuthorizationError(
                f"header.receiver {header.receiver!r} is not this aggregator ({self.aggregator_id!r})"
            )
        if header.federation_uuid != self.federation_uuid:
            raise AuthorizationError(
                f"header.federation_uuid {header.federation_uuid!r} is not this federation's "
                f"({self.federation_uuid!r})"
            )
        return header.sender
