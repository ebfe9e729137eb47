"""``aggregator status``: where a federation stands, read from its durable state, no RPC.

It reads ``aggregator.output_dir/state/state.sqlite`` through the store, read-only
(`foedus.aggregator.state.DurableState.read_standing`), in one read transaction, so it sees one
consistent moment and works whether the aggregator runs or not:

* running (it holds the folder's lock): the database is opened read-only; in WAL mode a reader
  never blocks the writer and writes nothing;
* stopped: the folder's lock is taken shared for the few milliseconds of the read, so no
  aggregator starts meanwhile, and the database is opened as immutable, so no file is created
  (a ``-wal`` or ``-shm`` file made by another user would stop the aggregator later); but when
  a ``-wal`` file is there (an aggregator killed before it could fold it in), read-only, so
  its last commits are read too. An aggregator started in those milliseconds says the folder
  is in use; started again, it runs.

Presence (who is online) is what the running aggregator saved last (`foedus.aggregator.liveness`: on
a transition, at most once a second; otherwise every few seconds); of a stopped one, what it
saw when it stopped. Who has left, and why, is read from the departures the aggregator keeps
before it answers `Leave`, so it is never late. Times are UTC.
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foedus.aggregator.liveness import NO_REASON, Departure, Presence, reporting_threshold
from foedus.aggregator.records import RoundRecord
from foedus.aggregator.schema import NotAStateError
from foedus.aggregator.state import DurableState
from foedus.aggregator.state_files import DATABASE, STATE_DIR
from foedus.aggregator.store import SavedPresence
from foedus.history.rows import METRICS, read_rows
from foedus.plans import Plan
from foedus.plans.schema import AGGREGATED_MODEL_VALIDATION, DifferentialPrivacySettings
from foedus.privacy.accountant import budget_line, epsilon_after
from foedus.privacy.budget import training_rounds
from foedus.privacy.site_budget import SiteBudget, latest_budgets
from foedus.refusals.errors import StorageError


@dataclass(frozen=True)
class CollaboratorStatus:
    """One collaborator: its presence as last saved, and its results in the round in progress."""

    name: str
    presence: str  # a `Presence` value, or "unknown" (nothing saved yet)
    since: float | None  # Unix seconds
    last_seen: float | None
    results: tuple[str, ...]  # tasks of the round in progress it has sent
    reason: str | None = None  # why it left (presence "left" only; may be empty)


@dataclass(frozen=True)
class PrivacySpent:
    """What a DP federation has spent: after `rounds` closed training rounds, `epsilon` at
    `delta` (of `max_epsilon`; None: no cap); recomputed from the plan, as the aggregator does."""

    def to_json(self) -> dict[str, Any]:
        """For scripts: the numbers."""
        return {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "max_epsilon": self.max_epsilon,
            "rounds": self.rounds,
            **({} if self.clip is None else {"clip": self.clip}),
        }

    epsilon: float
    delta: float
    max_epsilon: float | None
    rounds: int
    line: str = dataclasses.field(compare=False)  # "privacy budget: epsilon 3.71 of 4 at ..."
    clip: float | None = None  # the round in progress's clip under adaptive clipping


@dataclass(frozen=True)
class FederationStatus:
    """Where a federation stands, as its state says."""

    name: str
    uuid: str
    state: Path
    running: bool
    round_number: int  # the round in progress (counted from 0); `total_rounds` when finished
    rounds: int  # training rounds
    total_rounds: int  # with the final validation round, if any
    round_tasks: tuple[str, ...]
    closing: bool  # the round's close is decided, being aggregated
    collaborators: tuple[CollaboratorStatus, ...]
    offline_after_seconds: float
    presence_saved: float | None
    last_round: RoundRecord | None
    # With differential privacy: epsilon spent so far, its delta, the cap (None: none).
    privacy: PrivacySpent | None = None
    # Each DP-SGD site's budget as its latest round reported it (round counted from 1), from
    # metrics.jsonl: still there once the final validation round, trained by nobody, has closed.
    site_budgets: dict[str, tuple[int, SiteBudget]] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        """Whether every round, the final validation round included, has closed."""
        return self.round_number >= self.total_rounds

    @property
    def reported(self) -> tuple[str, ...]:
        """Collaborators that finished every task of the round in progress."""
        return tuple(c.name for c in self.collaborators if set(self.round_tasks) <= set(c.results))

    def round_label(self, round_number: int) -> str:
        """ "round 3/10" (counted from 1, as the aggregator prints it), or "final validation"."""
        if round_number >= self.rounds:
            return "final validation"
        return f"round {round_number + 1}/{self.rounds}"

    def to_json(self) -> dict[str, Any]:
        """Everything, for scripts: rounds counted from 0 as in metrics.jsonl, times ISO 8601."""
        last = self.last_round
        return {
            "federation": self.name,
            "uuid": self.uuid,
            "state": str(self.state),
            "aggregator_running": self.running,
            "finished": self.finished,
            "round": self.round_number,
            "rounds": self.rounds,
            "total_rounds": self.total_rounds,
            "round_tasks": list(self.round_tasks),
            "closing": self.closing,
            "reported": list(self.reported),
            "offline_after_seconds": self.offline_after_seconds,
            "presence_saved": _iso(self.presence_saved),
            "collaborators": [
                {
                    "name": c.name,
                    "presence": c.presence,
                    "since": _iso(c.since),
                    "last_seen": _iso(c.last_seen),
                    "results": list(c.results),
                    "reason": c.reason,
                }
                for c in self.collaborators
            ],
            "last_round": None
            if last is None
            else {
                "round": last.round_number,
                "final_validation": last.final_validation,
                "reporters": list(last.reporters),
                "missing": list(last.missing),
                "metrics": {task: dict(values) for task, values in last.metrics.items()},
                "seconds": last.seconds,
            },
            "site_budgets": [
                {"site": site, "round": round_number, **dataclasses.asdict(budget)}
                for site, (round_number, budget) in self.site_budgets.items()
            ],
            **({} if self.privacy is None else {"dp": self.privacy.to_json()}),
        }

    def lines(self, now: float | None = None) -> list[str]:
        """What a person reads."""
        now = time.time() if now is None else now
        where = (
            f"finished ({self.rounds} round{'s' if self.rounds != 1 else ''})"
            if self.finished
            else f"{self.round_label(self.round_number)} in progress"
            + (" (closing)" if self.closing else "")
        )
        running = "aggregator running" if self.running else "aggregator stopped"
        lines = [f"federation {self.name} ({self.uuid}): {where}; {running}"]
        lines.append(f"  state: {self.state}")
        if not self.finished:
            reported = ", ".join(self.reported) or "nobody"
            lines.append(f"  reported this round: {reported}")
            partial = [
                f"{c.name} ({', '.join(c.results)})"
                for c in self.collaborators
                if c.results and c.name not in self.reported
            ]
            if partial:
                lines.append(f"  results in, not all: {', '.join(partial)}")
        saved = (
            "nothing saved yet"
            if self.presence_saved is None
            else f"as saved {_when(self.presence_saved, now)}"
        )
        if not self.running and self.presence_saved is not None:
            saved += ", when the aggregator last ran"
        lines.append(
            f"  collaborators (offline after {self.offline_after_seconds:g} s of silence; {saved}):"
        )
        width = max(len(c.name) for c in self.collaborators)
        for c in self.collaborators:
            lines.append(f"    {c.name:<{width}}  {self._presence_text(c, now)}")
        if self.privacy is not None:
            lines.append(f"  {self.privacy.line}")
        last = self.last_round
        if last is None:
            lines.append("  no round closed yet")
        else:
            reporters = ",".join(last.reporters) or "nobody"
            missing = f" (missing {','.join(last.missing)})" if last.missing else ""
            lines.append(
                f"  last closed: {self.round_label(last.round_number)}, reported "
                f"{reporters}{missing}, {last.seconds:.2f} s"
            )
            for task, values in last.metrics.items():
                shown = ", ".join(f"{name} {value:.4f}" for name, value in values.items())
                lines.append(f"    {task}: {shown}")
        if self.site_budgets:
            lines.append("  sites' own privacy budgets (DP-SGD):")
            for site, (round_number, budget) in self.site_budgets.items():
                lines.append(f"    {site}: {budget.text()}, as of round {round_number}")
        return lines

    def _presence_text(self, c: CollaboratorStatus, now: float) -> str:
        """`c`'s presence in words; to an aggregator that stopped, nobody is online ("was online")."""
        online = c.presence == Presence.ONLINE.value
        text = "was online" if online and not self.running else c.presence
        if c.since is not None and (self.running or not online):
            text += f" since {_when(c.since, now)}"
        if c.last_seen is not None and (not online or not self.running):
            text += f", last seen {_when(c.last_seen, now)}"
        if c.reason is not None:
            text += f": {c.reason or NO_REASON}"
        return text


