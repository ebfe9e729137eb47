"""Where the aggregator's durable state keeps its files, and how they are placed, checked and tidied.

The layout under ``OUTPUT_DIR/`` (see `foedus.aggregator.state` for what each holds and when)::

    state/state.sqlite                                 the database (`foedus.aggregator.schema`)
    state/models/round-<n>.pbuf                        global models
    state/rounds/<round>/<collaborator>-<task>.upload  accepted results
    state/uploads/                                     uploads being received
    state/privacy.secret                               the noise secret (differential privacy)

Every folder is created durably (`foedus.durable.files.make_folders`), every file placed durably
(`foedus.durable.files.place_file`), and every failure raised as a `StorageError` naming the path.
One aggregator at a time: the output folder is locked (``flock``) while its state is open;
`aggregator status` takes the lock shared for the moment it reads (`probe_folder`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from foedus.aggregator.digest import file_digest
from foedus.aggregator.records import Array, NextModel, ResultTensor, TaskResult
from foedus.aggregator.storage import (
    BEST_MODEL,
    LAST_MODEL,
    read_model_tensors,
    write_model,
    write_model_slices,
    write_tensors,
)
from foedus.aggregator.upload import read_tensors_file
from foedus.durable.files import (
    fsync_folder,
    is_temporary,
    make_folders,
    place_file,
)
from foedus.durable.sqlite import hold_lock
from foedus.history.rows import METRICS
from foedus.privacy.noise import NoiseSecret
from foedus.privacy.secret import SECRET_FILE
from foedus.privacy.secret import privacy_secret as secret_file
from foedus.refusals.errors import ModelFileError, StorageError

STATE_DIR = "state"
DATABASE = "state.sqlite"
MODELS = "models"
ROUNDS = "rounds"
UPLOADS = "uploads"  # uploads being received (`aggregator.upload`), not yet accepted
SECRET = SECRET_FILE  # the noise secret of a federation with differential privacy
UPLOAD_SUFFIX = ".upload"  # an accepted result kept as it was sent: a serialized TaskResults
OUTPUTS = (LAST_MODEL, BEST_MODEL, METRICS)


@dataclass(frozen=True)
class StoredFile:
    """A file of the state (relative to ``state/``) and the digest of its bytes."""

    name: str
    digest: str


def place_result(root: Path, result: TaskResult) -> StoredFile:
    """Make the result's file durable in its place under `root` (``state/``).

    A streamed upload's file is kept as it is (made durable, then renamed into place);
    a result in memory has its tensors written to a `ModelProto` file.
    """
    stem = f"{ROUNDS}/{result.round_number}/{result.collaborator}-{result.task_name}"
    upload = result.upload
    name = stem + (".pbuf" if upload is None else UPLOAD_SUFFIX)
    path = root / name
    make_folder(path.parent)
    if upload is None:
        digest = write_tensors(
            path,
            ((tensor.name, tensor.array, tensor.tags) for tensor in result.tensors),
            round_number=result.round_number,
        )
    else:
        keep(upload.path, path)
        digest = upload.digest
    return StoredFile(name, digest)


def read_result(root: Path, stored: StoredFile, max_tensor_bytes: int) -> tuple[ResultTensor, ...]:
    """A result's tensors read back from its file.

    A kept upload's tensors are mapped from its file, checked against its digest when the
    state was recovered (this process wrote the others, hashing them as they arrived);
    a `ModelProto` result file is read whole and checked now.
    """
    if stored.name.endswith(UPLOAD_SUFFIX):
        _, tensors = read_tensors_file(root / stored.name, max_tensor_bytes=max_tensor_bytes)
        return tensors
    return read_checked(root, stored, max_tensor_bytes, empty=True)


def write_model_file(root: Path, round_number: int, model: Mapping[str, Array]) -> StoredFile:
    """`model` written durably as round `round_number`'s model file."""
    name = f"{MODELS}/round-{round_number}.pbuf"
    path = root / name
    make_folder(path.parent)
    return StoredFile(name, write_model(path, model, round_number=round_number))


def average_into_file(
    root: Path, round_number: int, model: NextModel
) -> tuple[StoredFile, dict[str, Array]]:
    """The new model's file, and its tensors mapped from it (not read back: just written)."""
    name = f"{MODELS}/round-{round_number}.pbuf"
    path = root / name
    make_folder(path.parent)
    written = write_model_slices(path, model.reference, model.into, round_number=round_number)
    return StoredFile(name, written.digest), written.mapped()


