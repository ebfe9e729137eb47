"""A collaborator's progress (rounds, per-round metrics, times) read from its own log.

The collaborator already logs one line per task it finishes (`foedus.collaborator.loop`: ``round 2:
train on 1200 samples: loss=0.1234 accuracy=0.9500``) and one when the federation is finished;
reading those lines tells the site everything it shows, with no change to the collaborator nor
to what it says on the wire. The log is read incrementally (from where the last read stopped),
so watching a long run costs only its new lines.
"""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from foedus.envoy.state import SiteExperiment
from foedus.processes.children import STATUS_FILE

# "%(asctime)s %(levelname)s %(name)s: %(message)s", collaborator.cli's logging format.
_LINE = re.compile(
    r"^(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ foedus\.collaborator\.loop: (?P<message>.*)$"
)
_TASK = re.compile(r"^round (?P<round>\d+): (?P<task>\w+) on (?P<samples>\d+) samples:(?P<m>.*)$")
_METRIC = re.compile(r"^(?P<name>[^=\s]+)=(?P<value>\S+)$")
_FINISHED = "the federation is finished"
_TIME_FORMAT = "%Y-%m-%d %H:%M:%S,%f"


@dataclass
class Progress:
    """What one collaborator's log says so far."""

    round: int | None = None  # the last round it finished a task of
    rounds: dict[int, dict[str, dict[str, float]]] = field(default_factory=dict)  # task metrics
    started_at: float | None = None  # the log's first line (the collaborator's start)
    last_at: float | None = None  # its last line read
    finished: bool = False  # the aggregator said the federation is finished
    offset: int = 0  # how far the log has been read

    def last_metrics(self) -> dict[str, dict[str, float]]:
        """The metrics of the last round, by task."""
        return dict(self.rounds[self.round]) if self.round is not None else {}


class ProgressBook:
    """Every collaborator's `Progress`, kept up to date from its log; safe across threads."""

    def __init__(self) -> None:
        """Nothing read yet."""
        self._lock = threading.Lock()
        self._known: dict[str, Progress] = {}

    def read(self, key: str, log: Path) -> Progress:
        """A copy of `key`'s progress after reading what `log` gained since the last call."""
        with self._lock:
            progress = self._known.setdefault(key, Progress())
            read_new_lines(progress, log)
            return Progress(
                round=progress.round,
                rounds={
                    number: {task: dict(metrics) for task, metrics in tasks.items()}
                    for number, tasks in progress.rounds.items()
                },
                started_at=progress.started_at,
                last_at=progress.last_at,
                finished=progress.finished,
                offset=progress.offset,
            )


def read_new_lines(progress: Progress, log: Path) -> None:
    """Take into `progress` the whole lines `log` gained since `progress.offset`."""
    try:
        with log.open("rb") as file:
            size = file.seek(0, 2)
            if size < progress.offset:  # a new log (not expected): read it afresh
                progress.rounds.clear()
                progress.round = progress.started_at = progress.last_at = None
                progress.finished, progress.offset = False, 0
            file.seek(progress.offset)
            data = file.read()
    except OSError:
        return
    complete = data.rfind(b"\n") + 1  # a line still being written is read next time
    for raw in data[:complete].splitlines():
        _take(progress, raw.decode("utf-8", errors="replace"))
    progress.offset += complete


def _take(progress: Progress, line: str) -> None:
    if progress.started_at is None:
        progress.started_at = _time(line[:23])
    found = _LINE.match(line)
    if found is None:
        return
    progress.last_at = _time(found["time"]) or progress.last_at
    message = found["message"]
    if message.startswith(_FINISHED):
        progress.finished = True
        return
    task = _TASK.match(message)
    if task is None:
        return
    metrics: dict[str, float] = {}
    for word in task["m"].split():
        pair = _METRIC.match(word)
        if pair is not None:
            try:
                value = float(pair["value"])
            except ValueError:
                continue
            if math.isfinite(value):
                metrics[pair["name"]] = value
    number = int(task["round"])
    progress.rounds.setdefault(number, {})[task["task"]] = metrics
    progress.round = number if progress.round is None else max(progress.round, number)


def _time(text: str) -> float | None:
    try:
        return datetime.strptime(text, _TIME_FORMAT).timestamp()  # the log's local time
    except ValueError:
        return None


def describe(experiment: SiteExperiment, progress: Progress, folder: Path) -> dict[str, Any]:
    """One collaborator as the site API and Redis show it (JSON-ready); `folder` is its own."""
    ended_at = None
    if experiment.state.exited:
        try:
            ended_at = (folder / STATUS_FILE).stat().st_mtime
        except OSError:
            ended_at = progress.last_at
    return {
        "uuid": experiment.experiment_id,
        "name": experiment.name,
        "owner": experiment.owner,
        "origin": experiment.origin,
        "state": experiment.state.value,
        "reason": experiment.reason,
        "stopping": experiment.stopping,
        "done": experiment.done,
        "exit_code": experiment.exit_code if experiment.state.exited else None,
        "restarts": experiment.restarts,
        "round": progress.round,
        "last_metrics": progress.last_metrics(),
        "rounds": {str(number): tasks for number, tasks in sorted(progress.rounds.items())},
        "federation_finished": progress.finished,
        "received_at": experiment.received_at,
        "started_at": progress.started_at,
        "ended_at": ended_at,
    }
