"""A closed round's `RoundRecord` as the aggregator's state keeps it: JSON, NaN metrics kept as NaN.

Records written before each reporter's own metrics (``sites``) were kept read back with none.
"""

from __future__ import annotations

import json

from foedus.aggregator.records import RoundRecord


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
        },
        sort_keys=True,
    )


def record_from_json(text: object) -> RoundRecord:
    """The record `record_to_json` wrote (also before it kept ``sites``)."""
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
    )
