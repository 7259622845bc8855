"""``asicfleet controller serve`` and ``migrate``: bring the schema up to date, then serve.

Both accept ``--data-dir``/``--database-url`` after the command as well as on the group
(``asicfleet controller serve --database-url …`` is how operators type it). Failures that
are the operator's to fix — bad settings, an unreachable database, a database migrated by
newer code, a port in use — end in one line on stderr and a non-zero exit.
"""

from __future__ import annotations

import signal
import socket
from pathlib import Path
from types import FrameType
from typing import Annotated, NoReturn

import typer
from alembic.util.exc import CommandError
from sqlalchemy import make_url
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from controller import migrations, signing
from controller.cli.context import CliContext, context, fail
from controller.db import engine_for
from controller.settings import Settings

DataDirOption = Annotated[
    Path | None, typer.Option("--data-dir", help="State directory (overrides the group option).")
]
DatabaseUrlOption = Annotated[
    str | None, typer.Option("--database-url", help="SQLAlchemy URL (overrides the group option).")
]


def register(app: typer.Typer) -> None:
    """Add ``serve`` and ``migrate`` to the `asicfleet controller` group."""
    app.command("serve")(serve)
    app.command("migrate")(migrate)


def serve(
    ctx: typer.Context,
    bind: Annotated[
        str | None,
        typer.Option(help="host:port to listen on (default 127.0.0.1:8080; env ASICFLEET_BIND)."),
    ] = None,
    data_dir: DataDirOption = None,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Migrate the database to the latest schema, then serve the API until SIGTERM/SIGINT."""
    import uvicorn

    from controller.app import create_app

    cli = _with_overrides(context(ctx), data_dir, database_url)
    settings = cli.settings(bind=bind)
    try:  # refuse to start with a signing key anyone else can read, before serving anything
        signing.load_or_create(settings.data_dir)
    except signing.SigningKeyError as exc:
        fail(str(exc))
    engine, before, after = migrated_engine(settings)
    typer.echo(f"schema at revision {after} (was {before or 'empty'})", err=True)
    sock = _listen(settings)
    typer.echo(f"listening on http://{settings.bind}", err=True)
    config = uvicorn.Config(
        create_app(settings, engine),
        log_level="info",
        server_header=False,
        timeout_graceful_shutdown=10,
    )
    # uvicorn shuts down gracefully, then re-raises the signal to the handler it found:
    # make that handler a clean exit (status 0) rather than death by signal.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_cleanly)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        engine.dispose()


def migrate(
    ctx: typer.Context,
    data_dir: DataDirOption = None,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Upgrade the database schema to the latest revision (safe to run again) and say which."""
    cli = _with_overrides(context(ctx), data_dir, database_url)
    engine, before, after = migrated_engine(cli.settings())
    engine.dispose()
    if before == after:
        typer.echo(f"already at revision {after}")
    else:
        typer.echo(f"upgraded to revision {after} (from {before or 'empty database'})")


def _with_overrides(cli: CliContext, data_dir: Path | None, database_url: str | None) -> CliContext:
    if data_dir is not None:
        cli.data_dir = data_dir
    if database_url is not None:
        cli.database_url = database_url
    return cli


def migrated_engine(settings: Settings) -> tuple[Engine, str | None, str | None]:
    """An engine over the migrated database, with the revisions before and after.

    Every expected failure becomes a one-line error (exit 2 for a bad URL, else 1).
    """
    where = _redacted(settings.effective_database_url)
    try:
        engine = engine_for(settings)
    except OSError as exc:
        fail(f"cannot create data directory {settings.data_dir}: {exc.strerror or exc}")
    except (SQLAlchemyError, ImportError) as exc:
        fail(f"bad database URL {where}: {_one_line(exc)}", code=2)
    try:
        before = migrations.current(engine)
        after = migrations.upgrade(engine)
    except CommandError as exc:
        engine.dispose()
        fail(f"cannot migrate {where}: {_one_line(exc)} (was it migrated by a newer version?)")
    except (SQLAlchemyError, OSError, RuntimeError) as exc:
        engine.dispose()
        fail(f"cannot migrate {where}: {_one_line(exc)}")
    return engine, before, after


def _exit_cleanly(signum: int, frame: FrameType | None) -> NoReturn:
    raise SystemExit(0)


def _listen(settings: Settings) -> socket.socket:
    """Bind the listening socket ourselves so that a busy port is a one-line error."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            settings.host.strip("[]"), settings.port, type=socket.SOCK_STREAM
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        fail(f"cannot listen on {settings.bind}: {exc.strerror or exc}")
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        fail(f"cannot listen on {settings.bind}: {exc.strerror or exc}")
    sock.set_inheritable(True)
    return sock


def _redacted(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except SQLAlchemyError:
        return "<unparsable database URL>"


def _one_line(exc: BaseException) -> str:
    """The driver's own message when there is one, on one line, without SQLAlchemy's footer."""
    inner = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    text = " ".join(str(inner).split())
    return text or type(inner).__name__
