"""Keys and signatures of a secure round: what a site signs, how a peer's certificate is checked,
and the symmetric keys two sites agree on.

A site signs its advertisement and its survivor confirmation with its certificate's private key
(ECDSA with SHA-256, deterministic as RFC 6979 has it, so a restarted site posts the very same
bytes again; RSA keys with PSS and SHA-256). Every peer's certificate must chain to the
federation's CA, be valid now, carry the name it signs for, a name of the plan, and not be marked
for another role (a person's certificate named like a site signs nothing; an unmarked one is
taken with the warning `foedus.pki.roles.role_refusal` gives everywhere).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509 import verification

from foedus.pki.ca import utc_now
from foedus.pki.keys import PrivateKey, PublicKey, public_key_problem
from foedus.pki.requests import Role
from foedus.pki.roles import PeerCertificate, role_mark, role_refusal
from foedus.secure.context import RoundContext, framed, text
from foedus.secure.errors import ProtocolViolation
from foedus.secure.records import Advertisement, SealedShare, SurvivorConfirmation

__all__ = [
    "KEY_BYTES",
    "Advertisement",
    "SealedShare",
    "SurvivorConfirmation",
    "advertised_bytes",
    "agreed_key",
    "mask_agreement",
    "seed_commitment",
    "self_mask_key",
    "share_agreement",
    "sign",
    "survivors_bytes",
    "verify_advertisement",
    "verify_advertisements",
    "verify_certificate",
    "verify_signature",
    "x25519_problem",
]

KEY_BYTES = 32  # X25519 keys, seeds, derived keys and commitments


def advertised_bytes(context: RoundContext, advertisement: Advertisement) -> bytes:
    """What an advertisement's signature covers: the round's label, the name and the three keys."""
    return framed(
        context.label,
        b"keys",
        text(advertisement.collaborator),
        advertisement.encryption_key,
        advertisement.mask_key,
        advertisement.seed_commitment,
    )


def survivors_bytes(context: RoundContext, survivors: Sequence[str]) -> bytes:
    """What a survivor confirmation's signature covers: the round's label and the list, sorted."""
    return framed(context.label, b"survivors", *(text(name) for name in sorted(survivors)))


def seed_commitment(context: RoundContext, name: str, seed: bytes) -> bytes:
    """`SHA-256(label | name | seed)`: binds a site to its self-mask seed before any mask is made."""
    return hashlib.sha256(framed(context.label, b"seed", text(name), seed)).digest()


def sign(private_key: PrivateKey, data: bytes) -> bytes:
    """A signature of `data` by a certificate's key: deterministic ECDSA/SHA-256, or RSA-PSS/SHA-256."""
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        return private_key.sign(data, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    return private_key.sign(data, _pss(), hashes.SHA256())


def _pss() -> padding.PSS:
    # The salt's length fixed (the digest's): a site's signatures stay the same bytes on a resend.
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)


def verify_signature(public_key: PublicKey, signature: bytes, data: bytes) -> bool:
    """Whether `signature` is `public_key`'s over `data` (as `sign` makes them)."""
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        else:
            public_key.verify(
                signature,
                data,
                padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO),
                hashes.SHA256(),
            )
    except InvalidSignature:
        return False
    return True


def verify_certificate(
    context: RoundContext,
    name: str,
    certificate_der: bytes,
    ca_certificates: Sequence[x509.Certificate],
) -> PublicKey:
    """The public key of `name`'s certificate once it passes every check; else ProtocolViolation.

    `ca_certificates` is the federation's CA bundle (the signing CA and the root, as `pki` writes
    `cert_chain.crt`). The certificate must chain to it and be valid now, name `name` (a
    collaborator of the plan), carry an acceptable key, and not be marked for another role.
    """
    if name not in context.collaborators:
        raise ProtocolViolation(f"site {name!r} is not a collaborator of the plan")
    try:
        certificate = x509.load_der_x509_certificate(certificate_der)
    except ValueError as error:
        raise ProtocolViolation(
            f"site {name!r}: its certificate does not parse ({error})"
        ) from None
    try:
        names = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    except ValueError:
        names = []
    common_name = names[0].value if len(names) == 1 else None
    if common_name != name:
        raise ProtocolViolation(
            f"site {name!r}: its certificate is issued to {common_name!r}, not to {name!r}"
        )
    refusal = role_refusal(
        PeerCertificate(role_mark(certificate), hashlib.sha256(certificate_der).hexdigest()),
        name=name,
        expected=Role.COLLABORATOR,
        listed_as="the plan's collaborators",
        reissue=f"pki certify --role collaborator --name {name}",
    )
    if refusal is not None:
        raise ProtocolViolation(f"site {name!r}: {refusal}")
    try:
        verifier = (
            verification.PolicyBuilder()
            .store(verification.Store(list(ca_certificates)))
            .time(utc_now())
            .build_client_verifier()
        )
        verifier.verify(certificate, [])
    except (verification.VerificationError, ValueError) as error:
        raise ProtocolViolation(
            f"site {name!r}: its certificate fails verification against the federation's CA "
            f"({error})"
        ) from None
    public_key = certificate.public_key()
    problem = public_key_problem(public_key)
    if problem is not None or not isinstance(
        public_key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)
    ):
        raise ProtocolViolation(f"site {name!r}: its certificate's key cannot sign ({problem})")
    return public_key


