"""Alembic environment: migrates the connection handed over by ``controller.migrations``.

Run from ``controller.migrations`` (``serve``, ``migrate``, tests), the connection and its
transaction come from the caller. Given only ``sqlalchemy.url`` (e.g. a plain ``alembic``
command with ``-x``-less config), it opens its own engine; offline mode renders SQL.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from controller.db import make_engine
from controller.migrations import context_options

config = context.config


def _run(connection: Connection) -> None:
    context.configure(connection=connection, **context_options(connection.dialect.name))
    with context.begin_transaction():
        context.run_migrations()


def run_offline() -> None:
    url = config.get_main_option("sqlalchemy.url") or "sqlite://"
    dialect = url.split(":", 1)[0].split("+", 1)[0]
    context.configure(url=url, literal_binds=True, **context_options(dialect))
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no connection and no sqlalchemy.url given to the migration env")
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
