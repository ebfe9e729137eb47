"""`metrics.jsonl`: one JSON line per closed round, appended by the aggregator, read by all.

The one writer is `append_row` (the aggregator, once a round is committed to its state); the one
reader is `read_lines`/`read_rows` (the aggregator at a restart, the director and its dashboard,
the `experiment` command through the director). A line is strict JSON with sorted keys (a metric
that is not finite is written as null) and ends with a newline, written and fsynced at once: a
crash can cut only the last line short. Readers take whole lines only, so a row still being
written is not read; the aggregator, the file's only writer, also removes a line a crash cut
short before it appends again (`repair`), so the next row starts on a line of its own.
Rows from older aggregators lack some keys (`sites`, `run`, `secure`, ...): `MetricsRow.parse`
gives them their empty value, and drops the parts of a row that are not what the writer writes.

A round of a secure federation (`foedus.aggregator.secure_stages`) also says that it was
aggregated securely (`secure`), each step's time and who dropped out in it (`stages`, in order:
KEYS, SHARES, UPLOAD, SURVIVORS, UNMASK, as far as the round got), and, when it closed
untrained, why (`untrained`, one line). A training round of a federation with differential
privacy (`foedus.privacy`) says what the federation has spent so far (`dp`: epsilon and delta;
under adaptive clipping also `clip`, the clip the round used); other rows have no `dp` key.
"""

from __future__ import annotations

import json
import logging
import math
import os
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from foedus.durable.files import fsync_folder

METRICS = "metrics.jsonl"

logger = logging.getLogger(__name__)

# task -> metric -> value; None: a value that was not finite (written as null)
TaskMetrics = Mapping[str, Mapping[str, float | None]]


# A secure round's steps, in order: its four stages and, between SHARES and SURVIVORS, the
# masked upload (it ends when the round's survivors are named).
SECURE_STEPS = ("KEYS", "SHARES", "UPLOAD", "SURVIVORS", "UNMASK")


class RowError(ValueError):
    """A line of `metrics.jsonl` that is not a row: not JSON, or not a JSON object."""


@dataclass(frozen=True)
class StageRecord:
    """One step of a secure round (`SECURE_STEPS`): how long it took, who dropped out in it."""

    stage: str
    # From the step's start (the step before it ended; KEYS: the round's tasks were first handed
    # out, as for the round's `seconds`) to its end. A step in progress when the aggregator
    # restarted counts from the restart (as the round's `seconds` do); None: one that ended
    # before the restart.
    seconds: float | None
    dropped: tuple[str, ...] = ()  # members of the step before (KEYS: the collaborators) not in it

    def to_dict(self) -> dict[str, object]:
        """The step as its row writes it."""
        return {"stage": self.stage, "seconds": self.seconds, "dropped": list(self.dropped)}

    @classmethod
    def parse(cls, value: object) -> StageRecord | None:
        """The step a row's entry holds; None when it is not one."""
        if not isinstance(value, dict) or not isinstance(value.get("stage"), str):
            return None
        seconds = value.get("seconds")
        return cls(
            stage=value["stage"],
            seconds=float(seconds) if isinstance(seconds, int | float) else None,
            dropped=_names(value.get("dropped")) or (),
        )


@dataclass(frozen=True)
class MetricsRow:
    """One closed round: who reported, who did not, the metrics (weighted means and per site)."""

    round_number: int | None  # None: a row without a whole-number `round`
    metrics: TaskMetrics = field(default_factory=dict)
    federation: str = ""  # the plan's federation uuid
    run: str = ""  # when the aggregator that wrote it started (ISO 8601, UTC)
    final_validation: bool = False  # the last row: the final model validated, no training
    reporters: tuple[str, ...] | None = None  # None: not in the row
    missing: tuple[str, ...] | None = None
    seconds: float | None = None
    sites: Mapping[str, TaskMetrics] = field(default_factory=dict)
    secure: bool = False  # the round's model was aggregated securely
    stages: tuple[StageRecord, ...] = ()  # a secure round's steps, as far as it got
    untrained: str = ""  # why a secure round closed untrained (one line); "" if it did not
    # A training round of a DP federation: the privacy it has spent so far ({"epsilon", "delta"}).
    dp: Mapping[str, float] | None = None

    def to_json(self) -> str:
        """The row as its line (without the newline): strict JSON, sorted keys, NaN as null."""
        row: dict[str, object] = {
            "federation": self.federation,
            "run": self.run,
            "round": self.round_number,
            "final_validation": self.final_validation,
            "reporters": None if self.reporters is None else list(self.reporters),
            "missing": None if self.missing is None else list(self.missing),
            "metrics": {task: dict(values) for task, values in self.metrics.items()},
            "seconds": self.seconds,
            "sites": {
                site: {task: dict(values) for task, values in tasks.items()}
                for site, tasks in self.sites.items()
            },
            "secure": self.secure,
            "stages": [stage.to_dict() for stage in self.stages],
            "untrained": self.untrained,
        }
        if self.dp is not None:  # only a DP federation's training rows: plain rows are unchanged
            row["dp"] = dict(self.dp)
        return json.dumps(_finite(row), sort_keys=True, allow_nan=False)

    @classmethod
    def parse(cls, line: str) -> MetricsRow:
        """The row a line holds; `RowError` unless it is a JSON object. Parts of the wrong
        type are left out (a task or site that is not a mapping, a value not a number)."""
        try:
            data = json.loads(line)
        except ValueError:
            raise RowError("not JSON") from None
        if not isinstance(data, dict):
            raise RowError("not a JSON object")
        round_number = data.get("round")
        sites = data.get("sites")
        seconds = data.get("seconds")
        stages = data.get("stages")
        steps = [StageRecord.parse(stage) for stage in stages] if isinstance(stages, list) else []
        untrained = data.get("untrained")
        dp = data.get("dp")
        return cls(
            round_number=round_number if _is_number(round_number, int) else None,
            metrics=_task_metrics(data.get("metrics")),
            federation=str(data.get("federation") or ""),
            run=str(data.get("run") or ""),
            final_validation=bool(data.get("final_validation")),
            reporters=_names(data.get("reporters")),
            missing=_names(data.get("missing")),
            seconds=float(seconds) if isinstance(seconds, int | float) else None,
            sites=(
                {str(site): _task_metrics(tasks) for site, tasks in sites.items()}
                if isinstance(sites, dict)
                else {}
            ),
            secure=data.get("secure") is True,
            stages=tuple(step for step in steps if step is not None),
            untrained=untrained if isinstance(untrained, str) else "",
            dp=_privacy(dp),
        )


