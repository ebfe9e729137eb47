"""OpenFL 1.9's own gRPC client, with certificates from our pki, against `aggregator start`.

`openfl_side/client_probe.py` runs in OpenFL's virtualenv and plays two collaborators through
`AggregatorGRPCClient`: ping, get_tasks, get_aggregated_tensor for every model tensor and
send_local_task_results (OpenFL's chunked stream; the model is over 2 MiB, so several chunks)
for every task of every round. It records what it fetched and sent; these tests check it.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from foedus.aggregator.storage import write_model
from foedus.pki.layout import CertsLayout

from conftest import Identity
from federation_processes import FederationProcesses, free_port, write_plan
from openfl_workspace import OPENFL_SIDE, TASKS, openfl_venv

ROUNDS = 2
UUID = "openfl-client-probe"
AGGREGATOR_ID = f"aggregator_{UUID}"
# name: (train data size, validation data size); the weights FedAvg must use.
SIZES = {"alice": (30, 5), "bob": (10, 15)}
CHUNK_BYTES = 2 * 1024 * 1024
Array = npt.NDArray[np.float32]


@dataclass(frozen=True)
class ProbeRun:
    """The aggregator's exit code and output, and what the probe saw."""

    aggregator_exit: int
    initial_model: Mapping[str, Array]
    report: dict[str, Any]
    arrays: Mapping[str, Array]
    output_dir: Path


def initial_model() -> dict[str, Array]:
    """A float32 model whose kernel alone is over 2 MiB, so every train upload is several chunks."""
    rng = np.random.default_rng(7)
    return {
        "dense/kernel": rng.normal(0.0, 0.05, (1024, 640)).astype(np.float32),
        "dense/bias": np.zeros(640, dtype=np.float32),
    }


