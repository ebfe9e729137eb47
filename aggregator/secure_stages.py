"""Secure aggregation at the aggregator: a round's stages, in plain Python (`foedus.secure`
says the protocol; tests drive this without a socket).

The aggregator relays what the sites post and never can open it. Per training round:

* KEYS: each site posts its signed keys; the stage closes with members U1, whose
  advertisements are relayed to everyone;
* SHARES: each member of U1 posts one sealed share for each holder of its secrets in U1; the
  stage closes with members U2, and each site is relayed the shares addressed to it by members
  of U2;
* the masked upload is the `train` result (`SendLocalTaskResults`), from a member of U2 only,
  its tensors in the ring's dtype (`check_member`, `foedus.aggregator.checks`);
* SURVIVORS: when the round is due, the federation fixes its reporters for good
  (`FederationStore.decide_close`), and U3 = the reporters in U2 is relayed; each member of U3
  posts its signature over U3, and the stage closes with the confirmers;
* UNMASK: the confirmations are relayed; each confirmer posts the shares the unmasking needs;
  once the stage closes, the secrets are rebuilt (`foedus.secure.Unmasking`), and the next
  global model is the round's plus the survivors' unmasked sum over their summed weight,
  computed a slice at a time (`foedus.aggregator.secure_model`): no site's update is ever formed, logged or kept.

Every stage closes by one rule, the straggler policy's (`_due`): once every member of the
stage before (the plan's collaborators for KEYS) that is still awaited has posted and at
least `threshold` have (SURVIVORS: the quorum, `RoundContext.quorum`); under policy ``cutoff``
also once ``cutoff_seconds`` have passed since the stage opened and at least that many have. A
stage that closes with fewer (every other member left), fewer survivors than the quorum, or
secrets that cannot be rebuilt: the round
closes untrained, with one line saying why (`failure`).

Posts and closes are durable before they are acknowledged or relayed (`record_secure_post`,
`record_secure_close`); a resend of an accepted post (the same bytes) is answered OK and
changes nothing, a different second post is refused. A restarted aggregator reads them back
(`Progress.secure_posts`, `secure_closes`) and relays the very same messages.

What a post holds is checked by `foedus.aggregator.secure_posts` (names, lengths, the shares'
addressees, the survivors named, the kinds of secret revealed, each signature against the
poster's own certificate); when it may come (its round, its stage, its poster), here.

The module stays one (about 570 lines): a round's stages are one state machine under one lock,
whose posts, closes, relays and the unmasking read the same members and close times; the parts
that stand alone are apart (the posts' checks, `foedus.aggregator.secure_model`'s sum,
`foedus.aggregator.secure_record`'s row).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from foedus.aggregator.fedavg import TensorSource
from foedus.aggregator.liveness import Liveness
from foedus.aggregator.records import (
    Array,
    SecureClose,
    SecurePost,
)
from foedus.aggregator.secure_model import SecureModel
from foedus.aggregator.secure_posts import check_form
from foedus.aggregator.secure_record import Step, stage_records
from foedus.aggregator.store import FederationStore
from foedus.history.rows import StageRecord
from foedus.plans.schema import SecureAggregationSettings, StragglerPolicy, StragglerSettings
from foedus.refusals.errors import InvalidRequestError, PreconditionError
from foedus.secure import (
    Advertisement,
    FixedPoint,
    ProtocolViolation,
    RoundContext,
    SealedShare,
)
from foedus.secure.unmask import Unmasking
from foedus.secure.wire import MalformedMessage, Post, Relay, Stage, post_from_bytes

logger = logging.getLogger(__name__)

KEY_BYTES = 32  # X25519 public keys, the seed's SHA-256 commitment
MAX_SIGNATURE_BYTES = 1024  # ECDSA P-384 takes about 104, RSA-4096 PSS 512
MAX_CERTIFICATE_BYTES = 16 * 1024
MAX_SEALED_BYTES = 1024  # a nonce, a point, two shares of SHARE_BYTES and a tag: about 180


@dataclass
class _Stage:
    """One stage of the round in progress: what was posted, and with whom it closed."""

    posts: dict[str, tuple[bytes, Post]] = field(default_factory=dict)  # by collaborator
    members: tuple[str, ...] | None = None  # None: still open
    opened_at: float | None = None  # the clock's time it opened (None: not yet)
    closed_at: float | None = None  # the clock's time it closed (None: open, or before a restart)


class SecureStages:
    """A federation's secure aggregation, the round in progress's stages; thread-safe.

    Its own lock: the federation calls in under its own (its lock first, never the reverse);
    relays wait on `changed`. `liveness` and `straggler` decide who a stage still awaits.
    """

    def __init__(
        self,
        *,
        federation_uuid: str,
        collaborators: Sequence[str],
        settings: SecureAggregationSettings,
        rounds: int,
        store: FederationStore,
        liveness: Liveness,
        straggler: StragglerSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.federation_uuid = federation_uuid
        self.collaborators = tuple(sorted(collaborators))
        self.settings = settings
        self.threshold = settings.threshold
        # Survivors that must confirm one list before any reveals (`RoundContext.quorum`).
        self.quorum = RoundContext(federation_uuid, 0, self.collaborators, settings).quorum
        self.rounds = rounds  # training rounds: a final validation round has no stages
        self.store = store
        self.liveness = liveness
        self.straggler = straggler
        self.fixed_point = FixedPoint.for_federation(settings, len(self.collaborators))
        self._clock = clock
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)
        self.round_number = 0
        self._finished = False
        self._stages: dict[Stage, _Stage] = {}
        self._survivors: tuple[str, ...] | None = None  # U3, once the close is decided
        self._context = RoundContext(federation_uuid, 0, self.collaborators, settings)
        # SHARES's relays by receiver, made once the stage has closed (each relay is then a look-up)
        self._inbox: dict[str, tuple[SealedShare, ...]] | None = None
        self._untrained = ""  # why the round closes untrained, once `next_model` found out
        self.open_round(0)

    # -- the round ---------------------------------------------------------------------------------

    def open_round(
        self,
        round_number: int,
        *,
        finished: bool = False,
        posts: Sequence[SecurePost] = (),
        closes: Sequence[SecureClose] = (),
        survivors: Sequence[str] | None = None,
    ) -> None:
        """Start `round_number`'s stages, or go on with what a store recovered of them.

        `survivors`: the reporters of a close decided before a restart.
        """
        with self.changed:
            self.round_number = round_number
            self._finished = finished
            self._context = RoundContext(
                self.federation_uuid, round_number, self.collaborators, self.settings
            )
            self._inbox = None
            self._untrained = ""
            now = self._clock()
            self._stages = {stage: _Stage() for stage in Stage}
            self._stages[Stage.KEYS].opened_at = now
            for close in closes:
                self._stages[Stage(close.stage)].members = tuple(close.members)
            for post in posts:
                try:
                    decoded = post_from_bytes(post.message)
                except MalformedMessage as error:  # we wrote it: the state is damaged
                    raise ValueError(
                        f"round {round_number}: {post.collaborator}'s stored "
                        f"{Stage(post.stage).name} post does not read back: {error}"
                    ) from None
                self._stages[Stage(post.stage)].posts[post.collaborator] = (post.message, decoded)
            self._survivors = None
            for stage in (Stage.KEYS, Stage.SURVIVORS):  # SURVIVORS opens when it is decided
                if self._stages[stage].members is not None:
                    self._stages[Stage(stage + 1)].opened_at = now
            if survivors is not None:
                self._decide(survivors, now)
            self.changed.notify_all()

    def decide(self, reporters: Sequence[str]) -> None:
        """The round's close is decided (durably) with `reporters`: U3 = those in U2."""
        with self.changed:
            self._decide(reporters, self._clock())
            self.changed.notify_all()

    def _decide(self, reporters: Sequence[str], now: float) -> None:
        sharers = set(self._stages[Stage.SHARES].members or ())
        self._survivors = tuple(sorted(set(reporters) & sharers))
        self._stages[Stage.SURVIVORS].opened_at = now

    @property
    def active(self) -> bool:
        """Whether the round in progress trains, so has secure stages."""
        return not self._finished and self.round_number < self.rounds

    def context(self) -> RoundContext:
        """The round in progress's `RoundContext` (made once a round: it caches the graph)."""
        return self._context

    def excluded(self) -> frozenset[str]:
        """The collaborators a closed KEYS or SHARES stage left out: they cannot report this
        round (their masked update could not be unmasked), so no round waits for them."""
        with self._lock:
            members = self._stages[Stage.SHARES].members
            if members is None:
                members = self._stages[Stage.KEYS].members
            if members is None or not self.active:
                return frozenset()
            return frozenset(self.collaborators) - set(members)

    def failure(self) -> str | None:
        """Why the round in progress's secure aggregation has failed; None if it has not (yet)."""
        with self._lock:
            return self._failure()

    def done(self) -> bool:
        """Whether the round can close as far as its stages go: UNMASK has closed, the
        aggregation has failed, or the round has none (final validation)."""
        with self._lock:
            if not self.active or self._failure() is not None:
                return True
            return self._stages[Stage.UNMASK].members is not None

    def _failure(self) -> str | None:
        if not self.active:
            return None
        for stage in Stage:
            survivors = self._survivors
            if stage is Stage.SURVIVORS and survivors is not None and len(survivors) < self.quorum:
                return (
                    f"round {self.round_number} has {len(survivors)} survivor(s) "
                    f"({', '.join(survivors) or 'nobody'}), fewer than "
                    f"{self._needed_said(stage)}"
                )
            members = self._stages[stage].members
            needed = self._needed(stage)
            if members is not None and len(members) < needed:
                return (
                    f"round {self.round_number}'s {stage.name} stage closed with "
                    f"{len(members)} site(s) ({', '.join(members) or 'nobody'}), fewer than "
                    f"{self._needed_said(stage)}"
                )
        return None

    def _needed(self, stage: Stage) -> int:
        """How many posts `stage` must close with: the survivors' confirmations a quorum, every
        other stage's the threshold."""
        return self.quorum if stage is Stage.SURVIVORS else self.threshold

    def _needed_said(self, stage: Stage) -> str:
        """`_needed(stage)` for a person, with its reason."""
        if stage is Stage.SURVIVORS and self.quorum > self.threshold:
            return (
                f"the {self.quorum} survivors' confirmations needed (more than half the "
                "collaborators, so no two survivor lists can both be confirmed)"
            )
        return f"the threshold of {self.threshold} (secure_aggregation.threshold)"

    # -- posts --------------------------------------------------------------------------------------

    def post(self, caller: str, post: Post, data: bytes) -> bool:
        """Accept `caller`'s post (durable before this returns True); False for a resend of one
        accepted. `data` is the post's stored form (`foedus.secure.wire.post_bytes`)."""
        with self.changed:
            self._check_round(post.round_number)
            stage = self._stages[post.stage]
            kept = stage.posts.get(caller)
            if kept is not None:
                if kept[0] == data:
                    return False
                raise PreconditionError(
                    f"{caller} already posted a different {post.stage.name} message in round "
                    f"{post.round_number}; a stage takes one post per site"
                )
            self._check_open(caller, post.stage)
            self._check_form(caller, post)
            self.store.record_secure_post(
                SecurePost(self.round_number, int(post.stage), caller, data)
            )
            stage.posts[caller] = (data, post)
            self._advance()
            self.changed.notify_all()
        return True

    def _check_round(self, round_number: int) -> None:
        """Refuse a post or relay for any round but a training round in progress."""
        if round_number < 0:
            raise InvalidRequestError(f"round_number must be 0 or more, got {round_number}")
        if round_number < self.round_number:
            raise PreconditionError(
                f"round {round_number} is closed; the federation is in round {self.round_number}"
            )
        if self._finished:
            raise PreconditionError(
                f"round {round_number}: the federation has finished all its rounds"
            )
        if round_number != self.round_number:
            raise PreconditionError(
                f"round {round_number} is not the round in progress ({self.round_number})"
            )
        if self.round_number >= self.rounds:
            raise PreconditionError(
                f"round {round_number} is the final validation round: it trains nothing, so "
                "has no secure stages"
            )
        failure = self._failure()
        if failure is not None:
            raise PreconditionError(f"{failure}; the round closes untrained")

    def _previous(self, stage: Stage) -> tuple[str, ...] | None:
        """Who may post to `stage`: the members of the stage before; None: not known yet."""
        if stage is Stage.KEYS:
            return self.collaborators
        if stage is Stage.SHARES:
            return self._stages[Stage.KEYS].members
        if stage is Stage.SURVIVORS:
            return self._survivors
        return self._stages[Stage.SURVIVORS].members

    def _check_open(self, caller: str, stage: Stage) -> None:
        """Refuse a post to a stage that is not open to `caller` (FAILED_PRECONDITION)."""
        number = self.round_number
        if self._stages[stage].members is not None:
            raise PreconditionError(
                f"round {number}'s {stage.name} stage closed without {caller}: it takes no "
                "further part in this round's secure aggregation"
            )
        if stage in (Stage.KEYS, Stage.SHARES) and self._survivors is not None:
            raise PreconditionError(
                f"round {number}'s {stage.name} stage is over: the round's survivors are named"
            )
        allowed = self._previous(stage)
        before = (
            "survivors"
            if stage is Stage.SURVIVORS
            else "collaborators"
            if stage is Stage.KEYS
            else f"{Stage(stage - 1).name} stage's members"
        )
        if allowed is None:
            raise PreconditionError(
                f"round {number}'s {before} are not known yet: post {stage.name} once the "
                "relay before it is ready"
            )
        if caller not in allowed:
            raise PreconditionError(
                f"{caller} is not among round {number}'s {before} ({', '.join(allowed)}): it "
                f"takes no part in the {stage.name} stage"
            )

    def _check_form(self, caller: str, post: Post) -> None:
        """Refuse a post whose content cannot be the caller's for its stage (`check_form`)."""
        keys = self._stages[Stage.KEYS]
        kept = keys.posts.get(caller)
        check_form(
            self.context(),
            caller,
            post,
            key_members=keys.members or (),
            sharers=self._stages[Stage.SHARES].members or (),
            survivors=self._survivors,
            caller_keys=None if kept is None else kept[1].keys,
        )

    # -- closing stages -----------------------------------------------------------------------------

    def advance(self) -> bool:
        """Close every stage the rule says is due now (durable first); True if one closed."""
        with self.changed:
            closed = self._advance()
            if closed:
                self.changed.notify_all()
            return closed

    def _advance(self) -> bool:
        if not self.active:
            return False
        closed = False
        for stage in Stage:
            state = self._stages[stage]
            if state.members is not None:
                continue
            if self._failure() is not None:
                break
            previous = self._previous(stage)
            if previous is None or not self._due(stage, previous):
                break
            members = tuple(sorted(state.posts))
            self.store.record_secure_close(SecureClose(self.round_number, int(stage), members))
            state.members = members
            state.closed_at = now = self._clock()
            closed = True
            if stage in (Stage.KEYS, Stage.SURVIVORS):  # SURVIVORS opens when it is decided
                self._stages[Stage(stage + 1)].opened_at = now
            logger.info(
                "round %d's %s stage closed with %s",
                self.round_number,
                stage.name,
                ", ".join(members) or "nobody",
            )
        return closed

    def _due(self, stage: Stage, previous: Sequence[str]) -> bool:
        """The closing rule (see the module docstring) for `stage`, whose posters come from
        `previous`."""
        state = self._stages[stage]
        posted = set(state.posts)
        policy = self.straggler
        if policy.offline_after_seconds is not None:
            awaited = self.liveness.awaited()
        else:
            awaited = self.liveness.staying()
        waiting = (set(previous) & awaited) - posted
        needed = self._needed(stage)
        if not waiting:
            if len(posted) >= needed:
                return True
            # Fewer than the threshold, and nobody else will post unless one comes back: only
            # when every other member has left is that final (an offline one may return).
            staying = self.liveness.staying()
            return not ((set(previous) - posted) & staying)
        if policy.policy is StragglerPolicy.CUTOFF and state.opened_at is not None:
            late = self._clock() - state.opened_at >= policy.cutoff_seconds
            return late and len(posted) >= needed
        return False

    # -- relays -------------------------------------------------------------------------------------

    def relay(self, caller: str, round_number: int, stage: Stage) -> Relay:
        """What `stage` of `round_number` relays to `caller` now (not `ready`: still open)."""
        with self._lock:
            return self._relay(caller, round_number, stage)

    def wait_for_relay(
        self,
        caller: str,
        round_number: int,
        stage: Stage,
        timeout: float,
        *,
        cancel: threading.Event | None = None,
    ) -> Relay:
        """`relay`, waiting up to `timeout` s for the stage to close (a long poll)."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                answer = self._relay(caller, round_number, stage)
                remaining = deadline - time.monotonic()
                cancelled = cancel is not None and cancel.is_set()
                if answer.ready or remaining <= 0 or cancelled:
                    return answer
                self.changed.wait(remaining)

    def wake(self) -> None:
        """Make every waiting relay look again now (to see that it was cancelled)."""
        with self.changed:
            self.changed.notify_all()

    def _relay(self, caller: str, round_number: int, stage: Stage) -> Relay:
        self._check_round(round_number)
        if stage is Stage.SURVIVORS:
            members: tuple[str, ...] | None = self._survivors
        elif stage is Stage.UNMASK:
            members = self._stages[Stage.SURVIVORS].members
        else:
            members = self._stages[stage].members
        if members is None:
            return Relay(round_number, stage, ready=False)
        if caller not in members:
            return Relay(round_number, stage, ready=True, excluded=True, members=members)
        if stage is Stage.KEYS:
            posts = self._stages[Stage.KEYS].posts
            keys = tuple(posts[name][1].keys for name in members)
            return Relay(
                round_number,
                stage,
                ready=True,
                members=members,
                keys=tuple(key for key in keys if key is not None),
            )
        if stage is Stage.SHARES:
            if self._inbox is None:
                inbox: dict[str, list[SealedShare]] = {}
                posts = self._stages[Stage.SHARES].posts
                for name in members:
                    for share in posts[name][1].shares:
                        inbox.setdefault(share.receiver, []).append(share)
                self._inbox = {receiver: tuple(got) for receiver, got in inbox.items()}
            shares = self._inbox.get(caller, ())
            return Relay(round_number, stage, ready=True, members=members, shares=shares)
        if stage is Stage.SURVIVORS:
            return Relay(round_number, stage, ready=True, members=members)
        posts = self._stages[Stage.SURVIVORS].posts
        confirmations = tuple(posts[name][1].confirmation for name in members)
        return Relay(
            round_number,
            stage,
            ready=True,
            members=members,
            confirmations=tuple(item for item in confirmations if item is not None),
        )

    # -- the masked upload and the close ------------------------------------------------------------

    def check_member(self, collaborator: str, round_number: int) -> None:
        """Refuse a masked `train` result from a site outside U2 (FAILED_PRECONDITION)."""
        with self._lock:
            self._check_round(round_number)
            members = self._stages[Stage.SHARES].members
            if members is None:
                raise PreconditionError(
                    f"round {round_number}'s SHARES stage has not closed: a masked update is "
                    "sent once its relay is ready"
                )
            if collaborator not in members:
                raise PreconditionError(
                    f"round {round_number}'s SHARES stage closed without {collaborator}: its "
                    "update cannot be unmasked, so it is not taken this round"
                )

    def next_model(
        self, model: Mapping[str, Array], uploads: Mapping[str, TensorSource]
    ) -> SecureModel | None:
        """The next global model from the survivors' masked uploads (`uploads`, by name), still
        to be computed; None, with one line saying why, when the round closes untrained."""
        with self._lock:
            number = self.round_number
            failure = self._failure()
            survivors = self._survivors or ()
            unmask = self._stages[Stage.UNMASK]
            if failure is None and unmask.members is None:
                failure = f"round {number}'s UNMASK stage has not closed"
            if failure is None and set(uploads) != set(survivors):
                failure = (
                    f"round {number}'s masked uploads are from {sorted(uploads)}, its "
                    f"survivors are {list(survivors)}"
                )
            advertisements: dict[str, Advertisement] = {}
            for name, (_, post) in self._stages[Stage.KEYS].posts.items():
                if post.keys is not None and name in (self._stages[Stage.KEYS].members or ()):
                    advertisements[name] = post.keys
            revealed = {
                name: tuple(post.revealed)
                for name, (_, post) in unmask.posts.items()
                if name in (unmask.members or ())
            }
            sharers = self._stages[Stage.SHARES].members or ()
            context = self.context()
        unmasking: Unmasking | None = None
        if failure is None:
            try:
                unmasking = Unmasking.rebuild(context, advertisements, sharers, survivors, revealed)
            except (ProtocolViolation, ValueError) as error:  # ValueError: a key agrees nothing
                failure = f"round {number}'s masks cannot be removed: {error}"
        if unmasking is not None:
            try:
                return SecureModel(model, uploads, unmasking)
            except ProtocolViolation as error:
                failure = f"round {number}'s summed weight is not usable: {error}"
        logger.warning(
            "round %d closes untrained: %s; the global model stays as it was", number, failure
        )
        with self._lock:
            self._untrained = str(failure)
        return None

    def record(self, handed_out: float) -> tuple[tuple[StageRecord, ...], str]:
        """The round in progress's steps so far (`secure_record.stage_records`; KEYS from the
        round's first hand-out, `handed_out` on this clock, if later than its opening), and why
        it closes untrained ("" unless `next_model` said so)."""
        with self._lock:
            steps: list[Step] = []
            for stage in Stage:
                state = self._stages[stage]
                if stage is Stage.SURVIVORS:  # the masked upload ends when survivors are named
                    if self._survivors is None:
                        break
                    started = self._stages[Stage.SHARES].closed_at
                    steps.append(Step("UPLOAD", self._survivors, started, state.opened_at))
                if state.members is None:
                    break
                opened = state.opened_at
                if stage is Stage.KEYS and opened is not None:
                    opened = max(opened, handed_out)
                steps.append(Step(stage.name, state.members, opened, state.closed_at))
            return stage_records(self.collaborators, steps), self._untrained
