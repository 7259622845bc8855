"""Who acts at the controller's console: a named user of the controller, never the OS account.

Every command that changes something resolves its actor here, in this order:

1. ``--as USER --password-stdin``: USER, proven by the password on standard input;
2. ``ASICFLEET_TOKEN``: the personal API token in the environment (its user; ``--as``, when
   given, must name the same user);
3. the token stored by ``asicfleet controller login --as USER`` (a 0600 file in the user's
   config dir), when ``--as`` is absent or names the same user;
4. ``--as USER`` at a terminal: USER's password is prompted for.

Anything else is a one-line error (exit 2), and the user's role must be one the API allows for
the same change (:data:`controller.api.policy.ROUTE_ACCESS`: one table for both doors).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from sqlmodel import Session, select

from controller import login_throttle
from controller.api.policy import ROUTE_ACCESS
from controller.cli.context import context, fail
from controller.cli.context import in_transaction as _run
from controller.models import ApiToken, Role, User, utcnow
from controller.pool_policy import CliUser
from controller.security import USER_TOKEN_PREFIX, token_hash

TOKEN_ENV = "ASICFLEET_TOKEN"
TOKEN_FILE_NAME = "controller-token.json"
API = "/api/v1"

AsOpt = Annotated[
    str,
    typer.Option(
        "--as",
        metavar="USER",
        help=f"Act as this controller user (password prompted, or --password-stdin; "
        f"not needed after `asicfleet controller login` or with {TOKEN_ENV}).",
    ),
]
StdinOpt = Annotated[
    bool,
    typer.Option("--password-stdin", help="Read the --as user's password from standard input."),
]


# --- pure rules ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ByPassword:
    """Prove ``name`` with a password (from stdin when ``from_stdin``, else a prompt)."""

    name: str
    from_stdin: bool


@dataclass(frozen=True)
class ByToken:
    """A personal API token; ``origin`` says where it came from, for error messages."""

    secret: str
    origin: str
    expected_user: str = ""


Credential = ByPassword | ByToken


@dataclass(frozen=True)
class StoredLogin:
    user: str
    token: str
    path: Path


def choose_credential(
    as_user: str, password_stdin: bool, env_token: str, stored: StoredLogin | None
) -> Credential | str:
    """Which credential names the actor, or why none does (a one-line message)."""
    if password_stdin:
        if not as_user:
            return "--password-stdin needs --as USER (whose password it is)"
        return ByPassword(as_user, from_stdin=True)
    if env_token:
        return ByToken(env_token, TOKEN_ENV, expected_user=as_user)
    if stored is not None and (not as_user or as_user == stored.user):
        return ByToken(stored.token, f"the login stored in {stored.path}", stored.user)
    if as_user:
        return ByPassword(as_user, from_stdin=False)
    return (
        "this command changes the controller, so it must say who acts: give --as USER "
        "(password prompted, or --password-stdin), or log in once with "
        f"`asicfleet controller login --as USER`, or set {TOKEN_ENV}"
    )


def role_problem(person: CliUser, route: tuple[str, str], doing: str) -> str | None:
    """Why ``person`` may not do what the API route ``route`` does, or None."""
    allowed = ROUTE_ACCESS[route]
    if person.role.value in allowed:
        return None
    names = ", ".join(sorted(allowed))
    return f"{person.name} has the role {person.role.value}; {doing} needs the role {names}"


# --- the stored login ---------------------------------------------------------------------------


def token_file() -> Path:
    """``$XDG_CONFIG_HOME/asicfleet/controller-token.json`` (``~/.config/…`` by default)."""
    return Path(typer.get_app_dir("asicfleet")) / TOKEN_FILE_NAME


def read_stored_login() -> StoredLogin | None:
    """The stored login, or None when there is none; a damaged or open file is an error."""
    path = token_file()
    try:
        mode = path.stat().st_mode & 0o777
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        fail(f"{path}: unreadable stored login ({exc}); remove it and log in again", code=2)
    if mode & 0o077:
        fail(f"{path} is readable by others (mode {mode:o}); run: chmod 600 {path}", code=2)
    user, token = data.get("user"), data.get("token")
    if not isinstance(user, str) or not isinstance(token, str) or not user or not token:
        fail(f"{path}: not a stored login; remove it and log in again", code=2)
    return StoredLogin(user=user, token=token, path=path)


def store_login(user: str, token: str, expires_at: datetime | None) -> Path:
    """Write the token 0600 (from the first byte) in a 0700 directory, replacing any other."""
    path = token_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    body = {
        "user": user,
        "token": token,
        "expires_at": expires_at.isoformat() if expires_at else None,
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        os.fchmod(out.fileno(), 0o600)  # whatever the umask
        json.dump(body, out)
        out.write("\n")
    os.replace(tmp, path)
    return path


# --- resolving the actor ------------------------------------------------------------------------


def _password(credential: ByPassword) -> str:
    if credential.from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            fail("no password on standard input", code=2)
        return password
    if not sys.stdin.isatty():
        fail(
            f"--as {credential.name}: no terminal to ask the password; give --password-stdin "
            f"and pipe it in, or log in once with `asicfleet controller login --as "
            f"{credential.name}`",
            code=2,
        )
    entered: str = typer.prompt(f"Password for {credential.name}", hide_input=True)
    return entered


def user_for_token(session: Session, secret: str) -> tuple[User, ApiToken] | None:
    """The user a personal token acts as, or None when it is unknown, revoked or expired."""
    if not secret.startswith(USER_TOKEN_PREFIX):
        return None
    row = session.exec(select(ApiToken).where(ApiToken.token_hash == token_hash(secret))).first()
    if row is None or row.revoked or (row.expires_at is not None and row.expires_at <= utcnow()):
        return None
    user = session.get(User, row.user_id)
    if user is None or user.disabled:
        return None
    return user, row


CLI_SOURCE = "cli"
"""The address a console login counts against (the API counts the client's address)."""


def _check_password(
    session: Session, name: str, password: str, policy: login_throttle.ThrottlePolicy
) -> CliUser | None:
    """The user, if the password is right; behind the same throttle as the API's login, so
    the console is no way around a lockout (raises :class:`LoginThrottled`)."""
    from controller.accounts import check_password

    now = utcnow()
    login_throttle.check(session, name, CLI_SOURCE, now)
    user = check_password(session, name, password)
    if user is None:
        login_throttle.record_failure(session, policy, name, CLI_SOURCE, now)
        return None
    login_throttle.record_success(session, name)
    return CliUser(name=user.name, role=Role(user.role))


def by_password(ctx: typer.Context, credential: ByPassword) -> CliUser:
    """The user named in ``credential``, proven by their password (exit 1 if it is wrong)."""
    name, password = credential.name, _password(credential)
    policy = login_throttle.ThrottlePolicy.of(context(ctx).settings())
    found = _run(ctx, lambda s: _check_password(s, name, password, policy))
    if found is None:
        fail(f"--as {name}: invalid user name or password")
    return found


def person(ctx: typer.Context, as_user: str, password_stdin: bool) -> CliUser:
    """The controller user this command acts as (see the module docstring); fails clearly."""
    env_token = os.environ.get(TOKEN_ENV, "").strip()
    stored = None if env_token or password_stdin else read_stored_login()
    credential = choose_credential(as_user, password_stdin, env_token, stored)
    if isinstance(credential, str):
        fail(credential, code=2)
    if isinstance(credential, ByPassword):
        return by_password(ctx, credential)
    secret = credential.secret

    def by_token(session: Session) -> CliUser | None:
        match = user_for_token(session, secret)
        if match is None:
            return None
        user, row = match
        row.last_used_at = utcnow()
        session.add(row)
        return CliUser(name=user.name, role=Role(user.role))

    found = _run(ctx, by_token)
    if found is None:
        again = f" --as {credential.expected_user}" if credential.expected_user else ""
        fail(
            f"{credential.origin}: the token is unknown to this controller, revoked or expired "
            f"(or its user is disabled); log in again with `asicfleet controller login{again}`"
        )
    if credential.expected_user and found.name != credential.expected_user:
        fail(f"{credential.origin} acts as {found.name}, not --as {credential.expected_user}")
    return found


def acting_user(
    ctx: typer.Context,
    as_user: str,
    password_stdin: bool,
    *,
    route: tuple[str, str],
    doing: str,
) -> CliUser:
    """:func:`person`, who must hold a role the API allows for ``route`` (exit 1 if not)."""
    found = person(ctx, as_user, password_stdin)
    if problem := role_problem(found, (route[0], API + route[1]), doing):
        fail(problem)
    return found