def metric_text(value: float) -> str:
    """A metric as people read it: 4 decimals, or 3 significant digits where 4 decimals would
    show a small value as 0.0000 (a site's DP-SGD delta of 1e-05)."""
    return f"{value:.3g}" if 0 < abs(value) < 1e-3 else f"{value:.4f}"


def append_row(path: Path, row: MetricsRow) -> None:
    """Append `row` as one line, flushed and fsynced (the folder too, when this creates the
    file); `OSError`."""
    line = row.to_json()
    created = not path.exists()
    with path.open("a", encoding="utf-8") as file:
        file.write(line + "\n")
        file.flush()
        os.fsync(file.fileno())
    if created:
        fsync_folder(path.parent)


def read_lines(path: Path, *, repair: bool = False) -> list[str]:
    """The whole lines of `path`, as written ([] when there is no file); `OSError`.

    A last line without its newline (being written, or cut short by a crash) is not read;
    with `repair` it is removed from the file: only the file's writer, before it appends
    again, may do that.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    whole = data.rfind(b"\n") + 1
    if repair and whole < len(data):
        logger.warning("%s: removing a last line cut short by a crash", path)
        with path.open("r+b") as file:
            file.truncate(whole)
            file.flush()
            os.fsync(file.fileno())
    return data[:whole].decode("utf-8", errors="replace").splitlines()


def read_rows(path: Path, *, repair: bool = False) -> list[MetricsRow]:
    """The rows of `path` (`read_lines`); a line that is not a row is logged and left out."""
    rows: list[MetricsRow] = []
    for number, line in enumerate(read_lines(path, repair=repair), 1):
        try:
            rows.append(MetricsRow.parse(line))
        except RowError as error:
            logger.warning("%s: line %d is %s; left as it is", path, number, error)
    return rows


def _task_metrics(value: object) -> TaskMetrics:
    """A row's task -> metric -> value mapping, without what is not one."""
    if not isinstance(value, dict):
        return {}
    return {
        str(task): {
            str(name): None if number is None else float(number)
            for name, number in values.items()
            if number is None or _is_number(number, int | float)
        }
        for task, values in value.items()
        if isinstance(values, dict)
    }


def _privacy(value: object) -> dict[str, float] | None:
    """A row's `dp` ({"epsilon", "delta"}, both numbers, and under adaptive clipping "clip");
    None when absent or not that."""
    if not isinstance(value, dict):
        return None
    spent = {key: value.get(key) for key in ("epsilon", "delta")}
    if not all(_is_number(number, int | float) for number in spent.values()):
        return None
    if _is_number(value.get("clip"), int | float):
        spent["clip"] = value["clip"]
    return {key: float(number) for key, number in spent.items()}  # type: ignore[arg-type]


def _names(value: object) -> tuple[str, ...] | None:
    """A row's list of site names; None when it has none."""
    return tuple(str(name) for name in value) if isinstance(value, list) else None


def _is_number(value: object, kind: type | types.UnionType) -> bool:
    """Whether `value` is of `kind` and not a bool (JSON's true is not a number)."""
    return isinstance(value, kind) and not isinstance(value, bool)


def _finite(value: object) -> object:
    """`value` with NaN and infinities replaced by None, so the line is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(key): _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value
