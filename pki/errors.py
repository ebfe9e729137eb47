"""Errors raised by the pki package; each message is one line naming the file or field at fault."""


class PkiError(Exception):
    """Base of every pki error, so a caller can catch bad certificate input in one place."""


class CertificateRequestError(PkiError):
    """A name, address or request content is not acceptable for a certificate."""


class SigningError(PkiError):
    """A certificate signing request was refused by the signer."""


class FingerprintError(SigningError):
    """A fingerprint is malformed or does not match the request it should identify."""


class PemFileError(PkiError):
    """A certificate, request or bundle file is missing, unreadable or of the wrong kind."""


class KeyFileError(PemFileError):
    """A private key file is missing, unreadable, exposed to other users or would be overwritten."""


class CertificateValidityError(PkiError):
    """A certificate of our own is expired or not yet valid: peers would refuse it in the handshake."""


class MissingTLSFileError(PemFileError):
    """A file the TLS credentials need is absent (`absent`) or cannot be read."""

    def __init__(self, message: str, *, absent: bool) -> None:
        super().__init__(message)
        self.absent = absent
