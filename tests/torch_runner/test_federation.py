"""PyTorch federations of real processes over mutual TLS: the CNN example, every dtype, a misfit."""

from __future__ import annotations

import os
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import yaml

from foedus.pki.layout import CertsLayout
from foedus.plans.runners import Array, load_runner
from foedus.plans.schema import RunnerSettings
from foedus.protos import base_pb2
from foedus.protos.codec import decode_tensor
from foedus.protos.dtypes import bfloat16_dtype

from dying_runner import TRAIN, arm
from fedavg_reference import Contribution, federated_average
from federation_processes import (
    COLLABORATORS,
    REPO,
    FederationProcesses,
    final_accuracy,
    write_plan,
)
from readme_blocks import run_block

HERE = Path(__file__).resolve().parent
EXAMPLE_PLAN = REPO / "plans" / "torch_digits.yaml"
# net_runner and the dying_runner it imports, for the processes
ENVIRONMENT = {"PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}
KILLED = -signal.SIGKILL
SCORING_MARKER = (
    "<!-- tests/torch_runner/test_federation.py runs the next block in a folder with "
    "best_model.pbuf -->"
)


def run(
    folder: Path,
    certs: CertsLayout,
    rounds: int,
    runner: dict[str, object],
    **sections: dict[str, object],
) -> FederationProcesses:
    """An aggregator and three collaborators of `runner` run to the end, the plan's other
    `sections` merged in (`write_plan`); exit codes checked."""
    plan = write_plan(folder, certs, rounds, runner=runner, **sections)
    federation = FederationProcesses(plan, folder)
    try:
        federation.start("aggregator", env=ENVIRONMENT)
        for name in COLLABORATORS:
            federation.start(name, env=ENVIRONMENT)
        codes = federation.wait_all()
    finally:
        federation.stop_all()
    logs = {name: (folder / f"{name}.log").read_text() for name in COLLABORATORS}
    assert set(codes.values()) == {0}, (codes, federation.output(), logs)
    return federation


def replay(runner: dict[str, object], rounds: int) -> dict[str, Array]:
    """The federation's final model computed here in one process: each round's FedAvg of the
    collaborators' training, as the aggregator computes it."""
    settings = RunnerSettings(
        name=str(runner["name"]),
        seed=int(runner["seed"]),  # type: ignore[call-overload]
        settings=dict(runner.get("settings") or {}),  # type: ignore[call-overload]
    )
    factory = load_runner(settings)
    runners = {
        name: factory(settings, collaborator=name, collaborators=COLLABORATORS)
        for name in COLLABORATORS
    }
    model = factory.initial_model(settings)
    for round_number in range(rounds):
        outcomes = {name: runners[name].train(model, round_number) for name in COLLABORATORS}
        model = federated_average(
            {name: Contribution(o.data_size, o.model) for name, o in outcomes.items()}, model
        )
    return model


def read_model(path: Path) -> dict[str, Array]:
    """The tensors of a `ModelProto` file, decoded exactly."""
    proto = base_pb2.ModelProto.FromString(path.read_bytes())
    return {tensor.name: decode_tensor(tensor, max_bytes=2**26) for tensor in proto.tensors}


def assert_same_model(got: dict[str, Array], expected: dict[str, Array]) -> None:
    """Same names, dtypes, shapes and bytes."""
    assert sorted(got) == sorted(expected)
    for name, array in expected.items():
        assert (got[name].dtype, got[name].shape) == (array.dtype, array.shape), name
        assert got[name].tobytes() == array.tobytes(), name


@pytest.mark.slow
def test_the_cnn_example_learns_the_digits_over_mtls(certs: CertsLayout, tmp_path: Path) -> None:
    """plans/torch_digits.yaml's runner, 5 rounds: accuracy >= 0.95 and the model bit for bit;
    the README's PyTorch scoring block, as printed, loads its best model and scores it."""
    runner = yaml.safe_load(EXAMPLE_PLAN.read_text(encoding="utf-8"))["runner"]
    rounds = yaml.safe_load(EXAMPLE_PLAN.read_text(encoding="utf-8"))["federation"]["rounds"]
    federation = run(tmp_path, certs, rounds, runner)
    assert final_accuracy(federation.output()) >= 0.95, federation.output()
    final = read_model(tmp_path / "output" / "last_model.pbuf")
    assert final["bn1.num_batches_tracked"].dtype == np.int64  # a buffer, averaged as an integer
    assert_same_model(final, replay(runner, rounds))
    assert score_as_printed(tmp_path / "output" / "best_model.pbuf", tmp_path / "score") >= 0.95


def score_as_printed(best_model: Path, folder: Path) -> float:
    """The README's PyTorch scoring block run as a script in `folder`, beside a copy of
    `best_model`, warnings as errors (a read-only array would warn); the accuracy it prints."""
    folder.mkdir()
    shutil.copy(best_model, folder / "best_model.pbuf")
    printed = run_block(SCORING_MARKER, folder)
    match = re.fullmatch(r"accuracy (\d\.\d{4}) on 1797 images\n", printed)
    assert match, printed
    return float(match.group(1))


@pytest.mark.slow
def test_a_collaborator_killed_twice_and_started_again_leaves_the_same_model(
    certs: CertsLayout, tmp_path: Path
) -> None:
    """The CNN example, alice killed -9 after sending round 0's results, then dying mid-train in
    round 2, each time started again by hand: the final model is the replay's, bit for bit.

    Bob and carol start after the first kill, so round 0 cannot close without alice; the second
    death is her runner's own SIGKILL (`dying_runner`), after training, before sending."""
    example = yaml.safe_load(EXAMPLE_PLAN.read_text(encoding="utf-8"))["runner"]
    runner = {**example, "name": "net_runner:DyingCNNRunner"}
    rounds = 3
    federation = FederationProcesses(write_plan(tmp_path, certs, rounds, runner=runner), tmp_path)
    marker = tmp_path / "alice-died-in-round-2"
    alice = {**ENVIRONMENT, **arm((2, TRAIN, marker))}
    try:
        federation.start("aggregator", env=ENVIRONMENT)
        federation.start("alice", env=alice)
        federation.wait_for_log("alice", "round 0: locally_tuned_model_validation on", 180)
        federation.kill("alice")
        assert federation.wait("alice", 10) == KILLED  # killed while it waited on round 0
        federation.start("alice", env=alice)
        for name in ("bob", "carol"):
            federation.start(name, env=ENVIRONMENT)
        assert federation.wait("alice", 180) == KILLED
        assert marker.exists()  # it died by its own hand, mid-task in round 2
        federation.start("alice", env=alice)
        codes = federation.wait_all()
    finally:
        federation.stop_all()
    assert set(codes.values()) == {0}, (codes, federation.output(), federation.log("alice"))
    rows = [line for line in federation.output().splitlines() if "reported" in line]
    assert len(rows) == rounds + 1 and all("reported alice,bob,carol " in r for r in rows), rows
    final = read_model(tmp_path / "output" / "last_model.pbuf")
    assert_same_model(final, replay(runner, rounds))


@pytest.mark.slow
def test_every_state_dict_dtype_through_a_federation(certs: CertsLayout, tmp_path: Path) -> None:
    """bfloat16, float32 and int64 state from PyTorch through a real aggregator, bit for bit."""
    runner: dict[str, object] = {"name": "net_runner:NetRunner", "seed": 2, "settings": {}}
    run(tmp_path, certs, 2, runner)
    final = read_model(tmp_path / "output" / "last_model.pbuf")
    assert final["scale"].dtype == bfloat16_dtype()
    assert final["bn.num_batches_tracked"] == 8  # 4 batches a round, the same at every site
    assert_same_model(final, replay(runner, 2))


@pytest.mark.slow
def test_a_collaborator_whose_module_differs_is_refused_before_training(
    certs: CertsLayout, tmp_path: Path
) -> None:
    """A site whose module does not fit the global model exits 1 with one line naming a
    difference, before its first task's result is sent.

    The collaborator's own check of the aggregator's model against its runner's (for every
    runner) sees it first; `foedus.torch_runner.state`'s line of every difference is tested in
    test_state.py, for models that reach a runner another way."""
    plan = write_plan(tmp_path, certs, 1, runner={"name": "net_runner:NetRunner", "settings": {}})
    document = yaml.safe_load(plan.read_text(encoding="utf-8"))
    document["runner"]["name"] = "net_runner:WiderRunner"
    wider = tmp_path / "wider.yaml"
    wider.write_text(yaml.safe_dump(document), encoding="utf-8")
    federation = FederationProcesses(plan, tmp_path)
    try:
        federation.start("aggregator", env=ENVIRONMENT)
        federation.start("alice", plan=wider, env=ENVIRONMENT)
        assert federation.wait("alice", timeout=180) == 1
    finally:
        federation.stop_all()
    lines = (tmp_path / "alice.log").read_text(encoding="utf-8").splitlines()
    errors = [line for line in lines if line.startswith("collaborator: error:")]
    assert errors == [
        "collaborator: error: the aggregator's global 'bn.weight' is float32[6]; "
        "this collaborator's runner has float32[8]"
    ], lines
    assert "Traceback" not in "\n".join(lines)
