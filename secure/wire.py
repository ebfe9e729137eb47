"""Secure aggregation's messages from and to aggregator.proto, once, for both ends.

The aggregator's servicer and the collaborator's client both convert with these, so a field
added to the proto is added here and nowhere else. A `Post` is what a site sends for one stage
(`PostSecureMessage`), a `Relay` what the aggregator hands out once a stage has closed
(`GetSecureRelay`). Conversion and form only: a message whose stage is unknown, or that carries
another stage's fields, is `MalformedMessage`; whether its content fits the round is each
side's to judge (the aggregator's stages, the site's `foedus.secure.site.SiteRound`).

`post_bytes` is what the aggregator stores of a post: the proto's own serialization of the
post without its header (deterministic: the same post gives the same bytes, which is how a
resend is recognised), read back by `post_from_bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from google.protobuf.message import DecodeError

from foedus.protos import aggregator_pb2
from foedus.secure import (
    Advertisement,
    RevealedShare,
    SealedShare,
    SecretKind,
    SurvivorConfirmation,
)


class MalformedMessage(ValueError):  # noqa: N818 (a message, as ProtocolViolation is)
    """A secure message that is not one of the protocol's forms; the message says what is wrong."""


class Stage(IntEnum):
    """A round's secure stages, in order; the values are aggregator.proto's `SecureStage`."""

    KEYS = aggregator_pb2.SECURE_KEYS
    SHARES = aggregator_pb2.SECURE_SHARES
    SURVIVORS = aggregator_pb2.SECURE_SURVIVORS
    UNMASK = aggregator_pb2.SECURE_UNMASK


@dataclass(frozen=True)
class Post:
    """What one site posts for one stage of one round: the stage's field only."""

    round_number: int
    stage: Stage
    keys: Advertisement | None = None  # KEYS
    shares: tuple[SealedShare, ...] = ()  # SHARES: one for each holder of the sender's secrets
    confirmation: SurvivorConfirmation | None = None  # SURVIVORS
    revealed: tuple[RevealedShare, ...] = ()  # UNMASK


@dataclass(frozen=True)
class Relay:
    """What the aggregator relays of a closed stage to one site (`ready` False: still open)."""

    round_number: int
    stage: Stage
    ready: bool
    excluded: bool = False  # the stage closed without the caller: no part in the rest of the round
    members: tuple[str, ...] = ()  # who the stage closed with, sorted
    keys: tuple[Advertisement, ...] = ()  # KEYS: the members' advertisements
    shares: tuple[SealedShare, ...] = ()  # SHARES: the members' shares for the caller
    confirmations: tuple[SurvivorConfirmation, ...] = ()  # UNMASK: the survivors' signatures


# -- records -----------------------------------------------------------------------------------


def advertisement_to_proto(advertisement: Advertisement) -> aggregator_pb2.KeyAdvertisement:
    """The wire form of a site's signed keys."""
    return aggregator_pb2.KeyAdvertisement(
        collaborator=advertisement.collaborator,
        encryption_key=advertisement.encryption_key,
        mask_key=advertisement.mask_key,
        seed_commitment=advertisement.seed_commitment,
        certificate=advertisement.certificate,
        signature=advertisement.signature,
    )


def advertisement_from_proto(message: aggregator_pb2.KeyAdvertisement) -> Advertisement:
    """A site's signed keys as received."""
    return Advertisement(
        collaborator=message.collaborator,
        encryption_key=message.encryption_key,
        mask_key=message.mask_key,
        seed_commitment=message.seed_commitment,
        certificate=message.certificate,
        signature=message.signature,
    )


def share_to_proto(share: SealedShare) -> aggregator_pb2.SealedShare:
    """The wire form of one sealed share."""
    return aggregator_pb2.SealedShare(
        sender=share.sender, receiver=share.receiver, ciphertext=share.ciphertext
    )


