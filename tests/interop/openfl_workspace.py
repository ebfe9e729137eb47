"""OpenFL 1.9 peers for the interop tests: a workspace generated at test time, run in OpenFL's venv.

OpenFL and foedus cannot share a Python process (their protobuf messages have the same full
names), so everything of OpenFL's runs as a separate process of the virtualenv `make interop-env`
makes (`.venv-openfl`, or the one `FOEDUS_OPENFL_VENV` names). The workspace is written here from
scratch: a plan without `defaults` (every setting spelled out), `cols.yaml`, `data.yaml`, the task
runner in `openfl_side/digits_runner.py`, and our `pki`'s certificates copied into OpenFL's
`cert/` layout. Nothing is copied from OpenFL.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from foedus.pki.layout import CertsLayout

REPO = Path(__file__).resolve().parents[2]
OPENFL_SIDE = Path(__file__).resolve().parent / "openfl_side"
TASKS = ("aggregated_model_validation", "train", "locally_tuned_model_validation")
AGGREGATOR_HOST = "localhost"  # the CN and SAN of the session fixture's aggregator certificate


def openfl_venv() -> Path:
    """The OpenFL virtualenv; the test fails (not skips) without it: `make interop` makes it."""
    # Absolute: the OpenFL processes run from their workspace folder.
    venv = Path(os.environ.get("FOEDUS_OPENFL_VENV", REPO / ".venv-openfl")).absolute()
    if not (venv / "bin" / "fx").is_file():
        pytest.fail(f"no OpenFL virtualenv at {venv} (bin/fx missing): run 'make interop-env'")
    return venv


@dataclass(frozen=True)
class PlanIds:
    """The ids OpenFL derives from its plan, which every foedus peer of it must use."""

    federation_uuid: str
    aggregator_uuid: str


@dataclass(frozen=True)
class Workspace:
    """A generated OpenFL workspace and the virtualenv that runs it."""

    root: Path
    venv: Path

    @property
    def plan(self) -> Path:
        """The workspace's plan, `plan/plan.yaml`."""
        return self.root / "plan" / "plan.yaml"

    def python(self, script: str, *args: str, timeout: float = 60) -> str:
        """Run one of `openfl_side/`'s scripts in OpenFL's venv, from the workspace; its stdout."""
        done = subprocess.run(
            [str(self.venv / "bin" / "python"), str(OPENFL_SIDE / script), *args],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(f"{script} failed ({done.returncode}):\n{done.stderr}")
        return done.stdout

    def ids(self) -> PlanIds:
        """federation_uuid and aggregator_uuid, computed by OpenFL's own `Plan.parse`."""
        last = self.python("plan_ids.py", str(self.plan)).strip().splitlines()[-1]
        return PlanIds(**json.loads(last))

    def start_fx(self, log: Path, *args: str) -> subprocess.Popen[bytes]:
        """Start `fx ARGS` in the workspace, stdout and stderr to `log`."""
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", "HOME": str(self.root)}
        with log.open("ab") as out:
            return subprocess.Popen(
                [str(self.venv / "bin" / "fx"), *args],
                cwd=self.root,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=environment,
            )


def write_workspace(
    root: Path,
    certs: CertsLayout,
    *,
    port: int,
    rounds: int,
    collaborators: Sequence[str],
    shards: Mapping[str, str] | None = None,
    aggregator_settings: Mapping[str, Any] | None = None,
    collaborator_settings: Mapping[str, Any] | None = None,
    compression_pipeline: str = "NoCompressionPipeline",
) -> Workspace:
    """An OpenFL workspace whose plan points at `localhost:port`, with our certificates in `cert/`.

    `collaborators` is the plan's authorised list (`plan/cols.yaml`); `shards` maps the
    collaborators this workspace runs to their `data.yaml` entry ("INDEX/COUNT" of the digits);
    `collaborator_settings` update the plan's, `compression_pipeline` names one of
    `openfl.pipelines`.
    """
    venv = openfl_venv()
    for folder in ("plan", "src", "save", "cert/client", "cert/server"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    plan = openfl_plan(
        port=port,
        rounds=rounds,
        aggregator_settings=aggregator_settings,
        collaborator_settings=collaborator_settings,
        compression_pipeline=compression_pipeline,
    )
    (root / "plan" / "plan.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))
    (root / "plan" / "cols.yaml").write_text(yaml.safe_dump({"collaborators": list(collaborators)}))
    lines = [f"{name},{shard}" for name, shard in (shards or {}).items()]
    (root / "plan" / "data.yaml").write_text("".join(line + "\n" for line in lines))
    (root / "src" / "__init__.py").write_text("")
    shutil.copyfile(OPENFL_SIDE / "digits_runner.py", root / "src" / "digits_runner.py")
    install_certificates(root, certs, collaborators)
    return Workspace(root, venv)


def openfl_plan(
    *,
    port: int,
    rounds: int,
    aggregator_settings: Mapping[str, Any] | None = None,
    collaborator_settings: Mapping[str, Any] | None = None,
    compression_pipeline: str = "NoCompressionPipeline",
) -> dict[str, Any]:
    """OpenFL 1.9's plan sections, defaults written out, for the digits task runner."""
    return {
        "aggregator": {
            "template": "openfl.component.Aggregator",
            "settings": {
                "init_state_path": "save/init.pbuf",
                "best_state_path": "save/best.pbuf",
                "last_state_path": "save/last.pbuf",
                "rounds_to_train": rounds,
                "db_store_rounds": 2,
                "persist_checkpoint": True,
                "persistent_db_path": "save/tensor.db",
                **(aggregator_settings or {}),
            },
        },
        "collaborator": {
            "template": "openfl.component.Collaborator",
            # foedus sends whole models: OpenFL's default `use_delta_updates: True` needs
            # `db_store_rounds: 0` with it, so the collaborator asks for the whole model (README).
            "settings": {
                "opt_treatment": "RESET",
                "use_delta_updates": False,
                "db_store_rounds": 1,
                **(collaborator_settings or {}),
            },
        },
        "data_loader": {
            "template": "src.digits_runner.DigitsShard",
            "settings": {"seed": 0, "test_fraction": 0.2},
        },
        "task_runner": {
            "template": "src.digits_runner.DigitsTaskRunner",
            "settings": {"seed": 0, "learning_rate": 0.5, "batch_size": 32},
        },
        "network": {
            "template": "openfl.federation.Network",
            "settings": {
                "agg_addr": AGGREGATOR_HOST,  # dialled, checked against the certificate's SAN
                "agg_port": port,
                "hash_salt": "auto",
                "use_tls": True,
                "require_client_auth": True,
                "client_reconnect_interval": 1,
                "cert_folder": "cert",
                "enable_atomic_connections": False,
                "transport_protocol": "grpc",
            },
        },
        "assigner": {
            "template": "openfl.component.RandomGroupedAssigner",
            "settings": {
                "task_groups": [{"name": "learning", "percentage": 1.0, "tasks": list(TASKS)}]
            },
        },
        "tasks": {
            "aggregated_model_validation": {
                "function": "validate_task",
                "kwargs": {"apply": "global"},
            },
            "train": {"function": "train_task", "kwargs": {"epochs": 1}},
            "locally_tuned_model_validation": {
                "function": "validate_task",
                "kwargs": {"apply": "local"},
            },
        },
        "compression_pipeline": {"template": f"openfl.pipelines.{compression_pipeline}"},
    }


def install_certificates(root: Path, certs: CertsLayout, collaborators: Sequence[str]) -> None:
    """Copy our pki's files into OpenFL's `cert/` layout (keys keep their 0600 mode)."""
    cert = root / "cert"
    shutil.copyfile(certs.ca_bundle, cert / "cert_chain.crt")
    shutil.copy2(certs.aggregator_cert, cert / "server" / f"agg_{AGGREGATOR_HOST}.crt")
    shutil.copy2(certs.aggregator_key, cert / "server" / f"agg_{AGGREGATOR_HOST}.key")
    for name in collaborators:
        shutil.copy2(certs.collaborator_cert(name), cert / "client" / f"col_{name}.crt")
        shutil.copy2(certs.collaborator_key(name), cert / "client" / f"col_{name}.key")
