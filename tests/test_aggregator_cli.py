"""The aggregator command line: bad input as one line per problem, a whole federation in-process, restart and reset, SIGTERM in a subprocess."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml

from foedus.aggregator.cli import main
from foedus.aggregator.state import DurableState
from foedus.aggregator.storage import read_model, write_model
from foedus.pki.layout import CertsLayout
from foedus.plans.runners import TrainOutcome, Validation
from foedus.plans.schema import RunnerSettings
from foedus.protos import aggregator_pb2, aggregator_pb2_grpc
from foedus.protos.codec import decode_tensor, encode_tensor
from foedus.protos.stream import task_results_to_chunks

from federation_processes import child_python_path
from servers import AGGREGATOR_ID, COLLABORATORS, FEDERATION_UUID, plan_document
from settings_runner import IMPORTED, MARKER
from settings_runner import NAME as SETTINGS_RUNNER

RUNNER = "test_aggregator_cli:TinyRunner"


class TinyRunner:
    """A task runner small enough for CLI tests: a model of three zeros (plus the seed)."""

    @classmethod
    def initial_model(cls, settings: RunnerSettings) -> dict[str, Any]:
        """Three float32 values equal to the seed."""
        return {"w": np.full(3, settings.seed, dtype=np.float32)}

    def __init__(self, settings: RunnerSettings, *, collaborator: str, collaborators: Any) -> None:
        self.settings = settings

    def train(self, model: Any, round_number: int) -> TrainOutcome:
        """Add one to every weight."""
        return TrainOutcome({"w": model["w"] + 1}, {"loss": 1.0}, 10)

    def validate(self, model: Any) -> Validation:
        """An 'accuracy' of a tenth of the first weight."""
        return Validation({"accuracy": float(model["w"][0]) / 10}, 10)


class FlagRunner(TinyRunner):
    """TinyRunner whose model also holds a boolean tensor, which secure aggregation cannot sum."""

    @classmethod
    def initial_model(cls, settings: RunnerSettings) -> dict[str, Any]:
        """TinyRunner's weights and three flags."""
        return {**TinyRunner.initial_model(settings), "seen": np.zeros(3, dtype=bool)}


def write_plan(tmp_path: Path, certs: CertsLayout | None, **sections: Any) -> Path:
    """A plan file in tmp_path for the tiny runner, output in tmp_path/out, port 0 unless told."""
    document = plan_document(
        certs,
        runner={"name": RUNNER, "seed": 0},
        aggregator={
            "output_dir": str(tmp_path / "out"),
            "long_poll_seconds": 2,
            "quit_grace_seconds": 5,
        },
        best_model={"task": "aggregated_model_validation", "metric": "accuracy", "mode": "max"},
    )
    for key, value in sections.items():
        base = document.get(key)
        document[key] = {**base, **value} if isinstance(base, dict) else value
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`main(argv)` and what it printed."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    """`--help` on the command and on `start` prints usage and exits 0."""
    assert run(capsys, "--help")[0] == 0
    code, out, _ = run(capsys, "start", "--help")
    assert code == 0 and "--plan" in out and "--log-level" in out
    assert "--reset" in out and "resumes where it stopped" in " ".join(out.split())
    for text in ("exit status", "finished", "130", "143", "SIGTERM"):
        assert text in out, text


def test_missing_command_or_plan_is_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    """No command, or `start` without --plan, exits 2 with one line."""
    code, _, err = run(capsys, "start")
    assert code == 2 and "--plan" in err and len(err.splitlines()) == 1


def test_broken_plan_lists_every_problem_by_key(
    tmp_path: Path, certs: CertsLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unknown key and a bad port each get a line naming the key path; exit 2, no traceback."""
    plan = write_plan(tmp_path, certs, aggregator={"port": "80a", "colour": "blue"})
    code, _, err = run(capsys, "start", "--plan", str(plan))
    assert code == 2
    lines = err.splitlines()
    assert any(line.startswith(f"{plan}: aggregator.port: expected an integer") for line in lines)
    assert any(line == f"{plan}: aggregator.colour: unknown key" for line in lines), err


