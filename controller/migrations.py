"""Schema migrations with Alembic, configured in code so they work from an installed package.

``upgrade(engine)`` is what ``serve`` and ``migrate`` call: it brings the database to the
newest revision in ``controller/alembic/versions`` inside one transaction, holding a lock
so that two controllers starting at once on one PostgreSQL (or one SQLite file) do not
race. Developers add a revision after changing ``controller.models`` with::

    python -m controller.migrations revision -m "add machine notes"

which autogenerates the next numbered revision (``0002_add_machine_notes.py``) against a
scratch SQLite database at head; review it before committing.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.autogenerate.api import AutogenContext
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlmodel import SQLModel
from sqlmodel.sql.sqltypes import AutoString

from controller import models
from controller.db import make_engine

SCRIPT_LOCATION = Path(__file__).resolve().parent / "alembic"
# pg_advisory_xact_lock key for migrations (the audit log uses a different one).
MIGRATION_LOCK = 741852964

target_metadata = SQLModel.metadata


# --- how revisions are rendered and compared (shared by env.py and the schema check) ----------


def render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | bool:
    """Render our column types without importing model code into revisions.

    ``UTCDateTime`` is stored as a plain timezone-aware timestamp, so a revision says
    ``sa.DateTime(timezone=True)``; SQLModel's ``AutoString`` is imported by name.
    """
    if type_ != "type":
        return False
    if isinstance(obj, models.UTCDateTime):
        return "sa.DateTime(timezone=True)"
    if isinstance(obj, AutoString):
        if autogen_context.imports is not None:
            autogen_context.imports.add("from sqlmodel.sql.sqltypes import AutoString")
        length = f"length={obj.length}" if obj.length is not None else ""
        return f"AutoString({length})"
    return False


def context_options(dialect_name: str) -> dict[str, Any]:
    """Options for ``context.configure`` / ``MigrationContext.configure`` on this dialect.

    Batch mode on SQLite lets later revisions alter columns (SQLite has no ALTER COLUMN);
    on PostgreSQL the same batch blocks turn into plain ALTERs.
    """
    return {
        "target_metadata": target_metadata,
        "render_item": render_item,
        "render_as_batch": dialect_name == "sqlite",
        "compare_type": True,
    }


# --- running -----------------------------------------------------------------------------------


def alembic_config(connection: Connection | None = None, url: str | None = None) -> Config:
    """An Alembic Config without alembic.ini: script location inside this package."""
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    cfg.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    """The newest revision this code knows."""
    rev = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if rev is None:
        raise RuntimeError("no migration revisions found in the package")
    return rev


def current(engine: Engine) -> str | None:
    """The revision the database is at (None when it was never migrated)."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


SUMS_REVISION = 2
"""The revision that added ``observation_sum``: history kept before it is summed once."""


