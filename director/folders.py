"""The experiments' folders: every file of an experiment the director reads or writes, and only here.

Each experiment has a folder `<state_dir>/experiments/<id>/`: the plan the director wrote
(`plan.yaml`), the submitted initial model, the aggregator's log and exit status, and the
aggregator's `output/` (models, metrics.jsonl, its own durable state). The desks and the
supervisor call `ExperimentFolders`; none of them opens a file itself.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Collection, Generator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from foedus.director.experiment_plan import PLAN_FILE
from foedus.director.launcher import LOG_FILE
from foedus.durable.files import replace_file
from foedus.history.rows import METRICS, MetricsRow, RowError, read_lines
from foedus.processes.children import log_tail
from foedus.refusals.errors import (
    InvalidRequestError,
    LimitExceededError,
    NotFoundError,
    StorageError,
)

logger = logging.getLogger(__name__)

EXPERIMENTS = "experiments"
INITIAL_MODEL = "initial_model.pbuf"
OUTPUT = "output"
MODELS = {"best": "best_model.pbuf", "last": "last_model.pbuf"}
LOG_TAIL_BYTES = 4096  # of an aggregator's log, read for its last line when it failed


@dataclass(frozen=True)
class ModelUpload:
    """A submitted initial model: its declared size and its pieces, in order."""

    size: int
    pieces: Iterable[bytes]


@dataclass(frozen=True)
class ModelDownload:
    """A model file being sent: its size, and its chunks in order (the file closed after the last)."""

    size: int
    chunks: Generator[bytes, None, None]


class ExperimentFolders:
    """The experiments' folders under one state folder."""

    def __init__(self, state_dir: Path) -> None:
        """The folders under `state_dir`/experiments."""
        self.root = state_dir / EXPERIMENTS

    def folder(self, experiment_id: str) -> Path:
        """Where an experiment's files are."""
        return self.root / experiment_id

    def make(self, experiment_id: str) -> Path:
        """A new experiment's folder, made now; `StorageError` if it cannot be."""
        folder = self.folder(experiment_id)
        try:
            folder.mkdir(parents=True)
        except OSError as error:
            raise StorageError(f"{folder}: cannot make: {error.strerror}") from None
        return folder

    def delete(self, experiment_id: str) -> None:
        """Delete an experiment's folder and everything in it (nothing if it is not there)."""
        shutil.rmtree(self.folder(experiment_id), ignore_errors=True)

    def delete_unknown(self, known: Collection[str]) -> None:
        """Delete the folders of experiments not `known` (removed, or never stored, in a crash)."""
        if self.root.is_dir():
            for folder in self.root.iterdir():
                if folder.name not in known:
                    shutil.rmtree(folder, ignore_errors=True)

    def initial_model(self, experiment_id: str) -> Path:
        """Where the experiment's submitted initial model is (if it has one)."""
        return self.folder(experiment_id) / INITIAL_MODEL

    def receive_model(self, experiment_id: str, model: ModelUpload, limit: int) -> None:
        """Write a submitted model as its pieces arrive, within the size declared and `limit`."""
        if model.size > limit:
            raise LimitExceededError(
                f"the initial model is {model.size} bytes; this director accepts at most {limit} "
                "(director.yaml limits.max_model_bytes)"
            )
        path = self.initial_model(experiment_id)

        def receive(file: BinaryIO) -> None:
            received = 0
            for piece in model.pieces:
                received += len(piece)
                if received > model.size:
                    raise InvalidRequestError(
                        f"initial_model_size says {model.size} bytes, but more arrived"
                    )
                file.write(piece)
            if received != model.size:
                raise InvalidRequestError(
                    f"initial_model_size says {model.size} bytes, but {received} arrived"
                )

        try:
            replace_file(path, receive)  # nothing at `path` unless every byte declared arrived
        except OSError as error:
            raise StorageError(f"{path}: cannot write: {error.strerror}") from None

    def plan_text(self, experiment_id: str) -> str:
        """The plan the director wrote for the experiment's aggregator and sites."""
        path = self.folder(experiment_id) / PLAN_FILE
        try:
            return path.read_text(encoding="utf-8")
        except OSError as error:
            raise StorageError(f"{path}: cannot read: {error.strerror}") from None

    def metric_lines(self, experiment_id: str) -> list[str]:
        """The aggregator's metrics.jsonl lines, as written (none: none yet)."""
        path = self.folder(experiment_id) / OUTPUT / METRICS
        try:
            return read_lines(path)  # whole lines only: the aggregator may be writing the last
        except OSError as error:
            raise StorageError(f"{path}: cannot read: {error}") from None

    def metric_rows(self, experiment_id: str) -> list[MetricsRow]:
        """The aggregator's metrics.jsonl rows (a line that is not one is left out)."""
        rows = []
        for line in self.metric_lines(experiment_id):
            try:
                rows.append(MetricsRow.parse(line))
            except RowError:
                continue  # not a row: no round
        return rows

    def rounds_completed(self, experiment_id: str) -> int:
        """Training rounds in metrics.jsonl (the final validation's row is not one)."""
        return training_rounds_in(self.metric_rows(experiment_id))

    def log_chunk(self, experiment_id: str, offset: int, max_bytes: int) -> bytes:
        """Up to `max_bytes` of the aggregator's log from `offset` (empty: none yet)."""
        path = self.folder(experiment_id) / LOG_FILE
        try:
            with path.open("rb") as file:
                if offset >= file.seek(0, 2):  # nothing there yet; a seek that far may fail
                    return b""
                file.seek(offset)
                return file.read(max_bytes)
        except FileNotFoundError:
            return b""
        except OSError as error:
            raise StorageError(f"{path}: cannot read: {error.strerror}") from None

    def log_last_line(self, experiment_id: str) -> str | None:
        """The aggregator's log's last line (None: no log, or none readable)."""
        try:
            last = log_tail(self.folder(experiment_id) / LOG_FILE, 1, LOG_TAIL_BYTES)
        except OSError:
            return None
        return last[0] if last else None

    def has_model(self, experiment_id: str, kind: str) -> bool:
        """Whether the experiment's aggregator has written its best or last model."""
        return self._model(experiment_id, kind).is_file()

    def model(self, experiment_id: str, kind: str, chunk_bytes: int) -> ModelDownload:
        """The best or last model file, open, in chunks of `chunk_bytes`; `NotFoundError` if gone."""
        path = self._model(experiment_id, kind)
        try:
            file = path.open("rb")
        except FileNotFoundError:
            raise NotFoundError(f"the {kind} model is gone (the experiment was removed)") from None
        size = os.fstat(file.fileno()).st_size

        def chunks() -> Generator[bytes, None, None]:
            with file:
                yield file.read(chunk_bytes)
                while data := file.read(chunk_bytes):
                    yield data

        return ModelDownload(size, chunks())

    def watched(self, experiment_id: str) -> tuple[int, int, bool, bool]:
        """What of an active experiment's files a follower shows: its log's and metrics' sizes,
        and whether each model is there."""
        folder = self.folder(experiment_id)
        return (
            _size(folder / LOG_FILE),
            _size(folder / OUTPUT / METRICS),
            self.has_model(experiment_id, "best"),
            self.has_model(experiment_id, "last"),
        )

    def _model(self, experiment_id: str, kind: str) -> Path:
        return self.folder(experiment_id) / OUTPUT / MODELS[kind]


def _size(path: Path) -> int:
    """A file's size; -1 when it is not there (or not readable)."""
    try:
        return path.stat().st_size
    except OSError:
        return -1


def training_rounds_in(rows: Iterable[MetricsRow]) -> int:
    """How many of metrics.jsonl's `rows` are training rounds (the final validation's is not)."""
    return sum(not row.final_validation for row in rows)