def read_status(plan: Plan) -> FederationStatus:
    """The status of `plan`'s federation from its state; `NotAStateError`, `StorageError`."""
    folder = plan.aggregator.output_dir
    root = folder / STATE_DIR
    standing = DurableState.read_standing(folder)
    if standing is None:
        raise NotAStateError(
            f"{root}: no aggregator state there (aggregator.output_dir of {plan.path}; "
            f"'aggregator start --plan {plan.path}' makes it)"
        )
    if standing.uuid != plan.federation.uuid:
        raise NotAStateError(
            f"{root / DATABASE}: the state of federation {standing.uuid!r}, not of this plan's "
            f"{plan.federation.uuid!r}"
        )
    rounds = training_rounds(plan)  # with differential privacy, those its budget allows
    round_number = standing.round_number
    total = rounds + (1 if AGGREGATED_MODEL_VALIDATION in plan.tasks else 0)
    round_tasks = (AGGREGATED_MODEL_VALIDATION,) if round_number >= rounds else plan.tasks
    sent: dict[str, list[str]] = {}
    for collaborator, task in standing.results:
        sent.setdefault(collaborator, []).append(task)
    saved = {row.name: row for row in standing.presence}
    left = {departure.name: departure for departure in standing.departures}
    names = list(plan.collaborators) + sorted(set(saved) - set(plan.collaborators))
    collaborators = tuple(
        CollaboratorStatus(
            name=name,
            presence=_presence_of(name, saved, left),
            since=left[name].since
            if name in left
            else saved[name].since
            if name in saved
            else None,
            last_seen=saved[name].last_seen if name in saved else None,
            results=tuple(sorted(sent.get(name, ()))),
            reason=left[name].reason if name in left else None,
        )
        for name in names
    )
    offline_after = plan.straggler.offline_after_seconds
    return FederationStatus(
        name=plan.federation.name,
        uuid=standing.uuid,
        state=root,
        running=standing.running,
        round_number=round_number,
        rounds=rounds,
        total_rounds=total,
        round_tasks=round_tasks,
        closing=standing.closing,
        collaborators=collaborators,
        offline_after_seconds=offline_after
        or reporting_threshold(plan.connection.heartbeat_seconds),
        presence_saved=max((row.saved for row in standing.presence), default=None),
        last_round=standing.last_round,
        privacy=_privacy_spent(plan, min(round_number, rounds), standing.last_round),
        site_budgets=_site_budgets(folder / METRICS),
    )


