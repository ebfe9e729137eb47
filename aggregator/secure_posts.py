"""The checks of what sites post to secure aggregation's stages, before anything is stored.

Each refusal is INVALID_ARGUMENT with a message a person can act on: the sender is the caller,
the advertisement's name is the caller and its certificate's, key lengths 32, the commitment 32,
the certificate parses, shares one per holder of the caller's secrets in U1 (each addressed to a
member), a confirmation over exactly U3, revealed shares only of owners the caller holds and of
the right kind for U3. Each signature is checked against the poster's own certificate (cheap: a
forged, swapped or replayed key is refused at once); whether that certificate chains to the
federation's CA is each site's to check, as it does for every peer. Whether a post comes in
time (its round, its stage open, the caller a member of the stage before) is
`foedus.aggregator.secure_stages`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from foedus.refusals.errors import InvalidRequestError
from foedus.secure import Advertisement, RevealedShare, RoundContext, SecretKind
from foedus.secure.keys import (
    advertised_bytes,
    survivors_bytes,
    verify_signature,
    x25519_problem,
)
from foedus.secure.shamir import SHARE_BYTES
from foedus.secure.wire import Post, Stage

KEY_BYTES = 32  # X25519 public keys, the seed's SHA-256 commitment
MAX_SIGNATURE_BYTES = 1024  # ECDSA P-384 takes about 104, RSA-4096 PSS 512
MAX_CERTIFICATE_BYTES = 16 * 1024
MAX_SEALED_BYTES = 1024  # a nonce, a point, two shares of SHARE_BYTES and a tag: about 180


def check_form(
    context: RoundContext,
    caller: str,
    post: Post,
    *,
    key_members: Sequence[str],
    sharers: Sequence[str],
    survivors: tuple[str, ...] | None,
    caller_keys: Advertisement | None,
) -> None:
    """Refuse a post whose content cannot be the caller's for its stage (INVALID_ARGUMENT).

    `key_members`, `sharers`, `survivors`: U1, U2 and U3 so far (empty or None: not yet known);
    `caller_keys`: the caller's accepted advertisement (its confirmation is checked against it).
    """
    if post.stage is Stage.KEYS:
        assert post.keys is not None  # the wire's form says so
        _check_advertisement(context, caller, post.keys)
    elif post.stage is Stage.SHARES:
        _check_shares(context, caller, post, key_members)
    elif post.stage is Stage.SURVIVORS:
        confirmation = post.confirmation
        assert confirmation is not None
        if confirmation.collaborator != caller:
            raise InvalidRequestError(
                f"the confirmation is signed as {confirmation.collaborator!r}; {caller} "
                "confirms as itself"
            )
        if tuple(confirmation.survivors) != survivors:
            raise InvalidRequestError(
                f"the confirmation is over {list(confirmation.survivors)}; round "
                f"{context.round_number}'s survivors are {list(survivors or ())}"
            )
        assert caller_keys is not None  # a survivor advertised its keys
        _check_signature(
            caller_keys.certificate,
            confirmation.signature,
            survivors_bytes(context, confirmation.survivors),
            "the confirmation",
        )
    else:
        _check_revealed(context, caller, post.revealed, sharers, survivors or ())


def _check_shares(context: RoundContext, caller: str, post: Post, members: Sequence[str]) -> None:
    """Refuse shares that are not one for each holder of the caller's secrets in U1."""
    holders = sorted(set(context.holders(caller)) & set(members))
    seen: set[str] = set()
    for share in post.shares:
        if share.sender != caller:
            raise InvalidRequestError(
                f"a share says it is from {share.sender!r}; {caller} posts its own shares"
            )
        if share.receiver not in members:
            raise InvalidRequestError(
                f"a share is addressed to {share.receiver!r}, not a member of round "
                f"{context.round_number}'s KEYS stage ({', '.join(members)})"
            )
        if share.receiver not in holders:
            raise InvalidRequestError(
                f"a share is addressed to {share.receiver}, which holds none of {caller}'s "
                f"secrets (its holders: {', '.join(holders)})"
            )
        if share.receiver in seen:
            raise InvalidRequestError(f"two shares are addressed to {share.receiver}")
        seen.add(share.receiver)
        if not 0 < len(share.ciphertext) <= MAX_SEALED_BYTES:
            raise InvalidRequestError(
                f"the share for {share.receiver} is {len(share.ciphertext)} bytes long; a "
                f"sealed share takes 1 to {MAX_SEALED_BYTES}"
            )
    missing = [name for name in holders if name not in seen]
    if missing:
        raise InvalidRequestError(
            f"no share for {', '.join(missing)}: {caller} posts one for each holder of its "
            f"secrets among the KEYS stage's members ({', '.join(holders)})"
        )


