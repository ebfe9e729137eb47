"""The director command: bad input named in one line (exit 2), a real start and stop, a restart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from foedus.director.cli import main
from foedus.pki.layout import CertsLayout
from foedus.protos import director_pb2 as pb

from directors import ENVOYS, stub_at, write_config

REPO = Path(__file__).resolve().parent.parent
WAIT_SECONDS = 60


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    """--help of director and of start prints usage and exits 0."""
    assert main(["--help"]) == 0
    assert main(["start", "--help"]) == 0
    assert "--config" in capsys.readouterr().out


def test_a_bad_config_is_one_line_naming_file_and_key(
    tmp_path: Path, director_certs: CertsLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    """A typo in director.yaml: exit 2, the file and the key on one line, no traceback."""
    config = write_config(tmp_path, director_certs, reveiw="manual")
    assert main(["start", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"{config}: reveiw: unknown key"


def test_a_per_user_limit_above_the_total_is_one_line(
    tmp_path: Path, director_certs: CertsLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    """max_running_per_user above max_running_experiments: exit 2, file and key, before serving."""
    config = write_config(tmp_path, director_certs, max_running_per_user=5)
    assert main(["start", "--config", str(config)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{config}: max_running_per_user: 5 is above max_running_experiments 2; one owner can "
        "never run more than all of them (at most 2, or leave it out for the fair share)"
    ]
    assert not (tmp_path / "state").exists()


def test_a_runner_director_yaml_allows_but_cannot_import_is_one_line(
    tmp_path: Path, director_certs: CertsLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    """director.yaml runners naming a module not installed here: exit 2, file and key, before serving."""
    config = write_config(tmp_path, director_certs, runners=["digits", "no_such_lab.models:Net"])
    assert main(["start", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"{config}: runners: cannot import 'no_such_lab.models': No module named 'no_such_lab'"
    ]
    assert not (tmp_path / "state").exists()


def test_a_malformed_runner_entry_is_one_line(
    tmp_path: Path, director_certs: CertsLayout, capsys: pytest.CaptureFixture[str]
) -> None:
    """A runners entry that is no module path: exit 2, the file and the key on one line."""
    config = write_config(tmp_path, director_certs, runners=["digits", "os.system('rm')"])
    assert main(["start", "--config", str(config)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{config}: runners: expected a list of runner names (built-in or package.module:Class), "
        "got ['digits', \"os.system('rm')\"]"
    ]


def test_missing_certificates_are_named_with_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No certificate folder yet: exit 2, the file, and the pki setup command to run."""
    config = write_config(tmp_path, CertsLayout(tmp_path / "no-certs"))
    assert main(["start", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{config}: certs_dir: CA bundle not found" in err
    assert f"pki setup --director {config}" in err
    assert "Traceback" not in err


def test_no_config_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """`director start` without --config: exit 2, one line."""
    assert main(["start"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("director: error: ")


def _start(config: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "foedus.director", "start", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        start_new_session=True,
    )


def _port_of(process: subprocess.Popen[str]) -> int:
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("director: serving on "), line
    return int(line.rsplit(":", 1)[1])


def test_the_director_serves_stops_on_sigterm_and_finds_its_state_again(
    tmp_path: Path, director_certs: CertsLayout
) -> None:
    """A real process: an envoy registers; SIGTERM exits 0; started again, the envoy is still known."""
    config = write_config(tmp_path, director_certs)
    process = _start(config)
    try:
        port = _port_of(process)
        alice = stub_at(
            port,
            director_certs.ca_bundle,
            director_certs.collaborator_cert(ENVOYS[0]),
            director_certs.collaborator_key(ENVOYS[0]),
        )
        alice.RegisterEnvoy(pb.RegisterEnvoyRequest(version="test"), timeout=20)
        second = _start(config)  # the same state folder: refused while the first runs
        assert second.wait(timeout=WAIT_SECONDS) == 1
        assert second.stderr is not None and "another director" in second.stderr.read()
        for stream in (second.stdout, second.stderr):
            assert stream is not None
            stream.close()
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(timeout=WAIT_SECONDS) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=WAIT_SECONDS)
        for stream in (process.stdout, process.stderr):
            assert stream is not None
            stream.close()
    again = _start(config)
    try:
        port = _port_of(again)
        bob = stub_at(
            port,
            director_certs.ca_bundle,
            director_certs.user_cert("ada"),
            director_certs.user_key("ada"),
        )
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            try:
                answer = bob.ListEnvoys(pb.ListEnvoysRequest(), timeout=20)
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert [(envoy.name, envoy.version) for envoy in answer.envoys] == [("alice", "test")]
    finally:
        os.killpg(again.pid, signal.SIGKILL)
        again.wait(timeout=WAIT_SECONDS)
        for stream in (again.stdout, again.stderr):
            assert stream is not None
            stream.close()
