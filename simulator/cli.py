"""``asicfleet sim``: run a virtual farm and poke at it through its control API."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from simulator.errors import SimulatorError
from simulator.farm import DEFAULT_MIX, farm_spec

app = typer.Typer(
    help="A virtual ASIC farm on loopback addresses that pyasic cannot tell from real miners.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

DEFAULT_CONTROL = "http://127.0.0.1:8700"
ControlOpt = Annotated[str, typer.Option("--control", help="URL of a running farm's control API.")]


def fail(message: str, code: int = 2) -> NoReturn:
    """One line on stderr and a non-zero exit: what a script can act on."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@app.command()
def run(
    miners: Annotated[int, typer.Option(help="How many virtual miners to serve.")] = 100,
    mix: Annotated[
        str,
        typer.Option(help="Personality weights, e.g. antminer=60,whatsminer=25,avalon=10,vnish=5."),
    ] = DEFAULT_MIX,
    subnet: Annotated[
        str, typer.Option(help="Loopback subnet the miners live in (inside 127.0.0.0/8).")
    ] = "127.10.0.0/16",
    seed: Annotated[
        int, typer.Option(help="Same seed, same farm: serials, MACs, models, faults.")
    ] = 7,
    faults: Annotated[
        str,
        typer.Option(
            help="Faults at start, as a fraction or a count of the farm per fault, "
            "e.g. blackhole=1%,malware=2%,offline=3."
        ),
    ] = "",
    control_port: Annotated[int, typer.Option(help="Port of the control API on 127.0.0.1.")] = 8700,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Worker processes (default: enough for the open-file limit and the cores)."
        ),
    ] = None,
    restart_seconds: Annotated[
        float, typer.Option(help="How long a miner does not hash after a config write.")
    ] = 20.0,
    reboot_seconds: Annotated[
        float, typer.Option(help="How long a rebooting miner is unreachable.")
    ] = 30.0,
    worker_names: Annotated[
        str,
        typer.Option(
            help="Initial pool workers: 'ip' (<account>.<ip octets>) or 'serial' "
            "(<account>.<chassis serial>, a farm on an {account}.{serial} worker rule)."
        ),
    ] = "ip",
    inventory_out: Annotated[
        Path | None,
        typer.Option(help="Write the true state of every miner to this JSON file once listening."),
    ] = None,
) -> None:
    """Serve a farm until Ctrl-C.

    Listening on ports 80 and 4028 needs root (or CAP_NET_BIND_SERVICE).
    """
    from simulator.supervisor import FarmStarted, run_farm

    try:
        spec = farm_spec(
            miners=miners,
            mix=mix,
            subnet=subnet,
            seed=seed,
            faults=faults,
            restart_seconds=restart_seconds,
            reboot_seconds=reboot_seconds,
            worker_names=worker_names,
        )
        if not 1 <= control_port <= 65535:
            fail(f"--control-port {control_port} is not a TCP port")
        if workers is not None and workers < 1:
            fail("--workers must be at least 1")
    except SimulatorError as exc:
        fail(str(exc))

    def announce(started: FarmStarted) -> None:
        counts = ", ".join(f"{name} {count}" for name, count in sorted(started.counts.items()))
        typer.echo(
            f"asicfleet sim: {started.miners} miners ({counts}) on {started.first_ip} - "
            f"{started.last_ip}, {started.shards} worker process(es), "
            f"ready in {started.startup_seconds:.1f} s"
        )
        typer.echo(f"control API: {started.control_url}  (GET /miners, POST /miners/IP/faults …)")
        if started.inventory_path is not None:
            typer.echo(f"inventory: {started.inventory_path}")
        typer.echo("Ctrl-C to stop.")
        sys.stdout.flush()

    try:
        asyncio.run(run_farm(spec, control_port, workers, inventory_out, announce))
    except SimulatorError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        pass


def _request(control: str, method: str, path: str, body: Any = None) -> Any:
    import httpx

    try:
        response = httpx.request(method, control.rstrip("/") + path, json=body, timeout=30)
    except httpx.HTTPError as exc:
        fail(f"cannot reach the farm's control API at {control}: {exc}", code=1)
    try:
        payload = response.json()
    except ValueError:
        fail(f"control API answered {response.status_code} without JSON", code=1)
    if response.status_code >= 400:
        fail(str(payload.get("error", payload)), code=1)
    return payload


@app.command("miners")
def list_miners(
    control: ControlOpt = DEFAULT_CONTROL,
    personality: Annotated[str | None, typer.Option(help="Only this personality.")] = None,
    fault: Annotated[str | None, typer.Option(help="Only miners with this fault.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the farm's miners with their true state."""
    query = []
    if personality:
        query.append(f"personality={personality}")
    if fault:
        query.append(f"fault={fault}")
    miners = _request(control, "GET", "/miners" + ("?" + "&".join(query) if query else ""))
    if as_json:
        typer.echo(json.dumps(miners, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("IP", "make", "model", "firmware", "serial", "MAC", "pool 1", "mining", "faults")
    for m in miners:
        pool = m["pools"][0] if m["pools"] else {"url": "", "user": ""}
        table.add_row(
            m["ip"],
            m["make"],
            m["model"],
            m["firmware"],
            m["serial"],
            m["mac"],
            f"{pool['url']} {pool['user']}",
            "yes" if m["is_mining"] else "no",
            ", ".join(m["faults"]),
        )
    Console().print(table)


@app.command("fault")
def inject_fault(
    ip: Annotated[str, typer.Argument(help="The miner's address.")],
    fault: Annotated[str, typer.Argument(help="Fault name, e.g. blackhole, malware, offline.")],
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="key=value (JSON values allowed).")
    ] = None,
    control: ControlOpt = DEFAULT_CONTROL,
) -> None:
    """Inject a fault into one running miner."""
    params: dict[str, Any] = {}
    for item in param or []:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"--param {item!r} is not key=value")
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    result = _request(control, "POST", f"/miners/{ip}/faults", {"fault": fault, "params": params})
    typer.echo(f"{ip}: faults now {', '.join(result['faults']) or 'none'}")


@app.command("clear")
def clear_fault(
    ip: Annotated[str, typer.Argument(help="The miner's address.")],
    fault: Annotated[str | None, typer.Argument(help="Fault to clear (default: all).")] = None,
    control: ControlOpt = DEFAULT_CONTROL,
) -> None:
    """Clear one fault, or all faults, of a running miner."""
    path = f"/miners/{ip}/faults" + (f"/{fault}" if fault else "")
    result = _request(control, "DELETE", path)
    typer.echo(f"{ip}: faults now {', '.join(result['faults']) or 'none'}")


@app.command("log")
def show_log(
    ip: Annotated[str, typer.Argument(help="The miner's address.")],
    control: ControlOpt = DEFAULT_CONTROL,
    writes: Annotated[bool, typer.Option(help="Only requests that changed something.")] = False,
) -> None:
    """Show what clients asked a miner (to prove that something was or was not written)."""
    for entry in _request(control, "GET", f"/miners/{ip}/log"):
        if writes and not entry["write"]:
            continue
        mark = "W" if entry["write"] else " "
        typer.echo(f"{entry['ts']:.3f} {mark} {entry['via']:<8} {entry['op']} {entry['detail']}")
