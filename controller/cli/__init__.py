"""``asicfleet controller …``: serve, migrate, and the operator's commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from controller.cli import audit, compliance, export, people, policy, register, server
from controller.cli.context import CliContext

app = typer.Typer(
    help="The central controller: machine register, agents, audit log, users and roles.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _options(
    ctx: typer.Context,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="State directory (SQLite file, keys). Env ASICFLEET_DATA_DIR."),
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(help="SQLAlchemy URL, e.g. postgresql+psycopg://u@host/db (default SQLite)."),
    ] = None,
) -> None:
    ctx.obj = CliContext(data_dir=data_dir, database_url=database_url)


server.register(app)
people.register(app)
register.register(app)
audit.register(app)
export.register(app)
compliance.register(app)
policy.register(app)