def share_from_proto(message: aggregator_pb2.SealedShare) -> SealedShare:
    """One sealed share as received."""
    return SealedShare(
        sender=message.sender, receiver=message.receiver, ciphertext=message.ciphertext
    )


def confirmation_to_proto(
    confirmation: SurvivorConfirmation, *, with_survivors: bool = True
) -> aggregator_pb2.SurvivorConfirmation:
    """The wire form of a survivor's signature of the survivors; `with_survivors` False: the
    signature alone, the list left to the receiver (`relay_to_proto`)."""
    return aggregator_pb2.SurvivorConfirmation(
        collaborator=confirmation.collaborator,
        survivors=list(confirmation.survivors) if with_survivors else [],
        signature=confirmation.signature,
    )


def confirmation_from_proto(
    message: aggregator_pb2.SurvivorConfirmation,
) -> SurvivorConfirmation:
    """A survivor's signature of the survivors as received."""
    return SurvivorConfirmation(
        collaborator=message.collaborator,
        survivors=tuple(message.survivors),
        signature=message.signature,
    )


def revealed_to_proto(revealed: RevealedShare) -> aggregator_pb2.RevealedShare:
    """The wire form of one revealed share."""
    return aggregator_pb2.RevealedShare(
        owner=revealed.owner,
        kind=revealed.kind.name,
        share=revealed.share,
    )


def revealed_from_proto(message: aggregator_pb2.RevealedShare) -> RevealedShare:
    """One revealed share as received; `MalformedMessage` for a kind that is not one."""
    try:
        kind = SecretKind(int(message.kind))
    except ValueError:
        raise MalformedMessage(
            f"revealed share of {message.owner!r}: secret kind {int(message.kind)} is neither "
            "SELF_MASK_SEED nor MASK_PRIVATE_KEY"
        ) from None
    return RevealedShare(owner=message.owner, kind=kind, share=message.share)


# -- posts -------------------------------------------------------------------------------------


def post_to_proto(
    post: Post, header: aggregator_pb2.MessageHeader | None = None
) -> aggregator_pb2.SecureMessage:
    """The `SecureMessage` of a post, with `header` (none: the stored form)."""
    message = aggregator_pb2.SecureMessage(
        round_number=post.round_number,
        stage=_STAGE_NAMES[post.stage],
        shares=[share_to_proto(share) for share in post.shares],
        revealed=[revealed_to_proto(share) for share in post.revealed],
    )
    if header is not None:
        message.header.CopyFrom(header)
    if post.keys is not None:
        message.keys.CopyFrom(advertisement_to_proto(post.keys))
    if post.confirmation is not None:
        message.confirmation.CopyFrom(confirmation_to_proto(post.confirmation))
    return message


def post_from_proto(message: aggregator_pb2.SecureMessage) -> Post:
    """The post a `SecureMessage` carries; `MalformedMessage` unless it carries its stage's field
    and no other stage's."""
    stage = _stage(int(message.stage))
    carried = {
        Stage.KEYS: message.HasField("keys"),
        Stage.SHARES: len(message.shares) > 0,
        Stage.SURVIVORS: message.HasField("confirmation"),
        Stage.UNMASK: len(message.revealed) > 0,
    }
    others = [other.name for other, present in carried.items() if present and other != stage]
    if others:
        raise MalformedMessage(
            f"a {stage.name} message carries the field(s) of {', '.join(others)} too"
        )
    # An UNMASK post may reveal nothing (a survivor whose shares all failed to open holds none).
    if not carried[stage] and stage is not Stage.UNMASK:
        raise MalformedMessage(f"a {stage.name} message without its {_FIELDS[stage]}")
    return Post(
        round_number=message.round_number,
        stage=stage,
        keys=advertisement_from_proto(message.keys) if stage is Stage.KEYS else None,
        shares=tuple(share_from_proto(share) for share in message.shares),
        confirmation=(
            confirmation_from_proto(message.confirmation) if stage is Stage.SURVIVORS else None
        ),
        revealed=tuple(revealed_from_proto(share) for share in message.revealed),
    )


