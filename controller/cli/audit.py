"""``asicfleet controller audit …``: verify and read the hash-chained audit log.

``verify`` exits 0 with "audit log intact: N entries, head <hash>", or 1 naming the first
modified, deleted or reordered entry, so it can run from cron or a compliance script.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from controller.audit_verify import list_entries, verify_chain
from controller.cli.context import context, fail
from controller.db import session_scope
from controller.errors import ControllerError


def _console() -> Console:
    """A console; when output is piped, wide enough that table rows stay on one line."""
    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 200))


def register(app: typer.Typer) -> None:
    """Add the ``audit`` group to the `asicfleet controller` group."""
    audit = typer.Typer(
        help="The hash-chained audit log: verify it, read it.", no_args_is_help=True
    )
    app.add_typer(audit, name="audit")

    @audit.command("verify")
    def verify(
        ctx: typer.Context,
        anchor: Annotated[
            str | None,
            typer.Option(
                "--anchor",
                help="A head hash noted earlier; fails if the chain no longer contains it.",
            ),
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    ) -> None:
        """Recompute the chain from the entries and name the first bad one."""
        if anchor is not None and (
            len(anchor) != 64 or any(c not in "0123456789abcdef" for c in anchor)
        ):
            fail("--anchor must be a 64-character lower-case hex SHA-256", code=2)
        engine = context(ctx).engine()
        try:
            with session_scope(engine) as session:
                result = verify_chain(session, anchor=anchor)
        except ControllerError as exc:
            fail(str(exc))
        if as_json:
            typer.echo(result.model_dump_json(indent=2))
        elif result.ok:
            typer.echo(result.message)
        else:
            typer.echo(result.message, err=True)
        if not result.ok:
            raise typer.Exit(1)

    @audit.command("list")
    def list_(
        ctx: typer.Context,
        limit: Annotated[int, typer.Option(min=1, max=1000, help="How many entries.")] = 50,
        entity_id: Annotated[str | None, typer.Option(help="Only entries about this id.")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    ) -> None:
        """The newest entries, newest first."""
        engine = context(ctx).engine()
        with session_scope(engine) as session:
            page = list_entries(session, limit=limit, order="desc", entity_id=entity_id)
        if as_json:
            typer.echo(page.model_dump_json(indent=2))
            return
        table = Table(title=f"{len(page.data)} newest audit entries", title_justify="left")
        for name in ("seq", "at", "actor", "action", "entity", "source", "reason"):
            table.add_column(name)
        for e in page.data:
            table.add_row(
                str(e.seq),
                e.at.isoformat(timespec="seconds"),
                e.actor,
                e.action,
                f"{e.entity} {e.entity_id}".strip(),
                e.source,
                e.reason,
            )
        _console().print(table)
