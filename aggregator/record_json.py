"""A closed round's `RoundRecord` as the aggregator's state keeps it: JSON, NaN metrics kept as NaN.

Records written before each reporter's own metrics (``sites``) were kept read back with none, and
those written before secure aggregation's steps were kept (``secure``, ``stages``, ``untrained``)
as rounds aggregated in the clear that said nothing of why they were untrained. The clips of
adaptive clipping (``clip``, ``next_clip``) are written only when there are some.
"""

from __future__ import annotations

import json

from foedus.aggregator.records import RoundRecord
from foedus.history.rows import StageRecord


def record_to_json(record: RoundRecord) -> str:
    """A round's record as JSON (NaN metrics kept as NaN)."""
    return json.dumps(
        {
            "round": record.round_number,
            "final_validation": record.final_validation,
            "reporters": list(record.reporters),
            "missing": list(record.missing),
            "metrics": {task: dict(values) for task, values in record.metrics.items()},
            "seconds": record.seconds,
            "trained": record.trained,
            "sites": {
                site: {task: dict(values) for task, values in tasks.items()}
                for site, tasks in record.sites.items()
            },
            "secure": record.secure,
            "stages": [stage.to_dict() for stage in record.stages],
            "untrained": record.untrained,
            # only under adaptive clipping: other federations' records stay as they were
            **({} if record.clip is None else {"clip": record.clip}),
            **({} if record.next_clip is None else {"next_clip": record.next_clip}),
        },
        sort_keys=True,
    )


def record_from_json(text: object) -> RoundRecord:
    """The record `record_to_json` wrote (also before it kept ``sites`` or the secure steps)."""
    data = json.loads(str(text))
    return RoundRecord(
        round_number=int(data["round"]),
        final_validation=bool(data["final_validation"]),
        reporters=tuple(data["reporters"]),
        missing=tuple(data["missing"]),
        metrics={
            task: {name: float(value) for name, value in values.items()}
            for task, values in data["metrics"].items()
        },
        seconds=float(data["seconds"]),
        trained=bool(data["trained"]),
        sites={
            site: {
                task: {name: float(value) for name, value in values.items()}
                for task, values in tasks.items()
            }
            for site, tasks in data.get("sites", {}).items()
        },
        secure=bool(data.get("secure", False)),
        stages=tuple(
            StageRecord(
                stage=str(stage["stage"]),
                seconds=None if stage["seconds"] is None else float(stage["seconds"]),
                dropped=tuple(stage["dropped"]),
            )
            for stage in data.get("stages", ())
        ),
        untrained=str(data.get("untrained", "")),
        clip=_number(data.get("clip")),
        next_clip=_number(data.get("next_clip")),
    )


def _number(value: object) -> float | None:
    """A float kept in a record, or None when it was not kept."""
    return None if value is None else float(value)  # type: ignore[arg-type]
