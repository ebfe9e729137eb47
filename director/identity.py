"""Who is calling the director: the one check, from the TLS client certificate's common name.

Every RPC's caller is the CN of its verified client certificate, and director.yaml gives each name
one role: an envoy (`envoys`), a user (`users`) or an admin (`admins`). No message field names the
caller. `Roster.identify` runs for every call (see `director.servicer`), `Caller.require` says
which roles a call is for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from director.config import DirectorConfig
from director.errors import AuthenticationError, AuthorizationError


class Role(Enum):
    """What a certificate name may do at this director."""

    ENVOY = "envoy"
    USER = "user"
    ADMIN = "admin"


PEOPLE = (Role.USER, Role.ADMIN)


@dataclass(frozen=True)
class Caller:
    """An identified caller."""

    name: str
    role: Role

    @property
    def is_admin(self) -> bool:
        """Whether the caller sees and acts on every experiment."""
        return self.role is Role.ADMIN

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

    def identify(self, peer_common_names: Sequence[str]) -> Caller:
        """The caller behind a verified TLS peer; refused if it has no usable name or no role."""
        if len(peer_common_names) != 1 or not peer_common_names[0]:
            raise AuthenticationError(
                "no usable client certificate: the director requires a certificate with one "
                "common name, issued by its CA"
            )
        name = peer_common_names[0]
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
