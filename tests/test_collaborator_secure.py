"""The collaborator's part in secure aggregation: its round files, its two calls, its stages.

Real parts: the round files on disk, a real gRPC server over mutual TLS with the federation's
certificates made by `pki`, and the sites' protocol (`foedus.secure.SiteRound`) behind the loop.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from foedus.collaborator.secure_state import RoundFile, RoundFileError, RoundFiles

UUID = "test-federation-0001"


def test_a_round_file_is_private_durable_and_read_back(tmp_path: Path) -> None:
    """The file is mode 0600 in a folder of mode 0700 and reads back as written."""
    files = RoundFiles(tmp_path / "state" / "alice", UUID, "alice")
    file = files.new(3, b"secret bytes").with_post("KEYS", b"\x00\x01keys")
    files.write(file)
    path = files.path(3)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert files.read(3) == file
    assert files.read(4) is None
    assert files.rounds() == [3]


def test_rewriting_a_round_file_keeps_what_was_posted(tmp_path: Path) -> None:
    """Each stage's post is added to the file; the secrets can be replaced with what was revealed."""
    files = RoundFiles(tmp_path, UUID, "alice")
    file = files.new(0, b"first").with_post("KEYS", b"k")
    files.write(file)
    file = file.with_post("SHARES", b"s").with_secrets(b"revealed")
    files.write(file)
    read = files.read(0)
    assert read is not None
    assert dict(read.posted) == {"KEYS": b"k", "SHARES": b"s"}
    assert read.secrets == b"revealed"


def test_rounds_over_are_erased(tmp_path: Path) -> None:
    """Files of rounds before the one the aggregator names are erased; None erases every one."""
    files = RoundFiles(tmp_path, UUID, "alice")
    for number in (1, 2, 3):
        files.write(files.new(number, b"x"))
    (tmp_path / ".round-4.json.0123456789ab.tmp").write_bytes(b"cut")  # a crash mid-write
    assert files.erase_before(3) == [1, 2]
    assert files.rounds() == [3]
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["round-3.json"]
    assert files.erase_before(None) == [3]
    assert list(tmp_path.iterdir()) == []
    assert RoundFiles(tmp_path / "never-made", UUID, "alice").erase_before(None) == []


@pytest.mark.parametrize(
    "content",
    [
        b"{cut",
        b"[]",
        json.dumps({"format": "something else"}).encode(),
        b"\xff\xfe",
    ],
)
def test_a_corrupt_round_file_is_one_line_naming_it(tmp_path: Path, content: bytes) -> None:
    """A file that does not read as a round file stops the site with one line naming it."""
    files = RoundFiles(tmp_path, UUID, "alice")
    files.path(2).write_bytes(content)
    with pytest.raises(RoundFileError) as raised:
        files.read(2)
    message = str(raised.value)
    assert message.startswith(f"{files.path(2)}: cannot read this secure round file")
    assert "\n" not in message


def test_a_bad_base64_field_is_refused(tmp_path: Path) -> None:
    """A secrets field that is not base64 is a corrupt file, not a crash."""
    files = RoundFiles(tmp_path, UUID, "alice")
    files.write(files.new(0, b"x"))
    document = json.loads(files.path(0).read_bytes())
    document["secrets"] = "not base64!"
    files.path(0).write_text(json.dumps(document))
    with pytest.raises(RoundFileError, match="not base64"):
        files.read(0)


@pytest.mark.parametrize(("uuid", "name"), [("another-federation", "alice"), (UUID, "bob")])
def test_another_sites_or_federations_file_is_refused(tmp_path: Path, uuid: str, name: str) -> None:
    """A file another collaborator or federation wrote in this folder is never taken as ours."""
    RoundFiles(tmp_path, uuid, name).write(RoundFile(uuid, name, 1, b"theirs"))
    with pytest.raises(RoundFileError, match="give each collaborator and federation its own"):
        RoundFiles(tmp_path, UUID, "alice").read(1)