def test_missing_certificates_name_tls_certs_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A certificate folder without the aggregator's files exits 2 with one line and the fix."""
    empty = CertsLayout(tmp_path / "no-certs")
    empty.root.mkdir()
    plan = write_plan(tmp_path, empty)
    code, _, err = run(capsys, "start", "--plan", str(plan))
    assert code == 2
    assert err.splitlines() == [
        f"{plan}: tls.certs_dir: CA bundle not found: {empty.ca_bundle} "
        f"(run 'pki setup --plan {plan}')"
    ]


def test_exposed_private_key_is_refused_with_the_fix(
    tmp_path: Path, certs: CertsLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    """An aggregator key readable by others exits 2 with one line naming the file and chmod 600."""
    copy = CertsLayout(tmp_path / "certs")
    shutil.copytree(certs.root, copy.root)
    copy.aggregator_key.chmod(0o644)
    code, _, err = run(capsys, "start", "--plan", str(write_plan(tmp_path, copy)))
    assert code == 2
    (line,) = err.splitlines()
    assert str(copy.aggregator_key) in line and "chmod 600" in line


def test_runner_that_cannot_load_is_bad_input(
    tmp_path: Path, certs: CertsLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    """A runner module that does not exist exits 2 with `PLAN: runner.name: ...`."""
    plan = write_plan(tmp_path, certs, runner={"name": "no_such_module:Runner"})
    code, _, err = run(capsys, "start", "--plan", str(plan))
    assert code == 2
    (line,) = err.splitlines()
    assert line.startswith(f"{plan}: runner.name: cannot import 'no_such_module'")


DIGITS_KEYS = "split, test_fraction, epochs, batch_size, learning_rate, skew"


@pytest.fixture
def import_marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The file `settings_runner` marks when imported, and that module not imported yet."""
    path = tmp_path / "imported"
    monkeypatch.setenv(MARKER, str(path))
    monkeypatch.delitem(sys.modules, "settings_runner", raising=False)
    return path


@pytest.mark.usefixtures("watchdog")  # a check that let it through would serve, not return
@pytest.mark.parametrize(
    ("runner", "line"),
    [
        (
            {"name": "digits", "settings": {"epochs": 1, "epoch": 2}},
            f"runner.settings.epoch: unknown key (known: {DIGITS_KEYS})",
        ),
        (
            {"name": SETTINGS_RUNNER, "settings": {"step": -1}},
            "runner.settings.step: expected a number > 0, got -1",
        ),
    ],
    ids=["digits", "test runner"],
)
def test_a_runner_settings_typo_stops_start_with_the_sites_line(
    tmp_path: Path,
    certs: CertsLayout,
    *,
    capsys: pytest.CaptureFixture[str],
    import_marker: Path,
    runner: dict[str, Any],
    line: str,
) -> None:
    """No initial model: the runner is loaded and its check refuses the typo, exit 2, one line
    naming the plan file and the key (a collaborator's own line), before anything is opened."""
    plan = write_plan(tmp_path, certs, runner=runner)
    code, _, err = run(capsys, "start", "--plan", str(plan))
    assert code == 2
    assert err.splitlines() == [f"{plan}: {line}"]
    assert not (tmp_path / "out").exists()  # no state opened, nothing served
    assert import_marker.exists() == (runner["name"] == SETTINGS_RUNNER)


@pytest.mark.usefixtures("watchdog")
@pytest.mark.parametrize("name", ["no_such_module:Runner", SETTINGS_RUNNER])
def test_with_an_initial_model_nothing_of_the_runner_is_imported(
    tmp_path: Path,
    certs: CertsLayout,
    *,
    monkeypatch: pytest.MonkeyPatch,
    import_marker: Path,
    name: str,
) -> None:
    """A plan bringing its model file starts and runs with a runner this host cannot import, or
    one that prints on import: never imported (its settings are the sites' to check)."""
    model = tmp_path / "initial.pbuf"
    write_model(model, {"w": np.zeros(3, dtype=np.float32)})
    plan = write_plan(
        tmp_path,
        certs,
        federation={"rounds": 1},
        runner={"name": name, "settings": {"step": -1}},
        aggregator={"initial_model": str(model)},
    )
    code, console = serve_in_process(plan, certs, monkeypatch)
    assert code == 0
    assert "settings_runner" not in sys.modules
    assert not import_marker.exists() and IMPORTED not in console.text
    assert read_model(tmp_path / "out" / "last_model.pbuf", 1024)["w"].tolist() == [1.0] * 3


def test_secure_aggregation_without_tls_is_bad_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Secure aggregation with `tls.insecure` exits 2 with one line: sites sign with certificates."""
    plan = write_plan(tmp_path, None, secure_aggregation={"enabled": True})
    code, _, err = run(capsys, "start", "--plan", str(plan))
    assert (code, err.splitlines()) == (
        2,
        [
            f"{plan}: secure_aggregation.enabled: needs tls.certs_dir: each site signs its keys "
            "with its certificate and checks the others' against the federation's CA "
            "(tls.insecure is true)"
        ],
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.usefixtures("watchdog")  # a check that let it through would serve, not return
@pytest.mark.parametrize("source", ["model file", "runner"])
def test_secure_aggregation_refuses_a_model_it_cannot_sum(
    tmp_path: Path, certs: CertsLayout, capsys: pytest.CaptureFixture[str], source: str
) -> None:
    """With secure aggregation on, an initial model with a boolean tensor stops start: exit 2, one
    line naming the tensor and the plan's field, no state saved; off, the same model is taken;
    on again, the saved model is refused the same way."""
    initial: dict[str, str] = {}
    runner = "test_aggregator_cli:FlagRunner"
    if source == "model file":
        initial["initial_model"] = str(tmp_path / "initial.pbuf")
        write_model(
            tmp_path / "initial.pbuf", FlagRunner.initial_model(RunnerSettings(RUNNER, 0, {}))
        )
        runner = RUNNER
    plan = tmp_path / "plan.yaml"
    refused = (
        f"{plan}: secure_aggregation.enabled: tensor 'seen' of the {{}} is bool, neither "
        "floating point nor integer, so it cannot be summed masked; make it a number, or "
        "turn secure aggregation off"
    )
    with socket.socket() as taken:  # a start that gets past the checks stops, unable to listen
        taken.bind(("127.0.0.1", 0))
        taken.listen()

        def start(enabled: bool) -> tuple[int, list[str]]:
            write_plan(
                tmp_path,
                certs,
                runner={"name": runner},
                aggregator={**initial, "port": taken.getsockname()[1]},
                secure_aggregation={"enabled": enabled},
            )
            code, _, err = run(capsys, "start", "--plan", str(plan))
            return code, err.splitlines()

        assert start(True) == (2, [refused.format("initial model")])
        assert not (tmp_path / "out" / "state" / "state.sqlite").exists()
        code, lines = start(False)
        assert code == 1 and "cannot listen" in lines[-1], lines
        assert start(True) == (2, [refused.format("saved global model")])
    state = DurableState.open(tmp_path / "out", FEDERATION_UUID, dict, max_tensor_bytes=64)
    with state:
        assert state.recovered.progress.model["seen"].dtype == np.dtype(bool)


@pytest.mark.usefixtures("watchdog")  # a check that let it through would serve, not return
def test_differential_privacy_refuses_what_it_cannot_noise_or_afford(
    tmp_path: Path, certs: CertsLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    """With differential privacy on, a model with a tensor that is not floating point, and a
    max_epsilon not even one round fits, each stop start: exit 2, one line naming the plan's
    field, no state saved."""
    plan = tmp_path / "plan.yaml"
    with socket.socket() as taken:  # a start that gets past the checks stops, unable to listen
        taken.bind(("127.0.0.1", 0))
        taken.listen()

        def start(runner: str, **privacy: object) -> tuple[int, list[str]]:
            write_plan(
                tmp_path,
                certs,
                runner={"name": runner},
                aggregator={"port": taken.getsockname()[1]},
                differential_privacy={
                    "enabled": True,
                    "clip": 1.0,
                    "noise_multiplier": 1.0,
                    **privacy,
                },
            )
            code, _, err = run(capsys, "start", "--plan", str(plan))
            return code, err.splitlines()

        assert start("test_aggregator_cli:FlagRunner") == (
            2,
            [
                f"{plan}: differential_privacy.enabled: tensor 'seen' is bool in the initial "
                "model: Gaussian noise needs floating-point tensors (an integer would round it "
                "away); make it a float, or turn differential privacy off"
            ],
        )
        code, lines = start(RUNNER, max_epsilon=1)
        assert code == 2 and len(lines) == 1, lines
        assert lines[0].startswith(f"{plan}: differential_privacy.max_epsilon: 1 is less than"), (
            lines
        )
        assert not (tmp_path / "out" / "state" / "state.sqlite").exists()
        code, lines = start(RUNNER)  # the same plan without a cap gets past every check
        assert code == 1 and "cannot listen" in lines[-1], lines


def test_port_in_use_is_a_runtime_failure(
    tmp_path: Path, certs: CertsLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    """When the port is taken the aggregator exits 1 saying it cannot listen."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        plan = write_plan(tmp_path, certs, aggregator={"port": port})
        code, _, err = run(capsys, "start", "--plan", str(plan))
    assert code == 1
    assert "cannot listen on 127.0.0.1" in err


class Console:
    """Stands in for stdout: keeps the lines and says when the aggregator is serving, on which port."""

    def __init__(self) -> None:
        self.text = ""
        self.port: queue.Queue[int] = queue.Queue()

    def write(self, text: str) -> int:
        """Keep `text`; note the port once the serving line is written."""
        self.text += text
        found = re.search(r"serving federation .* on 127\.0\.0\.1:(\d+)", text)
        if found:
            self.port.put(int(found.group(1)))
        return len(text)

    def flush(self) -> None:
        """Nothing is buffered."""


def collaborate(name: str, port: int, certs: CertsLayout, errors: list[BaseException]) -> None:
    """A minimal collaborator over raw stubs: tasks, global model, TinyRunner, results, until quit."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=certs.ca_bundle.read_bytes(),
        private_key=certs.collaborator_key(name).read_bytes(),
        certificate_chain=certs.collaborator_cert(name).read_bytes(),
    )
    header = aggregator_pb2.MessageHeader(
        sender=name, receiver=AGGREGATOR_ID, federation_uuid=FEDERATION_UUID
    )
    runner = TinyRunner(RunnerSettings(RUNNER, 0, {}), collaborator=name, collaborators=())
    try:
        with grpc.secure_channel(f"localhost:{port}", credentials) as channel:
            stub = aggregator_pb2_grpc.AggregatorStub(channel)
            for _ in range(50):
                reply = stub.GetTasks(aggregator_pb2.GetTasksRequest(header=header), timeout=10)
                if reply.quit:
                    return
                if not reply.tasks:
                    time.sleep(reply.sleep_time)
                    continue
                round_number = reply.round_number
                request = aggregator_pb2.GetAggregatedTensorRequest(
                    header=header, tensor_name="w", round_number=round_number
                )
                tensor = stub.GetAggregatedTensor(request, timeout=10).tensor
                model = {"w": decode_tensor(tensor, max_bytes=1024)}
                for task in reply.tasks:
                    if task.name == "train":
                        outcome = runner.train(model, round_number)
                        arrays = {**outcome.model, **outcome.metrics}
                        size = outcome.data_size
                    else:
                        validation = runner.validate(model)
                        arrays, size = dict(validation.metrics), validation.data_size
                    tensors = [
                        encode_tensor(
                            key,
                            np.float32(value) if key != "w" else value,
                            tags=() if key == "w" else ("metric",),
                        )
                        for key, value in arrays.items()
                    ]
                    results = aggregator_pb2.TaskResults(
                        header=header,
                        round_number=round_number,
                        task_name=task.name,
                        data_size=size,
                        tensors=tensors,
                    )
                    stub.SendLocalTaskResults(task_results_to_chunks(results), timeout=10)
        raise AssertionError(f"{name} was never told to quit")
    except BaseException as error:
        errors.append(error)


@pytest.fixture
def watchdog() -> Iterator[None]:
    """Interrupts a test that would hang: SIGINT to this process after 30 s, if still inside."""
    inside = threading.Lock()
    inside.acquire()

    def fire() -> None:
        if inside.locked():
            signal.raise_signal(signal.SIGINT)

    timer = threading.Timer(30, fire)
    timer.start()
    try:
        yield
    finally:
        inside.release()
        timer.cancel()


def serve_in_process(
    plan: Path, certs: CertsLayout, monkeypatch: pytest.MonkeyPatch, *extra: str
) -> tuple[int, Console]:
    """`main start` on `plan` with three raw-stub collaborators; its exit code and console."""
    console = Console()
    monkeypatch.setattr(sys, "stdout", console)
    errors: list[BaseException] = []

    def start_collaborators() -> None:
        port = console.port.get(timeout=20)
        for name in COLLABORATORS:
            threading.Thread(target=collaborate, args=(name, port, certs, errors)).start()

    starter = threading.Thread(target=start_collaborators)
    starter.start()
    code = main(["start", "--plan", str(plan), "--log-level", "warning", *extra])
    starter.join(5)
    assert errors == []
    return code, console


@pytest.mark.usefixtures("watchdog")
def test_federation_runs_to_the_end(
    tmp_path: Path, certs: CertsLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three collaborators run two rounds and the final validation; the aggregator prints, saves and exits 0."""
    plan = write_plan(tmp_path, certs, federation={"rounds": 2})
    code, console = serve_in_process(plan, certs, monkeypatch)
    assert code == 0
    lines = console.text.splitlines()
    assert lines[1].startswith(
        "round 1/2  reported alice,bob,carol  train loss 1.0000  accuracy 0.0000"
    )
    assert lines[2].startswith(
        "round 2/2  reported alice,bob,carol  train loss 1.0000  accuracy 0.1000"
    )
    assert lines[3].startswith("final validation  reported alice,bob,carol  accuracy 0.2000")
    assert lines[4] == (
        "federation finished: 2 rounds, final global model accuracy 0.2000 "
        f"(best 0.2000 after 2 rounds), model saved to {tmp_path / 'out' / 'last_model.pbuf'}"
    )
    for name in ("last_model.pbuf", "best_model.pbuf"):
        model = read_model(tmp_path / "out" / name, 1024)
        assert model["w"].tolist() == [2.0, 2.0, 2.0], name
    rows = (tmp_path / "out" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 3


@pytest.mark.usefixtures("watchdog")
def test_a_finished_federation_started_again_only_says_quit(
    tmp_path: Path, certs: CertsLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Started again after the end, the aggregator resumes finished: collaborators are told to quit, nothing is run or written twice."""
    plan = write_plan(tmp_path, certs, federation={"rounds": 1})
    assert serve_in_process(plan, certs, monkeypatch)[0] == 0
    output = tmp_path / "out"
    saved = {name: (output / name).read_bytes() for name in ("last_model.pbuf", "best_model.pbuf")}
    code, console = serve_in_process(plan, certs, monkeypatch)
    assert code == 0
    lines = console.text.splitlines()
    assert lines[1] == (
        f"saved state in {output / 'state'}: the federation had finished; telling the "
        "collaborators to quit"
    )
    assert lines[2].startswith("federation finished: 1 round, final global model accuracy 0.1000")
    assert not any(line.startswith("round") for line in lines), lines
    assert {name: (output / name).read_bytes() for name in saved} == saved
    rows = (output / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(row)["round"] for row in rows] == [0, 1]


def test_output_folder_of_another_federation_is_refused(
    tmp_path: Path, certs: CertsLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder holding another federation's state exits 2 with one line naming it and both ways out."""
    plan = write_plan(tmp_path, certs)
    other = {"w": np.zeros(3, dtype=np.float32)}
    DurableState.open(tmp_path / "out", "another-uuid", lambda: other, max_tensor_bytes=64).close()
    code, _, err = run(capsys, "start", "--plan", str(plan))
    assert code == 2
    (line,) = err.splitlines()
    assert line.startswith(f"{plan}: aggregator.output_dir: {tmp_path / 'out'}: ")
    assert "'another-uuid'" in line and repr(FEDERATION_UUID) in line
    assert f"'aggregator start --plan {plan} --reset'" in line and "a new folder" in line


def test_reset_wipes_the_folder_and_starts_over(
    tmp_path: Path, certs: CertsLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--reset` removes another run's state and outputs, then the plan's federation starts from round 1."""
    other = {"w": np.full(3, 5.0, dtype=np.float32)}
    DurableState.open(tmp_path / "out", "another-uuid", lambda: other, max_tensor_bytes=64).close()
    (tmp_path / "out" / "metrics.jsonl").write_text('{"round": 7}\n', encoding="utf-8")
    with socket.socket() as taken:  # the port is taken, so it stops right after the reset
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        plan = write_plan(tmp_path, certs, aggregator={"port": taken.getsockname()[1]})
        code, _, err = run(capsys, "start", "--plan", str(plan), "--reset")
    assert code == 1 and "cannot listen" in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()
    state = DurableState.open(tmp_path / "out", FEDERATION_UUID, lambda: other, max_tensor_bytes=64)
    with state:
        assert state.recovered.progress.round_number == 0
        # The plan's runner's initial model (the seed, 0), not the other federation's.
        assert state.recovered.progress.model["w"].tolist() == [0.0, 0.0, 0.0]


def test_malformed_failpoints_are_bad_input(
    tmp_path: Path,
    certs: CertsLayout,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A FOEDUS_FAILPOINTS naming an unknown point exits 2 with one line before anything starts."""
    monkeypatch.setenv("FOEDUS_FAILPOINTS", "while_sleeping:1")
    code, _, err = run(capsys, "start", "--plan", str(write_plan(tmp_path, certs)))
    assert code == 2
    assert err.splitlines() == [
        "FOEDUS_FAILPOINTS: unknown failpoint 'while_sleeping' (known: after_accept, "
        "while_aggregating, before_round_commit, while_saving)"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_a_serving_aggregator_with_128_plus_its_number(
    tmp_path: Path, certs: CertsLayout, number: signal.Signals
) -> None:
    """`python -m foedus.aggregator start` serves, and on a signal stops within a few seconds with
    128 + its number: not 0, which says the federation finished."""
    plan = write_plan(tmp_path, certs)
    env = {**os.environ, "PYTHONPATH": child_python_path()}
    with subprocess.Popen(
        [sys.executable, "-m", "foedus.aggregator", "start", "--plan", str(plan)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        lines: queue.Queue[str] = queue.Queue()

        def read() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                lines.put(line)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            deadline = time.monotonic() + 20
            while "serving federation" not in lines.get(
                timeout=max(0.01, deadline - time.monotonic())
            ):
                pass
            process.send_signal(number)
            code = process.wait(timeout=10)
        finally:
            if process.poll() is None:
                process.kill()
        assert process.stderr is not None
        err = process.stderr.read()
        reader.join(5)
    assert code == 128 + number, err
    assert "Traceback" not in err
    assert f"{number.name} received" in err
    assert "stopped during round 1/2" in "".join(lines.queue)
