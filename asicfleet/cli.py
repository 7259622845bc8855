"""The ``asicfleet`` command: one entry point, a subcommand group per component."""

from __future__ import annotations

import typer

from agent.cli import app as agent_app
from controller.cli import app as controller_app
from simulator.cli import app as sim_app

app = typer.Typer(
    name="asicfleet",
    help="Fleet agent and controller for licensed ASIC mining farms.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(sim_app, name="sim")
app.add_typer(controller_app, name="controller")
app.add_typer(agent_app, name="agent")


def main() -> None:
    app()
