"""``asicfleet controller pools|policy|exemptions …``: pool policy at the console.

Four eyes needs to know *who* acts, and the console alone does not say: every change here is
made as a named controller user (:mod:`controller.cli.identity`: ``--as NAME`` with their
password, a stored login or ``ASICFLEET_TOKEN``), and the same role and four-eyes rules as the
API apply. Reading needs no user. Errors are one line on stderr: exit 2 for bad input, 1 for a
refused change.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, TypeVar

import typer
from sqlmodel import Session

from contract.policy import DevFeePolicy, EnforcementMode
from controller import bundles, exemptions, pool_policy, timefmt
from controller.cli.context import fail
from controller.cli.context import in_transaction as _run
from controller.cli.context import validated as _validated
from controller.cli.identity import AsOpt, StdinOpt, acting_user
from controller.exemptions import ExemptionPublic, ExemptionRequest, ExemptionState
from controller.models import utcnow
from controller.pool_policy import (
    PoolSetProposal,
    PoolSetPublic,
    SitePolicyPublic,
    SitePolicyUpdate,
)
from controller.sites import get_site

T = TypeVar("T")

pools_app = typer.Typer(
    help="Approved pool sets: propose, approve (four eyes), reject, list.", no_args_is_help=True
)
policy_app = typer.Typer(
    help="A site's enforcement settings and the dry run of a change.", no_args_is_help=True
)
exemptions_app = typer.Typer(
    help=f"Time-boxed exemptions of machines from pool enforcement. {timefmt.HELP}",
    no_args_is_help=True,
)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON.")]
SiteArg = Annotated[str, typer.Argument(metavar="SITE", help="Site name.")]


def register(app: typer.Typer) -> None:
    """Add the ``pools``, ``policy`` and ``exemptions`` groups to `asicfleet controller`."""
    app.add_typer(pools_app, name="pools")
    app.add_typer(policy_app, name="policy")
    app.add_typer(exemptions_app, name="exemptions")
    app.command("resolve-alert")(resolve_alert_command)


# --- shared -------------------------------------------------------------------------------------


def _echo_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, default=str))


def _when(value: datetime | None) -> str:
    return f"{value:%Y-%m-%d %H:%M}" if value else "-"


def _pool_set_lines(row: PoolSetPublic) -> list[str]:
    decided = (
        f", {row.status.value} by {row.decided_by} at {_when(row.decided_at)}"
        if row.decided_by
        else ""
    )
    lines = [
        f"{row.site}/v{row.version} [{row.status.value}] {row.name} "
        f"(accreditation {row.accreditation_ref or '-'}), account {row.account}, "
        f"devfee {row.devfee}",
        f"  proposed by {row.proposed_by} at {_when(row.proposed_at)}{decided}",
    ]
    lines += [f"  slot {i}: {url}" for i, url in enumerate(row.urls, 1)]
    if row.reason:
        lines.append(f"  reason: {row.reason}")
    if row.decision_reason:
        lines.append(f"  decision: {row.decision_reason}")
    return lines


def _print_preview(view: bundles.PolicyPreview) -> None:
    which = (
        "the proposed (unsaved) set"
        if view.pool_set_status == "draft"
        else f"pool set v{view.pool_set_version} ({view.pool_set_status})"
    )
    typer.echo(f"dry run for site {view.site} against {which}, mode {view.mode.value}:")
    typer.echo(f"  machines                    {view.machines}")
    typer.echo(f"  compliant                   {view.compliant}")
    verb = "would be written" if view.mode is EnforcementMode.ENFORCE else "would be written*"
    typer.echo(f"  {verb:<27} {view.would_write}")
    typer.echo(f"  would be quarantined        {view.would_quarantine}")
    typer.echo(f"  unknown                     {view.unknown}")
    typer.echo(f"  exempt                      {view.exempt}")
    if view.duplicate_workers:
        typer.echo(f"  sharing a worker name       {view.duplicate_workers}")
    if view.mode is not EnforcementMode.ENFORCE:
        typer.echo("  * the site is in observe mode: nothing is written until it enforces")
    for sample in view.samples:
        typer.echo(f"  {sample.machine_id}: {'; '.join(sample.problems)}")


# --- pools --------------------------------------------------------------------------------------


@pools_app.command("propose")
def pools_propose(
    ctx: typer.Context,
    site: SiteArg,
    name: Annotated[str, typer.Option("--name", help="DMP (pool) name.")],
    accreditation_ref: Annotated[str, typer.Option(help="The DMP's accreditation reference.")],
    url: Annotated[
        list[str], typer.Option("--url", help="Stratum URL; repeat for slots 1-3 in order.")
    ],
    account: Annotated[str, typer.Option(help="Account or sub-account at the pool.")],
    pool_password: Annotated[str, typer.Option(help="Stratum password.")] = "x",
    devfee: Annotated[
        DevFeePolicy, typer.Option(help="A firmware fee pool: allow, or forbid.")
    ] = DevFeePolicy.ALLOW,
    reason: Annotated[str, typer.Option(help="Why the change.")] = "",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would change; store nothing.")
    ] = False,
    as_user: AsOpt = "",
    password_stdin: StdinOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Propose a new approved pool set; a second (compliance) user must approve it."""
    proposal = _validated(
        lambda: PoolSetProposal(
            name=name,
            accreditation_ref=accreditation_ref,
            urls=url,
            account=account,
            password=pool_password,
            devfee=devfee,
            reason=reason,
        )
    )
    if dry_run:
        draft = pool_policy.proposal_to_contract(proposal)
        view = _run(ctx, lambda s: bundles.preview(s, get_site(s, site), utcnow(), draft=draft))
        if as_json:
            typer.echo(view.model_dump_json(indent=2))
        else:
            _print_preview(view)
        return
    actor = acting_user(
        ctx,
        as_user,
        password_stdin,
        route=("POST", "/sites/{name}/pool-sets"),
        doing="proposing a pool set",
    )
    row = _run(ctx, lambda s: PoolSetPublic.of(pool_policy.propose(s, actor, site, proposal), site))
    if as_json:
        typer.echo(row.model_dump_json(indent=2))
        return
    typer.echo(
        f"proposed {site}/v{row.version}; it takes effect once a compliance user other than "
        f"{actor.name} approves it"
    )


