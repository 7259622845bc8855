"""The controller's Ed25519 signing key: it signs policy bundles; agents pin its public key.

The key is created on first use in the data directory as a PKCS#8 PEM file readable by the
owner only. A key file that group or others can read (or write) is refused rather than used:
whoever can read it can sign policy bundles that redirect the farm's hashrate. Replicas of the
controller behind a load balancer must share the same key file.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from contract.policy import PolicyBundle
from controller.errors import ControllerError

KEY_FILENAME = "controller-signing-key.pem"


class SigningKeyError(ControllerError):
    """The signing key cannot be used safely (loose permissions, unreadable, not Ed25519)."""


@dataclass(frozen=True)
class SigningKey:
    """The controller's private key, with the operations the rest of the controller needs."""

    private: Ed25519PrivateKey
    path: Path

    def public_key_b64(self) -> str:
        """The public key as base64 of its raw 32 bytes (what EnrollmentResponse carries)."""
        raw = self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return base64.b64encode(raw).decode()

    def sign(self, data: bytes) -> str:
        """A base64 Ed25519 signature over ``data``."""
        return base64.b64encode(self.private.sign(data)).decode()

    def sign_bundle(self, bundle: PolicyBundle) -> PolicyBundle:
        """``bundle`` with its signature over ``signing_bytes()`` filled in."""
        return bundle.model_copy(update={"signature": self.sign(bundle.signing_bytes())})


def key_path(data_dir: Path) -> Path:
    return data_dir / KEY_FILENAME


def permission_problem(mode: int) -> str | None:
    """Why a key file with this ``st_mode`` must not be used, or None (pure)."""
    if not stat.S_ISREG(mode):
        return "is not a regular file"
    loose = stat.S_IMODE(mode) & 0o077
    if loose:
        return (
            f"has mode {stat.S_IMODE(mode):04o}; group/others must have no access "
            "(anyone who can read it can sign policy bundles)"
        )
    return None


def load_or_create(data_dir: Path) -> SigningKey:
    """The key in ``data_dir``, generating it (mode 0600) if there is none yet."""
    path = key_path(data_dir)
    if not path.exists():
        _create(path)
    return load(path)


def load(path: Path) -> SigningKey:
    """Load a key file after checking that only its owner can read it."""
    try:
        mode = os.lstat(path).st_mode
    except OSError as exc:
        raise SigningKeyError(f"signing key {path}: {exc.strerror}") from None
    if problem := permission_problem(mode):
        raise SigningKeyError(f"refusing signing key {path}: it {problem}; run: chmod 600 {path}")
    try:
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SigningKeyError(f"signing key {path} cannot be read: {exc}") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise SigningKeyError(f"signing key {path} is not an Ed25519 private key")
    return SigningKey(private=private, path=path)


def verify(public_key_b64: str, data: bytes, signature_b64: str) -> bool:
    """Check a signature the way an agent would (raw public key, base64 signature)."""
    try:
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64))
        public.verify(base64.b64decode(signature_b64), data)
    except (InvalidSignature, ValueError):
        return False
    return True


def _create(path: Path) -> None:
    """Write a new key atomically: a 0600 temp file hard-linked into place (first writer wins)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileExistsError):  # another process was first: use theirs
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
