"""Who is calling the director: the one check, from the TLS client certificate.

Every RPC's caller is the CN of its verified client certificate, and director.yaml gives each name
one role: an envoy (`envoys`), a user (`users`) or an admin (`admins`). No message field names the
caller. The certificate's role mark (`foedus.pki.roles`) must be that role's: a site's
(collaborator) certificate for an envoy, a user's for a user or admin, so a certificate issued to a
person named like a site is not that site. `Roster.identify` runs for every call (see
`foedus.director.servicer`), `Caller.require` says which roles a call is for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from foedus.pki.requests import Role as CertificateRole
from foedus.pki.roles import PeerCertificate, role_refusal
from foedus.plans.director_config import DirectorConfig
from foedus.refusals.errors import AuthorizationError
from foedus.serving.identity import caller_name


class Role(Enum):
    """What a certificate name may do at this director."""

    ENVOY = "envoy"
    USER = "user"
    ADMIN = "admin"


PEOPLE = (Role.USER, Role.ADMIN)
# The certificate role (`pki certify --role`) each director role needs; envoys are sites.
CERTIFICATE_ROLES = {
    Role.ENVOY: CertificateRole.COLLABORATOR,
    Role.USER: CertificateRole.USER,
    Role.ADMIN: CertificateRole.USER,
}


@dataclass(frozen=True)
class Caller:
    """An identified caller."""

    name: str
    role: Role

    @property
    def is_admin(self) -> bool:
        """Whether the caller sees and acts on every experiment."""
        return self.role is Role.ADMIN

    def sees(self, owner: str) -> bool:
        """Whether the caller may see and act on an experiment of `owner`: a user their own."""
        return self.is_admin or owner == self.name

    def require(self, call: str, *roles: Role) -> None:
        """`AuthorizationError` unless the caller's role is one of `roles`."""
        if self.role not in roles:
            allowed = " or ".join(f"{role.value}s" for role in roles)
            raise AuthorizationError(
                f"{call} is for {allowed}; certificate {self.name!r} is one of this director's "
                f"{self.role.value}s"
            )


@dataclass(frozen=True)
class Roster:
    """The names director.yaml allows, by role."""

    envoys: frozenset[str]
    users: frozenset[str]
    admins: frozenset[str]

    @classmethod
    def of(cls, config: DirectorConfig) -> Roster:
        """The roster of a director.yaml."""
        return cls(frozenset(config.envoys), frozenset(config.users), frozenset(config.admins))

    def identify(
        self, peer_common_names: Sequence[str], certificate: PeerCertificate | None
    ) -> Caller:
        """The caller behind a verified TLS peer; refused if it has no usable name, no role, or a
        certificate marked for another role (`certificate` None: a dashboard token's person)."""
        name = caller_name(peer_common_names, service="the director", issuer="its CA")
        caller = self._listed(name)
        expected = CERTIFICATE_ROLES[caller.role]
        refusal = role_refusal(
            certificate,
            name=name,
            expected=expected,
            listed_as=f"director.yaml {caller.role.value}s",  # its list: envoys, users, admins
            reissue=f"pki certify --role {expected.value} --name {name}, or pki setup --director "
            "CONFIG for a local federation",
        )
        if refusal is not None:
            raise AuthorizationError(refusal)
        return caller

    def _listed(self, name: str) -> Caller:
        """The role director.yaml gives `name` (it refuses a site listed as a person too)."""
        if name in self.admins:
            return Caller(name, Role.ADMIN)
        if name in self.users:
            return Caller(name, Role.USER)
        if name in self.envoys:
            return Caller(name, Role.ENVOY)
        raise AuthorizationError(
            f"certificate common name {name!r} is not in this director's envoys, users or admins "
            "(director.yaml)"
        )
