"""ClientSettings: everything the collaborator's client is told, said once, checked once, frozen.

The plan gives every setting (`ClientSettings.from_plan`); tests and the CLI replace single ones
by name. A settings object that exists is a usable one: `__post_init__` raises
`ClientConfigurationError` listing every problem (`problems`), each naming its setting.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any, Self

from foedus.collaborator.errors import ClientConfigurationError
from foedus.collaborator.server_identity import ExpectedAggregator
from foedus.pki.errors import PkiError
from foedus.pki.requests import normalise_fingerprint
from foedus.plans import Plan
from foedus.protos.channel import host_port

MIB = 1024 * 1024
DEFAULT_MAX_MESSAGE_BYTES = 128 * MIB
DEFAULT_MAX_TENSOR_BYTES = 1024 * MIB
MAX_PORT = 65535
_TLS_FILES = ("root_certificate", "certificate", "private_key")


@dataclass(frozen=True)
class ClientSettings:
    """How one collaborator calls its aggregator: where, as whom, over what, and how patiently."""

    aggregator_address: str
    aggregator_port: int
    _: KW_ONLY
    aggregator_id: str
    federation_uuid: str
    collaborator_name: str
    # Who the aggregator must be (collaborator.server_identity); by default the host dialled.
    aggregator_common_name: str | None = None
    aggregator_fingerprint: str | None = None
    tls: bool = True
    root_certificate: Path | None = None
    certificate: Path | None = None
    private_key: Path | None = None
    enable_atomic_connections: bool = False
    resend_data_on_reconnection: bool = True
    max_retries: int | None = 10
    max_wait_time: float | None = 300.0
    deadline: float = 60.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES
    # NaN/Inf in the global model are refused unless the plan allows them, as in uploads.
    allow_non_finite: bool = False

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ClientConfigurationError(
                f"cannot configure the client for {self.collaborator_name!r}: {'; '.join(problems)}"
            )

    @classmethod
    def from_plan(cls, plan: Plan, collaborator_name: str, **overrides: Any) -> Self:
        """The settings the federation plan gives `collaborator_name`; `overrides` replace single ones by name."""
        certs = plan.tls.certs
        try:
            cert = None if certs is None else certs.collaborator_cert(collaborator_name)
            key = None if certs is None else certs.collaborator_key(collaborator_name)
        except PkiError as error:
            raise ClientConfigurationError(
                f"{plan.path}: collaborator {collaborator_name!r}: {error}"
            ) from None
        connection = plan.connection
        settings: dict[str, Any] = {
            "aggregator_address": plan.aggregator.host,
            "aggregator_port": plan.aggregator.port,
            "aggregator_id": plan.federation.aggregator_id,
            "federation_uuid": plan.federation.uuid,
            "aggregator_common_name": plan.aggregator.common_name,
            "aggregator_fingerprint": plan.aggregator.fingerprint,
            "tls": certs is not None,
            "root_certificate": None if certs is None else certs.ca_bundle,
            "certificate": cert,
            "private_key": key,
            "enable_atomic_connections": connection.atomic_connections,
            "resend_data_on_reconnection": connection.resend_on_reconnect,
            "max_retries": connection.max_retries,
            "max_wait_time": connection.max_wait_seconds,
            "deadline": connection.deadline_seconds,
            "backoff_initial": connection.backoff_initial_seconds,
            "backoff_max": connection.backoff_max_seconds,
            "max_message_bytes": plan.limits.max_message_bytes,
            "max_tensor_bytes": plan.limits.max_tensor_bytes,
            "allow_non_finite": plan.limits.allow_non_finite,
        }
        settings.update(overrides)  # a name that is no setting: TypeError naming it
        return cls(collaborator_name=collaborator_name, **settings)

    @property
    def target(self) -> str:
        """The `host:port` gRPC dials, an IPv6 literal in brackets."""
        return host_port(self.aggregator_address, self.aggregator_port)

    @property
    def expected(self) -> ExpectedAggregator:
        """Who the aggregator must be: its certificate's name and, if pinned, its fingerprint."""
        pin = None
        if self.aggregator_fingerprint is not None:
            pin = normalise_fingerprint(self.aggregator_fingerprint)  # checked by `problems`
        return ExpectedAggregator(self.aggregator_common_name or self.aggregator_address, pin)

    def problems(self) -> list[str]:
        """Every problem with these settings, each naming its setting."""
        problems: list[str] = []
        for label, text in (
            ("aggregator_address", self.aggregator_address),
            ("aggregator_id", self.aggregator_id),
            ("federation_uuid", self.federation_uuid),
            ("collaborator_name", self.collaborator_name),
        ):
            if not text:
                problems.append(f"{label} must not be empty")
        if not 0 < self.aggregator_port <= MAX_PORT:
            problems.append(f"aggregator_port must be 1-{MAX_PORT}, got {self.aggregator_port}")
        files = {label: getattr(self, label) for label in _TLS_FILES}
        if self.tls:
            missing = [label for label, path in files.items() if path is None]
            if missing:
                problems.append(f"tls=True needs {', '.join(missing)}")
        else:
            given = [label for label, path in files.items() if path is not None]
            if given:
                problems.append(f"tls=False but {', '.join(given)} given; set tls=True to use them")
        if self.max_retries is not None and self.max_retries < 0:
            problems.append(f"max_retries must be >= 0 or None, got {self.max_retries}")
        if self.max_wait_time is not None and not self.max_wait_time > 0:
            problems.append(f"max_wait_time must be > 0 or None, got {self.max_wait_time}")
        if not self.deadline > 0:
            problems.append(f"deadline must be > 0 seconds, got {self.deadline}")
        if not self.backoff_initial >= 0:
            problems.append(f"backoff_initial must be >= 0 seconds, got {self.backoff_initial}")
        if not self.backoff_max >= self.backoff_initial:
            problems.append(
                f"backoff_max ({self.backoff_max}) must be >= backoff_initial "
                f"({self.backoff_initial})"
            )
        if not self.max_message_bytes > 0:
            problems.append(f"max_message_bytes must be > 0, got {self.max_message_bytes}")
        if not self.max_tensor_bytes > 0:
            problems.append(f"max_tensor_bytes must be > 0, got {self.max_tensor_bytes}")
        if self.aggregator_fingerprint is not None:
            try:
                normalise_fingerprint(self.aggregator_fingerprint)
            except PkiError as error:
                problems.append(f"aggregator_fingerprint: {error}")
        return problems