@pytest.fixture(scope="module")
def probe(
    certs: CertsLayout, stranger: Identity, tmp_path_factory: pytest.TempPathFactory
) -> ProbeRun:
    """One federation of two OpenFL clients against `aggregator start`, run to the end."""
    venv = openfl_venv()
    folder = tmp_path_factory.mktemp("openfl-client")
    model = initial_model()
    write_model(folder / "initial.pbuf", model)
    port = free_port()
    plan = write_plan(
        folder,
        certs,
        ROUNDS,
        federation={"uuid": UUID, "aggregator_id": AGGREGATOR_ID},
        aggregator={"port": port, "initial_model": str(folder / "initial.pbuf")},
        collaborators=list(SIZES),
    )
    alice = [str(certs.collaborator_cert("alice")), str(certs.collaborator_key("alice"))]
    scenario = {
        "port": port,
        "ca": str(certs.ca_bundle),
        "federation_uuid": UUID,
        "aggregator_uuid": AGGREGATOR_ID,
        "tensors": sorted(model),
        "collaborators": {
            name: [str(certs.collaborator_cert(name)), str(certs.collaborator_key(name)), *sizes]
            for name, sizes in SIZES.items()
        },
        "duplicate": "alice",
        "impostors": {
            "another_collaborators_certificate": {"name": "bob", "cert": alice[0], "key": alice[1]},
            "not_in_the_plan": {
                "name": "mallory",
                "cert": str(stranger.cert),
                "key": str(stranger.key),
            },
            "wrong_federation": {
                "name": "alice",
                "cert": alice[0],
                "key": alice[1],
                "federation_uuid": "another-federation",
            },
            "wrong_aggregator": {
                "name": "alice",
                "cert": alice[0],
                "key": alice[1],
                "aggregator_uuid": "aggregator_elsewhere",
            },
        },
        "out": str(folder),
    }
    (folder / "scenario.json").write_text(json.dumps(scenario, indent=1))
    federation = FederationProcesses(plan, folder)
    try:
        federation.start("aggregator")
        federation.wait_for_output("aggregator", r"serving federation", timeout=30)
        done = subprocess.run(
            [
                str(venv / "bin" / "python"),
                str(OPENFL_SIDE / "client_probe.py"),
                str(folder / "scenario.json"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, f"the probe failed:\n{done.stderr[-4000:]}"
        code = federation.wait("aggregator", timeout=60)
    finally:
        federation.stop_all()
    with np.load(folder / "arrays.npz") as saved:
        arrays = {name: saved[name] for name in saved.files}
    report = json.loads((folder / "report.json").read_text())
    return ProbeRun(code, model, report, arrays, folder / "output")


def fedavg(parts: Mapping[str, tuple[int, Array]]) -> Array:
    """The weighted mean a FedAvg aggregator must produce, in float64 then cast to float32."""
    total = sum(weight for weight, _ in parts.values())
    mean = sum(weight * array.astype(np.float64) for weight, array in parts.values()) / total
    return np.asarray(mean, dtype=np.float32)


def test_every_round_and_task_is_served_to_openfl_clients(probe: ProbeRun) -> None:
    """Both clients get the plan's tasks in rounds 0-1, the final validation round, then quit."""
    assert probe.aggregator_exit == 0
    seen = {(entry["name"], entry["round"]): entry["tasks"] for entry in probe.report["rounds"]}
    for name in SIZES:
        for round_number in range(ROUNDS):
            assert [task[0] for task in seen[name, round_number]] == list(TASKS)
        assert [task[0] for task in seen[name, ROUNDS]] == ["aggregated_model_validation"]
    assert sorted(entry["name"] for entry in probe.report["quit"]) == sorted(SIZES)
    assert len(seen) == len(SIZES) * (ROUNDS + 1)


def test_openfl_decodes_the_initial_model_exactly(probe: ProbeRun) -> None:
    """Round 0's tensors, decoded by OpenFL's codec, are the aggregator's initial model bit for bit."""
    for name in SIZES:
        for tensor, expected in probe.initial_model.items():
            fetched = probe.arrays[f"0/{name}/global/{tensor}"]
            assert fetched.dtype == np.float32 and fetched.shape == expected.shape
            assert np.array_equal(fetched, expected)
    assert probe.initial_model["dense/kernel"].nbytes > CHUNK_BYTES  # uploads span chunks


def test_global_model_follows_fedavg_of_openfl_uploads(probe: ProbeRun) -> None:
    """Each round's global model is the data-size weighted mean of the trained tensors sent before."""
    for round_number in range(1, ROUNDS + 1):
        for tensor in probe.initial_model:
            expected = fedavg(
                {
                    name: (sizes[0], probe.arrays[f"{round_number - 1}/{name}/trained/{tensor}"])
                    for name, sizes in SIZES.items()
                }
            )
            for name in SIZES:
                fetched = probe.arrays[f"{round_number}/{name}/global/{tensor}"]
                np.testing.assert_allclose(fetched, expected, rtol=1e-6, atol=1e-7)


def test_duplicate_upload_is_answered_ok_and_counted_once(probe: ProbeRun) -> None:
    """alice's train result sent twice in round 0 is answered OK and weighs 30, not 60."""
    assert probe.report["duplicate_answers"] == [None]
    tensor = "dense/kernel"
    trained = {name: probe.arrays[f"0/{name}/trained/{tensor}"] for name in SIZES}
    counted_twice = fedavg({"alice": (60, trained["alice"]), "bob": (10, trained["bob"])})
    fetched = probe.arrays[f"1/alice/global/{tensor}"]
    assert not np.allclose(fetched, counted_twice, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("impostor", "named"),
    [
        ("another_collaborators_certificate", "does not match the certificate's common name"),
        ("not_in_the_plan", "'mallory' is not an authorised collaborator"),
        ("wrong_federation", "header.federation_uuid 'another-federation'"),
        ("wrong_aggregator", "header.receiver 'aggregator_elsewhere'"),
    ],
)
def test_wrong_identity_is_refused_with_permission_denied(
    probe: ProbeRun, impostor: str, named: str
) -> None:
    """OpenFL's client with a mismatched identity gets PERMISSION_DENIED naming what is wrong."""
    refusal = probe.report["refusals"][impostor]
    assert refusal is not None, f"{impostor} was served"
    assert refusal["code"] == "PERMISSION_DENIED", refusal
    assert named in refusal["details"], refusal


def test_delta_download_is_refused_not_served_as_a_whole_model(probe: ProbeRun) -> None:
    """OpenFL's request for an aggregated delta (use_delta_updates: true) is INVALID_ARGUMENT."""
    refusal = probe.report["delta_request"]
    assert refusal is not None, "a whole model was sent where OpenFL expects a delta"
    assert refusal["code"] == "INVALID_ARGUMENT", refusal
    assert "use_delta_updates: false" in refusal["details"], refusal


def test_openfl_metrics_are_averaged_by_validation_size(probe: ProbeRun) -> None:
    """The aggregated validation accuracy is the data-size weighted mean of the OpenFL metrics."""
    rows = [
        json.loads(line) for line in (probe.output_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert [row["round"] for row in rows] == list(range(ROUNDS + 1))
    for row in rows:
        r = row["round"]
        # client_probe.accuracy: 0.5 + 0.1 * index + 0.01 * round, as float32 on the wire.
        values = {
            name: float(np.float32(0.5 + 0.1 * index + 0.01 * r))
            for index, name in enumerate(SIZES)
        }
        weights = {name: sizes[1] for name, sizes in SIZES.items()}
        expected = sum(weights[n] * values[n] for n in SIZES) / sum(weights.values())
        accuracy = row["metrics"]["aggregated_model_validation"]["accuracy"]
        assert accuracy == pytest.approx(expected, rel=1e-9)
