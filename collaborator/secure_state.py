"""RoundFiles: a site's secrets of each secure round, one private file per round, in its state folder.

A site makes its round secrets (`foedus.secure.SiteSecrets`) once, and must never make them again
in the same round: a second set would advertise other keys, split another seed and reveal shares
of secrets its peers never saw. So they are written here, whole and durably
(`foedus.durable.files.write_bytes`, mode 0600 from the file's creation on, in a folder of mode
0700), before anything made from them is sent; so is each message the site posts (its records as
`foedus.secure.wire.post_bytes` serializes them), before it is posted, since signatures, Shamir shares and
AES-GCM nonces are random and only the very same bytes may be posted again after a restart. A
restarted site reads its file, posts what it posted again (the aggregator answers OK to the same
bytes) and fetches the stages' relays again, which the aggregator keeps.

The file is JSON, never pickle: a file that does not read as one of these (a cut, an edit, another
federation's or another site's) is a `RoundFileError` with one line naming it. A round's file is
erased once the round is over: when the aggregator names a later round, or says the federation is
finished.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from foedus.collaborator.errors import ClientError
from foedus.durable.files import (
    fsync_folder,
    is_temporary,
    make_folders,
    numbered_files,
    write_bytes,
)

logger = logging.getLogger(__name__)

FORMAT = "foedus collaborator secure round v1"
FILE_MODE = 0o600
FOLDER_MODE = 0o700
_NAME = re.compile(r"round-(\d{1,9})\.json")


class RoundFileError(ClientError):
    """A round file cannot be read or written: one line naming the file and what is wrong."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass(frozen=True)
class RoundFile:
    """What a site keeps of one secure round: its secrets and what it posted in each stage."""

    federation_uuid: str
    collaborator: str
    round_number: int
    secrets: bytes  # foedus.secure.SiteSecrets.to_bytes()
    # Stage name (foedus.secure.wire.Stage's) -> the post sent in it (wire.post_bytes).
    posted: Mapping[str, bytes] = field(default_factory=dict)

    def with_secrets(self, secrets: bytes) -> RoundFile:
        """The same file with the secrets as they are now (what was revealed marked in them)."""
        return replace(self, secrets=secrets)

    def with_post(self, stage: str, post: bytes) -> RoundFile:
        """The same file with what the site posts in `stage`."""
        return replace(self, posted={**self.posted, stage: post})

    def to_bytes(self) -> bytes:
        """The file's JSON bytes (bytes fields in base64)."""
        document = {
            "format": FORMAT,
            "federation_uuid": self.federation_uuid,
            "collaborator": self.collaborator,
            "round": self.round_number,
            "secrets": _b64(self.secrets),
            "posted": {stage: _b64(post) for stage, post in sorted(self.posted.items())},
        }
        return json.dumps(document, indent=1).encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes, where: Path) -> RoundFile:
        """Read a file's bytes; `RoundFileError` naming `where` for anything but a round file."""
        try:
            document = json.loads(data.decode("utf-8"))
            if not isinstance(document, dict) or document.get("format") != FORMAT:
                raise ValueError(f"not a round file ({FORMAT!r})")
            uuid, name, number = (
                document[key] for key in ("federation_uuid", "collaborator", "round")
            )
            if not (isinstance(uuid, str) and isinstance(name, str) and type(number) is int):
                raise ValueError("federation_uuid, collaborator or round of the wrong type")
            posted = document["posted"]
            if not isinstance(posted, dict):
                raise ValueError("posted is not a mapping")
            return cls(
                federation_uuid=uuid,
                collaborator=name,
                round_number=number,
                secrets=_decode(document["secrets"]),
                posted={str(stage): _decode(post) for stage, post in posted.items()},
            )
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
            raise RoundFileError(
                f"{where}: cannot read this secure round file ({error}); it is not one this "
                f"collaborator wrote: move it away (its round is then lost to this site)"
            ) from None


def _decode(value: Any) -> bytes:
    if not isinstance(value, str):
        raise ValueError("a bytes field is not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise ValueError("a bytes field is not base64") from None


class RoundFiles:
    """The round files of one collaborator of one federation, in `folder` (`--state-dir`)."""

    def __init__(self, folder: Path, federation_uuid: str, collaborator: str) -> None:
        self.folder = folder
        self.federation_uuid = federation_uuid
        self.collaborator = collaborator

    def path(self, round_number: int) -> Path:
        """Where round `round_number`'s file is."""
        return self.folder / f"round-{round_number}.json"

    def read(self, round_number: int) -> RoundFile | None:
        """Round `round_number`'s file, or None when this site has none (it made no secrets yet)."""
        path = self.path(round_number)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise RoundFileError(f"{path}: cannot read this secure round file: {error}") from None
        file = RoundFile.from_bytes(data, path)
        ours = (self.federation_uuid, self.collaborator, round_number)
        theirs = (file.federation_uuid, file.collaborator, file.round_number)
        if theirs != ours:
            raise RoundFileError(
                f"{path}: this secure round file is collaborator {file.collaborator!r}'s of "
                f"round {file.round_number} of federation {file.federation_uuid}, not "
                f"{self.collaborator!r}'s of round {round_number} of {self.federation_uuid}: "
                f"give each collaborator and federation its own --state-dir"
            )
        return file

    def new(self, round_number: int, secrets: bytes) -> RoundFile:
        """A round file for `round_number` holding `secrets` (not written yet)."""
        return RoundFile(self.federation_uuid, self.collaborator, round_number, secrets)

    def prepare(self) -> None:
        """Make the folder (mode 0700) and check this process can write in it, before a round."""
        try:
            make_folders(self.folder)
            if not self.folder.is_dir():
                raise NotADirectoryError("not a folder")
            os.chmod(self.folder, FOLDER_MODE)
            if not os.access(self.folder, os.W_OK | os.X_OK):
                raise PermissionError("not writable by this user")
        except OSError as error:
            reason = error.strerror or str(error)
            raise RoundFileError(
                f"{self.folder}: cannot keep secure round files there: {reason}"
            ) from None

    def write(self, file: RoundFile) -> None:
        """Replace the round's file with `file`, durably, mode 0600, before anything depends on it."""
        path = self.path(file.round_number)
        try:
            make_folders(self.folder)
            os.chmod(self.folder, FOLDER_MODE)
            write_bytes(path, file.to_bytes(), mode=FILE_MODE)
        except OSError as error:
            raise RoundFileError(f"{path}: cannot write this secure round file: {error}") from None

    def rounds(self) -> list[int]:
        """The rounds that have a file here, in order."""
        try:
            return numbered_files(self.folder, _NAME)
        except OSError as error:
            raise RoundFileError(
                f"{self.folder}: cannot list the secure round files: {error}"
            ) from None

    def erase_before(self, round_number: int | None) -> list[int]:
        """Erase the files of every round before `round_number` (None: of every round): those
        rounds are over. Returns the rounds erased."""
        erased = [
            number for number in self.rounds() if round_number is None or number < round_number
        ]
        try:
            for number in erased:
                self.path(number).unlink(missing_ok=True)
            leftovers = (
                [entry for entry in self.folder.iterdir() if is_temporary(entry)]
                if self.folder.exists()
                else []
            )
            for entry in leftovers:  # a crash while writing a round file left it
                entry.unlink(missing_ok=True)
            if erased or leftovers:
                fsync_folder(self.folder)
        except OSError as error:
            raise RoundFileError(
                f"{self.folder}: cannot erase a secure round file: {error}"
            ) from None
        for number in erased:
            logger.info("round %d is over: its secure aggregation secrets are erased", number)
        return erased
