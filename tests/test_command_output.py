"""Every command ends quietly when whoever reads its stdout has gone, as Unix tools do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from foedus.command.exits import EXIT_SIGPIPE
from foedus.command.output import quiet_when_stdout_closes
from foedus.envoy.config import load_config
from foedus.envoy.state import EnvoyState
from foedus.lifecycle.states import CollaboratorState
from foedus.pki.layout import CertsLayout

from envoys import write_envoy_config
from federation_processes import REPO, free_port


def into_a_closed_pipe(*argv: str) -> tuple[int, str]:
    """`python -m ARGV | true`, the reader gone before the first write: exit status and stderr."""
    process = subprocess.Popen(
        [sys.executable, "-m", *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stdout is not None
    process.stdout.close()  # before the command writes: its every write meets a closed pipe
    try:
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    return process.returncode, err.decode()


def test_pki_into_a_closed_pipe_is_silent(certs: CertsLayout) -> None:
    """`pki fingerprint FILE | true`: exit 141 and nothing on stderr, not "Broken pipe"."""
    assert into_a_closed_pipe("foedus.pki", "fingerprint", str(certs.ca_bundle)) == (
        EXIT_SIGPIPE,
        "",
    )


def test_envoy_list_into_a_closed_pipe_is_silent(tmp_path: Path, certs: CertsLayout) -> None:
    """`envoy list | head -1` on a site's state: exit 141, no traceback."""
    path = write_envoy_config(tmp_path, certs, free_port())
    state = EnvoyState.open(load_config(path).state_dir, exclusive=True)
    state.add(
        experiment_id="e1",
        name="e1",
        owner="dora",
        site="alice",
        plan_yaml="",
        state=CollaboratorState.APPROVAL_PENDING,
    )
    state.close()
    assert into_a_closed_pipe("foedus.envoy", "list", "--config", str(path)) == (EXIT_SIGPIPE, "")


def test_a_main_whose_writes_fail_returns_141(capsys: pytest.CaptureFixture[str]) -> None:
    """A BrokenPipeError out of `main` is exit 141 and no word; other errors still propagate."""

    @quiet_when_stdout_closes
    def writes(error: type[Exception]) -> int:
        raise error("stdout")

    assert writes(BrokenPipeError) == EXIT_SIGPIPE
    assert capsys.readouterr() == ("", "")
    with pytest.raises(ValueError, match="stdout"):
        writes(ValueError)
