"""``asicfleet controller compliance …`` and ``asicfleet controller alerts``: the compliance
evidence from the console (read-only). Errors are one line on stderr; bad options exit 2."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer
from rich.table import Table

from controller import timefmt
from controller.cli.context import context, fail
from controller.cli.context import transaction as _session
from controller.cli.context import wide_console as _console
from controller.evidence import Rules
from controller.evidence_report import (
    AlertView,
    ComplianceStats,
    ComplianceStatus,
    MachineTimeline,
    compliance_status,
    machine_timeline,
    open_alerts,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
PeriodOpt = Annotated[
    str | None,
    typer.Option(
        help="FROM..TO, TO excluded, e.g. 2026-11-01..2026-11-26 (docs/controller.md, "
        "Times and periods)."
    ),
]
SinceOpt = Annotated[
    str | None, typer.Option(help="The last 15m, 12h, 7d … up to now (default 24h).")
]


def _period(period: str | None, since: str | None, now: datetime) -> tuple[datetime, datetime]:
    if period and since:
        fail("give --period or --since, not both", code=2)
    try:
        if period:
            return timefmt.parse_period(period, "--period", now=now)
        return timefmt.parse_since(since or "24h", "--since", now=now)
    except timefmt.TimeFormatError as exc:
        fail(str(exc), code=2)


def _when(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value is not None else ""


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.0f}"


def _status_table(report: ComplianceStatus) -> Table:
    table = Table(
        title=f"pool compliance {_when(report.start)} .. {_when(report.end)}", title_justify="left"
    )
    for name in ("site", "machines", "compliant %", "non-compl. %", "unknown %", "exempt %"):
        table.add_column(name, justify="left" if name == "site" else "right")
    for name in ("incidents", "verified", "failed", "open", "p50 s", "p95 s"):
        table.add_column(name, justify="right")
    table.add_column("repeat offenders")
    table.add_column("alerts", justify="right")

    def row(label: str, s: ComplianceStats) -> None:
        table.add_row(
            label,
            str(s.machines_tracked),
            f"{s.compliant_pct:.2f}",
            f"{s.non_compliant_pct:.2f}",
            f"{s.unknown_pct:.2f}",
            f"{s.exempt_pct:.2f}",
            str(s.incidents_opened),
            str(s.incidents_verified),
            str(s.incidents_failed),
            str(s.incidents_open),
            _seconds(s.detect_to_verified_p50_s),
            _seconds(s.detect_to_verified_p95_s),
            ", ".join(s.repeat_offenders),
            str(s.open_alerts),
        )

    for stats in report.sites:
        row(stats.site or "(no site)", stats)
    row("fleet" if report.fleet.site is None else f"total ({report.fleet.site})", report.fleet)
    return table


def _print_timeline(timeline: MachineTimeline) -> None:
    console = _console()
    flag = "  REPEAT OFFENDER" if timeline.repeat_offender else ""
    console.print(
        f"machine {timeline.machine_id} ({timeline.site or 'no site'}): "
        f"now {timeline.current_status or 'not tracked'}{flag}"
    )
    intervals = Table(title="intervals", title_justify="left")
    for name in ("from", "to", "status", "pool set", "cause"):
        intervals.add_column(name)
    for iv in timeline.intervals:
        intervals.add_row(
            _when(iv.started_at),
            _when(iv.ended_at) or "(open)",
            iv.status,
            "" if iv.pool_set_version is None else f"v{iv.pool_set_version}",
            iv.cause,
        )
    console.print(intervals)
    incidents = Table(title="drift incidents", title_justify="left")
    for name in ("detected", "action", "action at", "verified", "outcome", "s", "cause"):
        incidents.add_column(name)
    for inc in timeline.incidents:
        incidents.add_row(
            _when(inc.detected_at),
            inc.action or "-",
            _when(inc.action_at),
            _when(inc.verified_at),
            inc.outcome,
            _seconds(inc.detect_to_verified_s),
            inc.cause or "; ".join(inc.problems),
        )
    console.print(incidents)


def _alerts_table(alerts: list[AlertView]) -> Table:
    table = Table(
        title=f"{len(alerts)} open alert(s); resolve one with `resolve-alert ID --reason …`",
        title_justify="left",
    )
    for name in ("id", "at", "kind", "severity", "site", "machine", "agent", "detail"):
        table.add_column(name)
    for a in alerts:
        table.add_row(
            str(a.id),
            _when(a.at),
            a.kind,
            a.severity,
            a.site or "",
            a.machine_id or "",
            a.agent_id or "",
            a.detail,
        )
    return table


def register(app: typer.Typer) -> None:
    """Add the ``compliance`` group and the ``alerts`` command to `asicfleet controller`."""
    group = typer.Typer(
        help=f"Pool-compliance evidence: status over a period, timelines. {timefmt.HELP}"
    )
    app.add_typer(group, name="compliance", no_args_is_help=True)

    @group.command("status")
    def status(
        ctx: typer.Context,
        site: Annotated[str | None, typer.Option(help="Only this site.")] = None,
        period: PeriodOpt = None,
        since: SinceOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Fleet and per-site compliance: time shares, incidents, detect-to-verified p50/p95,
        repeat offenders, open alerts."""
        now = datetime.now(UTC)
        start, end = _period(period, since, now)
        rules = Rules.of(context(ctx).settings())
        with _session(ctx) as session:
            report = compliance_status(session, site, start, end, rules=rules, now=now)
        if as_json:
            typer.echo(report.model_dump_json(indent=2))
        else:
            console = _console()
            console.print(_status_table(report))
            if report.fleet.non_compliant_now:
                console.print("non-compliant now: " + ", ".join(report.fleet.non_compliant_now))

    @group.command("timeline")
    def timeline(
        ctx: typer.Context,
        machine: Annotated[str, typer.Argument(metavar="MACHINE_ID", help="machine_id, MAC or IP")],
        period: PeriodOpt = None,
        since: SinceOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """One machine's intervals and drift incidents (detected, action, verified)."""
        start, end = _period(period, since, datetime.now(UTC))
        rules = Rules.of(context(ctx).settings())
        with _session(ctx) as session:
            result = machine_timeline(session, machine, start, end, rules=rules)
        if as_json:
            typer.echo(result.model_dump_json(indent=2))
        else:
            _print_timeline(result)

    @app.command("alerts")
    def alerts(
        ctx: typer.Context,
        site: Annotated[str | None, typer.Option(help="Only this site.")] = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Open alerts: refused policy bundles, halted rollouts, repeat offenders, criticals."""
        with _session(ctx) as session:
            found = open_alerts(session, site)
        if as_json:
            typer.echo("[" + ",".join(a.model_dump_json() for a in found) + "]")
        else:
            _console().print(_alerts_table(found))
