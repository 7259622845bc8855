"""The append-only, hash-chained audit log.

Every change made by a person or an agent is audited atomically with the change itself.
Each entry's hash covers its content and the previous entry's hash, so modifying, deleting
or reordering entries breaks the chain; ``verify`` recomputes it from the entries (never
trusting stored hashes) and names the first bad entry.

Why entries are appended at commit, not when recorded: the chain is linear (entry ``n``
links to entry ``n - 1``), so appending needs the head, and the head must not move until
the appending transaction ends. Taking that lock when :func:`record` is called would hold
it for the rest of the caller's transaction (a whole ingest batch), serialising every
controller replica behind one lock. Instead :func:`record` only buffers the entry in the
session; a ``before_commit`` hook appends the buffered entries right before ``COMMIT``:
lock the chain (PostgreSQL: a transaction advisory lock; SQLite: the database write lock),
read the head, insert, commit. The lock is held for that append and the commit only.

Crash safety follows from the entries being written in the caller's own transaction: a
committed change always has its entries, a rolled-back one never (the buffer is dropped
with the transaction). Inside a savepoint the entry is appended at once (the old way), so a
rolled-back savepoint takes its entry with it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import event, insert, select, text
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import SessionTransaction
from sqlmodel import Session

from controller.models import AuditEntry, utcnow

GENESIS = "0" * 64
_TABLE = AuditEntry.metadata.tables["audit_log"]
_PENDING = "asicfleet.audit.pending"
# One key for the whole chain: every replica appending to this database takes it.
_CHAIN_LOCK = 741852963


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


@dataclass(frozen=True, slots=True)
class _Pending:
    """An entry recorded but not yet chained: everything but ``seq`` and the hashes."""

    at: datetime
    actor: str
    actor_kind: str
    action: str
    entity: str
    entity_id: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None
    source: str
    reason: str


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
) -> None:
    """Audit one change made in the caller's transaction; it is chained when that commits."""
    pending = _Pending(
        at=utcnow(),
        actor=actor,
        actor_kind=actor_kind,
        action=action,
        entity=entity,
        entity_id=entity_id,
        before=_jsonable(before),
        after=_jsonable(after),
        source=source,
        reason=reason,
    )
    if session.in_nested_transaction():
        _append(session, [pending])
        return
    if not session.in_transaction():
        session.begin()  # the buffer belongs to a transaction: its end must drop it
    session.info.setdefault(_PENDING, []).append(pending)


def flush_pending(session: Session | OrmSession) -> None:
    """Chain what this session recorded so far (readers of the log in the same transaction)."""
    pending: list[_Pending] = session.info.pop(_PENDING, [])
    if pending:
        _append(session, pending)


def _append(session: Session | OrmSession, pending: list[_Pending]) -> None:
    """Lock the chain, read its head and insert ``pending`` after it, in this transaction."""
    session.flush()  # the caller's own rows first: after the lock we touch audit_log only
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _CHAIN_LOCK})
    else:
        # SQLite: a write statement takes the database write lock, so the head read next is
        # the newest one and stays so until COMMIT (a plain read would not lock anything).
        conn.execute(_TABLE.delete().where(text("0 = 1")))
    head = conn.execute(
        select(_TABLE.c.seq, _TABLE.c.hash).order_by(_TABLE.c.seq.desc()).limit(1)
    ).first()
    seq, prev_hash = (0, GENESIS) if head is None else (head.seq, head.hash)
    rows: list[dict[str, Any]] = []
    for p in pending:
        seq += 1
        digest = entry_digest(
            seq=seq,
            at=p.at,
            actor=p.actor,
            actor_kind=p.actor_kind,
            action=p.action,
            entity=p.entity,
            entity_id=p.entity_id,
            before=p.before,
            after=p.after,
            source=p.source,
            reason=p.reason,
            prev_hash=prev_hash,
        )
        rows.append({**asdict(p), "seq": seq, "prev_hash": prev_hash, "hash": digest})
        prev_hash = digest
    conn.execute(insert(_TABLE), rows)


@event.listens_for(OrmSession, "before_commit")
def _chain_at_commit(session: OrmSession) -> None:
    """Append the transaction's buffered entries just before it commits (outermost only)."""
    if not session.in_nested_transaction():
        flush_pending(session)


@event.listens_for(OrmSession, "after_transaction_end")
def _drop_on_end(session: OrmSession, transaction: SessionTransaction) -> None:
    """A transaction that ends without committing takes its buffered entries with it."""
    if transaction.parent is None:
        session.info.pop(_PENDING, None)


def _jsonable(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """Round-trip through JSON so that what is hashed is exactly what the database stores."""
    if value is None:
        return None
    result: dict[str, Any] = json.loads(json.dumps(value, default=str))
    return result
