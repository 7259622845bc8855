"""Checking the audit log: recompute the hash chain and name the first entry that is wrong.

The chain is recomputed from each entry's content, never from the stored hashes alone:
an entry whose content no longer matches its hash was **modified**; a gap in ``seq`` or a
link to a hash no entry holds means entries were **deleted**; a link to an entry that
comes later means entries were **reordered** (swapped or moved).

:class:`ChainVerifier` is the pure part: it is fed entries in ``seq`` order and decides.
:func:`verify_chain` streams the table into it in keyset-paginated chunks, so memory stays
flat however long the log is. A bare chain cannot notice that its newest entries were cut
off; pass a head hash noted earlier (``anchor``) to check that too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel
from sqlalchemy import func, select
from sqlmodel import Session, col

from controller.audit import GENESIS, entry_digest, flush_pending
from controller.models import AuditEntry

DEFAULT_CHUNK = 5_000
_TABLE = AuditEntry.metadata.tables["audit_log"]


class ProblemKind(StrEnum):
    MODIFIED = "modified"
    DELETED = "deleted"
    REORDERED = "reordered"


@dataclass(frozen=True, slots=True)
class ChainEntry:
    """The columns of one ``audit_log`` row, in table order (cheaper than ORM objects)."""

    seq: int
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
    prev_hash: str
    hash: str

    def digest(self, prev_hash: str | None = None) -> str:
        """The hash this entry's content gives (optionally under another predecessor hash)."""
        return entry_digest(
            seq=self.seq,
            at=self.at,
            actor=self.actor,
            actor_kind=self.actor_kind,
            action=self.action,
            entity=self.entity,
            entity_id=self.entity_id,
            before=self.before,
            after=self.after,
            source=self.source,
            reason=self.reason,
            prev_hash=self.prev_hash if prev_hash is None else prev_hash,
        )


class ChainProblem(BaseModel):
    """The first thing wrong with the chain: which entry (``seq``) and what."""

    seq: int
    kind: ProblemKind
    detail: str


class VerifyResult(BaseModel):
    """The outcome of a verification; ``head`` is the hash of the last entry that checked out."""

    ok: bool
    entries: int
    head: str
    problem: ChainProblem | None = None

    @property
    def message(self) -> str:
        if self.problem is None:
            return f"audit log intact: {self.entries} entries, head {self.head}"
        p = self.problem
        return f"audit log broken at entry {p.seq}: {p.kind.value}: {p.detail}"


Locate = Callable[[str], int | None]


class ChainVerifier:
    """Feed entries in ascending ``seq``; stops at the first problem.

    ``locate(hash)`` (optional) answers which ``seq`` stores a given hash; it only serves
    to tell a reordering from a deletion once a link is already known to be broken.
    """

    def __init__(self, locate: Locate | None = None) -> None:
        self._locate = locate
        self.expected_seq = 1
        self.head = GENESIS
        self.entries = 0
        self.problem: ChainProblem | None = None

    def feed(self, entry: ChainEntry) -> ChainProblem | None:
        """Check one entry against its predecessor; returns (and keeps) the first problem."""
        if self.problem is not None:
            return self.problem
        problem = self._check(entry)
        if problem is not None:
            self.problem = problem
            return problem
        self.head = entry.hash
        self.expected_seq = entry.seq + 1
        self.entries += 1
        return None

    def _check(self, e: ChainEntry) -> ChainProblem | None:
        if e.seq != self.expected_seq:
            if e.seq > self.expected_seq:
                missing = (
                    f"entry {self.expected_seq} is missing"
                    if e.seq == self.expected_seq + 1
                    else f"entries {self.expected_seq}..{e.seq - 1} are missing"
                )
                return ChainProblem(
                    seq=self.expected_seq,
                    kind=ProblemKind.DELETED,
                    detail=f"{missing} (seq jumps from {self.expected_seq - 1} to {e.seq})",
                )
            return ChainProblem(  # not reachable while seq is the primary key; kept for safety
                seq=e.seq,
                kind=ProblemKind.REORDERED,
                detail=f"entry {e.seq} appears after entry {self.expected_seq - 1}",
            )
        if e.prev_hash != self.head:
            return self._broken_link(e)
        if e.digest() != e.hash:
            return ChainProblem(
                seq=e.seq,
                kind=ProblemKind.MODIFIED,
                detail=(
                    f"its content no longer matches its hash (now: {e.action} on "
                    f"{e.entity} {e.entity_id!r} by {e.actor} at {e.at.isoformat()})"
                ),
            )
        return None

    def _broken_link(self, e: ChainEntry) -> ChainProblem:
        """``e`` does not link to the entry before it: find out why."""
        previous = e.seq - 1
        if e.digest(prev_hash=self.head) == e.hash:
            return ChainProblem(
                seq=e.seq,
                kind=ProblemKind.MODIFIED,
                detail="its prev_hash field was altered (the rest of the entry is intact)",
            )
        holder = self._locate(e.prev_hash) if self._locate is not None else None
        if holder is not None and holder > e.seq:
            return ChainProblem(
                seq=e.seq,
                kind=ProblemKind.REORDERED,
                detail=(
                    f"it links to entry {holder}, which comes after it: "
                    "entries were swapped or moved"
                ),
            )
        if holder is not None and holder != previous:
            return ChainProblem(
                seq=e.seq,
                kind=ProblemKind.REORDERED,
                detail=f"it links to entry {holder} instead of entry {previous}",
            )
        if holder is None and e.digest() == e.hash and e.seq > 1:
            # The entry is intact but its predecessor is not the one it was chained to.
            return ChainProblem(
                seq=previous,
                kind=ProblemKind.MODIFIED,
                detail=(
                    f"it is not the entry that entry {e.seq} was chained to "
                    "(rewritten together with its stored hash)"
                ),
            )
        if e.seq == 1:
            detail = "the first entry does not start the chain: entries before it were deleted"
        else:
            detail = (
                f"it links to a predecessor that no longer exists: an entry before it "
                f"was deleted and the later ones renumbered (expected entry {previous})"
            )
        return ChainProblem(seq=e.seq, kind=ProblemKind.DELETED, detail=detail)


