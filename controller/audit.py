"""The append-only, hash-chained audit log.

Every change made by a person or an agent is appended here in the same transaction as
the change itself. Each entry's hash covers its content and the previous entry's hash,
so modifying, deleting or reordering entries breaks the chain; ``verify`` recomputes it
from the entries (never trusting stored hashes) and names the first bad entry.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlmodel import Session, col, select

from controller.models import AuditEntry, utcnow

GENESIS = "0" * 64


def entry_digest(
    *,
    seq: int,
    at: datetime,
    actor: str,
    actor_kind: str,
    action: str,
    entity: str,
    entity_id: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    source: str,
    reason: str,
    prev_hash: str,
) -> str:
    """SHA-256 over a canonical JSON form of the entry's content and its predecessor's hash."""
    payload = {
        "seq": seq,
        "at": at.isoformat(timespec="microseconds"),
        "actor": actor,
        "actor_kind": actor_kind,
        "action": action,
        "entity": entity,
        "entity_id": entity_id,
        "before": before,
        "after": after,
        "source": source,
        "reason": reason,
        "prev_hash": prev_hash,
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def record(
    session: Session,
    *,
    actor: str,
    actor_kind: str,
    action: str,
    entity: str,
    entity_id: str = "",
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    source: str = "",
    reason: str = "",
) -> AuditEntry:
    """Append one entry in the caller's transaction (it commits or rolls back with the change)."""
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        # Serialise appenders across replicas so ``seq`` stays gapless and the chain linear.
        session.execute(text("SELECT pg_advisory_xact_lock(741852963)"))
    last = session.exec(select(AuditEntry).order_by(col(AuditEntry.seq).desc()).limit(1)).first()
    seq = 1 if last is None else last.seq + 1
    prev_hash = GENESIS if last is None else last.hash
    at = utcnow()
    before = _jsonable(before)
    after = _jsonable(after)
    digest = entry_digest(
        seq=seq,
        at=at,
        actor=actor,
        actor_kind=actor_kind,
        action=action,
        entity=entity,
        entity_id=entity_id,
        before=before,
        after=after,
        source=source,
        reason=reason,
        prev_hash=prev_hash,
    )
    entry = AuditEntry(
        seq=seq,
        at=at,
        actor=actor,
        actor_kind=actor_kind,
        action=action,
        entity=entity,
        entity_id=entity_id,
        before=before,
        after=after,
        source=source,
        reason=reason,
        prev_hash=prev_hash,
        hash=digest,
    )
    session.add(entry)
    session.flush()
    return entry


def _jsonable(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """Round-trip through JSON so that what is hashed is exactly what the database stores."""
    if value is None:
        return None
    result: dict[str, Any] = json.loads(json.dumps(value, default=str))
    return result
