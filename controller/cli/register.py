"""``asicfleet controller machines …``: the register from the console.

Changes act as a named controller user (:mod:`controller.cli.identity`). Errors are one line
on stderr with a non-zero exit; ``import-claims`` prints a result per row and imports
nothing when any row is bad.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.table import Table

from controller import register as reg
from controller.cli.context import fail
from controller.cli.context import transaction as _session
from controller.cli.context import validated as _validated
from controller.cli.context import wide_console as _console
from controller.cli.identity import AsOpt, StdinOpt, acting_user
from controller.models import LifecycleState
from controller.register import (
    ClaimRequest,
    ConfirmSerialRequest,
    ImportResult,
    MachineDetail,
    MachinePublic,
    StateChangeRequest,
)

T = TypeVar("T")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _location(m: MachinePublic) -> str:
    parts = [m.site, m.container, m.rack, m.shelf, m.slot]
    return "/".join(p or "-" for p in parts) if any(parts) else ""


def _when(value: object) -> str:
    return value.isoformat(timespec="seconds") if hasattr(value, "isoformat") else ""


def _machines_table(machines: list[MachinePublic], total: int) -> Table:
    table = Table(title=f"{len(machines)} of {total} machines", title_justify="left")
    for name in ("machine", "state", "location", "label serial", "reported serial"):
        table.add_column(name, no_wrap=True)
    for name in ("MAC", "IP", "model", "last seen", "flags"):
        table.add_column(name)
    for m in machines:
        flags = list(m.flags)
        if m.serial_unconfirmed and "serial_unconfirmed" not in flags:
            flags.append("serial_unconfirmed")
        table.add_row(
            m.machine_id,
            m.lifecycle_state.value,
            _location(m),
            m.label_serial or "",
            m.reported_serial or "",
            m.mac or "",
            m.current_ip or "",
            machine_name(m.vendor, m.model),
            _when(m.last_seen),
            ", ".join(flags),
        )
    return table


def _print_detail(detail: MachineDetail) -> None:
    console = _console()
    info = Table(show_header=False, title=f"machine {detail.machine_id}", title_justify="left")
    info.add_column("field", style="bold")
    info.add_column("value")
    for name, value in detail.model_dump(exclude={"history", "latest_observation"}).items():
        if isinstance(value, list):
            value = ", ".join(str(v) for v in value)
        info.add_row(name, "" if value is None else _when(value) or str(value))
    console.print(info)
    history = Table(title="lifecycle", title_justify="left")
    for name in ("at", "from", "to", "by", "reason"):
        history.add_column(name)
    for h in detail.history:
        history.add_row(_when(h.at), h.from_state or "", h.to_state, h.actor, h.reason)
    console.print(history)
    obs = detail.latest_observation
    if obs is None:
        console.print("latest observation: none")
    else:
        state = "reachable" if obs.reachable else f"unreachable ({obs.error or 'no answer'})"
        readings = ", ".join(
            text
            for text in (
                _reading("mining", obs.is_mining),
                _reading("", obs.hashrate_ths, "TH/s"),
                _reading("", obs.power_w, "W"),
                _reading("", obs.temperature_c, "°C"),
                f"ip {obs.ip}" if obs.ip else "",
            )
            if text
        )
        console.print(f"latest observation {_when(obs.observed_at)}: {state}, {readings}")


def machine_name(vendor: str | None, model: str | None) -> str:
    """``Antminer S19j Pro``, not ``AntMiner Antminer S19j Pro``: the vendor only where the
    model does not already start with it."""
    if vendor and model and model.casefold().startswith(vendor.casefold()):
        return model
    return " ".join(p for p in (vendor, model) if p)


def _reading(name: str, value: float | bool | None, unit: str = "") -> str:
    """One reading of a poll, or "" when the miner did not report it (never "None W")."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return f"{name}={'yes' if value else 'no'}"
    return f"{value:g} {unit}".strip()


def _import_table(result: ImportResult) -> Table:
    title = (
        f"{result.imported} machines claimed"
        if result.ok and not result.dry_run
        else "dry run: every row is valid; nothing imported"
        if result.ok
        else f"nothing imported: {len(result.bad_rows)} bad row(s)"
    )
    table = Table(title=title, title_justify="left")
    for name in ("line", "row", "machine", "status", "detail"):
        table.add_column(name)
    for row in result.rows:
        detail = "; ".join(row.errors)
        if row.override and not detail:
            detail = f"serial override (reported {row.reported_serial})"
        table.add_row(str(row.line), row.ref, row.machine_id or "", row.status, detail)
    return table


