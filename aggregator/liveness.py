"""Who is alive: each collaborator judged by its calls, in plain Python with an injectable clock.

Every call a collaborator makes that passes the identity check counts as contact (`seen`), and
a collaborator with a call in progress (`calling`: a long poll, an upload of many minutes) is
alive for as long as the call lasts. foedus collaborators also send `Heartbeat` calls while a
task runs, so a long training is not mistaken for a death; OpenFL collaborators only poll, so
they are judged by their polls, uploads and downloads alone.

The rule, written once here: a collaborator is

* ``online`` while it has a call in progress, or was heard from in the last `offline_after`
  seconds;
* ``offline`` once it has been silent longer than that, counted from its last call, or from
  this aggregator's start when it has not called since (an aggregator that restarts gives
  everyone `offline_after` seconds to come back before judging them);
* ``not heard from`` before its first call, while that grace lasts;
* ``left`` once it has told the aggregator it gives up (the foedus `Leave` RPC, with a reason),
  whatever its calls say, until it rejoins (`rejoin`, on any later call of its but a `Heartbeat`,
  which may have been sent before the `Leave`; `foedus.aggregator.federation` makes both durable
  first).

`awaited` is who a round still waits for (everyone not offline and not left);
`foedus.aggregator.schedule` closes a round once all of them have reported (offline counts only when
the plan sets `straggler.offline_after_seconds`; left counts always). Nothing here decides
rounds. A collaborator that calls again is online again at once.

States are recomputed from the clock whenever they are read, never kept as a flag that could go
stale. `poll` is for the one thread that saves them (the runtime's loop): it logs transitions
and hands a snapshot to save on a transition (at most once a second) or, when there were only
calls, every `SAVE_SECONDS`: never a write per call.
"""

from __future__ import annotations

import logging
import threading
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum

logger = logging.getLogger(__name__)

# Without straggler.offline_after_seconds nobody is ever taken for dead, but `aggregator status`
# and the online count still judge by this silence: a few heartbeats, at least a minute.
REPORTING_OFFLINE_AFTER_SECONDS = 60.0
REPORTING_HEARTBEATS = 3
# A transition is saved within this long; contact alone (last seen) every SAVE_SECONDS.
TRANSITION_SAVE_SECONDS = 1.0
SAVE_SECONDS = 10.0


def reporting_threshold(heartbeat_seconds: float) -> float:
    """The silence after which status reports a collaborator offline when the plan sets none."""
    return max(REPORTING_OFFLINE_AFTER_SECONDS, REPORTING_HEARTBEATS * heartbeat_seconds)


class Presence(Enum):
    """What a collaborator's calls say about it now."""

    ONLINE = "online"
    OFFLINE = "offline"
    UNSEEN = "not heard from"
    LEFT = "left"


NO_REASON = "no reason given"
MAX_REASON_CHARACTERS = 1000
# Unicode control, format (bidirectional overrides, ...) and surrogate characters.
_CONTROL_CATEGORIES = frozenset({"Cc", "Cf", "Cs"})


def clean_reason(text: str) -> str:
    """A `Leave` reason fit for a log line and a terminal: control characters stripped, then
    blanks at either end; `ValueError` past MAX_REASON_CHARACTERS."""
    cleaned = "".join(
        character
        for character in text
        if unicodedata.category(character) not in _CONTROL_CATEGORIES
    ).strip()
    if len(cleaned) > MAX_REASON_CHARACTERS:
        raise ValueError(
            f"reason is {len(cleaned)} characters long; at most {MAX_REASON_CHARACTERS} are allowed"
        )
    return cleaned


@dataclass(frozen=True)
class Departure:
    """A collaborator that has left: why (as it said; may be empty), and when (Unix seconds)."""

    name: str
    reason: str
    since: float

    @property
    def said(self) -> str:
        """The reason as a person reads it."""
        return self.reason or NO_REASON


@dataclass(frozen=True)
class Seen:
    """One collaborator's presence, with wall-clock times (Unix seconds) a person can read."""

    name: str
    presence: Presence
    # When the presence began: online since the first call after a silence; offline since the
    # last call (or the aggregator's start, if none since); not heard from since the start;
    # left since its `Leave` was recorded.
    since: float
    last_seen: float | None  # the last call's start or end (None: not heard from in this run)