def _revision_number(revision: str | None) -> int:
    """``0003`` and ``0003_http_bounds`` are both revision 3 (helpers' revisions are named)."""
    digits = revision.split("_", 1)[0] if revision is not None else ""
    return int(digits) if digits.isdigit() else 0


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Bring the schema to ``revision`` atomically and return the revision it is now at.

    Idempotent: at head, it only takes the lock and checks the version table. Crossing
    :data:`SUMS_REVISION` backfills the observation sums from the history already kept, in the
    same transaction (the revision files stay free of model code).
    """
    with _migration_transaction(engine) as conn:
        before = MigrationContext.configure(conn).get_current_revision()
        command.upgrade(alembic_config(conn), revision)
        after = MigrationContext.configure(conn).get_current_revision()
        if _revision_number(before) < SUMS_REVISION <= _revision_number(after):
            from controller.history_rollup import rebuild

            rebuild(conn)
    return current(engine)


def downgrade(engine: Engine, revision: str) -> str | None:
    """Step the schema back to ``revision`` (``base`` empties it); for development and tests."""
    with _migration_transaction(engine) as conn:
        command.downgrade(alembic_config(conn), revision)
    return current(engine)


@contextmanager
def _migration_transaction(engine: Engine) -> Iterator[Connection]:
    """One transaction holding the database-wide migration lock; committed if all went well.

    PostgreSQL: an advisory lock (DDL is transactional). SQLite: pysqlite would autocommit
    each DDL statement, so the transaction is opened explicitly (``BEGIN IMMEDIATE`` also
    keeps a second process out); foreign keys are switched off around it, as SQLite's own
    procedure for table rebuilds prescribes, and checked before committing.
    """
    with engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:
            conn.exec_driver_sql("PRAGMA foreign_keys=OFF")  # no effect inside a transaction
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        before = MigrationContext.configure(conn).get_current_revision()
        try:
            yield conn
            changed = MigrationContext.configure(conn).get_current_revision() != before
            # The check reads every row of every table with a foreign key (seconds or more on a
            # large history), so it runs only when a revision actually ran.
            if sqlite and changed:
                broken = conn.exec_driver_sql("PRAGMA foreign_key_check").first()
                if broken is not None:
                    raise RuntimeError(f"migration broke a foreign key: {tuple(broken)}")
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        finally:
            if sqlite:
                conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                conn.commit()


def differences(engine: Engine) -> list[Any]:
    """What autogenerate would change: empty when the database matches the models exactly."""
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts=context_options(conn.dialect.name))
        diffs: list[Any] = compare_metadata(context, target_metadata)
        return diffs


# --- authoring revisions (developers) ----------------------------------------------------------


def next_revision_id() -> str:
    """Revisions are numbered ``0001``, ``0002`` … so the versions folder reads in order."""
    script = ScriptDirectory.from_config(alembic_config())
    numbers = [_revision_number(s.revision) for s in script.walk_revisions()]
    return f"{max(numbers, default=0) + 1:04d}"


def revision(message: str, database_url: str | None = None) -> Path:
    """Autogenerate the next revision from the models against a database at head.

    By default the database is a scratch SQLite file, so no server is needed.
    """
    with tempfile.TemporaryDirectory() as tmp:
        url = database_url or f"sqlite:///{Path(tmp) / 'scratch.db'}"
        engine = make_engine(url)
        try:
            upgrade(engine)
            with engine.begin() as conn:
                scripts = command.revision(
                    alembic_config(conn),
                    message=message,
                    autogenerate=True,
                    rev_id=next_revision_id(),
                )
        finally:
            engine.dispose()
    items = scripts if isinstance(scripts, list) else [scripts]
    path = Path(items[0].path) if items and items[0] is not None else None
    if path is None:
        raise RuntimeError("alembic did not write a revision")
    _tidy(path)
    return path


def _tidy(path: Path) -> None:
    """Format a generated revision with ruff when it is installed (a dev dependency)."""
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        return
    subprocess.run([ruff, "format", "--quiet", str(path)], check=False)
    subprocess.run([ruff, "check", "--fix", "--quiet", str(path)], check=False)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m controller.migrations revision -m MSG | heads | check --database-url URL``."""
    parser = argparse.ArgumentParser(prog="python -m controller.migrations")
    sub = parser.add_subparsers(dest="cmd", required=True)
    rev = sub.add_parser("revision", help="autogenerate the next revision from controller.models")
    rev.add_argument("-m", "--message", required=True)
    rev.add_argument("--database-url", help="diff against this database instead of scratch")
    sub.add_parser("heads", help="print the newest revision")
    chk = sub.add_parser("check", help="exit 1 if the database differs from the models")
    chk.add_argument("--database-url", required=True)
    args = parser.parse_args(argv)

    if args.cmd == "revision":
        if not re.search(r"\w", args.message):
            parser.error("the message must contain a word")
        print(revision(args.message, args.database_url))
        return 0
    if args.cmd == "heads":
        print(head())
        return 0
    engine = make_engine(args.database_url)
    try:
        diffs = differences(engine)
    finally:
        engine.dispose()
    for diff in diffs:
        print(diff)
    return 1 if diffs else 0


if __name__ == "__main__":
    raise SystemExit(main())