def read_checked(
    root: Path, stored: StoredFile, max_tensor_bytes: int, *, empty: bool = False
) -> tuple[ResultTensor, ...]:
    """The tensors of a `ModelProto` state file, mapped from it, after checking its digest
    (`empty`: a result's file, which may hold none; a model's never does)."""
    path = root / stored.name
    check_digest(path, stored.digest)
    return read_model_tensors(path, max_tensor_bytes, empty=empty)


def privacy_secret(root: Path) -> NoiseSecret:
    """The noise secret kept in `root` (``state/``), made (mode 0600, durably) when it is not
    there yet (`foedus.privacy.secret`); `StorageError` naming the file when it cannot be, or
    holds something else."""
    return secret_file(root / SECRET, remedy="start with --reset to begin the federation again")


def files_of(root: Path) -> list[str]:
    """Every file under `root` (``state/``) but the database's, relative to it, sorted."""
    return sorted(
        str(path.relative_to(root))
        for path in root.rglob("*")
        if path.is_file() and not path.name.startswith(DATABASE)
    )


def wipe(folder: Path) -> list[str]:
    """Remove the state and outputs of the aggregator in `folder`; the names removed."""
    removed: list[str] = []
    root = Path(folder) / STATE_DIR
    try:
        if root.exists():
            shutil.rmtree(root)
            removed.append(f"{STATE_DIR}/")
        for name in OUTPUTS:
            path = Path(folder) / name
            if path.exists():
                path.unlink()
                removed.append(name)
        if Path(folder).is_dir():
            for path in Path(folder).iterdir():
                if is_temporary(path, LAST_MODEL) or is_temporary(path, BEST_MODEL):
                    path.unlink()
            fsync_folder(Path(folder))
    except OSError as error:
        raise StorageError(f"{folder}: cannot reset: {error.strerror or error}") from None
    return removed


def tidy(root: Path, round_number: int, keep: set[str] | None, models: set[str]) -> None:
    """Delete result files of rounds before `round_number`, models not in `models`, temporaries.

    With `keep` (at recovery) the files of `round_number` not in it go too: they were
    written by a crash before their row was committed. Without it (after a commit) the
    round just opened is left alone.
    """
    rounds = root / ROUNDS
    if rounds.is_dir():
        for folder in rounds.iterdir():
            if not folder.name.isdigit() or int(folder.name) < round_number:
                shutil.rmtree(folder, ignore_errors=True)
            elif keep is not None:
                if int(folder.name) > round_number:
                    shutil.rmtree(folder, ignore_errors=True)
                    continue
                for path in folder.iterdir():
                    if f"{ROUNDS}/{folder.name}/{path.name}" not in keep:
                        path.unlink(missing_ok=True)
    if keep is not None:  # uploads cut by the crash, never accepted: they are asked for again
        shutil.rmtree(root / UPLOADS, ignore_errors=True)
    folder = root / MODELS
    if folder.is_dir():
        for path in folder.iterdir():
            if f"{MODELS}/{path.name}" not in models:
                path.unlink(missing_ok=True)


def keep(temporary: Path, path: Path) -> None:
    """Make the file `temporary` durable as `path` (same file system): fsync, rename, fsync folder."""
    try:
        place_file(temporary, path)
    except OSError as error:
        raise StorageError(f"{path}: cannot keep the upload: {error.strerror or error}") from None


def check_digest(path: Path, digest: str) -> None:
    """`ModelFileError` unless the file at `path` has that digest; read a block at a time."""
    try:
        actual = file_digest(path)
    except OSError as error:
        raise ModelFileError(f"{path}: cannot read: {error.strerror or error}") from None
    if actual != digest:
        raise ModelFileError(f"{path}: the file does not match its digest in {DATABASE}")


def make_folder(path: Path) -> None:
    """Create `path` (and its parents) so that a crash does not lose the new entries."""
    try:
        make_folders(path)
    except OSError as error:
        folder = error.filename or path
        raise StorageError(f"{folder}: cannot create: {error.strerror or error}") from None


def lock_folder(folder: Path) -> int:
    """An exclusive lock on `folder` for this process (released when the descriptor closes)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError as error:
        raise StorageError(f"{folder}: cannot open: {error.strerror or error}") from None
    return hold_lock(
        descriptor, StorageError(f"{folder}: another aggregator is using this output folder")
    )


@contextlib.contextmanager
def probe_folder(folder: Path) -> Iterator[bool]:
    """Whether an aggregator runs on `folder` (holds its lock); if not, keep it from starting
    while inside."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError as error:
        raise StorageError(f"{folder}: cannot open: {error.strerror or error}") from None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            yield True
        else:
            yield False
    finally:
        os.close(descriptor)  # releases the lock
