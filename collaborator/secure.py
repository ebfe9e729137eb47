"""SecureRounds: this site's part of each secure aggregation round, around the train task.

Plain Python over `AggregatorGRPCClient` and `foedus.secure.SiteRound` (the protocol itself; read
`foedus.secure` for it). The collaborator loop calls three hooks and keeps its shape:

- `before_train`: KEYS (post this site's signed keys, wait for the members' keys, check every
  one of them) and SHARES (post the Shamir shares sealed for each holder, wait for those sealed
  for this site);
- `masked_results`: the train result as it is uploaded, by the usual `send_local_task_results`:
  the update's delta, weighted, encoded in the ring and masked, plus its masked weight
  (`WEIGHT_TENSOR`), with the wire data size 1 (the weight travels masked); with differential
  privacy, the delta clipped and this site's noise share added first (`foedus.privacy.shares`);
- `after_round`, once the round's last task is sent: SURVIVORS (check the aggregator's list of
  survivors, sign it) and UNMASK (check the survivors' signatures, reveal the shares the
  unmasking needs, never both kinds of one site's).

The round's secrets, and each message before it is posted, are in the site's round file
(`foedus.collaborator.secure_state`) first; a restarted site reads it, posts the same bytes again
and fetches the relays again. A relay is a long poll (the aggregator holds the call until the
stage closes or its `aggregator.long_poll_seconds` pass); each call is bounded and retried as
every call (`connection.*`), and an answer that comes back at once is followed by a pause of
`POLL_PAUSE_SECONDS`, so an aggregator that does not long-poll is not called in a busy loop.

What the aggregator or a peer sends that breaks the protocol raises `foedus.secure.ProtocolViolation`
(one line naming the site or the aggregator and what failed): the collaborator reveals nothing
more, leaves and exits 1. A stage that closed without this site (`excluded`) ends its part in the
round: `SecureRoundMissedError` before its upload, a log line after. So does a stage or survivor
list below the threshold (`foedus.secure.TooFewSites`): nothing is revealed, but it need not be
malice (the others may have left), so the site waits for the next round instead of leaving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from foedus.collaborator.client import AggregatorGRPCClient, OutgoingTensor
from foedus.collaborator.errors import ClientError
from foedus.collaborator.secure_state import RoundFile, RoundFileError, RoundFiles
from foedus.pki.files import read_certificate, read_certificates, read_private_key
from foedus.pki.keys import PrivateKey
from foedus.plans.runners import Array
from foedus.plans.schema import Plan
from foedus.privacy.shares import NoiseShares
from foedus.secure import RoundContext, SecretsFileError, TooFewSites
from foedus.secure.site import SiteRound
from foedus.secure.site_secrets import SiteSecrets
from foedus.secure.wire import Post, Relay, Stage, post_bytes, post_from_bytes

logger = logging.getLogger(__name__)

# The tags of a masked update's tensors: those of a plain one (the aggregator tells them by dtype).
TRAINED_TAGS = ("trained",)
# A relay that comes back at once (no long poll) is asked again after this pause.
POLL_PAUSE_SECONDS = 1.0


class SecureRoundMissedError(ClientError):
    """This site has no more part in the round: a stage closed without it, or with fewer sites
    than the threshold (`foedus.secure.TooFewSites`: nothing is revealed, and it need not be
    malice, the others may have left). The round goes on, or fails, without it; the site waits
    for the next one."""

    @classmethod
    def excluded(cls, round_number: int, stage: Stage) -> SecureRoundMissedError:
        """`stage` of the round closed without this site."""
        return cls(
            f"round {round_number}'s {stage.name} stage closed without this collaborator; "
            f"the round goes on without it"
        )


class SecureUpdateError(ClientError):
    """The runner's trained update cannot be masked (no samples, or values that are not finite)."""


@dataclass(frozen=True)
class SiteIdentity:
    """What this site signs with and checks its peers against: its certificate and the CA's."""

    signing_key: PrivateKey
    certificate_der: bytes
    ca_certificates: tuple[x509.Certificate, ...]  # the federation's CA bundle

    @classmethod
    def from_files(cls, certificate: Path, private_key: Path, ca_bundle: Path) -> SiteIdentity:
        """Read the site's TLS certificate and key and the federation's CA (`PkiError`)."""
        return cls(
            signing_key=read_private_key(private_key),
            certificate_der=read_certificate(certificate).public_bytes(Encoding.DER),
            ca_certificates=tuple(read_certificates(ca_bundle)),
        )