def _site_budgets(path: Path) -> dict[str, tuple[int, SiteBudget]]:
    """Each site's DP-SGD budget as metrics.jsonl at `path` last has it (none: no file)."""
    try:
        return latest_budgets(read_rows(path))
    except OSError as error:
        raise StorageError(f"{path}: cannot read it: {error.strerror or error}") from None


def _privacy_spent(plan: Plan, rounds: int, last: RoundRecord | None) -> PrivacySpent | None:
    """What `rounds` closed training rounds spent, when the plan has differential privacy;
    under adaptive clipping with the clip of the round in progress (the last closed round's
    next, or the plan's before any)."""
    settings = plan.differential_privacy
    if not settings.enabled:
        return None
    spent = budget_spent(settings, rounds)
    if settings.adaptive_clipping is None:
        return spent
    clip = settings.clip if last is None or last.next_clip is None else last.next_clip
    line = f"{spent.line}; clip {clip:.4g} (adaptive, from {settings.clip:g})"
    return dataclasses.replace(spent, clip=clip, line=line)


def budget_spent(settings: DifferentialPrivacySettings, rounds: int) -> PrivacySpent:
    """What `rounds` closed training rounds of DP-FedAvg with `settings` spent (`aggregator
    status` and the Prometheus gauges alike)."""
    epsilon = epsilon_after(rounds, settings.noise_multiplier, settings.delta)
    line = budget_line(settings, rounds, epsilon=epsilon)
    return PrivacySpent(epsilon, settings.delta, settings.max_epsilon, rounds, line)


def _presence_of(name: str, saved: dict[str, SavedPresence], left: dict[str, Departure]) -> str:
    """`name`'s presence: left as the departures say, else as last saved."""
    if name in left:
        return Presence.LEFT.value
    if name not in saved:
        return "unknown"
    if saved[name].presence == Presence.LEFT.value:
        return Presence.ONLINE.value  # rejoined (by calling) since the presence was saved
    return saved[name].presence


def _iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return datetime.datetime.fromtimestamp(moment, datetime.UTC).isoformat(timespec="seconds")


def _when(moment: float, now: float) -> str:
    stamp = datetime.datetime.fromtimestamp(moment, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
    ago = max(0.0, now - moment)
    return f"{stamp} UTC ({_duration(ago)} ago)"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