@pools_app.command("list")
def pools_list(ctx: typer.Context, site: SiteArg, as_json: JsonOpt = False) -> None:
    """Every revision of the site's pool set, newest first."""

    def rows(s: Session) -> list[PoolSetPublic]:
        found = get_site(s, site)
        return [PoolSetPublic.of(r, found.name) for r in pool_policy.list_pool_sets(s, found)]

    result = _run(ctx, rows)
    if as_json:
        _echo_json([r.model_dump(mode="json") for r in result])
        return
    if not result:
        typer.echo(f"site {site} has no pool sets; propose one with `pools propose`", err=True)
    for row in result:
        typer.echo(
            f"v{row.version:<4} {row.status.value:<11} {row.name:<20} {row.account:<16} "
            f"{' '.join(row.urls)}"
        )


@pools_app.command("show")
def pools_show(
    ctx: typer.Context,
    site: SiteArg,
    version: Annotated[
        int | None, typer.Argument(help="Revision (default: the approved and the pending one).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """One revision in full, or the set in force and any pending proposal."""

    def rows(s: Session) -> list[PoolSetPublic]:
        found = get_site(s, site)
        assert found.id is not None
        if version is not None:
            return [PoolSetPublic.of(pool_policy.get_pool_set(s, found, version), found.name)]
        picked = [
            pool_policy.active_pool_set(s, found.id),
            pool_policy.pending_pool_set(s, found.id),
        ]
        return [PoolSetPublic.of(r, found.name) for r in picked if r is not None]

    result = _run(ctx, rows)
    if as_json:
        _echo_json([r.model_dump(mode="json") for r in result])
        return
    if not result:
        typer.echo(f"site {site} has no approved or pending pool set", err=True)
    for row in result:
        typer.echo("\n".join(_pool_set_lines(row)))


@pools_app.command("approve")
def pools_approve(
    ctx: typer.Context,
    site: SiteArg,
    version: Annotated[int, typer.Argument(help="The proposed revision.")],
    reason: Annotated[str, typer.Option(help="Note kept with the decision.")] = "",
    as_user: AsOpt = "",
    password_stdin: StdinOpt = False,
) -> None:
    """Approve a proposal: a compliance user who did not propose it."""
    actor = acting_user(
        ctx,
        as_user,
        password_stdin,
        route=("POST", "/sites/{name}/pool-sets/{version}/approve"),
        doing="approving a pool set",
    )
    _run(ctx, lambda s: pool_policy.approve(s, actor, site, version, reason))
    typer.echo(f"approved {site}/v{version}: agents get it with their next policy pull")


@pools_app.command("reject")
def pools_reject(
    ctx: typer.Context,
    site: SiteArg,
    version: Annotated[int, typer.Argument(help="The proposed revision.")],
    reason: Annotated[str, typer.Option(help="Why (required).")],
    as_user: AsOpt = "",
    password_stdin: StdinOpt = False,
) -> None:
    """Reject a proposal (compliance, not the proposer), or withdraw your own."""
    actor = acting_user(
        ctx,
        as_user,
        password_stdin,
        route=("POST", "/sites/{name}/pool-sets/{version}/reject"),
        doing="rejecting a pool set",
    )
    row = _run(
        ctx, lambda s: PoolSetPublic.of(pool_policy.reject(s, actor, site, version, reason), site)
    )
    verb = "withdrew" if row.proposed_by == actor.name else "rejected"
    typer.echo(f"{verb} {site}/v{version}")


# --- site policy --------------------------------------------------------------------------------


@policy_app.command("show")
def policy_show(ctx: typer.Context, site: SiteArg, as_json: JsonOpt = False) -> None:
    """The site's mode, worker rule, rollout limits, pool set and warnings."""
    view = _run(ctx, lambda s: pool_policy.policy_view(s, get_site(s, site)))
    if as_json:
        typer.echo(view.model_dump_json(indent=2))
        return
    _print_policy(view)


def _print_policy(view: SitePolicyPublic) -> None:
    typer.echo(f"site {view.site}: mode {view.mode.value}")
    typer.echo(f"  worker template         {view.worker_template}")
    typer.echo(f"  quarantine unregistered {'yes' if view.quarantine_unregistered else 'no'}")
    typer.echo(
        f"  rollout                 canary {view.canary_size}, halt above "
        f"{view.max_failure_rate:.0%} failures, {view.writes_per_segment} writes per segment"
    )
    active = f"v{view.pool_set.version} {view.pool_set.name}" if view.pool_set else "none"
    typer.echo(f"  approved pool set       {active}")
    if view.pending:
        typer.echo(
            f"  pending proposal        v{view.pending.version} by {view.pending.proposed_by}"
        )
    typer.echo(f"  bundle version          {view.bundle_version or '-'}")
    for warning in view.warnings:
        typer.echo(f"warning: {warning}", err=True)


@policy_app.command("set")
def policy_set(
    ctx: typer.Context,
    site: SiteArg,
    mode: Annotated[EnforcementMode | None, typer.Option(help="observe or enforce.")] = None,
    worker_template: Annotated[
        str | None, typer.Option(help="e.g. '{account}.{machine_id}'.")
    ] = None,
    quarantine_unregistered: Annotated[
        bool | None,
        typer.Option(
            "--quarantine-unregistered/--no-quarantine-unregistered",
            help="Sleep machines hashing while unregistered.",
        ),
    ] = None,
    canary_size: Annotated[int | None, typer.Option(help="Machines in the canary.")] = None,
    max_failure_rate: Annotated[
        float | None, typer.Option(help="Halt the rollout above this share of failures (0-1).")
    ] = None,
    writes_per_segment: Annotated[
        int | None, typer.Option(help="Concurrent writes per segment.")
    ] = None,
    as_user: AsOpt = "",
    password_stdin: StdinOpt = False,
) -> None:
    """Change the site's enforcement settings (operators, admin)."""
    changes = _validated(
        lambda: SitePolicyUpdate(
            mode=mode,
            worker_template=worker_template,
            quarantine_unregistered=quarantine_unregistered,
            canary_size=canary_size,
            max_failure_rate=max_failure_rate,
            writes_per_segment=writes_per_segment,
        )
    )
    if not changes.model_dump(exclude_none=True):
        fail("nothing to change: give at least one setting", code=2)
    actor = acting_user(
        ctx,
        as_user,
        password_stdin,
        route=("PATCH", "/sites/{name}/policy"),
        doing="changing a site's policy",
    )
    view = _run(ctx, lambda s: pool_policy.update_policy(s, actor, site, changes))
    _print_policy(view)


@policy_app.command("preview")
def policy_preview(
    ctx: typer.Context,
    site: SiteArg,
    version: Annotated[
        int | None, typer.Option(help="Preview this revision (e.g. the pending proposal).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Dry run: how the machines stand against the approved set (or a revision)."""
    view = _run(ctx, lambda s: bundles.preview(s, get_site(s, site), utcnow(), version=version))
    if as_json:
        typer.echo(view.model_dump_json(indent=2))
    else:
        _print_preview(view)


# --- exemptions ---------------------------------------------------------------------------------


def _moment(text: str, option: str) -> datetime:
    """A duration from now (``7d``, ``36h``) or an instant (docs: Times and periods)."""
    try:
        return timefmt.parse_moment(text, option, now=utcnow())
    except timefmt.TimeFormatError as exc:
        fail(str(exc), 2)


def _exemption_line(view: ExemptionPublic) -> str:
    approved = f"approved by {view.approved_by}" if view.approved_by else "not approved"
    return (
        f"#{view.id:<5} {view.machine_id:<11} {view.site or '-':<14} {view.state.value:<9} "
        f"{_when(view.starts_at)} → {_when(view.ends_at)}  requested by {view.requested_by}, "
        f"{approved}: {view.reason}"
    )


@exemptions_app.command("request")
def exemptions_request(
    ctx: typer.Context,
    machine: Annotated[str, typer.Argument(metavar="MACHINE", help="machine_id, MAC or IP")],
    reason: Annotated[str, typer.Option(help="Why the machine may run off policy.")],
    until: Annotated[
        str, typer.Option(help="End: a duration from now (7d) or a time (2026-12-01T08:00Z).")
    ],
    starts: Annotated[
        str | None, typer.Option(help="Start, in the same form (default now).")
    ] = None,
    as_user: AsOpt = "",
    password_stdin: StdinOpt = False,
) -> None:
    """Ask for an exemption of at most 30 days; a compliance user must approve it."""
    ends_at = _moment(until, "--until")
    starts_at = _moment(starts, "--starts") if starts else None
    req = _validated(lambda: ExemptionRequest(reason=reason, ends_at=ends_at, starts_at=starts_at))
    actor = acting_user(
        ctx,
        as_user,
        password_stdin,
        route=("POST", "/machines/{machine_id}/exemptions"),
        doing="requesting an exemption",
    )
    view = _run(ctx, lambda s: exemptions.request(s, actor, machine, req))
    typer.echo(
        f"exemption #{view.id} for {view.machine_id} requested until {_when(view.ends_at)} UTC; "
        "in force once a compliance user approves it"
    )


@exemptions_app.command("approve")
def exemptions_approve(
    ctx: typer.Context,
    exemption_id: Annotated[int, typer.Argument(metavar="ID")],
    as_user: AsOpt = "",
    password_stdin: StdinOpt = False,
) -> None:
    """Approve an exemption: a compliance user who did not request it."""
    actor = acting_user(
        ctx,
        as_user,
        password_stdin,
        route=("POST", "/machines/{machine_id}/exemptions/{exemption_id}/approve"),
        doing="approving an exemption",
    )
    view = _run(ctx, lambda s: exemptions.approve(s, actor, exemption_id))
    typer.echo(f"exemption #{view.id} for {view.machine_id} is {view.state.value}")


@exemptions_app.command("revoke")
def exemptions_revoke(
    ctx: typer.Context,
    exemption_id: Annotated[int, typer.Argument(metavar="ID")],
    reason: Annotated[str, typer.Option(help="Why (required).")],
    as_user: AsOpt = "",
    password_stdin: StdinOpt = False,
) -> None:
    """End an exemption now, or cancel a pending one."""
    actor = acting_user(
        ctx,
        as_user,
        password_stdin,
        route=("POST", "/machines/{machine_id}/exemptions/{exemption_id}/revoke"),
        doing="revoking an exemption",
    )
    view = _run(ctx, lambda s: exemptions.revoke(s, actor, exemption_id, reason))
    typer.echo(f"exemption #{view.id} for {view.machine_id} revoked")


@exemptions_app.command("list")
def exemptions_list(
    ctx: typer.Context,
    site: Annotated[str | None, typer.Option(help="Only this site.")] = None,
    state: Annotated[ExemptionState | None, typer.Option(help="Only in this state.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Exemptions, newest first."""
    views = _run(ctx, lambda s: exemptions.list_exemptions(s, site=site, state=state))
    if as_json:
        _echo_json([v.model_dump(mode="json") for v in views])
        return
    if not views:
        typer.echo("no exemptions", err=True)
    for view in views:
        typer.echo(_exemption_line(view))


# --- alerts -------------------------------------------------------------------------------------


def resolve_alert_command(
    ctx: typer.Context,
    alert_id: Annotated[int, typer.Argument(metavar="ALERT_ID", help="From `alerts`.")],
    reason: Annotated[str, typer.Option(help="What was done about it (required).")],
    as_user: AsOpt = "",
    password_stdin: StdinOpt = False,
) -> None:
    """Mark an alert dealt with (operator or compliance); audited with the reason."""
    from controller.alerts import ResolveRequest, resolve_alert

    request = _validated(lambda: ResolveRequest(reason=reason))
    actor = acting_user(
        ctx,
        as_user,
        password_stdin,
        route=("POST", "/alerts/{alert_id}/resolve"),
        doing="resolving an alert",
    )
    _run(ctx, lambda s: resolve_alert(s, actor, alert_id, request.reason))
    typer.echo(f"alert {alert_id} resolved")