def register(app: typer.Typer) -> None:
    """Add the ``machines`` group to the `asicfleet controller` group."""
    machines = typer.Typer(
        help="The machine register: list, show, claim, import claims, lifecycle.",
        no_args_is_help=True,
    )
    app.add_typer(machines, name="machines")

    @machines.command("list")
    def list_(
        ctx: typer.Context,
        state: Annotated[
            LifecycleState | None, typer.Option(help="Only machines in this lifecycle state.")
        ] = None,
        site: Annotated[str | None, typer.Option(help="Only machines of this site.")] = None,
        limit: Annotated[int | None, typer.Option(min=1, help="At most this many.")] = None,
        as_json: JsonOpt = False,
    ) -> None:
        """List machines on the register."""
        with _session(ctx) as session:
            page = reg.list_machines(session, state=state, site=site, limit=limit)
        if as_json:
            typer.echo(page.model_dump_json(indent=2))
        else:
            _console().print(_machines_table(page.data, page.count))

    @machines.command("show")
    def show(
        ctx: typer.Context,
        machine: Annotated[str, typer.Argument(metavar="ID", help="machine_id, MAC or IP")],
        as_json: JsonOpt = False,
    ) -> None:
        """One machine with its lifecycle history and latest observation."""
        with _session(ctx) as session:
            detail = reg.machine_detail(session, machine)
        if as_json:
            typer.echo(detail.model_dump_json(indent=2))
        else:
            _print_detail(detail)

    @machines.command("claim")
    def claim(
        ctx: typer.Context,
        machine: Annotated[str, typer.Argument(metavar="ID", help="machine_id, MAC or IP")],
        site: Annotated[str, typer.Option(help="Site name.")],
        container: Annotated[str, typer.Option()],
        rack: Annotated[str, typer.Option()],
        shelf: Annotated[str, typer.Option()],
        slot: Annotated[str, typer.Option()],
        label_serial: Annotated[str, typer.Option(help="Serial read from the chassis label.")],
        override_reason: Annotated[
            str | None,
            typer.Option(help="Accept a label serial that differs from the reported one."),
        ] = None,
        as_json: JsonOpt = False,
        as_user: AsOpt = "",
        password_stdin: StdinOpt = False,
    ) -> None:
        """Claim a discovered machine onto the register."""
        request = _validated(
            lambda: ClaimRequest(
                site=site,
                container=container,
                rack=rack,
                shelf=shelf,
                slot=slot,
                label_serial=label_serial,
                override_reason=override_reason,
            )
        )
        actor = acting_user(
            ctx,
            as_user,
            password_stdin,
            route=("POST", "/machines/{machine_id}/claim"),
            doing="claiming a machine",
        )
        with _session(ctx) as session:
            detail = reg.claim(session, actor, machine, request)
        if as_json:
            typer.echo(detail.model_dump_json(indent=2))
            return
        note = " (serial override recorded)" if reg.SERIAL_MISMATCH_FLAG in detail.flags else ""
        typer.echo(
            f"claimed {detail.machine_id} at {_location(detail)}, "
            f"label serial {detail.label_serial}{note}"
        )

    @machines.command("import-claims")
    def import_claims(
        ctx: typer.Context,
        file: Annotated[
            Path,
            typer.Argument(
                metavar="FILE.csv",
                help="Header: mac or ip (or machine_id), site, container, rack, shelf, slot, "
                "label_serial, and optionally override_reason (see docs/controller.md).",
            ),
        ],
        dry_run: Annotated[
            bool, typer.Option("--dry-run", help="Check the file; import nothing.")
        ] = False,
        as_json: JsonOpt = False,
        as_user: AsOpt = "",
        password_stdin: StdinOpt = False,
    ) -> None:
        """Claim many machines from a CSV: every row, or none if any row is bad."""
        try:
            text = file.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            fail(f"{file}: no such file")
        except UnicodeDecodeError as exc:
            fail(f"{file}: not UTF-8 text (byte {exc.start})")
        except OSError as exc:
            fail(f"{file}: {exc.strerror}")
        actor = acting_user(
            ctx,
            as_user,
            password_stdin,
            route=("POST", "/machines/import-claims"),
            doing="importing claims",
        )
        with _session(ctx) as session:
            result = reg.import_claims(session, actor, text, dry_run=dry_run, source_name=file.name)
            if not result.ok or dry_run:
                session.rollback()
        if as_json:
            typer.echo(result.model_dump_json(indent=2))
        else:
            for problem in result.file_errors:
                typer.echo(f"error: {file}: {problem}", err=True)
            if result.rows:
                _console().print(_import_table(result))
        if not result.ok:
            raise typer.Exit(1)

    @machines.command("state")
    def state(
        ctx: typer.Context,
        machine: Annotated[str, typer.Argument(metavar="ID", help="machine_id, MAC or IP")],
        to: Annotated[LifecycleState, typer.Argument(metavar="STATE")],
        reason: Annotated[str, typer.Option(help="Why (required for rma, decommissioned).")] = "",
        as_user: AsOpt = "",
        password_stdin: StdinOpt = False,
    ) -> None:
        """Move a machine along its lifecycle."""
        request = _validated(lambda: StateChangeRequest(state=to, reason=reason))
        actor = acting_user(
            ctx,
            as_user,
            password_stdin,
            route=("POST", "/machines/{machine_id}/state"),
            doing="changing a machine's state",
        )
        with _session(ctx) as session:
            detail = reg.change_state(session, actor, machine, request)
        typer.echo(f"{detail.machine_id} is now {detail.lifecycle_state.value}")

    @machines.command("confirm-serial")
    def confirm_serial(
        ctx: typer.Context,
        machine: Annotated[str, typer.Argument(metavar="ID", help="machine_id, MAC or IP")],
        serial: Annotated[str, typer.Option(help="Serial read from the chassis label.")],
        override_reason: Annotated[str | None, typer.Option()] = None,
        as_user: AsOpt = "",
        password_stdin: StdinOpt = False,
    ) -> None:
        """Confirm the serial of a machine whose serial the agent could not read."""
        request = _validated(
            lambda: ConfirmSerialRequest(serial=serial, override_reason=override_reason)
        )
        actor = acting_user(
            ctx,
            as_user,
            password_stdin,
            route=("POST", "/machines/{machine_id}/confirm-serial"),
            doing="confirming a serial",
        )
        with _session(ctx) as session:
            detail = reg.confirm_serial(session, actor, machine, request)
        typer.echo(f"{detail.machine_id}: serial {detail.label_serial} confirmed")
