"""The policy guard: only a bundle the controller signed, still valid and newer, is enforced.

A network attacker who can answer the agent's policy pull must not be able to redirect the
farm's hashrate, so every bundle is checked against the controller's Ed25519 key pinned at
enrollment before anything reads its content. A refused bundle changes nothing: the last valid
one stays in force (also across restarts: it is persisted in ``data_dir/policy.json`` and
verified again on load) and one ``policy_refused`` event tells the controller why.

An expired *stored* bundle is still enforced (with a warning): the agent must keep the farm on
its approved pools while the controller is unreachable. An expired *offered* bundle is refused:
it may be a replay.
"""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from agent.config import atomic_write
from agent.drivers.base import utcnow
from agent.errors import AgentError, ConfigError
from contract.enforcement import EnforcementEvent
from contract.policy import PolicyBundle
from contract.reports import Event, EventSeverity

log = logging.getLogger(__name__)

POLICY_FILE = "policy.json"
POLICY_FILE_MODE = 0o600


class RefusalReason(StrEnum):
    """Why a bundle was refused (``Event.data["reason"]`` of a ``policy_refused`` event)."""

    UNSIGNED = "unsigned"
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"
    OLDER = "older_version"
    CONFLICT = "same_version_different_content"
    WRONG_SITE = "wrong_site"


