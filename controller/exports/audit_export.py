"""The audit log as CSV and JSON, with its chain, verifiable offline.

Both files carry every field that the entry hash covers (times to the microsecond, before
and after as JSON), so the chain can be recomputed from either; ``verify-export`` does it
from ``audit_log.json`` and checks that it ends at the head recorded in the manifest.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from sqlalchemy import select
from sqlmodel import Session

from controller.audit import GENESIS
from controller.audit_verify import ChainEntry, ChainVerifier
from controller.exports.i18n import Lang
from controller.exports.table import Column, Table
from controller.models import AuditEntry

_TABLE = AuditEntry.metadata.tables["audit_log"]
FIELDS = tuple(ChainEntry.__dataclass_fields__)
COLUMNS: tuple[Column, ...] = (
    Column("seq", "int", 6),
    Column("at", "text", 27),
    Column("actor", "text", 16),
    Column("actor_kind", "text", 7),
    Column("action", "text", 16),
    Column("entity", "text", 9),
    Column("entity_id", "text", 12),
    Column("before", "text", 30),
    Column("after", "text", 30),
    Column("source", "text", 10),
    Column("reason", "text", 20),
    Column("prev_hash", "text", 64),
    Column("hash", "text", 64),
)
JSON_NAME = "audit_log.json"


def chain_head(session: Session) -> dict[str, Any]:
    """The newest entry's ``seq`` and hash (``seq`` 0 and the genesis hash for an empty log)."""
    row = (
        session.connection()
        .execute(select(_TABLE.c.seq, _TABLE.c.hash).order_by(_TABLE.c.seq.desc()).limit(1))
        .first()
    )
    return {"seq": 0, "hash": GENESIS} if row is None else {"seq": row.seq, "hash": row.hash}


def entries(session: Session, upto: int, chunk: int = 5000) -> Iterator[ChainEntry]:
    """Entries 1..``upto`` in order, keyset-paginated."""
    columns = [_TABLE.c[name] for name in FIELDS]
    last = 0
    conn = session.connection()
    while True:
        rows = conn.execute(
            select(*columns)
            .where(_TABLE.c.seq > last, _TABLE.c.seq <= upto)
            .order_by(_TABLE.c.seq)
            .limit(chunk)
        ).all()
        if not rows:
            return
        for row in rows:
            yield ChainEntry(*row)
        last = rows[-1].seq


def _json_text(value: dict[str, Any] | None) -> str:
    return "" if value is None else json.dumps(value, sort_keys=True, ensure_ascii=False)


def _at(value: datetime) -> str:
    return value.isoformat(timespec="microseconds")


def audit_table(session: Session, head: dict[str, Any]) -> Table:
    rows = [
        (
            e.seq,
            _at(e.at),
            e.actor,
            e.actor_kind,
            e.action,
            e.entity,
            e.entity_id,
            _json_text(e.before),
            _json_text(e.after),
            e.source,
            e.reason,
            e.prev_hash,
            e.hash,
        )
        for e in entries(session, int(head["seq"]))
    ]
    return Table(name="audit_log", sheet="sheet.audit", columns=COLUMNS, rows=rows)


def write_json(session: Session, head: dict[str, Any], path: Path, lang: Lang) -> int:
    """``{"head": …, "entries": [...]}``, one entry per line; returns the entry count."""
    count = 0
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        handle.write('{"head": ' + json.dumps(head) + ', "entries": [\n')
        for e in entries(session, int(head["seq"])):
            item = {name: getattr(e, name) for name in FIELDS}
            item["at"] = _at(e.at)
            handle.write(("" if count == 0 else ",\n") + json.dumps(item, ensure_ascii=False))
            count += 1
        handle.write("\n]}\n")
    return count


def verify_chain_file(handle: IO[bytes], head: dict[str, Any]) -> str | None:
    """Why the exported chain is not intact or does not end at ``head``; None if it is fine."""
    try:
        data = json.load(handle)
        items = data["entries"]
        chain = [ChainEntry(**{**item, "at": datetime.fromisoformat(item["at"])}) for item in items]
    except (ValueError, KeyError, TypeError) as exc:
        return f"{JSON_NAME}: cannot be read as an audit chain ({exc})"
    verifier = ChainVerifier()
    for entry in chain:
        if verifier.feed(entry) is not None:
            break
    if verifier.problem is not None:
        p = verifier.problem
        return f"{JSON_NAME}: chain broken at entry {p.seq}: {p.kind.value}: {p.detail}"
    if verifier.head != head.get("hash") or verifier.entries != head.get("seq"):
        return (
            f"{JSON_NAME}: chain ends at entry {verifier.entries} ({verifier.head}), "
            f"the manifest says {head.get('seq')} ({head.get('hash')})"
        )
    return None
