"""The ``asicfleet`` command: one entry point, a subcommand group per component."""

from __future__ import annotations

import os
from importlib.metadata import version as package_version
from typing import Annotated

import typer

from agent.cli import app as agent_app
from contract import CONTRACT_VERSION
from controller.cli import app as controller_app
from controller.cli.export import verify_export_command
from simulator.cli import app as sim_app

app = typer.Typer(
    name="asicfleet",
    help="Fleet agent and controller for licensed ASIC mining farms.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
PRIVATE_UMASK = 0o077


def _show_version(wanted: bool) -> None:
    if wanted:
        typer.echo(f"asicfleet {package_version('asicfleet')} (contract {CONTRACT_VERSION})")
        raise typer.Exit()


@app.callback()
def _private_files(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_show_version,
            is_eager=True,
            help="Print the asicfleet and wire-contract versions and exit.",
        ),
    ] = False,
) -> None:
    """Whatever the caller's umask, what asicfleet creates is its owner's alone: directories
    0700 and files 0600 (databases and their WAL, keys, exports, outbox, policy, configs).
    Restored when the command ends, so an in-process caller keeps its own umask."""
    previous = os.umask(PRIVATE_UMASK)
    ctx.call_on_close(lambda: os.umask(previous))


app.add_typer(sim_app, name="sim")
app.add_typer(controller_app, name="controller")
app.add_typer(agent_app, name="agent")
app.command("verify-export")(verify_export_command)


def main() -> None:
    app()


@app.command("demo")
def demo(
    miners: Annotated[
        int, typer.Option(help="Size of the simulated farm.", min=1, max=60_000)
    ] = 200,
    port: Annotated[int, typer.Option(help="Port of the controller on 127.0.0.1.")] = 8080,
    exit_when_compliant: Annotated[
        bool,
        typer.Option(
            "--exit-when-compliant",
            help="Exit 0 once every writable machine is on the approved pools by the "
            "simulator's true state (non-zero after --timeout).",
        ),
    ] = False,
    timeout: Annotated[
        float, typer.Option(help="Seconds --exit-when-compliant waits before giving up.")
    ] = 170.0,
    poll_interval: Annotated[
        float, typer.Option(help="The agent's poll interval in seconds.", min=2.0)
    ] = 10.0,
    seed: Annotated[int, typer.Option(help="Same seed, same farm and tampering.")] = 7,
    keep_data: Annotated[
        bool, typer.Option("--keep-data", help="Keep the temporary data directory and logs.")
    ] = False,
) -> None:
    """Controller, simulated farm and an enrolled agent enforcing an approved pool set.

    Everything runs on loopback in a temporary data directory with the embedded SQLite
    database: 10% of the miners start on a foreign pool and 2% carry persistent malware. A
    summary line by the simulator's true state follows; Ctrl-C stops everything. Needs root
    (the simulated miners listen on ports 80 and 4028).
    """
    from asicfleet.demo.run import DemoOptions, run_demo

    if not 1 <= port <= 65535:
        typer.echo(f"error: --port {port} is not a TCP port", err=True)
        raise typer.Exit(2)
    options = DemoOptions(
        miners=miners,
        port=port,
        exit_when_compliant=exit_when_compliant,
        timeout_s=timeout,
        poll_interval_s=poll_interval,
        seed=seed,
        keep_data=keep_data,
    )
    raise typer.Exit(run_demo(options, lambda line: typer.echo(line)))
