"""Key types and small key helpers shared by the CA, the signer and TLS loading."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

# foedus makes only P-384 keys, but accepts RSA keys that a participant brings itself.
PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

ALLOWED_CURVES = ("secp256r1", "secp384r1", "secp521r1")
MIN_RSA_BITS = 2048


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    """Make a new ECDSA P-384 key, the one key type foedus generates for CAs and participants."""
    return ec.generate_private_key(ec.SECP384R1())


def signature_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384 | hashes.SHA512:
    """Pick the hash that matches the key's strength, as TLS libraries expect (P-384 with SHA-384)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.key_size > 384:
            return hashes.SHA512()
        if key.curve.key_size > 256:
            return hashes.SHA384()
    return hashes.SHA256()


def public_key_problem(key: object) -> str | None:
    """Say why a public key is unacceptable for a foedus certificate, or None when it is fine."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ALLOWED_CURVES:
            return f"EC curve {key.curve.name} is not allowed (use P-256, P-384 or P-521)"
        return None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            return f"RSA key of {key.key_size} bits is too small (at least {MIN_RSA_BITS})"
        return None
    return f"{type(key).__name__} keys are not supported (use ECDSA P-384)"


def public_key_der(key: PrivateKey | PublicKey) -> bytes:
    """DER SubjectPublicKeyInfo of a key, the form in which two keys are compared."""
    public = (
        key.public_key()
        if isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey))
        else key
    )
    return public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_matches_certificate(key: PrivateKey, cert: x509.Certificate) -> bool:
    """True when cert certifies key's public half, so a mismatched pair is caught before TLS sees it."""
    cert_key = cert.public_key()
    if not isinstance(cert_key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
        return False
    return public_key_der(key) == public_key_der(cert_key)