@dataclass
class _Open:
    """The round in progress as this process knows it: its file and the protocol's state."""

    number: int
    file: RoundFile
    site: SiteRound
    done: bool = False  # SURVIVORS and UNMASK done (or the round ended for this site)


class SecureRounds:
    """This collaborator's part in the secure rounds of one federation (see the module's doc)."""

    def __init__(
        self,
        client: AggregatorGRPCClient,
        plan: Plan,
        name: str,
        identity: SiteIdentity,
        files: RoundFiles,
        *,
        sleep: Callable[[float], None] = time.sleep,
        max_polls: int | None = None,
        noise_shares: NoiseShares | None = None,
    ) -> None:
        """`max_polls`: relays not ready in a row before giving up (None: as long as the aggregator
        answers, like the rounds themselves). `noise_shares`: with differential privacy, how this
        site clips its update and adds its share of the noise before it masks it."""
        self.noise_shares = noise_shares
        self.client = client
        self.plan = plan
        self.name = name
        self.identity = identity
        self.files = files
        self._sleep = sleep
        self._max_polls = max_polls
        self._open: _Open | None = None

    # -- the loop's hooks ---------------------------------------------------------------------------

    def seen(self, round_number: int, *, finished: bool = False) -> None:
        """The aggregator named round `round_number` (`finished`: said the federation is): the
        rounds before it are over, their files erased (every file, once finished)."""
        if finished or (self._open is not None and self._open.number < round_number):
            self._open = None
        self.files.erase_before(None if finished else round_number)

    def before_train(self, round_number: int) -> None:
        """KEYS and SHARES of round `round_number`, before this site trains in it."""
        current = self._start(round_number)
        with _too_few_is_missed():
            self._keys(current)
            self._shares(current)

    def masked_results(
        self,
        round_number: int,
        global_model: Mapping[str, Array],
        trained: Mapping[str, Array],
        data_size: int,
    ) -> tuple[list[OutgoingTensor], int]:
        """The train result's model tensors, masked, and its wire data size (1: the weight is masked)."""
        current = self._open
        if current is None or current.number != round_number:
            raise RuntimeError(f"masked_results of round {round_number} before before_train")
        # The delta (trained - global, in float64) is taken a chunk at a time as it is encoded.
        trained_model = {name: np.asarray(trained[name]) for name in global_model}
        factor, noise = 1.0, None
        shares = self.noise_shares
        if shares is not None:  # clipped, and its noise share added, before it is masked
            factor = shares.clip_factor(global_model, trained_model)
            noise = shares.noise(round_number)
        try:
            masked = current.site.masked_update(  # the weight capped at max_weight
                trained_model, data_size, reference=global_model, factor=factor, noise=noise
            )
        except ValueError as error:  # no samples, NaN or infinities: nothing can be uploaded
            raise SecureUpdateError(
                f"round {round_number}: the trained update cannot be masked: {error}"
            ) from None
        return [OutgoingTensor(name, array, tags=TRAINED_TAGS) for name, array in masked.items()], 1

    def after_round(self, round_number: int) -> None:
        """SURVIVORS and UNMASK of round `round_number`, once this site sent its last task there.

        Also what a restarted site owes when the aggregator has no task left for it: a site
        without a file for the round (it never made secrets there) has nothing to do.
        """
        current = self._open
        if current is None or current.number != round_number:
            current = self._resume(round_number)
            if current is None:
                return
        if current.done:
            return
        try:
            with _too_few_is_missed():
                self._survivors_and_unmask(current)
        finally:
            current.done = True

    # -- the stages ---------------------------------------------------------------------------------

    def _context(self, round_number: int) -> RoundContext:
        plan = self.plan
        return RoundContext(
            federation_uuid=plan.federation.uuid,
            round_number=round_number,
            collaborators=tuple(sorted(plan.collaborators)),
            settings=plan.secure_aggregation,
        )

    def _site(self, round_number: int, secrets: SiteSecrets) -> SiteRound:
        return SiteRound(
            self._context(round_number),
            self.name,
            secrets,
            signing_key=self.identity.signing_key,
            certificate_der=self.identity.certificate_der,
            ca_certificates=self.identity.ca_certificates,
        )

    def _start(self, round_number: int) -> _Open:
        """The round's secrets: read from its file, or made and written before anything is sent."""
        if self._open is not None and self._open.number == round_number:
            return self._open
        file = self.files.read(round_number)
        if file is None:
            secrets = SiteSecrets.generate()
            file = self.files.new(round_number, secrets.to_bytes())
            self.files.write(file)
            logger.info("round %d: secure aggregation secrets made", round_number)
        else:
            path = self.files.path(round_number)
            try:
                secrets = SiteSecrets.from_bytes(file.secrets)
            except SecretsFileError as error:
                raise RoundFileError(f"{path}: {error}") from None
            logger.info("round %d: secure aggregation secrets read from %s", round_number, path)
        self._open = _Open(round_number, file, self._site(round_number, secrets))
        return self._open

    def _resume(self, round_number: int) -> _Open | None:
        """A restarted site's round, rebuilt from its file and the KEYS and SHARES relays again."""
        if self.files.read(round_number) is None:
            return None
        current = self._start(round_number)
        try:
            with _too_few_is_missed():
                self._keys(current)
                self._shares(current)
        except SecureRoundMissedError as missed:
            logger.info("%s", missed)
            current.done = True
        return current

    def _post(self, current: _Open, stage: Stage, make: Callable[[], Post]) -> Post:
        """Post this site's part of `stage`, written to the round file first; a restarted site
        posts the very bytes it wrote (answered OK), once `make` has checked the relays again."""
        post = make()  # its checks run again after a restart: a changed relay is refused
        kept = current.file.posted.get(stage.name)
        if kept is None:
            # With the secrets as making it left them (the survivors confirmed, what is revealed).
            secrets = current.site.secrets.to_bytes()
            current.file = current.file.with_secrets(secrets).with_post(
                stage.name, post_bytes(post)
            )
            self.files.write(current.file)
        else:
            post = post_from_bytes(kept)
        self.client.post_secure_message(post)
        return post

    def _keys(self, current: _Open) -> None:
        number, site = current.number, current.site
        self._post(current, Stage.KEYS, lambda: Post(number, Stage.KEYS, keys=site.advertisement()))
        relay = self._relay(number, Stage.KEYS)
        site.accept_keys(relay.members, relay.keys)
        logger.info("round %d: the keys of %d collaborators checked", number, len(relay.members))

    def _shares(self, current: _Open) -> None:
        number, site = current.number, current.site
        self._post(
            current,
            Stage.SHARES,
            lambda: Post(number, Stage.SHARES, shares=tuple(site.sealed_shares())),
        )
        relay = self._relay(number, Stage.SHARES)
        site.accept_shares(relay.members, relay.shares)  # logs each share it does not hold

    def _survivors_and_unmask(self, current: _Open) -> None:
        number, site = current.number, current.site
        try:
            survivors = self._relay(number, Stage.SURVIVORS).members
        except SecureRoundMissedError:
            logger.info("round %d closes without this collaborator's update", number)
            return
        self._post(
            current,
            Stage.SURVIVORS,
            lambda: Post(number, Stage.SURVIVORS, confirmation=site.confirmation(survivors)),
        )
        try:
            confirmations = self._relay(number, Stage.UNMASK).confirmations
        except SecureRoundMissedError:
            logger.info("round %d's unmasking goes on without this collaborator", number)
            return

        post = self._post(
            current,
            Stage.UNMASK,
            lambda: Post(
                number, Stage.UNMASK, revealed=tuple(site.revealed_shares(survivors, confirmations))
            ),
        )
        logger.info(
            "round %d: %d shares revealed for the unmasking of %d survivors",
            number,
            len(post.revealed),
            len(survivors),
        )

    def _relay(self, round_number: int, stage: Stage) -> Relay:
        """The stage's relay once it closed; `SecureRoundMissedError` when it closed without this site."""
        polls = 0
        while True:
            started = time.monotonic()
            relay = self.client.get_secure_relay(round_number, stage)
            if relay.excluded:
                raise SecureRoundMissedError.excluded(round_number, stage)
            if relay.ready:
                return relay
            polls += 1
            if self._max_polls is not None and polls >= self._max_polls:
                raise SecureRoundMissedError(
                    f"round {round_number}'s {stage.name} stage stayed open through {polls} "
                    "relays asked for; this collaborator gives the round up"
                )
            pause = POLL_PAUSE_SECONDS - (time.monotonic() - started)
            if pause > 0:
                self._sleep(pause)


@contextmanager
def _too_few_is_missed() -> Iterator[None]:
    """A stage or survivor list below the threshold ends this site's part in the round, as a stage
    that closed without it does: it reveals nothing, and need not leave (the others may have)."""
    try:
        yield
    except TooFewSites as error:
        raise SecureRoundMissedError(f"{error}; waiting for the next round") from None