def _chunks(session: Session, upto: int, chunk: int) -> Iterator[list[ChainEntry]]:
    """The log in ``seq`` order, ``chunk`` rows per query (keyset pagination, no OFFSET)."""
    table = _TABLE
    columns = [table.c[name] for name in ChainEntry.__dataclass_fields__]
    last = 0
    while True:
        rows = session.connection().execute(
            select(*columns)
            .where(table.c.seq > last, table.c.seq <= upto)
            .order_by(table.c.seq)
            .limit(chunk)
        )
        batch = [ChainEntry(*row) for row in rows]
        if not batch:
            return
        yield batch
        last = batch[-1].seq


def verify_chain(
    session: Session, *, anchor: str | None = None, chunk: int = DEFAULT_CHUNK
) -> VerifyResult:
    """Recompute the whole chain (up to the newest entry present when called).

    ``anchor``: a head hash recorded earlier; the chain must still pass through it,
    otherwise entries after it were cut off or the log was rebuilt.
    """
    flush_pending(session)
    upto = session.connection().execute(select(func.max(col(AuditEntry.seq)))).scalar() or 0

    def locate(digest: str) -> int | None:
        found = session.connection().execute(
            select(col(AuditEntry.seq)).where(col(AuditEntry.hash) == digest)
        )
        return found.scalar()

    verifier = ChainVerifier(locate)
    anchor_seen = anchor is None or anchor == GENESIS
    for batch in _chunks(session, upto, chunk):
        for entry in batch:
            if verifier.feed(entry) is not None:
                break
            if not anchor_seen and entry.hash == anchor:
                anchor_seen = True
        if verifier.problem is not None:
            break
    problem = verifier.problem
    if problem is None and not anchor_seen:
        problem = ChainProblem(
            seq=verifier.expected_seq,
            kind=ProblemKind.DELETED,
            detail=(
                f"the anchored head {anchor} is not in the chain: entries were cut off "
                "the end of the log or the log was rebuilt"
            ),
        )
    return VerifyResult(
        ok=problem is None, entries=verifier.entries, head=verifier.head, problem=problem
    )


# --- reading the log ---------------------------------------------------------------------------


class AuditEntryPublic(BaseModel):
    """One audit entry as the API and CLI show it."""

    seq: int
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
    prev_hash: str
    hash: str


class AuditPage(BaseModel):
    """A page of entries; pass ``next_cursor`` back as ``cursor`` for the next one."""

    data: list[AuditEntryPublic]
    next_cursor: int | None


def list_entries(
    session: Session,
    *,
    cursor: int | None = None,
    limit: int = 100,
    order: Literal["asc", "desc"] = "asc",
    actor: str | None = None,
    action: str | None = None,
    entity: str | None = None,
    entity_id: str | None = None,
) -> AuditPage:
    """Entries in ``seq`` order after (asc) or before (desc) ``cursor``, keyset-paginated."""
    flush_pending(session)
    table = _TABLE
    query = select(*[table.c[name] for name in ChainEntry.__dataclass_fields__])
    if cursor is not None:
        query = query.where(table.c.seq > cursor if order == "asc" else table.c.seq < cursor)
    for column, value in (
        ("actor", actor),
        ("action", action),
        ("entity", entity),
        ("entity_id", entity_id),
    ):
        if value is not None:
            query = query.where(table.c[column] == value)
    query = query.order_by(table.c.seq if order == "asc" else table.c.seq.desc())
    rows = list(session.connection().execute(query.limit(limit + 1)).mappings())
    more = len(rows) > limit
    data = [AuditEntryPublic.model_validate(dict(row)) for row in rows[:limit]]
    return AuditPage(data=data, next_cursor=data[-1].seq if more and data else None)