def post_bytes(post: Post) -> bytes:
    """What the aggregator keeps of a post: its message without the header, serialized
    deterministically (equal posts, equal bytes)."""
    return post_to_proto(post).SerializeToString(deterministic=True)


def post_from_bytes(data: bytes) -> Post:
    """A post kept as `post_bytes` wrote it; `MalformedMessage` if it is not one."""
    message = aggregator_pb2.SecureMessage()
    try:
        message.ParseFromString(data)
    except DecodeError as error:
        raise MalformedMessage(f"not a secure message: {error}") from None
    return post_from_proto(message)


# -- relays ------------------------------------------------------------------------------------


def relay_to_proto(
    relay: Relay, header: aggregator_pb2.MessageHeader | None = None
) -> aggregator_pb2.SecureRelay:
    """The `SecureRelay` of a relay, with `header`.

    UNMASK's confirmations go without their survivor lists: a site can use only those that
    signed the list the SURVIVORS relay named, which it holds and verifies each signature
    against (`foedus.secure.site.SiteRound.revealed_shares`). With the lists, every site's
    relay carried every survivor's copy of the whole list: quadratic in the sites (a 300-site
    round's UNMASK relay was 938 kB, 38 kB without them).
    """
    message = aggregator_pb2.SecureRelay(
        round_number=relay.round_number,
        stage=_STAGE_NAMES[relay.stage],
        ready=relay.ready,
        excluded=relay.excluded,
        members=list(relay.members),
        keys=[advertisement_to_proto(keys) for keys in relay.keys],
        shares=[share_to_proto(share) for share in relay.shares],
        confirmations=[
            confirmation_to_proto(item, with_survivors=False) for item in relay.confirmations
        ],
    )
    if header is not None:
        message.header.CopyFrom(header)
    return message


def relay_from_proto(message: aggregator_pb2.SecureRelay) -> Relay:
    """The relay a `SecureRelay` carries; `MalformedMessage` for an unknown stage."""
    return Relay(
        round_number=message.round_number,
        stage=_stage(int(message.stage)),
        ready=message.ready,
        excluded=message.excluded,
        members=tuple(message.members),
        keys=tuple(advertisement_from_proto(keys) for keys in message.keys),
        shares=tuple(share_from_proto(share) for share in message.shares),
        confirmations=tuple(confirmation_from_proto(item) for item in message.confirmations),
    )


def relay_request_to_proto(
    round_number: int, stage: Stage, header: aggregator_pb2.MessageHeader | None = None
) -> aggregator_pb2.SecureRelayRequest:
    """The `SecureRelayRequest` for `stage` of `round_number`."""
    request = aggregator_pb2.SecureRelayRequest(
        round_number=round_number, stage=_STAGE_NAMES[stage]
    )
    if header is not None:
        request.header.CopyFrom(header)
    return request


def relay_request_from_proto(request: aggregator_pb2.SecureRelayRequest) -> tuple[int, Stage]:
    """(round, stage) a `SecureRelayRequest` asks for; `MalformedMessage` for an unknown stage."""
    return request.round_number, _stage(int(request.stage))


_STAGE_NAMES = {
    Stage.KEYS: "SECURE_KEYS",
    Stage.SHARES: "SECURE_SHARES",
    Stage.SURVIVORS: "SECURE_SURVIVORS",
    Stage.UNMASK: "SECURE_UNMASK",
}
_FIELDS = {
    Stage.KEYS: "keys",
    Stage.SHARES: "shares",
    Stage.SURVIVORS: "confirmation",
    Stage.UNMASK: "revealed",
}


def _stage(value: int) -> Stage:
    try:
        return Stage(value)
    except ValueError:
        raise MalformedMessage(
            f"stage {value} is not a secure stage (SECURE_KEYS, SECURE_SHARES, "
            "SECURE_SURVIVORS or SECURE_UNMASK)"
        ) from None
