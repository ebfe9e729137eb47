"""Test helpers: a real director server on 127.0.0.1 with real certificates, and stubs to call it.

`RecordingLauncher` stands in for the process runner only (no aggregator is started): tests that
drive the lifecycle tell it when an aggregator "ends". Tests with real aggregators use
`LocalLauncher`, the director's own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml

from foedus.director.server import DirectorServer
from foedus.pki.layout import CertsLayout
from foedus.pki.local import setup_local_federation
from foedus.pki.tls import channel_credentials
from foedus.plans.director_config import load_config
from foedus.processes.children import Ended
from foedus.protos import director_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
ENVOYS = ("alice", "bob", "carol")
STRANGER = "mallory"  # a site certificate from our CA, not in the config's envoys
USERS = ("ada", "bea")
ADMIN = "root"
OUTSIDER = "eve"  # a user certificate from our CA, not in the config
PERSON_NAMED_LIKE_A_SITE = "alice"  # a user certificate (users/alice.crt) with an envoy's name
SITE_NAMED_LIKE_A_PERSON = "ada"  # a site certificate (collaborators/ada.crt) with a user's name


def eventually(check: Callable[[], bool], what: str, seconds: float = 30) -> None:
    """Wait for `check`, bounded: the director does its work on threads of its own."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def make_director_certs(root: Path) -> CertsLayout:
    """Certificates for the host 'localhost', its envoys and a stranger, its people and an outsider,
    and two of the wrong role: a person's named like a site, a site's named like a person."""
    layout = CertsLayout(root)
    setup_local_federation(
        layout,
        aggregator_host="localhost",
        dns_names=("localhost",),
        ip_addresses=("127.0.0.1",),
        collaborators=(*ENVOYS, STRANGER, SITE_NAMED_LIKE_A_PERSON),
        users=(*USERS, ADMIN, OUTSIDER, PERSON_NAMED_LIKE_A_SITE),
    )
    return layout


def write_config(folder: Path, certs: CertsLayout, **changes: Any) -> Path:
    """A director.yaml on 127.0.0.1, any port, its state in `folder`; `changes` override keys."""
    document: dict[str, Any] = {
        "listen": {"address": "127.0.0.1", "port": 0},
        "host": "localhost",
        "certs_dir": str(certs.root),
        "state_dir": str(folder / "state"),
        "aggregator": {"listen_address": "127.0.0.1", "ports": [60100, 60109]},
        "envoys": list(ENVOYS),
        "users": list(USERS),
        "admins": [ADMIN],
        "review": "auto",
        "health_check_seconds": 1,
        "max_running_experiments": 2,
        "limits": {"max_plan_bytes": 16384, "max_model_bytes": 65536, "chunk_bytes": 4096},
    }
    document.update(changes)
    # Tests run several of one user's experiments at once: every place may be one owner's, unless
    # a test asks for a limit, or for the fair share (None; 1 of 2 places for three people).
    document.setdefault("max_running_per_user", document["max_running_experiments"])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "director.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


@dataclass
class RecordingLauncher:
    """A `Launcher` that starts nothing: it records starts and stops; tests decide the ends."""

    started: list[tuple[str, Path]] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    ends: dict[str, Ended] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)

    def start(self, experiment_id: str, plan: Path, folder: Path) -> int:
        """Record the start."""
        self.started.append((experiment_id, plan))
        self.running.add(experiment_id)
        return 4_000_000 + len(self.started)  # no such process

    def adopt(self, experiment_id: str, folder: Path, pid: int) -> bool:
        """Nothing survives a restart here."""
        return False

    def poll(self, experiment_id: str, folder: Path) -> Ended | None:
        """The end a test set, else running."""
        if experiment_id in self.ends:
            self.running.discard(experiment_id)
            return self.ends.pop(experiment_id)
        return None if experiment_id in self.running else Ended(None)

    def stop(self, experiment_id: str, folder: Path, *, grace_seconds: float = 10.0) -> None:
        """Record the stop."""
        self.stopped.append(experiment_id)
        self.running.discard(experiment_id)


@dataclass
class Director:
    """A running director and what tests need to call it."""

    server: DirectorServer
    certs: CertsLayout
    config_path: Path

    @property
    def port(self) -> int:
        """The port it listens on."""
        return self.server.port

    def stub(self, name: str, *, role: str = "user") -> director_pb2_grpc.DirectorStub:
        """A stub calling as `name` (a user/admin's certificate, or a site's with role='envoy')."""
        if role == "envoy":
            cert, key = self.certs.collaborator_cert(name), self.certs.collaborator_key(name)
        else:
            cert, key = self.certs.user_cert(name), self.certs.user_key(name)
        return stub_at(self.port, self.certs.ca_bundle, cert, key)


def stub_at(
    port: int, ca_bundle: Path, cert: Path | None, key: Path | None
) -> director_pb2_grpc.DirectorStub:
    """A stub over a new mTLS channel to 127.0.0.1:port, checking the server's name 'localhost'."""
    channel = grpc.secure_channel(
        f"localhost:{port}",
        channel_credentials(ca_bundle, cert, key),
    )
    return director_pb2_grpc.DirectorStub(channel)


@contextmanager
def running_director(
    folder: Path,
    certs: CertsLayout,
    *,
    launcher: Any = None,
    supervise_seconds: float = 0.05,
    **changes: Any,
) -> Iterator[Director]:
    """A director serving on 127.0.0.1 until the block ends."""
    config = load_config(write_config(folder, certs, **changes))
    server = DirectorServer(
        config,
        launcher=launcher if launcher is not None else RecordingLauncher(),
        supervise_seconds=supervise_seconds,
    )
    server.start()
    try:
        yield Director(server, certs, config.path)
    finally:
        server.stop(0)


def alias_bomb_plan(document: Mapping[str, Any]) -> str:
    """`document` as YAML whose `runner.settings.split` unfolds into 10**9 strings by aliases."""
    others = {key: value for key, value in document.items() if key != "runner"}
    levels = "".join(f"    l{n}: &l{n} [{', '.join([f'*l{n - 1}'] * 10)}]\n" for n in range(1, 9))
    return (
        yaml.safe_dump(others)
        + "runner:\n  name: digits\n  seed: 0\n  settings:\n"
        + "    l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
        + levels
        + "    split: *l8\n"
    )


def submitted_plan(**sections: Mapping[str, Any]) -> dict[str, Any]:
    """plans/local.yaml without the fields the director owns, sections merged with `sections`."""
    document: dict[str, Any] = yaml.safe_load((REPO / "plans/local.yaml").read_text("utf-8"))
    document.pop("tls")
    document["federation"] = {
        key: value
        for key, value in document["federation"].items()
        if key not in {"uuid", "aggregator_id"}
    }
    document["aggregator"] = {
        key: value
        for key, value in document["aggregator"].items()
        if key not in {"host", "port", "listen_address", "san_dns", "san_ips", "output_dir"}
    }
    for key, value in sections.items():
        base = document.get(key)
        document[key] = {**base, **value} if isinstance(base, dict) else value
    return document