class Liveness:
    """Presence of a federation's collaborators; thread-safe, each call a few dict operations."""

    def __init__(
        self,
        collaborators: Sequence[str],
        offline_after: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if not offline_after > 0:
            raise ValueError(f"offline_after must be > 0 seconds, got {offline_after}")
        self.collaborators = tuple(collaborators)
        self.offline_after = offline_after
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._started = clock()
        self._last: dict[str, float] = {}  # name -> clock() of its last contact
        self._online_since: dict[str, float] = {}
        self._calls: Counter[str] = Counter()  # calls in progress, by name
        self._left: dict[str, Departure] = {}
        self._logged = {name: Presence.UNSEEN for name in self.collaborators}
        self._saved: dict[str, Presence] | None = None  # what the last snapshot saved said
        self._saved_at = self._started
        self._contact_since_save = False

    # -- contact (every RPC thread) -------------------------------------------------------------

    def seen(self, name: str) -> None:
        """`name` called just now."""
        with self._lock:
            self._touch(name, self._clock())

    @contextmanager
    def calling(self, name: str) -> Iterator[None]:
        """`name` is alive while inside: a call of its in progress; contact on entry and exit."""
        with self._lock:
            self._touch(name, self._clock())
            self._calls[name] += 1
        try:
            yield
        finally:
            with self._lock:
                self._calls[name] -= 1
                if self._calls[name] <= 0:
                    del self._calls[name]
                self._touch(name, self._clock())

    # -- leaving and rejoining (the federation makes them durable first) -------------------------

    def leave(self, departure: Departure) -> None:
        """`departure.name` has left; nothing changes if it already had (the first reason stays)."""
        with self._lock:
            if departure.name in self._left:
                return
            self._left[departure.name] = departure
            self._logged[departure.name] = Presence.LEFT  # the federation logs it
            self._contact_since_save = True

    def rejoin(self, name: str) -> Departure | None:
        """`name` is back: awaited again from now on; its departure, or None if it had not left."""
        with self._lock:
            departure = self._left.pop(name, None)
            if departure is not None:
                self._online_since[name] = self._clock()
                self._logged[name] = self._presence(name, self._clock())
                self._contact_since_save = True
            return departure

    def has_left(self, name: str) -> bool:
        """Whether `name` has left (and not rejoined)."""
        with self._lock:
            return name in self._left

    def departures(self) -> tuple[Departure, ...]:
        """The collaborators that have left, in the plan's order."""
        with self._lock:
            return tuple(self._left[name] for name in self.collaborators if name in self._left)

    def _touch(self, name: str, now: float) -> None:
        if self._presence(name, now) is not Presence.ONLINE:
            self._online_since[name] = now
        self._last[name] = now
        self._contact_since_save = True

    # -- reading --------------------------------------------------------------------------------

    def presence(self, name: str) -> Presence:
        """`name`'s presence now."""
        with self._lock:
            return self._presence(name, self._clock())

    def online_count(self) -> int:
        """How many collaborators are online now (a gauge for operators)."""
        with self._lock:
            now = self._clock()
            return sum(self._presence(name, now) is Presence.ONLINE for name in self.collaborators)

    def awaited(self) -> frozenset[str]:
        """The collaborators a round still waits for: every one not offline and not left."""
        with self._lock:
            now = self._clock()
            return frozenset(
                name
                for name in self.collaborators
                if self._presence(name, now) not in (Presence.OFFLINE, Presence.LEFT)
            )

    def staying(self) -> frozenset[str]:
        """The collaborators that have not left (offline ones included: they may come back)."""
        with self._lock:
            return frozenset(name for name in self.collaborators if name not in self._left)

    def snapshot(self) -> tuple[Seen, ...]:
        """Every collaborator's presence now, in the plan's order."""
        with self._lock:
            return self._snapshot(self._clock())

    def poll(self) -> tuple[Seen, ...] | None:
        """Log transitions since the last poll; a snapshot when one is due for saving, else None.

        Due: the first time; after a transition (at most once every TRANSITION_SAVE_SECONDS);
        after calls only, every SAVE_SECONDS. For the one thread that saves.
        """
        with self._lock:
            now = self._clock()
            snapshot = self._snapshot(now)
            for seen in snapshot:
                self._log_transition(seen)
            states = {seen.name: seen.presence for seen in snapshot}
            waited = now - self._saved_at
            changed = self._saved is None or states != self._saved
            due = (self._saved is None) or (
                (changed and waited >= TRANSITION_SAVE_SECONDS)
                or (self._contact_since_save and waited >= SAVE_SECONDS)
            )
            if not due:
                return None
            self._saved, self._saved_at, self._contact_since_save = states, now, False
            return snapshot

    def _log_transition(self, seen: Seen) -> None:
        before = self._logged.get(seen.name)
        if before is seen.presence:
            return
        self._logged[seen.name] = seen.presence
        if Presence.LEFT in (before, seen.presence):
            return  # leaving and rejoining are logged where they happen
        if seen.presence is Presence.OFFLINE:
            logger.warning("%s is offline: not heard from in %g s", seen.name, self.offline_after)
        elif seen.presence is Presence.ONLINE and before is Presence.OFFLINE:
            logger.info("%s is back online", seen.name)

    # -- inside (under the lock) ----------------------------------------------------------------

    def _presence(self, name: str, now: float) -> Presence:
        if name in self._left:
            return Presence.LEFT
        if self._calls.get(name):
            return Presence.ONLINE
        last = self._last.get(name)
        if last is None:
            if now - self._started <= self.offline_after:
                return Presence.UNSEEN
            return Presence.OFFLINE
        return Presence.ONLINE if now - last <= self.offline_after else Presence.OFFLINE

    def _snapshot(self, now: float) -> tuple[Seen, ...]:
        offset = self._wall() - now  # clock() time + offset = wall time

        def wall(moment: float | None) -> float | None:
            return None if moment is None else moment + offset

        seen: list[Seen] = []
        for name in self.collaborators:
            presence = self._presence(name, now)
            last = self._last.get(name)
            departure = self._left.get(name)
            if departure is not None:
                seen.append(Seen(name, presence, departure.since, wall(last)))  # since: wall time
                continue
            if presence is Presence.ONLINE:
                since = self._online_since.get(name, now)
            else:
                since = self._started if last is None else last
            seen.append(Seen(name, presence, since + offset, wall(last)))
        return tuple(seen)
