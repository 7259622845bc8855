"""``asicfleet agent``: enroll, run the daemon, scan a segment, poll one miner, show status.

Every failure a user can cause (a bad config, an address outside the allowed segments, an
unreachable miner, a refused token) is one line on stderr and a non-zero exit: 1 for "it did
not work", 2 for "you asked for something invalid".

Safety: ``scan`` and ``poll`` touch only 127.0.0.0/8 unless ``--config`` is given, and then
only the segments that config lists. An agent never probes a network it was not given.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
import warnings
from ipaddress import IPv4Network
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from agent.errors import AgentError, DriverError, ScanRefused

if TYPE_CHECKING:
    from agent.config import AgentConfig, AgentSecrets
    from agent.drivers.base import MinerLogin

app = typer.Typer(
    help="The on-site agent: finds, identifies and polls miners and reports to the controller.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[Path, typer.Option("--config", help="The agent's TOML config file.")]
OptionalConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="Use this config's segments (and miner passwords)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
LOOPBACK = IPv4Network("127.0.0.0/8")
SCAN_KEYS = ("ip", "make", "model", "firmware", "serial", "mac")


def fail(message: str, code: int = 1) -> NoReturn:
    """One line on stderr and a non-zero exit."""
    typer.echo(f"error: {' '.join(str(message).split())}", err=True)
    raise typer.Exit(code)


def _quiet_pyasic() -> None:
    """pyasic warns on the root logger and via ``warnings`` about things we handle ourselves."""
    warnings.filterwarnings("ignore", module="pyasic")
    warnings.filterwarnings("ignore", message="Partially supported miner found")
    logging.getLogger().addFilter(lambda record: "pyasic" not in record.pathname)
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: "pyasic" not in record.pathname)


def _load(config_path: Path) -> AgentConfig:
    from agent.config import load_config

    try:
        return load_config(config_path)
    except AgentError as exc:
        fail(str(exc), code=2)


def _logins(config: AgentConfig | None) -> dict[str, MinerLogin]:
    """Miner logins from the config's secrets file, if it has one (scan/poll work without)."""
    if config is None or not config.secrets_file.exists():
        return {}
    from agent.config import load_secrets
    from agent.daemon import miner_credentials

    try:
        return miner_credentials(load_secrets(config.secrets_file))
    except AgentError as exc:
        fail(str(exc), code=2)


def _allowed(config: AgentConfig | None) -> list[IPv4Network]:
    if config is None:
        return [LOOPBACK]
    return list(config.segments)


# --- enroll -------------------------------------------------------------------------------------


def _enrollment_token(flag: str | None, from_stdin: bool, path: Path | None) -> str:
    """The token from exactly one of --token-stdin, --token-file, --token (with a warning)."""
    given = [n for n, on in (("--token-stdin", from_stdin), ("--token-file", path is not None),
                             ("--token", flag is not None)) if on]  # fmt: skip
    if len(given) != 1:
        fail(
            "give the enrollment token with one of --token-stdin (piped in) or --token-file"
            + (f", not {' and '.join(given)}" if given else ""),
            code=2,
        )
    if from_stdin:
        text, where = sys.stdin.readline(), "standard input"
    elif path is not None:
        try:
            text, where = path.read_text(encoding="utf-8"), str(path)
        except OSError as exc:
            fail(f"--token-file {path}: {exc.strerror or exc}", code=2)
        except UnicodeDecodeError:
            fail(f"--token-file {path}: not a text file", code=2)
    else:
        typer.echo(
            "warning: --token is visible to every user of this host in the process list; "
            "use --token-stdin or --token-file",
            err=True,
        )
        text, where = flag or "", "--token"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != 1:
        fail(f"{where}: expected the token on one line, found {len(lines)} lines", code=2)
    return lines[0]


