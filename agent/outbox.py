"""The outbox: a durable local queue of report batches waiting for the controller.

Why SQLite: a single file, crash-safe transactions, and readers (``asicfleet agent status``)
that do not block the writer in WAL mode. ``synchronous=FULL`` makes every commit reach the
disk before :meth:`Outbox.put` or :meth:`Outbox.ack` returns, so "put returned" means "survives
kill -9 and power loss" and "ack returned" means "will not be sent again".

Delivery is at-least-once: a batch is deleted only after the controller acknowledged it, and
the controller de-duplicates by ``batch_id``. Each batch gets a ``sequence`` here, from 1,
increasing and persisted (a counter in the database, so acknowledging the newest batch never
lets a number be reused). Only deleting the outbox file restarts the count.

A batch the controller refuses for good is *parked*: moved to the ``dead_letter`` table with
the reason, in the same transaction as a new pending batch carrying a ``batch_parked`` event,
so the controller hears of it and the queue moves on; nothing is ever deleted without an
acknowledgement. Each pending batch counts its failed attempts and *strikes* (answers proving
the batch itself is the problem, see ``agent.uplink``). A full disk raises
:class:`OutboxFull`: the batch was not stored and the caller must keep it and retry.

The last measured clock skew against the controller is kept here too (``outbox_meta``), so
``asicfleet agent status`` can show it whether the daemon runs or not.
"""

from __future__ import annotations

