"""Database engines and sessions: SQLite (WAL) by default, PostgreSQL by URL."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, make_url
from sqlalchemy.engine import Engine
from sqlmodel import Session, create_engine

from controller.settings import Settings


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine tuned for the backend: WAL, foreign keys and a busy timeout on SQLite."""
    if url.startswith("sqlite"):
        if (path := sqlite_file(url)) is not None:
            make_private(path)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs
        )

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            _switch_to_wal(cursor)
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


def _switch_to_wal(cursor: Any) -> None:
    """WAL mode; when two connections open a brand-new file at once, one briefly sees a lock."""
    for attempt in range(50):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == 49:
                raise
            time.sleep(0.05)


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL, or None (in memory, or a ``file:`` URI)."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def make_private(path: Path) -> None:
    """Create the SQLite file 0600 before SQLite does, and narrow an older, wider one.

    SQLite creates its ``-wal`` and ``-shm`` files with the database file's mode, so they
    follow; whatever the process umask, the data is readable by its owner only.

    An existing database is never opened here, only chmod-ed: closing any descriptor of a
    file drops every POSIX lock this process holds on it, so opening and closing the file
    beside a live engine would strip that engine's locks and let writers corrupt it.
    """
    try:
        if not path.parent.exists():
            path.parent.mkdir(parents=True, mode=0o700)
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            if path.stat().st_mode & 0o077:
                path.chmod(0o600)
        for suffix in ("-wal", "-shm", "-journal"):
            side = path.with_name(path.name + suffix)
            if side.exists() and side.stat().st_mode & 0o077:
                side.chmod(0o600)
    except OSError:
        return  # not ours to create or narrow (read-only, another owner): SQLite will say why


def engine_for(settings: Settings) -> Engine:
    if settings.database_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return make_engine(settings.effective_database_url)


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """One transaction: committed on success, rolled back on any error."""
    with Session(engine, expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