def verify_advertisement(
    context: RoundContext,
    advertisement: Advertisement,
    ca_certificates: Sequence[x509.Certificate],
) -> PublicKey:
    """The signer's public key of an advertisement that passes every check (its certificate, its
    keys' lengths, its signature over this round); else ProtocolViolation."""
    name = advertisement.collaborator
    public_key = verify_certificate(context, name, advertisement.certificate, ca_certificates)
    if len(advertisement.seed_commitment) != KEY_BYTES:
        raise ProtocolViolation(
            f"site {name!r}: its advertised seed commitment is not {KEY_BYTES} bytes long"
        )
    for field in ("encryption_key", "mask_key"):
        problem = x25519_problem(getattr(advertisement, field))
        if problem is not None:
            raise ProtocolViolation(
                f"site {name!r}: its advertised {field.replace('_', ' ')} {problem}"
            )
    if not verify_signature(
        public_key, advertisement.signature, advertised_bytes(context, advertisement)
    ):
        raise ProtocolViolation(
            f"site {name!r}: its advertised keys are not signed by its certificate for "
            f"federation {context.federation_uuid} round {context.round_number} (swapped, "
            "forged or replayed keys)"
        )
    return public_key


def verify_advertisements(
    context: RoundContext,
    advertisements: Iterable[Advertisement],
    ca_certificates: Sequence[x509.Certificate],
) -> dict[str, Advertisement]:
    """Every advertisement checked (`verify_advertisement`), by name, each name once; else
    ProtocolViolation."""
    verified: dict[str, Advertisement] = {}
    for advertisement in advertisements:
        name = advertisement.collaborator
        if name in verified:
            raise ProtocolViolation(f"the aggregator relayed two advertisements of site {name!r}")
        verify_advertisement(context, advertisement, ca_certificates)
        verified[name] = advertisement
    return verified


def x25519_problem(public_key: bytes) -> str | None:
    """Why a raw X25519 public key agrees no secret with anyone (its length, a low-order point),
    or None; the aggregator may refuse such a key at KEYS, before any site has to."""
    if len(public_key) != KEY_BYTES:
        return f"is not {KEY_BYTES} bytes long"
    try:
        x25519.X25519PrivateKey.generate().exchange(
            x25519.X25519PublicKey.from_public_bytes(public_key)
        )
    except ValueError:
        return "is a low-order point: it agrees no secret"
    return None


def agreed_key(private_key: bytes, peer_public_key: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 (32 bytes, `info`) of the X25519 secret of `private_key` and a peer's public key.

    Raises ValueError when the peer's key gives no secret (a low-order point).
    """
    secret = x25519.X25519PrivateKey.from_private_bytes(private_key).exchange(
        x25519.X25519PublicKey.from_public_bytes(peer_public_key)
    )
    return derive(secret, info)


def derive(secret: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 of `secret` under `info`, 32 bytes, no salt (every info starts with the label)."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def share_agreement(context: RoundContext, sender: str, receiver: str) -> bytes:
    """The HKDF info of the key `sender`'s shares for `receiver` are sealed under."""
    return framed(context.label, b"share", text(sender), text(receiver))


def share_associated_data(context: RoundContext, sender: str, receiver: str) -> bytes:
    """The AES-GCM associated data of a sealed share: the label, its sender and its receiver."""
    return framed(context.label, text(sender), text(receiver))


def mask_agreement(context: RoundContext, one: str, other: str) -> bytes:
    """The HKDF info of the pairwise mask key of two sites (the same from either side)."""
    low, high = sorted((one, other))
    return framed(context.label, b"mask", text(low), text(high))


def self_mask_key(context: RoundContext, name: str, seed: bytes) -> bytes:
    """The AES key of `name`'s self-mask: HKDF(seed, label | "self" | name)."""
    return derive(seed, framed(context.label, b"self", text(name)))


def public_key_of(private_key: bytes) -> bytes:
    """The raw X25519 public key of raw private bytes."""
    return x25519.X25519PrivateKey.from_private_bytes(private_key).public_key().public_bytes_raw()
