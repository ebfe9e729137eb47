"""The `experiment` command's small config file: which director, and who I am.

    director: localhost:50050   # host:port; host is the director's certificate name
    certs_dir: certs            # a `pki` folder: cert_chain.crt and users/NAME.{crt,key}
    name: ada                   # my certificate's name, as in director.yaml's users or admins

Read as strictly as a plan (unknown keys are errors, each problem names the file and the key);
paths are relative to the file. `--config` names it, else the `FOEDUS_EXPERIMENT_CONFIG`
environment variable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from foedus.pki.layout import CertsLayout
from foedus.plans.loader import PlanError, read_yaml
from foedus.plans.reader import NAME_PATTERN, Section
from foedus.protos.channel import host_port

ENVIRONMENT = "FOEDUS_EXPERIMENT_CONFIG"
ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})$")


class ClientConfigError(ValueError):
    """The config cannot be used; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class ClientConfig:
    """Where the director is and which certificate to present."""

    path: Path
    host: str  # director (its host part): dialled, and checked against its certificate
    port: int  # director (its port part)
    certs: CertsLayout  # certs_dir
    name: str  # name

    @property
    def target(self) -> str:
        """host:port for gRPC."""
        return host_port(self.host, self.port)


def load_client_config(path: str | Path) -> ClientConfig:
    """Read and check the config at `path`; `ClientConfigError` listing every problem."""
    config_path = Path(path)
    try:
        data = read_yaml(config_path)
    except PlanError as error:
        raise ClientConfigError(error.problems) from None
    problems: list[str] = []
    root = Section(data, "", problems)
    director = root.text("director", pattern=ADDRESS)
    certs_dir = root.text("certs_dir")
    name = root.text("name", pattern=NAME_PATTERN)
    root.finish()
    match = ADDRESS.match(director) if isinstance(director, str) else None
    if match is not None and not 1 <= int(match.group(2)) <= 65535:
        problems.append(f"director: port {match.group(2)} is not 1-65535")
    if problems or match is None:
        raise ClientConfigError([f"{config_path}: {problem}" for problem in problems])
    return ClientConfig(
        path=config_path,
        host=match.group(1),
        port=int(match.group(2)),
        certs=CertsLayout((config_path.resolve().parent / certs_dir).resolve()),
        name=name,
    )
