"""What every controller command shares: settings, the engine, one-line errors."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console
from sqlalchemy.engine import Engine
from sqlmodel import Session

from controller.errors import ConfigError
from controller.settings import Settings, load_settings

T = TypeVar("T")


def fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr and a non-zero exit."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@dataclass
class CliContext:
    data_dir: Path | None = None
    database_url: str | None = None
    _settings: Settings | None = field(default=None, init=False)
    _engine: Engine | None = field(default=None, init=False)

    def settings(self, **overrides: Any) -> Settings:
        if self._settings is None or overrides:
            try:
                self._settings = load_settings(
                    data_dir=self.data_dir, database_url=self.database_url, **overrides
                )
            except ConfigError as exc:
                fail(str(exc), code=2)
        return self._settings

    def engine(self) -> Engine:
        """The engine, after making sure the schema is migrated to the latest revision."""
        if self._engine is None:
            from controller.cli.server import migrated_engine

            self._engine, _, _ = migrated_engine(self.settings())
        return self._engine


def context(ctx: typer.Context) -> CliContext:
    obj = ctx.find_object(CliContext)
    if obj is None:  # called without the group callback (tests invoking a command directly)
        obj = CliContext()
        ctx.obj = obj
    return obj


def in_transaction(ctx: typer.Context, action: Callable[[Session], T]) -> T:
    """Run ``action`` in one transaction; a refused change is a one-line error, exit 1."""
    from sqlalchemy.exc import OperationalError

    from controller.db import session_scope
    from controller.errors import ControllerError

    try:
        with session_scope(context(ctx).engine()) as session:
            return action(session)
    except ControllerError as exc:
        fail(str(exc))
    except OperationalError as exc:
        fail(f"database unavailable: {str(exc.orig).strip().splitlines()[0]}")


def validated(build: Callable[[], T]) -> T:
    """A request model, or a one-line error naming what is wrong (exit 2)."""
    try:
        return build()
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        errors = getattr(exc, "errors", None)
        if callable(errors):
            fail(
                "; ".join(
                    f"{'.'.join(str(p) for p in e['loc']) or 'value'}: "
                    f"{str(e['msg']).removeprefix('Value error, ')}"
                    for e in errors()
                ),
                code=2,
            )
        fail(str(exc), code=2)


@contextmanager
def transaction(ctx: typer.Context) -> Iterator[Session]:
    """One transaction; controller errors become a one-line message and exit code 1."""
    from controller.db import session_scope
    from controller.errors import ControllerError

    try:
        with session_scope(context(ctx).engine()) as session:
            yield session
    except ControllerError as exc:
        fail(str(exc))


def wide_console() -> Console:
    """A console; when output is piped, wide enough that table rows stay on one line."""
    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 200))
