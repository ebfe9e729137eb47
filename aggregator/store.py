"""Where a federation keeps what it does: the `FederationStore` interface and `MemoryStore`.

One interface under every access to the aggregator's state: the federation's writes (results
staged and recorded, a round's close decided and committed, departures, the posts and closes of
a round's secure aggregation stages), what the runtime
reads back after a restart (`recovered`, `best_model`) and writes for ``aggregator status``
(`save_presence`), and what status reads (`standing`). Two implementations keep the same
contract (tests/test_store_contract.py runs it, and the federation's tests, against both):

* `MemoryStore`: in this process only; nothing survives it (tests, embedding);
* `foedus.aggregator.state.DurableState`: on disk, so that a restarted aggregator resumes; see it for
  the order of writes, and `foedus.aggregator.federation` for the order in which a federation calls.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from foedus.aggregator.liveness import Departure, Seen
from foedus.aggregator.records import (
    Accepted,
    Array,
    Progress,
    RoundCommit,
    RoundRecord,
    SecureClose,
    SecurePost,
    TaskResult,
)
from foedus.privacy.noise import NoiseSecret, new_secret


@dataclass(frozen=True)
class Recovered:
    """What a store held when it was opened: where the federation stands and what it did so far."""

    progress: Progress
    fresh: bool  # the state was created now: nothing to resume
    last_model_rounds: int | None  # training rounds of last_model.pbuf; None: nothing trained
    records: tuple[RoundRecord, ...]  # every closed round, in order
    dropped: tuple[str, ...] = ()  # result files that failed their check and were dropped


@dataclass(frozen=True)
class SavedPresence:
    """One collaborator's presence as the runtime saved it last (times are Unix seconds)."""

    name: str
    presence: str  # a `aggregator.liveness.Presence` value, as saved
    since: float
    last_seen: float | None
    saved: float  # when it was saved


@dataclass(frozen=True)
class Standing:
    """Where a federation stands, as its store says at one moment: what ``aggregator status`` shows."""

    uuid: str  # the federation's ("" for a store that was not told it)
    round_number: int  # the round in progress
    closing: bool  # the round's close is decided, being aggregated
    results: tuple[tuple[str, str], ...]  # (collaborator, task) accepted this round, sorted
    presence: tuple[SavedPresence, ...]  # as last saved (`save_presence`)
    last_round: RoundRecord | None  # the last closed round's record
    departures: tuple[Departure, ...]  # who has left and not rejoined, by name
    running: bool  # an aggregator holds the state now


class FederationStore(Protocol):
    """Where a federation's results, rounds and departures are kept; see the module docstring."""

    # Where uploads are written as they arrive, so that keeping one is a rename (None: anywhere).
    upload_folder: Path | None
    # What the store held when it was opened (a new store: round 0 of its initial model).
    recovered: Recovered

    @property
    def location(self) -> Path | None:
        """The folder the store keeps its files in; None: memory only."""

    def stage(self, result: TaskResult) -> Accepted:
        """Keep `result`'s tensors where they survive; not accepted until `record`."""

    def record(self, accepted: Accepted) -> None:
        """Accept a staged result for good: the commit point of an accept."""

    def discard(self, accepted: Accepted) -> None:
        """Forget a staged result that was not recorded."""

    def load(self, accepted: Accepted) -> TaskResult:
        """The result with its tensors, as it was staged."""

    def decide_close(self, round_number: int, reporters: Sequence[str]) -> None:
        """Fix who reported in a round that is being closed."""

    def commit_round(self, commit: RoundCommit) -> Mapping[str, Array] | None:
        """Close the round for good: next round, its model, the record, the best.

        Averages `commit.model` where the store keeps it and returns it as kept, for the
        federation to hold (None when there is no new model).
        """

    def record_secure_post(self, post: SecurePost) -> None:
        """Keep a site's post to a secure stage, for good, before it is acknowledged; the
        round's posts and closes are forgotten when the round is committed."""

    def record_secure_close(self, close: SecureClose) -> None:
        """Keep that a secure stage closed, and with whom, for good, before it is relayed."""

    def record_leave(self, departure: Departure) -> None:
        """Keep that a collaborator has left, for good, before its `Leave` is answered."""

    def record_rejoin(self, name: str) -> None:
        """Forget a departure: the collaborator called again."""

    def best_model(self) -> Mapping[str, Array] | None:
        """The model of the best score so far (None: no best yet)."""

    def privacy_secret(self) -> NoiseSecret:
        """The federation's 32-byte noise secret and its noise version (`foedus.privacy.noise`),
        made at the first call and kept for good: a resumed federation draws the very same noise."""

    def save_presence(self, snapshot: Sequence[Seen], *, saved: float | None = None) -> None:
        """Keep who is online and since when, replacing what was kept (for `standing`)."""

    def standing(self) -> Standing:
        """Where the federation stands now, read at one moment."""


