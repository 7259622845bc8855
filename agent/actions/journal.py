"""The action journal: every write's life on disk, beside the outbox (SQLite, WAL, fsync'd).

An action is written ``planned`` before anything is sent, ``dispatched`` (committed to disk)
right before the write leaves for the miner, and ``done``/``failed`` with its cause when it
ends. So after a kill -9 the journal says, for every action, whether it may have reached the
miner: ``planned`` never did; ``dispatched`` may have, and is read back before anything else
happens to that miner (:meth:`agent.actions.runner.ActionRunner.recover`).

Like :class:`agent.outbox.Outbox`: one connection, a lock, blocking methods (async callers use
``asyncio.to_thread``), ``synchronous=FULL`` so "returned" means "survives power loss".
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.actions.kinds import Action, ActionKind, ActionState
from agent.errors import AgentError

log = logging.getLogger(__name__)

MEMORY = ":memory:"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS action (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    ip TEXT NOT NULL,
    serial TEXT,
    machine_id TEXT,
    payload TEXT NOT NULL,
    deadline_s REAL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    planned_at TEXT NOT NULL,
    dispatched_at TEXT,
    finished_at TEXT,
    cause TEXT,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS action_by_state ON action (state);
CREATE INDEX IF NOT EXISTS action_by_ip ON action (ip);
"""

_COLUMNS = (
    "id, kind, ip, serial, machine_id, payload, deadline_s, state, attempts, planned_at, "
    "dispatched_at, finished_at, cause, detail"
)


class JournalError(AgentError):
    """The journal cannot be read or written (disk full, corrupt file …)."""


@dataclass(frozen=True)
class JournalEntry:
    action: Action
    state: ActionState
    attempts: int
    planned_at: datetime
    dispatched_at: datetime | None
    finished_at: datetime | None
    cause: str | None
    detail: str | None


def _ts(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


def _parse(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


class Journal:
    """The durable record of actions. Thread-safe; every method blocks."""

    def __init__(self, path: Path | str = MEMORY) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        try:
            if self.path != MEMORY:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
                os.close(fd)
            self._conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=30.0
            )
            if self.path != MEMORY:
                self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise JournalError(f"{self.path}: cannot open the action journal: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _tx(self, doing: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise JournalError(f"{self.path}: cannot {doing}: {exc}") from None

    # --- the life of an action --------------------------------------------------------------

    def plan(self, action: Action, at: datetime) -> None:
        with self._tx("plan an action") as conn:
            conn.execute(
                f"INSERT INTO action ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,0,?,NULL,NULL,NULL,NULL)",
                (
                    action.id,
                    action.kind.value,
                    action.ip,
                    action.serial,
                    action.machine_id,
                    json.dumps(dict(action.payload), sort_keys=True, default=str),
                    action.deadline_s,
                    ActionState.PLANNED.value,
                    _ts(at),
                ),
            )

    def dispatch(self, action_id: str, at: datetime) -> None:
        """Committed before the write is sent: from here on it may have reached the miner."""
        with self._tx("mark an action dispatched") as conn:
            conn.execute(
                "UPDATE action SET state = ?, attempts = attempts + 1, dispatched_at = ? "
                "WHERE id = ?",
                (ActionState.DISPATCHED.value, _ts(at), action_id),
            )

    def finish(
        self, action_id: str, ok: bool, cause: str | None, detail: str, at: datetime
    ) -> None:
        state = ActionState.DONE if ok else ActionState.FAILED
        with self._tx("finish an action") as conn:
            conn.execute(
                "UPDATE action SET state = ?, finished_at = ?, cause = ?, detail = ? WHERE id = ?",
                (state.value, _ts(at), cause, detail[:1000], action_id),
            )

    # --- reading ------------------------------------------------------------------------------

    def _select(self, where: str, args: tuple[Any, ...]) -> list[JournalEntry]:
        with self._lock:
            try:
                rows = self._conn.execute(
                    f"SELECT {_COLUMNS} FROM action WHERE {where} ORDER BY planned_at, rowid",
                    args,
                ).fetchall()
            except sqlite3.Error as exc:
                raise JournalError(f"{self.path}: cannot read the journal: {exc}") from None
        return [self._entry(row) for row in rows]

    @staticmethod
    def _entry(row: tuple[Any, ...]) -> JournalEntry:
        (id_, kind, ip, serial, machine_id, payload, deadline_s, state, attempts, planned_at,
         dispatched_at, finished_at, cause, detail) = row  # fmt: skip
        action = Action(
            kind=ActionKind(kind),
            ip=ip,
            serial=serial,
            machine_id=machine_id,
            payload=json.loads(payload),
            deadline_s=deadline_s,
            id=id_,
        )
        planned = _parse(planned_at)
        assert planned is not None
        return JournalEntry(
            action=action,
            state=ActionState(state),
            attempts=int(attempts),
            planned_at=planned,
            dispatched_at=_parse(dispatched_at),
            finished_at=_parse(finished_at),
            cause=cause,
            detail=detail,
        )

    def unfinished(self) -> list[JournalEntry]:
        """Actions a previous run planned or dispatched and never saw end."""
        return self._select(
            "state IN (?, ?)", (ActionState.PLANNED.value, ActionState.DISPATCHED.value)
        )

    def entries(self, ip: str | None = None) -> list[JournalEntry]:
        if ip is None:
            return self._select("1 = 1", ())
        return self._select("ip = ?", (ip,))

    def counts(self) -> dict[str, int]:
        with self._lock:
            try:
                rows = self._conn.execute(
                    "SELECT state, COUNT(*) FROM action GROUP BY state"
                ).fetchall()
            except sqlite3.Error as exc:
                raise JournalError(f"{self.path}: cannot read the journal: {exc}") from None
        return {str(state): int(n) for state, n in rows}

    def prune(self, before: datetime) -> int:
        """Forget finished actions older than ``before`` (the journal is not the evidence:
        the events in the outbox are)."""
        with self._tx("prune the journal") as conn:
            cursor = conn.execute(
                "DELETE FROM action WHERE state IN (?, ?) AND finished_at < ?",
                (ActionState.DONE.value, ActionState.FAILED.value, _ts(before)),
            )
            return int(cursor.rowcount)