import errno
import json
import logging
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from agent.config import AgentConfig
from agent.errors import OutboxError, OutboxFull
from contract import Event, EventSeverity, ReportBatch

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
PARKED_EVENT = "batch_parked"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox_meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pending (
    sequence INTEGER PRIMARY KEY,
    batch_id TEXT NOT NULL UNIQUE,
    queued_at TEXT NOT NULL,
    body TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    strikes INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
);
CREATE TABLE IF NOT EXISTS dead_letter (
    sequence INTEGER PRIMARY KEY,
    batch_id TEXT NOT NULL UNIQUE,
    queued_at TEXT NOT NULL,
    parked_at TEXT NOT NULL,
    status_code INTEGER,
    reason TEXT NOT NULL,
    body TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class DeadLetter:
    """A batch the controller refused for good, kept with the reason."""

    sequence: int
    batch_id: uuid.UUID
    queued_at: datetime
    parked_at: datetime
    status_code: int | None
    reason: str
    body: str


@dataclass(frozen=True)
class OutboxStats:
    depth: int
    dead_letters: int
    oldest_queued_at: datetime | None
    head_attempts: int = 0  # failed deliveries of the oldest pending batch
    head_last_error: str | None = None
    clock_skew_s: float | None = None  # this host's clock minus the controller's
    clock_checked_at: str | None = None  # ISO time of that measurement


# Columns added by schema 2 to a schema-1 file.
_V2_COLUMNS = (
    ("attempts", "INTEGER NOT NULL DEFAULT 0"),
    ("strikes", "INTEGER NOT NULL DEFAULT 0"),
    ("last_error", "TEXT"),
)


class Outbox:
    """A durable FIFO of :class:`ReportBatch`. Thread-safe; every method is blocking, so async
    code calls it through ``asyncio.to_thread``."""

    def __init__(self, path: Path | str, *, max_bytes: int | None = None) -> None:
        """Open (creating if needed) the outbox at ``path``. ``max_bytes`` caps the database
        so a long outage cannot fill the disk the rest of the host needs; reaching it raises
        :class:`OutboxFull` just like a full disk does."""
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        with self._guard("open"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=30.0
            )
            try:
                self._setup()
            except BaseException:
                self._conn.close()
                raise

    @classmethod
    def from_config(cls, config: AgentConfig) -> Outbox:
        """The outbox the config names (``data_dir``/``outbox.path``, ``outbox.max_size_mb``)."""
        cap = config.outbox.max_size_mb
        return cls(config.outbox_path, max_bytes=cap * 1024 * 1024 if cap else None)

    def _setup(self) -> None:
        conn = self._conn
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise OutboxError(f"{self.path}: cannot use WAL journal mode (got {mode})")
        conn.execute("PRAGMA synchronous=FULL")
        if self.max_bytes is not None:
            page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
            conn.execute(f"PRAGMA max_page_count={max(1, self.max_bytes // page_size)}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise OutboxError(
                f"{self.path}: outbox schema {version} was written by a newer agent "
                f"(this one reads up to {SCHEMA_VERSION}); upgrade the agent"
            )
        if version < SCHEMA_VERSION or not self._has_tables():
            with self._transaction():
                for statement in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                    conn.execute(statement)
                have = {row[1] for row in conn.execute("PRAGMA table_info(pending)")}
                for name, decl in _V2_COLUMNS:
                    if name not in have:
                        conn.execute(f"ALTER TABLE pending ADD COLUMN {name} {decl}")
                conn.execute(
                    "INSERT OR IGNORE INTO outbox_meta (key, value) VALUES ('next_sequence', ?)",
                    (1,),
                )
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _has_tables(self) -> bool:
        row = self._conn.execute(
            "SELECT count(*) FROM sqlite_master "
            "WHERE type = 'table' AND name IN ('outbox_meta', 'pending', 'dead_letter')"
        ).fetchone()
        return bool(row[0] == 3)

    # --- the queue -----------------------------------------------------------------------------

    def put(self, batch: ReportBatch) -> ReportBatch:
        """Store ``batch`` durably and return it with its assigned ``sequence``.

        The caller's ``sequence`` is replaced. Putting a batch whose ``batch_id`` is already
        pending returns the stored one unchanged (a retried put never doubles a batch).
        Raises :class:`OutboxFull` when the disk is full: the batch is then NOT stored.
        """
        key = str(batch.batch_id)
        with self._lock, self._guard("put", key), self._transaction() as conn:
            row = conn.execute(
                "SELECT sequence, body FROM pending WHERE batch_id = ?", (key,)
            ).fetchone()
            if row is not None:
                return _parse(row[0], row[1])
            return self._insert(conn, batch)

    def _insert(self, conn: sqlite3.Connection, batch: ReportBatch) -> ReportBatch:
        """Seal ``batch`` with the next sequence and store it (inside a transaction)."""
        (sequence,) = conn.execute(
            "SELECT value FROM outbox_meta WHERE key = 'next_sequence'"
        ).fetchone()
        conn.execute(
            "UPDATE outbox_meta SET value = ? WHERE key = 'next_sequence'", (sequence + 1,)
        )
        sealed = batch.model_copy(update={"sequence": sequence})
        conn.execute(
            "INSERT INTO pending (sequence, batch_id, queued_at, body) VALUES (?, ?, ?, ?)",
            (sequence, str(batch.batch_id), _now(), sealed.model_dump_json()),
        )
        return sealed

    def peek(self, n: int) -> list[ReportBatch]:
        """Up to ``n`` pending batches, oldest first. A row this agent cannot read any more (a
        corrupt body, a contract major it does not speak) is parked rather than blocking the
        queue for ever."""
        if n <= 0:
            return []
        with self._lock, self._guard("peek"):
            rows = self._conn.execute(
                "SELECT sequence, batch_id, body FROM pending ORDER BY sequence LIMIT ?", (n,)
            ).fetchall()
            batches: list[ReportBatch] = []
            for sequence, batch_id, body in rows:
                try:
                    batches.append(_parse(sequence, body))
                except ValidationError as exc:
                    reason = f"unreadable in the outbox: {exc.errors()[0]['msg']}"
                    log.error(
                        "outbox: parking batch %s (sequence %d): %s", batch_id, sequence, reason
                    )
                    self._park(batch_id, reason, None)
            return batches

    def ack(self, batch_id: uuid.UUID | str) -> bool:
        """Forget a batch the controller acknowledged; False if it was not pending."""
        with self._lock, self._guard("ack", str(batch_id)), self._transaction() as conn:
            cursor = conn.execute("DELETE FROM pending WHERE batch_id = ?", (str(batch_id),))
            return cursor.rowcount == 1

    def park(self, batch_id: uuid.UUID | str, reason: str, status_code: int | None = None) -> bool:
        """Move a pending batch to the dead-letter table with why, and queue a ``batch_parked``
        event for the controller (same transaction); False if it was not pending."""
        with self._lock, self._guard("park", str(batch_id)):
            return self._park(str(batch_id), reason, status_code)

    def _park(self, batch_id: str, reason: str, status_code: int | None) -> bool:
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT sequence, queued_at, body, attempts FROM pending WHERE batch_id = ?",
                (batch_id,),
            ).fetchone()
            if row is None:
                return False
            sequence, queued_at, body, attempts = row
            conn.execute(
                "INSERT INTO dead_letter "
                "(sequence, batch_id, queued_at, parked_at, status_code, reason, body) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (sequence, batch_id, queued_at, _now(), status_code, reason[:4096], body),
            )
            conn.execute("DELETE FROM pending WHERE batch_id = ?", (batch_id,))
            facts = _parked_facts(body)
            if facts.get("only_parked_events"):
                return True  # a report about parking that was itself parked: no chain
            event = Event(
                kind=PARKED_EVENT,
                at=datetime.now(UTC),
                severity=EventSeverity.CRITICAL,
                detail=(
                    f"batch {batch_id} (sequence {sequence}, queued {queued_at}) parked on the "
                    f"agent after {attempts} delivery attempt(s): {reason}"
                ),
                data={
                    "batch_id": batch_id,
                    "sequence": sequence,
                    "queued_at": queued_at,
                    "status_code": status_code,
                    "reason": reason[:1024],
                    "attempts": attempts,
                    **{k: v for k, v in facts.items() if k != "only_parked_events"},
                },
            )
            report = ReportBatch(
                batch_id=uuid.uuid4(), agent_clock=datetime.now(UTC), sequence=0, events=[event]
            )
            self._insert(conn, report)
            return True

    def failed(self, batch_id: uuid.UUID | str, error: str, *, strike: bool = False) -> int:
        """Count a failed delivery of a pending batch (a strike too if ``strike``); returns
        its strikes so far (0 if it is not pending)."""
        with self._lock, self._guard("failed", str(batch_id)), self._transaction() as conn:
            conn.execute(
                "UPDATE pending SET attempts = attempts + 1, strikes = strikes + ?, "
                "last_error = ? WHERE batch_id = ?",
                (int(strike), error[:1024], str(batch_id)),
            )
            row = conn.execute(
                "SELECT strikes FROM pending WHERE batch_id = ?", (str(batch_id),)
            ).fetchone()
            return int(row[0]) if row else 0

    def record_clock(self, skew_s: float, at: datetime) -> None:
        """Keep the latest measured skew (this host's clock minus the controller's)."""
        with self._lock, self._guard("record_clock"), self._transaction() as conn:
            conn.executemany(
                "INSERT INTO outbox_meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [
                    ("clock_skew_ms", round(skew_s * 1000)),
                    ("clock_checked_at", int(at.timestamp())),
                ],
            )

    def depth(self) -> int:
        """How many batches wait for delivery."""
        with self._lock, self._guard("depth"):
            return int(self._conn.execute("SELECT count(*) FROM pending").fetchone()[0])

    def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """Parked batches, oldest first."""
        with self._lock, self._guard("dead_letters"):
            rows = self._conn.execute(
                "SELECT sequence, batch_id, queued_at, parked_at, status_code, reason, body "
                "FROM dead_letter ORDER BY sequence LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            DeadLetter(
                sequence=seq,
                batch_id=uuid.UUID(bid),
                queued_at=datetime.fromisoformat(queued),
                parked_at=datetime.fromisoformat(parked),
                status_code=code,
                reason=reason,
                body=body,
            )
            for seq, bid, queued, parked, code, reason, body in rows
        ]

    def stats(self) -> OutboxStats:
        with self._lock, self._guard("stats"):
            conn = self._conn
            depth, oldest = conn.execute("SELECT count(*), min(queued_at) FROM pending").fetchone()
            dead = conn.execute("SELECT count(*) FROM dead_letter").fetchone()[0]
            head = conn.execute(
                "SELECT attempts, last_error FROM pending ORDER BY sequence LIMIT 1"
            ).fetchone()
            meta = dict(
                conn.execute(
                    "SELECT key, value FROM outbox_meta "
                    "WHERE key IN ('clock_skew_ms', 'clock_checked_at')"
                ).fetchall()
            )
        checked = meta.get("clock_checked_at")
        return OutboxStats(
            depth=int(depth),
            dead_letters=int(dead),
            oldest_queued_at=datetime.fromisoformat(oldest) if oldest else None,
            head_attempts=int(head[0]) if head else 0,
            head_last_error=head[1] if head else None,
            clock_skew_s=meta["clock_skew_ms"] / 1000 if "clock_skew_ms" in meta else None,
            clock_checked_at=(
                datetime.fromtimestamp(checked, UTC).isoformat() if checked is not None else None
            ),
        )

    def integrity_check(self) -> str:
        """SQLite's own verdict on the file: ``"ok"`` or the list of problems."""
        with self._lock, self._guard("integrity_check"):
            rows = self._conn.execute("PRAGMA integrity_check").fetchall()
        return "\n".join(str(row[0]) for row in rows)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing ------------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT; any failure (including a failing COMMIT) rolls back."""
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                with suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise

    @contextmanager
    def _guard(self, operation: str, batch_id: str | None = None) -> Iterator[None]:
        """Turn SQLite and OS errors into typed outbox errors; a full disk is shouted about."""
        try:
            yield
        except sqlite3.Error as exc:
            if _is_full(exc):
                raise self._full(operation, batch_id, str(exc)) from exc
            raise OutboxError(f"{self.path}: outbox {operation} failed: {exc}") from exc
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise self._full(operation, batch_id, exc.strerror or str(exc)) from exc
            raise OutboxError(f"{self.path}: outbox {operation} failed: {exc}") from exc

    def _full(self, operation: str, batch_id: str | None, detail: str) -> OutboxFull:
        what = f"batch {batch_id} was NOT stored" if operation == "put" else "nothing changed"
        cap = ""
        if self.max_bytes is not None:
            cap = f" (the outbox is capped at {self.max_bytes / 2**20:.1f} MiB: outbox.max_size_mb)"
        message = (
            f"OUTBOX FULL: {self.path}: {detail}{cap} during {operation}; {what}. The agent "
            f"must hold such reports in memory: free space on {self.path.parent} (or raise the "
            "cap) before it stops, or they are lost"
        )
        log.critical("%s", message)
        return OutboxFull(message)


def _is_full(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code == sqlite3.SQLITE_FULL or "database or disk is full" in str(exc)


def _parked_facts(body: str) -> dict[str, Any]:
    """What a parked batch held (item counts), read leniently: the body may be unreadable."""
    try:
        raw = json.loads(body)
    except ValueError:
        return {"body_bytes": len(body)}
    if not isinstance(raw, dict):
        return {"body_bytes": len(body)}
    counts = {
        name: len(raw[name])
        for name in ("observations", "identities", "events")
        if isinstance(raw.get(name), list)
    }
    events = raw.get("events") or []
    only_parked = (
        bool(events)
        and not counts.get("observations")
        and not counts.get("identities")
        and all(isinstance(e, dict) and e.get("kind") == PARKED_EVENT for e in events)
    )
    return {"items": counts, "body_bytes": len(body), "only_parked_events": only_parked}


def _parse(sequence: int, body: str) -> ReportBatch:
    batch = ReportBatch.model_validate_json(body)
    if batch.sequence != sequence:
        batch = batch.model_copy(update={"sequence": sequence})
    return batch


def _now() -> str:
    return datetime.now(UTC).isoformat()