class PolicyRefused(AgentError):
    """A bundle failed verification; the last valid bundle stays in force.

    ``event`` is the alert for the controller; ``repeated`` is True when the very same bundle
    was already refused for the same reason (the alert was sent then; do not send it again).
    """

    def __init__(
        self, reason: RefusalReason, message: str, *, event: Event, repeated: bool = False
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.event = event
        self.repeated = repeated


def policy_path(data_dir: Path) -> Path:
    return data_dir / POLICY_FILE


def signature_valid(public_key: Ed25519PublicKey, bundle: PolicyBundle) -> bool:
    """Whether ``bundle.signature`` is the key's Ed25519 signature over its signing bytes."""
    if not bundle.signature:
        return False
    try:
        public_key.verify(base64.b64decode(bundle.signature, validate=True), bundle.signing_bytes())
    except (InvalidSignature, ValueError, binascii.Error):
        return False
    return True


def load_public_key(public_key_b64: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(public_key_b64, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, binascii.Error):
        raise ConfigError(
            "controller.public_key: not a base64 Ed25519 public key (32 bytes)"
        ) from None


@dataclass(frozen=True)
class _Refusal:
    reason: RefusalReason
    version: int
    signature: str | None


class PolicyGuard:
    """Verifies offered bundles and keeps the last valid one (in memory and on disk)."""

    def __init__(self, public_key_b64: str, path: Path, *, site: str | None = None) -> None:
        self.public_key = load_public_key(public_key_b64)
        self.path = path
        self.site = site
        self._current: PolicyBundle | None = None
        self._last_refusal: _Refusal | None = None
        self.stored_refusal: str | None = None
        """Why the stored bundle was ignored on load (None when there was none, or it is used)."""
        self._current = self._load()

    @property
    def current(self) -> PolicyBundle | None:
        """The bundle in force (possibly expired: see the module docstring), or None."""
        return self._current

    def expired(self, now: datetime | None = None) -> bool:
        current = self._current
        return current is not None and current.expires_at <= (now or utcnow())

    def _load(self) -> PolicyBundle | None:
        """The stored bundle, verified again (the file may have been edited, or copied from
        another agent's data dir since); why it is ignored goes to ``stored_refusal``."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            return self._ignore(f"cannot read the stored policy: {exc.strerror}")
        try:
            bundle = PolicyBundle.model_validate_json(raw)
        except ValidationError:
            return self._ignore("the stored policy is not a policy bundle")
        if not signature_valid(self.public_key, bundle):
            return self._ignore(
                f"the stored policy version {bundle.version} fails signature verification "
                "(edited, or signed by another controller key)"
            )
        if self.site is not None and bundle.content.site != self.site:
            return self._ignore(
                f"the stored policy version {bundle.version} is for site "
                f"{bundle.content.site!r}, this agent serves {self.site!r} (copied from "
                "another agent?)"
            )
        if bundle.expires_at <= utcnow():
            log.warning(
                "stored policy version %d expired at %s; enforcing it until the controller "
                "sends a newer one",
                bundle.version,
                bundle.expires_at.isoformat(),
            )
        return bundle

    def _ignore(self, why: str) -> PolicyBundle | None:
        """Record and log why the stored bundle is not used; always None (no bundle)."""
        self.stored_refusal = f"{self.path}: {why}; ignoring it"
        log.error("%s", self.stored_refusal)
        return None

    def accept(self, bundle: PolicyBundle, now: datetime | None = None) -> PolicyBundle:
        """Return the bundle now in force after offering ``bundle``, or raise PolicyRefused.

        Refused: unsigned; bad signature (tampered); expired (``expires_at <= now``); for
        another site; older than the bundle in force; same version with different content.
        Accepted: a newer version, or the same version and content with a later expiry (a
        refresh). The same bundle offered again changes nothing.
        """
        now = now or utcnow()
        current = self._current
        if not bundle.signature:
            self._refuse(bundle, RefusalReason.UNSIGNED, "the bundle is not signed", now)
        if not signature_valid(self.public_key, bundle):
            self._refuse(
                bundle,
                RefusalReason.BAD_SIGNATURE,
                "the signature does not match the controller's pinned key (tampered in "
                "transit, or signed by another key)",
                now,
            )
        if bundle.expires_at <= now:
            self._refuse(
                bundle,
                RefusalReason.EXPIRED,
                f"the bundle expired at {bundle.expires_at.isoformat()}",
                now,
            )
        if self.site is not None and bundle.content.site != self.site:
            self._refuse(
                bundle,
                RefusalReason.WRONG_SITE,
                f"the bundle is for site {bundle.content.site!r}, this agent serves {self.site!r}",
                now,
            )
        if current is not None:
            if bundle.version < current.version:
                self._refuse(
                    bundle,
                    RefusalReason.OLDER,
                    f"version {bundle.version} is older than version {current.version} in force",
                    now,
                )
            if bundle.version == current.version:
                if bundle.content != current.content:
                    self._refuse(
                        bundle,
                        RefusalReason.CONFLICT,
                        f"version {bundle.version} is already in force with different content",
                        now,
                    )
                if bundle.expires_at <= current.expires_at:
                    return current  # the same bundle again (or an earlier expiry): nothing new
        self._store(bundle)
        self._current = bundle
        self._last_refusal = None
        if current is None or bundle.version != current.version:
            log.info(
                "policy version %d accepted (%s mode, expires %s)",
                bundle.version,
                bundle.content.mode,
                bundle.expires_at.isoformat(),
            )
        return bundle

    def _store(self, bundle: PolicyBundle) -> None:
        atomic_write(self.path, bundle.model_dump_json().encode(), POLICY_FILE_MODE)

    def _refuse(self, bundle: PolicyBundle, reason: RefusalReason, why: str, now: datetime) -> None:
        kept = self._current.version if self._current is not None else None
        key = _Refusal(reason, bundle.version, bundle.signature)
        repeated = key == self._last_refusal
        self._last_refusal = key
        keeping = f"keeping version {kept}" if kept is not None else "no valid policy yet"
        message = f"policy version {bundle.version} refused: {why}; {keeping}"
        event = Event(
            kind=EnforcementEvent.POLICY_REFUSED.value,
            at=now,
            severity=EventSeverity.CRITICAL,
            detail=message,
            data={
                "reason": reason.value,
                "detail": why,
                "offered_version": bundle.version,
                "kept_version": kept,
            },
        )
        if not repeated:
            log.critical("%s", message)
        raise PolicyRefused(reason, message, event=event, repeated=repeated)