@app.command()
def enroll(
    controller: Annotated[
        str, typer.Option("--controller", help="The controller's URL, e.g. https://host:8443.")
    ],
    config: ConfigOpt,
    token_stdin: Annotated[
        bool, typer.Option("--token-stdin", help="Read the one-time token from standard input.")
    ] = False,
    token_file: Annotated[
        Path | None, typer.Option("--token-file", help="Read the one-time token from this file.")
    ] = None,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            help="The one-time token itself (discouraged: other users of the host see it in "
            "the process list; use --token-stdin or --token-file).",
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="This agent's name (default: the host name).")
    ] = None,
) -> None:
    """Trade a one-time token for this agent's credentials: writes the config (segments, the
    controller's pinned key) and the secrets file (mode 0600)."""
    from agent.config import ControllerConfig, apply_enrollment, load_config
    from agent.uplink import enroll as enroll_request

    try:
        ControllerConfig(url=controller)
    except ValueError as exc:
        fail(f"--controller: {str(exc).splitlines()[-1].strip()}", code=2)
    token = _enrollment_token(token, token_stdin, token_file)
    ca_path = None
    timeout_s = 15.0
    if config.exists():
        try:
            existing = load_config(config)
            ca_path, timeout_s = existing.controller.ca_path, existing.uplink.timeout_s
        except AgentError:
            pass  # the enrollment rewrites what it needs and validates the result
    try:
        response = asyncio.run(
            enroll_request(
                controller.strip().rstrip("/"),
                token.strip(),
                name or socket.gethostname(),
                timeout_s=timeout_s,
                ca_path=ca_path,
            )
        )
        written = apply_enrollment(config, controller.strip().rstrip("/"), response)
    except AgentError as exc:
        fail(str(exc))
    except ValueError as exc:  # the token fails the request's own validation
        fail(f"--token: {str(exc).splitlines()[-1].strip()}", code=2)
    typer.echo(
        f"enrolled as {written.agent_id} for site {written.site} "
        f"({', '.join(str(s) for s in written.segments)}); config {config}, "
        f"secrets {written.secrets_file} (mode 0600)",
        err=True,
    )


# --- run ----------------------------------------------------------------------------------------


def _check_runnable(config: AgentConfig, config_path: Path) -> AgentSecrets:
    from agent.config import load_secrets

    if not config.enrolled:
        fail(f"{config_path}: not enrolled yet (run `asicfleet agent enroll`)", code=2)
    if not config.segments:
        fail(f"{config_path}: segments: no segment to poll", code=2)
    try:
        secrets = load_secrets(config.secrets_file)
    except AgentError as exc:
        fail(str(exc), code=2)
    if secrets.agent_secret is None:
        fail(f"{config.secrets_file}: no agent_secret (run `asicfleet agent enroll`)", code=2)
    return secrets


