"""``asicfleet controller user|site|agent …``: people, sites and agent enrollment at the console.

The commands call the same services as the API and act as a named controller user (see
:mod:`controller.cli.identity`); only the very first admin is added by the OS account.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timedelta
from typing import Annotated, Any, TypeVar

import typer
from sqlmodel import Session, select

from controller import accounts, enrollment, sites, timefmt
from controller.actors import Actor, cli_actor
from controller.cli.context import context, fail
from controller.cli.context import in_transaction as _run
from controller.cli.identity import (
    AsOpt,
    ByPassword,
    StdinOpt,
    acting_user,
    by_password,
    store_login,
    token_file,
)
from controller.models import Role, User, utcnow
from controller.pool_policy import CliUser

T = TypeVar("T")

user_app = typer.Typer(help="Users and roles.", no_args_is_help=True)
site_app = typer.Typer(help="Sites and their LAN segments.", no_args_is_help=True)
segment_app = typer.Typer(help="A site's LAN segments (CIDRs).", no_args_is_help=True)
agent_app = typer.Typer(
    help="Agents: enrollment tokens and the enrolled agents.", no_args_is_help=True
)
site_app.add_typer(segment_app, name="segment")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the `asicfleet controller` group."""
    app.add_typer(user_app, name="user")
    app.add_typer(site_app, name="site")
    app.add_typer(agent_app, name="agent")
    app.command("login")(login)
    app.command("logout")(logout)


def _info(message: str) -> None:
    typer.echo(message, err=True)


# --- users --------------------------------------------------------------------------------------


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        password = line.rstrip("\r\n")
        if not password:
            fail("no password on standard input")
        return password
    if not sys.stdin.isatty():
        fail("give --password-stdin and pipe the password in")
    entered: str = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    return entered


@user_app.command("add")
def user_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Login name.")],
    role: Annotated[Role, typer.Option(help="What the user may do.")],
    password_stdin: Annotated[
        bool,
        typer.Option("--password-stdin", help="Read the NEW user's password from standard input."),
    ] = False,
    as_user: AsOpt = "",
) -> None:
    """Add a user, acting as an admin; the very first admin is added by the OS account."""
    if problem := accounts.name_problem(name):
        fail(problem)
    actor: Actor
    if _run(ctx, lambda s: s.exec(select(User.id)).first()) is None:  # bootstrap
        if role is not Role.ADMIN:
            fail("the controller has no users yet: the first user must be an admin", code=2)
        actor = cli_actor()
    else:
        actor = acting_user(ctx, as_user, False, route=("POST", "/users"), doing="adding a user")
    password = _read_password(password_stdin)
    if problem := accounts.password_problem(password):
        fail(problem)
    _run(
        ctx,
        lambda s: accounts.create_user(s, actor, name=name, role=role, password=password),
    )
    _info(f"user {name} added with role {role.value}")


@user_app.command("list")
def user_list(ctx: typer.Context) -> None:
    """List users with their roles."""
    rows = _run(ctx, lambda s: [accounts.user_view(u) for u in accounts.list_users(s)])
    for row in rows:
        state = "disabled" if row["disabled"] else "active"
        typer.echo(f"{row['name']:<24} {row['role']:<11} {state}")


# --- sites and segments -------------------------------------------------------------------------


@site_app.command("add")
def site_add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Short site name, e.g. ekibastuz-1.")],
    licence: Annotated[str, typer.Option(help="Mining licence number.")],
    dmp_account: Annotated[str, typer.Option(help="Account at the digital mining pool.")] = "",
    owner: Annotated[str, typer.Option(help="Legal owner of the site's machines.")] = "",
    as_user: AsOpt = "",
    password_stdin: StdinOpt = False,
) -> None:
    """Add a site (operator, admin)."""
    actor = acting_user(
        ctx, as_user, password_stdin, route=("POST", "/sites"), doing="adding a site"
    )
    _run(
        ctx,
        lambda s: sites.create_site(
            s, actor, name=name, licence_number=licence, dmp_account=dmp_account, owner_name=owner
        ),
    )
    _info(f"site {name} added")


@site_app.command("list")
def site_list(ctx: typer.Context) -> None:
    """List sites."""
    rows = _run(ctx, lambda s: [sites.site_view(site) for site in sites.list_sites(s)])
    for row in rows:
        typer.echo(f"{row['name']:<24} licence {row['licence_number']:<16} {row['dmp_account']}")


@segment_app.command("add")
def segment_add(
    ctx: typer.Context,
    site: Annotated[str, typer.Argument(help="Site name.")],
    cidr: Annotated[str, typer.Argument(help="LAN segment, e.g. 10.20.1.0/24.")],
    as_user: AsOpt = "",
    password_stdin: StdinOpt = False,
) -> None:
    """Add a LAN segment to a site (overlapping any existing segment is refused)."""
    actor = acting_user(
        ctx,
        as_user,
        password_stdin,
        route=("POST", "/sites/{name}/segments"),
        doing="adding a segment",
    )
    added = _run(ctx, lambda s: sites.add_segment(s, actor, sites.get_site(s, site), cidr).cidr)
    _info(f"segment {added} added to site {site}")


@segment_app.command("list")
def segment_list(
    ctx: typer.Context, site: Annotated[str, typer.Argument(help="Site name.")]
) -> None:
    """List a site's segments and the agent reporting each."""

    def rows(s: Session) -> list[dict[str, Any]]:
        found = sites.get_site(s, site)
        return [sites.segment_view(seg, found.name) for seg in sites.list_segments(s, found)]

    for row in _run(ctx, rows):
        typer.echo(f"{row['cidr']:<20} {row['agent_id'] or '-'}")