class MemoryStore:
    """Keeps what a federation does in memory only: nothing survives the process (tests, embedding).

    It holds the round in progress, its model and results, the records of closed rounds, the
    best model, departures and presence, so that everything the interface reads is as the
    durable store would answer within one run.
    """

    def __init__(
        self,
        model: Mapping[str, Array] | None = None,
        *,
        upload_folder: Path | None = None,
        federation_uuid: str = "",
    ) -> None:
        """A new store at round 0 of `model` (without it, round 0's model is not known to it:
        a best model that is round 0's is then empty)."""
        self.upload_folder = upload_folder
        self.uuid = federation_uuid
        start = Progress(round_number=0, model=dict(model or {}))
        self.recovered = Recovered(start, fresh=True, last_model_rounds=None, records=())
        self.closed: list[RoundRecord] = []
        self._lock = threading.Lock()
        self._round = 0
        self._model: Mapping[str, Array] = start.model
        self._results: dict[tuple[str, str], Accepted] = {}  # recorded in the round in progress
        self._closing = False
        self._best_model: Mapping[str, Array] | None = None
        self._departures: dict[str, Departure] = {}
        self._presence: tuple[SavedPresence, ...] = ()
        self.secure_posts: list[SecurePost] = []  # of the round in progress
        self.secure_closes: list[SecureClose] = []
        self._secret: NoiseSecret | None = None

    @property
    def location(self) -> Path | None:
        """None: memory only."""
        return None

    def stage(self, result: TaskResult) -> Accepted:
        """The index entry, holding the result itself."""
        return Accepted(
            result.collaborator, result.round_number, result.task_name, result.data_size, result
        )

    def record(self, accepted: Accepted) -> None:
        """Count the result in the round in progress."""
        with self._lock:
            self._results[accepted.key] = accepted

    def discard(self, accepted: Accepted) -> None:
        """Nothing to remove: a staged result was never counted."""

    def load(self, accepted: Accepted) -> TaskResult:
        """The result that was staged."""
        if not isinstance(accepted.handle, TaskResult):
            raise TypeError(f"not a result staged in memory: {accepted!r}")
        return accepted.handle

    def decide_close(self, round_number: int, reporters: Sequence[str]) -> None:
        """Note that the round is closing."""
        with self._lock:
            self._closing = round_number == self._round

    def commit_round(self, commit: RoundCommit) -> Mapping[str, Array] | None:
        """Move to the next round with the new model averaged into arrays; keep the record."""
        model = None if commit.model is None else commit.model.arrays()
        with self._lock:
            current = self._model
            if model is not None:
                self._model = model
            if commit.best is not None:
                self._best_model = current if commit.best_is_round_model else self._model
            self._round = commit.record.round_number + 1
            self._results = {}
            self.secure_posts = [p for p in self.secure_posts if p.round_number >= self._round]
            self.secure_closes = [c for c in self.secure_closes if c.round_number >= self._round]
            self._closing = False
            self.closed.append(commit.record)
        return model

    def record_secure_post(self, post: SecurePost) -> None:
        """Keep the post until its round is committed."""
        with self._lock:
            self.secure_posts.append(post)

    def record_secure_close(self, close: SecureClose) -> None:
        """Keep the close until its round is committed."""
        with self._lock:
            self.secure_closes.append(close)

    def record_leave(self, departure: Departure) -> None:
        """Keep the departure."""
        with self._lock:
            self._departures[departure.name] = departure

    def record_rejoin(self, name: str) -> None:
        """Forget the departure."""
        with self._lock:
            self._departures.pop(name, None)

    def best_model(self) -> Mapping[str, Array] | None:
        """The best model so far, as committed."""
        with self._lock:
            return self._best_model

    def privacy_secret(self) -> NoiseSecret:
        """A secret made at the first call, kept for the life of the store."""
        with self._lock:
            if self._secret is None:
                self._secret = NoiseSecret(new_secret())
            return self._secret

    def save_presence(self, snapshot: Sequence[Seen], *, saved: float | None = None) -> None:
        """Keep the snapshot, replacing the one before."""
        now = time.time() if saved is None else saved
        presence = tuple(
            SavedPresence(seen.name, seen.presence.value, seen.since, seen.last_seen, now)
            for seen in snapshot
        )
        with self._lock:
            self._presence = presence

    def standing(self) -> Standing:
        """Where the federation stands, from what this process kept."""
        with self._lock:
            return Standing(
                uuid=self.uuid,
                round_number=self._round,
                closing=self._closing,
                results=tuple(sorted(self._results)),
                presence=self._presence,
                last_round=self.closed[-1] if self.closed else None,
                departures=tuple(self._departures[name] for name in sorted(self._departures)),
                running=True,
            )
