"""The director's SQLite schema, its versions and the rows' codecs; `foedus.director.state` uses them.

Schema version 2 added the count of each experiment's aggregator restarts in a row
(`DirectorState.count_restart`); a version 1 state is migrated when opened (`MIGRATIONS`).
"""

from __future__ import annotations

import json
from types import MappingProxyType
from typing import Any

from foedus.director.records import Experiment, ExperimentState, ShardInfo

SCHEMA_VERSION = 2

EXPERIMENT_COLUMNS = (
    "id, sequence, name, owner, state, reason, plan_yaml, sites, rounds, has_initial_model, "
    "submitted_at, started_at, ended_at, port, aggregator_pid"
)
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS experiments (
    sequence INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    owner TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    plan_yaml TEXT NOT NULL,
    sites TEXT NOT NULL,
    rounds INTEGER NOT NULL,
    has_initial_model INTEGER NOT NULL,
    submitted_at REAL NOT NULL,
    started_at REAL NOT NULL DEFAULT 0,
    ended_at REAL NOT NULL DEFAULT 0,
    port INTEGER,
    aggregator_pid INTEGER
);
CREATE TABLE IF NOT EXISTS envoys (
    name TEXT PRIMARY KEY,
    shard TEXT NOT NULL,
    version TEXT NOT NULL,
    registered_at REAL NOT NULL,
    last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS site_reports (
    experiment_id TEXT NOT NULL,
    site TEXT NOT NULL,
    state TEXT NOT NULL,
    exit_code INTEGER NOT NULL,
    reason TEXT NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (experiment_id, site)
);
"""
# Version 2: each experiment's aggregator restarts in a row, and the rounds completed at the last.
RESTARTS = """
CREATE TABLE IF NOT EXISTS aggregator_restarts (
    experiment_id TEXT PRIMARY KEY,
    in_a_row INTEGER NOT NULL,
    rounds INTEGER NOT NULL
);
"""
# What each version's state gets to become the next one's (`durable.sqlite.connect`).
MIGRATIONS = {1: RESTARTS}


def experiment_from_row(row: tuple[Any, ...]) -> Experiment:
    """An experiments row (`EXPERIMENT_COLUMNS`, in order) as the record."""
    (
        experiment_id,
        sequence,
        name,
        owner,
        state,
        reason,
        plan_yaml,
        sites,
        rounds,
        has_initial_model,
        submitted_at,
        started_at,
        ended_at,
        port,
        aggregator_pid,
    ) = row
    return Experiment(
        experiment_id=experiment_id,
        sequence=sequence,
        name=name,
        owner=owner,
        state=ExperimentState(state),
        reason=reason,
        plan_yaml=plan_yaml,
        sites=tuple(json.loads(sites)),
        rounds=rounds,
        has_initial_model=bool(has_initial_model),
        submitted_at=submitted_at,
        started_at=started_at,
        ended_at=ended_at,
        port=port,
        aggregator_pid=aggregator_pid,
    )


def shard_to_json(shard: ShardInfo) -> str:
    """A shard as its envoys row keeps it: JSON, keys sorted."""
    return json.dumps(
        {
            "description": shard.description,
            "train_samples": shard.train_samples,
            "valid_samples": shard.valid_samples,
            "labels": dict(shard.labels),
        },
        sort_keys=True,
    )


def shard_from_json(text: str) -> ShardInfo:
    """A shard back from its envoys row, its labels read-only."""
    data = json.loads(text)
    return ShardInfo(
        description=data["description"],
        train_samples=data["train_samples"],
        valid_samples=data["valid_samples"],
        labels=MappingProxyType(dict(data["labels"])),
    )