# --- agents -------------------------------------------------------------------------------------


@agent_app.command("token")
def agent_token(
    ctx: typer.Context,
    site: Annotated[str, typer.Option(help="Site the agent will belong to.")],
    segment: Annotated[
        list[str], typer.Option(help="CIDR the agent will report from (repeatable).")
    ],
    ttl: Annotated[
        str | None,
        typer.Option(help=f"How long the token is valid, e.g. 30m, 1h, 2d. {timefmt.HELP}"),
    ] = None,
    as_user: AsOpt = "",
    password_stdin: StdinOpt = False,
) -> None:
    """Make a one-time enrollment token. Only the token goes to stdout."""
    if ttl is None:
        lifetime = timedelta(seconds=context(ctx).settings().enrollment_ttl_s)
    else:
        try:
            lifetime = timefmt.parse_duration(ttl, "--ttl")
        except timefmt.TimeFormatError as exc:
            fail(str(exc), code=2)
    actor = acting_user(
        ctx,
        as_user,
        password_stdin,
        route=("POST", "/agents/enrollment-tokens"),
        doing="making an enrollment token",
    )
    issued = _run(
        ctx,
        lambda s: enrollment.create_token(s, actor, site_name=site, cidrs=segment, ttl=lifetime),
    )
    _info(
        f"enrollment token for site {issued.site.name}, segments {', '.join(issued.segments)}; "
        f"valid once until {issued.row.expires_at:%Y-%m-%d %H:%M:%S} UTC"
    )
    typer.echo(issued.secret)


def _age(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "never"
    seconds = int((now - when).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{max(seconds, 0)}s ago"


@agent_app.command("list")
def agent_list(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array on stdout.")] = False,
) -> None:
    """List enrolled agents with their version and when they were last seen."""
    infos = _run(ctx, enrollment.list_agents)
    now = utcnow()
    if as_json:
        payload = [
            {
                **enrollment.agent_view(i.agent, i.site, i.segments),
                "enrolled_at": i.agent.enrolled_at.isoformat(),
                "last_seen_at": i.agent.last_seen_at.isoformat() if i.agent.last_seen_at else None,
                "last_address": i.agent.last_address,
                "clock_skew_s": i.agent.clock_skew_s,
                "clock_checked_at": (
                    i.agent.clock_checked_at.isoformat() if i.agent.clock_checked_at else None
                ),
            }
            for i in infos
        ]
        typer.echo(json.dumps(payload, indent=2))
        return
    if not infos:
        _info("no agents enrolled")
        return
    typer.echo(
        f"{'ID':<14} {'NAME':<20} {'SITE':<16} {'VERSION':<10} {'LAST SEEN':<10} "
        f"{'CLOCK':<10} SEGMENTS"
    )
    for i in infos:
        name = i.agent.name + (" (disabled)" if i.agent.disabled else "")
        typer.echo(
            f"{i.agent.id:<14} {name:<20} {i.site:<16} {i.agent.version:<10} "
            f"{_age(i.agent.last_seen_at, now):<10} {_skew(i.agent.clock_skew_s):<10} "
            f"{','.join(i.segments)}"
        )


def _skew(seconds: float | None) -> str:
    """The agent's clock against ours: ``+2.1s`` fast, ``-40s`` slow, ``-`` never measured."""
    if seconds is None:
        return "-"
    return f"{seconds:+.1f}s" if abs(seconds) < 100 else f"{seconds:+.0f}s"


# --- logging in at the console ------------------------------------------------------------------

DEFAULT_LOGIN_TTL = "30d"


def login(
    ctx: typer.Context,
    as_user: Annotated[str, typer.Option("--as", metavar="USER", help="Your controller user.")],
    password_stdin: StdinOpt = False,
    ttl: Annotated[
        str, typer.Option(help=f"How long the stored token works, e.g. 12h, 30d. {timefmt.HELP}")
    ] = DEFAULT_LOGIN_TTL,
) -> None:
    """Prove who you are once; later commands act as you without --as (token stored 0600)."""
    try:
        lifetime = timefmt.parse_duration(ttl, "--ttl")
    except timefmt.TimeFormatError as exc:
        fail(str(exc), code=2)
    if not timedelta(minutes=1) <= lifetime <= timedelta(days=365):
        fail(f"--ttl {ttl!r}: give between 1m and 365d", code=2)
    me = by_password(ctx, ByPassword(as_user, from_stdin=password_stdin))  # never a token

    def issue(session: Session) -> accounts.IssuedToken:
        user = accounts.get_user(session, me.name)
        assert user.id is not None
        return accounts.create_api_token(
            session, me, user.id, name="cli login", expires_in=lifetime
        )

    issued = _run(ctx, issue)
    path = store_login(me.name, issued.secret, issued.row.expires_at)
    expires = issued.row.expires_at
    _info(
        f"logged in as {me.name} ({me.role.value}) until {expires:%Y-%m-%d %H:%M} UTC; "
        f"token stored in {path} (mode 0600)"
    )


def logout(ctx: typer.Context) -> None:
    """Revoke the stored login token and remove its file."""
    from controller.cli.identity import read_stored_login, user_for_token

    stored = read_stored_login()
    if stored is None:
        _info(f"not logged in ({token_file()} does not exist)")
        return

    def revoke(session: Session) -> None:
        match = user_for_token(session, stored.token)
        if match is None:
            return
        user, row = match
        assert user.id is not None and row.id is not None
        accounts.revoke_api_token(
            session, CliUser(name=user.name, role=Role(user.role)), user.id, row.id
        )

    _run(ctx, revoke)
    stored.path.unlink(missing_ok=True)
    _info(f"logged out {stored.user}: token revoked and {stored.path} removed")
