"""How much of the director each caller may hold at once: calls per identity, and people's together.

Plain Python over `foedus.admission.calls.Admission`; `foedus.director.servicer` admits every call
here right after identifying its caller, and `foedus.director.server` sizes its worker threads to
what these limits admit, so that no identity can take the threads others need.

* `limits.max_calls_per_identity`: the calls of one certificate name in progress at once. An
  envoy's heartbeats, registrations and reports (`ENVOY_CONTROL_RPCS`) have as many slots again
  of their own, so a site busy uploading logs, or holding silent uploads, still heartbeats.
* `limits.max_people_calls`: all users' and admins' calls together, so that however many people
  director.yaml lists, their calls never take the threads kept for envoys.

One past a limit is `LimitExceededError` (RESOURCE_EXHAUSTED) naming the limit and the caller.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Final

from foedus.admission.calls import Admission
from foedus.director.identity import PEOPLE, Caller, Role
from foedus.plans.director_config import DirectorLimits
from foedus.refusals.errors import LimitExceededError

# An envoy's calls that keep it registered and alive: slots of their own, apart from its uploads.
ENVOY_CONTROL_RPCS: Final = frozenset({"RegisterEnvoy", "EnvoyHeartbeat", "ReportCollaborator"})


class Capacity:
    """The calls in progress each caller holds, refused past director.yaml's limits; thread-safe."""

    def __init__(self, limits: DirectorLimits) -> None:
        """Count against `limits.max_calls_per_identity` and `limits.max_people_calls`."""
        per_identity = limits.max_calls_per_identity
        key = "limits.max_calls_per_identity"
        self.calls = Admission(per_identity, key=key, who="certificate", refusal=LimitExceededError)
        self.envoy_control = Admission(
            per_identity, key=key, who="envoy", refusal=LimitExceededError
        )
        self.people = Admission(
            limits.max_people_calls,
            key="limits.max_people_calls",
            who="role",
            refusal=LimitExceededError,
        )

    @contextmanager
    def admit(self, caller: Caller, rpc: str) -> Iterator[None]:
        """Hold the caller's slots for `rpc` while inside; `LimitExceededError` if one is full."""
        with ExitStack() as held:
            if caller.role is Role.ENVOY and rpc in ENVOY_CONTROL_RPCS:
                held.enter_context(self.envoy_control.admit(caller.name))
            else:
                held.enter_context(self.calls.admit(caller.name))
            if caller.role in PEOPLE:
                held.enter_context(self.people.admit("users and admins"))
            yield

    def in_progress(self) -> int:
        """Every call holding a slot now."""
        return self.calls.in_progress() + self.envoy_control.in_progress()