def _check_revealed(
    context: RoundContext,
    caller: str,
    revealed: Sequence[RevealedShare],
    sharers: Sequence[str],
    survivors: Sequence[str],
) -> None:
    """Refuse revealed shares of owners the caller does not hold, or of the wrong kind for U3."""
    owners: set[str] = set()
    for share in revealed:
        owner = share.owner
        if owner not in sharers:
            raise InvalidRequestError(
                f"a revealed share is of {owner!r}, which is not a member of round "
                f"{context.round_number}'s SHARES stage"
            )
        if caller not in context.holders(owner):
            raise InvalidRequestError(
                f"{caller} holds no share of {owner}'s secrets, so reveals none"
            )
        if owner in owners:
            raise InvalidRequestError(f"two revealed shares of {owner}'s secrets")
        owners.add(owner)
        wanted = SecretKind.SELF_MASK_SEED if owner in survivors else (SecretKind.MASK_PRIVATE_KEY)
        if share.kind is not wanted:
            why = "a survivor" if owner in survivors else "not a survivor"
            raise InvalidRequestError(
                f"the share of {owner}'s {share.kind.name} is refused: {owner} is {why}, "
                f"so only its {wanted.name} is revealed"
            )
        if len(share.share) != SHARE_BYTES:
            raise InvalidRequestError(
                f"the revealed share of {owner} is {len(share.share)} bytes long; a share "
                f"takes {SHARE_BYTES}"
            )


def _check_advertisement(context: RoundContext, caller: str, keys: Advertisement) -> None:
    """Refuse keys that cannot be `caller`'s: another name, wrong lengths, a certificate of
    another, a signature its key did not make over this round's keys."""
    if keys.collaborator != caller:
        raise InvalidRequestError(
            f"the keys are advertised as {keys.collaborator!r}'s; {caller} advertises its own"
        )
    for what, value in (
        ("encryption_key", keys.encryption_key),
        ("mask_key", keys.mask_key),
        ("seed_commitment", keys.seed_commitment),
    ):
        if len(value) != KEY_BYTES:
            raise InvalidRequestError(f"{what} is {len(value)} bytes long, not {KEY_BYTES}")
    for what, value in (("encryption_key", keys.encryption_key), ("mask_key", keys.mask_key)):
        problem = x25519_problem(value)
        if problem is not None:
            raise InvalidRequestError(f"{what} {problem}")
    certificate = _certificate(keys.certificate)
    try:
        names = [
            attribute.value
            for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ]
    except ValueError:
        names = []
    if names != [caller]:
        shown = ", ".join(map(str, names)) or "nobody"
        raise InvalidRequestError(f"the certificate is issued to {shown}, not to {caller}")
    _check_signature(keys.certificate, keys.signature, advertised_bytes(context, keys), "the keys")


def _certificate(der: bytes) -> x509.Certificate:
    if not 0 < len(der) <= MAX_CERTIFICATE_BYTES:
        raise InvalidRequestError(
            f"the certificate is {len(der)} bytes long; 1 to {MAX_CERTIFICATE_BYTES} are taken"
        )
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as error:
        raise InvalidRequestError(f"the certificate is not DER X.509: {error}") from None


def _check_signature(certificate_der: bytes, signature: bytes, data: bytes, what: str) -> None:
    """Refuse a signature that the certificate's key did not make over `data` (its chain to
    the federation's CA is the sites' to check)."""
    if not 0 < len(signature) <= MAX_SIGNATURE_BYTES:
        raise InvalidRequestError(
            f"{what}' signature is {len(signature)} bytes long; 1 to {MAX_SIGNATURE_BYTES} "
            "are taken"
        )
    key = _certificate(certificate_der).public_key()
    if not isinstance(key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
        raise InvalidRequestError(
            f"the certificate's key ({type(key).__name__}) cannot sign: ECDSA or RSA is taken"
        )
    if not verify_signature(key, signature, data):
        raise InvalidRequestError(
            f"{what}' signature is not its certificate's over this federation's round (forged, "
            "or of another round or federation)"
        )