@app.command()
def run(
    config: ConfigOpt,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Run the agent until SIGTERM: discovery, polling, reporting (the systemd service)."""
    from agent.daemon import run_daemon

    level = logging.getLevelName(log_level.upper())
    if not isinstance(level, int):
        fail(f"--log-level: unknown level {log_level!r}", code=2)
    loaded = _load(config)
    secrets = _check_runnable(loaded, config)
    logging.basicConfig(  # force: importing pyasic installed its own root handler
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    _quiet_pyasic()
    try:
        loaded.data_dir.mkdir(parents=True, exist_ok=True)
        asyncio.run(run_daemon(loaded, secrets))
    except AgentError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{loaded.data_dir}: {exc.strerror or exc}")
    except KeyboardInterrupt:
        pass


# --- scan ---------------------------------------------------------------------------------------


@app.command()
def scan(
    cidr: Annotated[
        str, typer.Argument(metavar="CIDR", help="Segment to scan, e.g. 127.10.0.0/24.")
    ],
    as_json: JsonOpt = False,
    config: OptionalConfigOpt = None,
    concurrency: Annotated[int, typer.Option(min=1, max=4096, help="Probes in flight.")] = 128,
    timeout: Annotated[
        float, typer.Option(min=0.1, max=60, help="Per-miner timeout in seconds.")
    ] = 5.0,
) -> None:
    """Find and identify the miners in CIDR: a table (IP, make, model, firmware, serial, MAC),
    or a JSON list with exactly those keys."""
    from agent.discovery import Discovery, check_allowed, parse_network
    from agent.drivers import DriverOptions
    from agent.drivers.factory import DriverFactory

    loaded = _load(config) if config is not None else None
    try:
        network = parse_network(cidr)
        check_allowed(network, _allowed(loaded))
    except ScanRefused as exc:
        fail(str(exc), code=2)
    _quiet_pyasic()
    factory = DriverFactory(
        credentials=_logins(loaded),
        options=DriverOptions(timeout=timeout),
        identify_timeout=max(3.0, 2 * timeout),
    )
    discovery = Discovery(factory, _allowed(loaded), concurrency=concurrency)
    result = asyncio.run(_scan_with_progress(discovery, network))
    rows = [
        {
            "ip": ip,
            "make": identity.make,
            "model": identity.model,
            "firmware": identity.firmware,
            "serial": identity.serial,
            "mac": identity.mac,
        }
        for ip, identity in sorted(result.found.items(), key=lambda item: socket.inet_aton(item[0]))
    ]
    for ip, reason in sorted(result.failed.items(), key=lambda item: socket.inet_aton(item[0])):
        typer.echo(f"{ip}: answers but could not be identified ({reason})", err=True)
    summary = (
        f"{len(rows)} miner(s) identified, {len(result.failed)} not identifiable, "
        f"{result.probed} address(es) probed in {result.duration_s:.1f} s"
    )
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        typer.echo(summary, err=True)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("IP", "make", "model", "firmware", "serial", "MAC")
    for row in rows:
        table.add_row(*(str(row[key] or "-") for key in SCAN_KEYS))
    console = Console(width=max(Console().width, 120))
    console.print(table)
    typer.echo(summary, err=True)


async def _scan_with_progress(discovery: Any, network: IPv4Network) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        transient=True,
    ) as progress:
        tasks: dict[str, Any] = {}

        def update(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                label = "probing" if phase == "probe" else "identifying"
                tasks[phase] = progress.add_task(f"{label} {network}", total=total)
            progress.update(tasks[phase], completed=done, total=total)

        return await discovery.scan([network], progress=update)


# --- poll ---------------------------------------------------------------------------------------


@app.command()
def poll(
    ip: Annotated[str, typer.Argument(metavar="IP", help="The miner's address.")],
    as_json: JsonOpt = False,
    config: OptionalConfigOpt = None,
    timeout: Annotated[
        float, typer.Option(min=0.1, max=60, help="Per-miner timeout in seconds.")
    ] = 5.0,
) -> None:
    """One miner's identity and state: serial, MAC, make, model, firmware, pools (url, user,
    status), hashrate (TH/s), power (W), is_mining."""
    from agent.discovery import check_allowed, parse_network

    loaded = _load(config) if config is not None else None
    try:
        network = parse_network(ip)
        if network.num_addresses != 1:
            raise ScanRefused(f"{ip!r} is a network; give one address")
        check_allowed(network, _allowed(loaded))
    except ScanRefused as exc:
        fail(str(exc), code=2)
    _quiet_pyasic()
    address = str(network.network_address)
    try:
        data = asyncio.run(_poll_one(address, _logins(loaded), timeout))
    except DriverError as exc:
        fail(f"{address}: {exc.kind}: {exc.reason}")
    except AgentError as exc:
        fail(str(exc))
    if as_json:
        typer.echo(json.dumps(data, indent=1))
        return
    _print_miner(data)


async def _poll_one(ip: str, logins: dict[str, MinerLogin], timeout_s: float) -> dict[str, Any]:
    from agent.discovery import probe
    from agent.drivers import DriverOptions
    from agent.drivers.factory import DriverFactory
    from agent.errors import Unreachable

    if not await probe(ip, timeout_s=min(timeout_s, 2.0)):
        raise Unreachable("nothing answers on ports 4028 and 80", ip=ip)
    factory = DriverFactory(
        credentials=logins,
        options=DriverOptions(timeout=timeout_s),
        identify_timeout=max(3.0, 2 * timeout_s),
    )
    driver = await factory.driver_for(ip)
    identity = await driver.identify()
    snapshot = await driver.poll()
    if snapshot.error is not None or not snapshot.reachable:
        raise DriverError(f"identified, but the poll failed: {snapshot.error}", ip=ip)
    return {
        "ip": ip,
        "serial": identity.serial,
        "mac": identity.mac,
        "make": identity.make,
        "model": identity.model,
        "firmware": identity.firmware,
        "firmware_version": identity.firmware_version,
        "pools": [{"url": p.url, "user": p.user, "status": p.status} for p in snapshot.pools],
        "hashrate": snapshot.hashrate_ths,
        "power": snapshot.power_w,
        "is_mining": snapshot.is_mining,
        "cleaned": list(dict.fromkeys(identity.cleaned + snapshot.cleaned)),
    }


def _print_miner(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 120))
    facts = Table.grid(padding=(0, 2))
    for key, label in (
        ("ip", "IP"),
        ("make", "make"),
        ("model", "model"),
        ("firmware", "firmware"),
        ("firmware_version", "firmware version"),
        ("serial", "serial"),
        ("mac", "MAC"),
    ):
        facts.add_row(label, str(data[key] if data[key] is not None else "-"))
    hashrate = data["hashrate"]
    power = data["power"]
    facts.add_row("hashrate", "-" if hashrate is None else f"{hashrate:.2f} TH/s")
    facts.add_row("power", "-" if power is None else f"{power:.0f} W")
    facts.add_row("mining", {True: "yes", False: "no", None: "unknown"}[data["is_mining"]])
    console.print(facts)
    pools = Table("#", "pool URL", "user", "status")
    for n, pool in enumerate(data["pools"], start=1):
        pools.add_row(str(n), pool["url"], pool["user"], str(pool["status"] or "-"))
    console.print(pools)
    for note in data["cleaned"]:  # what the miner sent that had to be bounded or cleaned
        typer.echo(f"cleaned: {note}", err=True)


# --- status -------------------------------------------------------------------------------------

PARKED_SHOWN = 5
SKEW_WARN_S = 60.0  # half the controller's default allowance (report_max_skew_s)


@app.command()
def status(config: ConfigOpt, as_json: JsonOpt = False) -> None:
    """The last cycle, the outbox depth and the uplink's state, from the daemon's status file
    (and the outbox itself)."""
    from agent.daemon import pid_alive, read_status
    from agent.outbox import Outbox

    loaded = _load(config)
    try:
        last = read_status(loaded)
    except AgentError as exc:
        fail(str(exc))
    depth: int | None = None
    dead: int | None = None
    outbox_facts: dict[str, Any] = {}
    if loaded.outbox_path.exists():
        try:
            with Outbox(loaded.outbox_path) as outbox:
                stats = outbox.stats()
                parked = outbox.dead_letters(limit=PARKED_SHOWN)
            depth, dead = stats.depth, stats.dead_letters
            outbox_facts = {
                "head_attempts": stats.head_attempts,
                "head_last_error": stats.head_last_error,
                "clock_skew_s": stats.clock_skew_s,
                "clock_checked_at": stats.clock_checked_at,
                "parked": [
                    {
                        "sequence": d.sequence,
                        "batch_id": str(d.batch_id),
                        "queued_at": d.queued_at.isoformat(),
                        "parked_at": d.parked_at.isoformat(),
                        "status_code": d.status_code,
                        "reason": d.reason,
                    }
                    for d in parked
                ],
            }
        except AgentError as exc:
            fail(str(exc))
    running = last is not None and last.get("state") != "stopped" and pid_alive(last.get("pid"))
    summary: dict[str, Any] = {
        "running": running,
        "outbox_depth": depth if depth is not None else 0,
        "dead_letters": dead if dead is not None else 0,
        **outbox_facts,
        "status": last,
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
        return
    _print_status(loaded, summary)


def _print_status(config: AgentConfig, summary: dict[str, Any]) -> None:
    last = summary["status"]
    echo = typer.echo
    echo(f"agent:    {config.agent_id or '(not enrolled)'}  site {config.site or '-'}")
    if last is None:
        echo("daemon:   has not run with this data directory yet")
    else:
        state = "running" if summary["running"] else f"not running (last state {last['state']})"
        echo(f"daemon:   {state}, pid {last.get('pid')}, status written {last.get('updated_at')}")
        cycle = last.get("last_cycle")
        if cycle:
            echo(
                f"last cycle: #{cycle['cycle']} at {cycle['started_at']}: {cycle['polled']} "
                f"polled, {cycle['ok']} ok, {cycle['failed']} failed, {cycle['skipped']} backing "
                f"off, {cycle['duration_s']:.2f} s"
            )
        else:
            echo("last cycle: none yet")
        miners = last.get("miners", {})
        echo(f"miners:   {miners.get('known', 0)} known, {miners.get('failing', 0)} failing")
        policy = last.get("policy")
        if policy:
            expired = " (expired, still enforced)" if policy.get("expired") else ""
            echo(
                f"policy:   version {policy['version']}, {policy['mode']} mode, pool set "
                f"{policy.get('pool_set') or '-'}, expires {policy['expires_at']}{expired}"
            )
        enforced = last.get("enforcement")
        if enforced:
            failed = ", ".join(f"{n} {c}" for c, n in enforced.get("failed", {}).items())
            echo(
                f"enforcement: {enforced['compliant']} compliant, {enforced['drift']} drifting, "
                f"{enforced['written']} written, {enforced['verified']} verified, failed: "
                f"{failed or 'none'}, {enforced['cannot_enforce']} cannot enforce, "
                f"{enforced['exempt']} exempt, {enforced['unknown']} unknown"
            )
    echo(f"outbox:   {summary['outbox_depth']} batch(es) waiting, {summary['dead_letters']} parked")
    if summary.get("head_attempts"):
        echo(
            f"          oldest batch failed {summary['head_attempts']} time(s): "
            f"{summary.get('head_last_error')}"
        )
    for parked in summary.get("parked", []):
        code = parked["status_code"] if parked["status_code"] is not None else "-"
        echo(
            f"  parked: #{parked['sequence']} {parked['batch_id']} at {parked['parked_at']} "
            f"({code}): {parked['reason']}"
        )
    if summary["dead_letters"] > len(summary.get("parked", [])):
        echo(f"  (first {PARKED_SHOWN} shown; all kept in {config.outbox_path})")
    skew = summary.get("clock_skew_s")
    if skew is not None:
        side = "ahead of" if skew >= 0 else "behind"
        warn = "  CHECK NTP: reports dated ahead are refused" if abs(skew) >= SKEW_WARN_S else ""
        echo(
            f"clock:    {abs(skew):.1f} s {side} the controller "
            f"(measured {summary.get('clock_checked_at')}){warn}"
        )
    else:
        echo("clock:    not measured yet (no delivery acknowledged)")
    if last is not None:
        uplink = last.get("uplink", {})
        if uplink.get("healthy", True):
            echo(f"uplink:   ok (last delivery {uplink.get('last_success_at') or 'none yet'})")
        else:
            echo(
                f"uplink:   failing ({uplink.get('consecutive_failures')} attempts, next "
                f"{uplink.get('next_attempt_at')}): {uplink.get('last_error')}"
            )


# --- policy and enforcement ---------------------------------------------------------------------

policy_app = typer.Typer(
    help="The signed pool policy this agent enforces (stored by the daemon after verifying it).",
    no_args_is_help=True,
)
app.add_typer(policy_app, name="policy")


@policy_app.command("show")
def policy_show(config: ConfigOpt, as_json: JsonOpt = False) -> None:
    """The policy in force: version, mode, approved pool set, machine counts, expiry. Read
    from DATA_DIR/policy.json and verified against the controller's pinned key."""
    from agent.enforce.oneshot import stored_policy

    loaded = _load(config)
    try:
        guard = stored_policy(loaded)
    except AgentError as exc:
        fail(str(exc))
    bundle = guard.current
    assert bundle is not None
    summary = _policy_summary(bundle, guard.expired())
    if as_json:
        typer.echo(json.dumps(summary, indent=1))
        return
    echo = typer.echo
    echo(f"policy:     version {summary['version']} for site {summary['site']}")
    echo(f"mode:       {summary['mode']}")
    expiry = " (EXPIRED: still enforced until the controller sends a newer one)"
    echo(f"issued:     {summary['issued_at']}")
    echo(f"expires:    {summary['expires_at']}{expiry if summary['expired'] else ''}")
    pool_set = summary["pool_set"]
    if pool_set is None:
        echo("pool set:   none (nothing to enforce)")
    else:
        echo(
            f"pool set:   {pool_set['name']} v{pool_set['version']} (account "
            f"{pool_set['account']}, firmware fee pool: {pool_set['devfee']})"
        )
        for n, url in enumerate(pool_set["urls"], start=1):
            echo(f"  slot {n}:   {url}")
    machines = summary["machines"]
    echo(
        f"machines:   {machines['total']} ({machines['registered']} registered, "
        f"{machines['unregistered']} unregistered, {machines['exempt']} exempt now)"
    )
    echo(f"quarantine: {'on' if summary['quarantine_unregistered'] else 'off'} for unregistered")
    rollout = summary["rollout"]
    echo(
        f"rollout:    canary {rollout['canary_size']}, halt above "
        f"{rollout['max_failure_rate']:.0%} failures, {rollout['writes_per_segment']} writes "
        f"per segment, {rollout['verify_attempts']} read-backs"
    )


def _policy_summary(bundle: Any, expired: bool) -> dict[str, Any]:
    from agent.drivers.base import utcnow

    content = bundle.content
    now = utcnow()
    pool_set = content.pool_set
    return {
        "version": bundle.version,
        "site": content.site,
        "mode": str(content.mode),
        "issued_at": bundle.issued_at.isoformat(),
        "expires_at": bundle.expires_at.isoformat(),
        "expired": expired,
        "pool_set": None if pool_set is None else pool_set.model_dump(mode="json"),
        "machines": {
            "total": len(content.machines),
            "registered": sum(1 for m in content.machines if m.registered),
            "unregistered": sum(1 for m in content.machines if not m.registered),
            "exempt": sum(1 for m in content.machines if m.exempt_at(now)),
        },
        "quarantine_unregistered": content.quarantine_unregistered,
        "rollout": content.rollout.model_dump(mode="json"),
    }


@app.command()
def enforce(
    config: ConfigOpt,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Decide and show what would change; write nothing to any miner."
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """One enforcement pass under the stored policy: scan the segments, poll every miner,
    decide, and (without --dry-run, in enforce mode) write, read back and verify. Prints one
    line per machine and the totals; exit 1 if any write was not verified."""
    from agent.enforce.oneshot import enforce_once

    loaded = _load(config)
    if not loaded.segments:
        fail(f"{config}: segments: no segment to enforce on", code=2)
    logins = _logins(loaded)
    _quiet_pyasic()
    try:
        report = asyncio.run(enforce_once(loaded, logins, dry_run=dry_run))
    except AgentError as exc:
        fail(str(exc))
    result = report.result
    totals = result.summary()
    rows = [
        {
            "ip": o.ip,
            "machine_id": o.machine_id,
            "decision": o.decision,
            "action": o.action,
            "canary": o.canary,
            "detail": o.detail,
        }
        for o in result.outcomes
    ]
    if as_json:
        payload = {
            "dry_run": dry_run,
            "policy": _policy_summary(report.bundle, report.expired),
            "miners": {"identified": report.identified, "unidentified": report.unidentified},
            "totals": totals,
            "machines": rows,
            "batches_stored": report.stored,
        }
        typer.echo(json.dumps(payload, indent=1))
    else:
        _print_enforcement(report, rows, totals, dry_run)
    if not dry_run and sum(totals["failed"].values()):
        raise typer.Exit(1)


def _print_enforcement(
    report: Any, rows: list[dict[str, Any]], totals: dict[str, Any], dry_run: bool
) -> None:
    from rich.console import Console
    from rich.table import Table

    bundle = report.bundle
    console = Console(width=max(Console().width, 140))
    table = Table("IP", "machine", "decision", "action", "detail")
    for row in rows:
        action = row["action"] + (" (canary)" if row["canary"] else "")
        table.add_row(
            row["ip"], row["machine_id"] or "-", row["decision"], action, row["detail"] or ""
        )
    console.print(table)
    failed = ", ".join(f"{n} {cause}" for cause, n in totals["failed"].items()) or "none"
    what = "dry run, nothing written" if dry_run else f"{bundle.content.mode} mode"
    typer.echo(
        f"policy version {bundle.version} ({what}): {report.identified} miner(s) identified, "
        f"{report.unidentified} not identifiable"
    )
    typer.echo(
        f"{totals['compliant']} compliant, {totals['drift']} would change / drifting, "
        f"{totals['written']} written, {totals['verified']} verified, failed: {failed}, "
        f"{totals['cannot_enforce']} cannot enforce, {totals['exempt']} exempt, "
        f"{totals['unknown']} unknown, {totals['quarantined']} quarantined, "
        f"{totals['released']} released"
    )
    if report.stored:
        typer.echo(f"{report.stored} report batch(es) stored in the outbox", err=True)
