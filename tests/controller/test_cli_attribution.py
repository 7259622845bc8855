"""Every write at the controller's console is made by a named controller user (issue 10).

Before: claims and exports were audited as ``cli:root`` (the OS account), so the audit log
could not say which technician claimed a machine. Now each write resolves a user — a password
(``--as USER``), ``ASICFLEET_TOKEN`` or the token stored by ``controller login`` — and the audit
entry names that user; without one the command fails in one line and changes nothing.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from controller.models import ApiToken, AuditEntry, RegisterEvent, Role
from tests.controller.conftest import DEFAULT_PASSWORD, CliInvoker, TestUser, UserFactory
from tests.controller.test_register import add_machine, add_site

POOL_URL = "stratum+tcp://pool.example.com:3333"


def audit_entries(engine: Engine) -> list[AuditEntry]:
    with Session(engine) as session:
        return list(session.exec(select(AuditEntry).order_by(col(AuditEntry.seq))).all())


@pytest.fixture
def people(make_user: UserFactory) -> dict[str, TestUser]:
    return {
        "olga": make_user(Role.OPERATOR, name="olga"),
        "tess": make_user(Role.TECHNICIAN, name="tess"),
        "carla": make_user(Role.COMPLIANCE, name="carla"),
        "adam": make_user(Role.ADMIN, name="adam"),
    }


def test_every_write_names_its_user_and_none_runs_anonymously(
    cli: CliInvoker, engine: Engine, people: dict[str, TestUser], tmp_path: Path
) -> None:
    alpha = add_site(engine, "alpha")
    machines = [
        add_machine(
            engine,
            mac=f"aa:bb:cc:00:01:0{i}",
            current_ip=f"10.0.1.{i}",
            reported_serial=f"SN100{i}",
            model="S19",
            vendor="antminer",
            site_id=alpha,
        )
        for i in (1, 2)
    ]
    with Session(engine, expire_on_commit=False) as session:
        alert = RegisterEvent(kind="rollout_halted", severity="critical", detail="canary failed")
        session.add(alert)
        session.commit()
    claims = tmp_path / "claims.csv"
    claims.write_text(
        "mac,ip,site,container,rack,shelf,slot,label_serial,override_reason\n"
        "aa:bb:cc:00:01:02,,alpha,C1,R1,1,2,SN1002,\n"
    )
    place = ["--site", "alpha", "--container", "C", "--rack", "R", "--shelf", "1", "--slot", "1"]
    writes: list[tuple[str, list[str], str | None]] = [
        ("olga", ["site", "add", "beta", "--licence", "KZ-B"], None),
        ("olga", ["site", "segment", "add", "beta", "10.30.0.0/24"], None),
        ("olga", ["agent", "token", "--site", "beta", "--segment", "10.30.0.0/24"], None),
        ("tess", ["machines", "claim", machines[0].machine_id, *place, "--label-serial", "SN1001"],
         None),
        ("tess", ["machines", "state", machines[0].machine_id, "active"], None),
        ("tess", ["machines", "import-claims", str(claims)], None),
        ("olga", ["pools", "propose", "alpha", "--name", "DMP", "--accreditation-ref", "A-1",
                  "--url", POOL_URL, "--account", "farm1"], None),
        ("olga", ["policy", "set", "alpha", "--canary-size", "3"], None),
        ("olga", ["exemptions", "request", machines[0].machine_id, "--reason", "repair",
                  "--until", "2d"], None),
        ("olga", ["resolve-alert", str(alert.id), "--reason", "firmware fixed"], None),
        ("carla", ["export", "audit", "--out", str(tmp_path / "audit-export")], None),
        ("adam", ["user", "add", "kim", "--role", "inspector", "--password-stdin"],
         DEFAULT_PASSWORD + "\n"),
    ]  # fmt: skip
    for who, args, stdin in writes:
        before = len(audit_entries(engine))
        anonymous = cli(*args, input=stdin)
        assert anonymous.exit_code == 2, (args, anonymous.output)
        assert anonymous.stderr.startswith("error: this command changes the controller, so it")
        assert len(anonymous.stderr.splitlines()) == 1 and "Traceback" not in anonymous.output
        assert len(audit_entries(engine)) == before, args  # nothing happened

        done = cli(*args, input=stdin, as_user=people[who])
        assert done.exit_code == 0, (args, done.output)
        added = audit_entries(engine)[before:]
        assert added, args
        assert {(e.actor, e.actor_kind, e.source) for e in added} == {(who, "user", "cli")}, args
    assert not any(e.actor.startswith("cli:") for e in audit_entries(engine))


def test_a_wrong_password_or_role_fails_cleanly(
    cli: CliInvoker, engine: Engine, people: dict[str, TestUser]
) -> None:
    add_site(engine, "alpha")
    args = ["policy", "set", "alpha", "--canary-size", "3"]
    for stdin, expected in [
        ("not the password\n", "error: --as olga: invalid user name or password\n"),
        ("", "error: no password on standard input\n"),
    ]:
        result = cli(*args, "--as", "olga", "--password-stdin", input=stdin)
        assert result.exit_code != 0 and result.stderr == expected
    ghost = cli(*args, "--as", "ghost", "--password-stdin", input=DEFAULT_PASSWORD + "\n")
    assert ghost.stderr == "error: --as ghost: invalid user name or password\n"
    # no terminal to prompt on (tests, cron): say how to give the password, do not hang
    no_tty = cli(*args, "--as", "olga")
    assert no_tty.exit_code == 2 and "no terminal to ask the password" in no_tty.stderr
    lonely = cli(*args, "--password-stdin", input=DEFAULT_PASSWORD + "\n")
    assert lonely.exit_code == 2 and "--password-stdin needs --as USER" in lonely.stderr
    tess = cli(*args, as_user=people["tess"])
    assert tess.exit_code == 1 and tess.stderr == (
        "error: tess has the role technician; changing a site's policy needs the role "
        "admin, operator\n"
    )
    impostor = cli(*args, "--as", "adam", as_user=people["olga"])
    assert impostor.exit_code == 1
    assert impostor.stderr == "error: ASICFLEET_TOKEN acts as olga, not --as adam\n"
    assert audit_entries(engine) == []
    ok = cli(*args, "--as", "olga", "--password-stdin", input=DEFAULT_PASSWORD + "\n")
    assert ok.exit_code == 0, ok.output
    assert [e.actor for e in audit_entries(engine)] == ["olga"]


def test_the_console_is_no_way_around_a_login_lockout(
    cli: CliInvoker, engine: Engine, people: dict[str, TestUser]
) -> None:
    """Guessing olga's password at the console counts like guessing it at the API."""
    add_site(engine, "alpha")
    args = ["policy", "set", "alpha", "--canary-size", "3", "--as", "olga", "--password-stdin"]
    for _ in range(5):  # login_max_failures_per_user
        wrong = cli(*args, input="a guess\n")
        assert wrong.stderr == "error: --as olga: invalid user name or password\n"
    right = cli(*args, input=DEFAULT_PASSWORD + "\n")
    assert right.exit_code == 1
    assert right.stderr.startswith("error: too many failed logins; try again in ")
    assert [e.action for e in audit_entries(engine)] == ["auth.lockout"]


def test_login_stores_a_private_token_that_later_commands_use(
    cli: CliInvoker,
    engine: Engine,
    people: dict[str, TestUser],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    add_site(engine, "alpha")
    previous = os.umask(0)  # the widest umask: the token file must still be 0600
    request.addfinalizer(lambda: os.umask(previous))
    wrong = cli("login", "--as", "olga", "--password-stdin", input="nope nope nope\n")
    assert wrong.exit_code == 1 and wrong.stderr == (
        "error: --as olga: invalid user name or password\n"
    )
    stored = tmp_path / "config" / "asicfleet" / "controller-token.json"
    assert not stored.exists()

    login = cli("login", "--as", "olga", "--password-stdin", input=DEFAULT_PASSWORD + "\n")
    assert login.exit_code == 0, login.output
    assert "logged in as olga (operator)" in login.stderr
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert stat.S_IMODE(stored.parent.stat().st_mode) == 0o700
    secret = json.loads(stored.read_text())["token"]
    assert secret not in login.output

    # `pools propose --as olga` with no terminal: the stored login proves olga
    propose = [
        "pools", "propose", "alpha", "--name", "DMP", "--accreditation-ref", "A-1",
        "--url", POOL_URL, "--account", "farm1",
    ]  # fmt: skip
    proposed = cli(*propose, "--as", "olga")
    assert proposed.exit_code == 0, proposed.output
    changed = cli("policy", "set", "alpha", "--canary-size", "4")  # no --as at all
    assert changed.exit_code == 0, changed.output
    actors = [(e.action, e.actor) for e in audit_entries(engine)]
    assert actors == [
        ("api_token.create", "olga"),
        ("pool_set.propose", "olga"),
        ("site_policy.update", "olga"),
    ], actors
    # another user's --as still needs that user's password
    other = cli("policy", "set", "alpha", "--canary-size", "5", "--as", "adam")
    assert other.exit_code == 2 and "no terminal to ask the password" in other.stderr

    # a failed login (wrong password, no terminal) leaves the stored login as it was
    failed = cli("login", "--as", "adam", "--password-stdin", input="wrong password\n")
    assert failed.exit_code == 1
    assert cli("login", "--as", "adam").exit_code == 2
    assert json.loads(stored.read_text())["token"] == secret

    stored.chmod(0o644)
    opened = cli("policy", "set", "alpha", "--canary-size", "5")
    assert opened.exit_code == 2
    assert opened.stderr == (
        f"error: {stored} is readable by others (mode 644); run: chmod 600 {stored}\n"
    )
    stored.chmod(0o600)

    logout = cli("logout")
    assert logout.exit_code == 0 and not stored.exists()
    with Session(engine) as session:
        row = session.exec(select(ApiToken).where(ApiToken.name == "cli login")).one()
        assert row.revoked
    after = cli("policy", "set", "alpha", "--canary-size", "5")
    assert after.exit_code == 2 and "must say who acts" in after.stderr


def test_a_revoked_token_in_the_environment_is_refused(
    cli: CliInvoker, engine: Engine, people: dict[str, TestUser]
) -> None:
    add_site(engine, "alpha")
    with Session(engine) as session:
        for row in session.exec(select(ApiToken)).all():
            row.revoked = True
            session.add(row)
        session.commit()
    result = cli("policy", "set", "alpha", "--canary-size", "3", as_user=people["olga"])
    assert result.exit_code == 1
    assert result.stderr.startswith(
        "error: ASICFLEET_TOKEN: the token is unknown to this controller, revoked or expired"
    )
    assert audit_entries(engine) == []


def test_which_credential_names_the_actor() -> None:
    from controller.cli.identity import ByPassword, ByToken, StoredLogin, choose_credential

    stored = StoredLogin(user="olga", token="afu_stored", path=Path("/x/controller-token.json"))
    env = "afu_env"
    assert choose_credential("olga", True, env, stored) == ByPassword("olga", from_stdin=True)
    assert choose_credential("", False, env, stored) == ByToken(env, "ASICFLEET_TOKEN", "")
    assert choose_credential("adam", False, env, None) == ByToken(env, "ASICFLEET_TOKEN", "adam")
    assert choose_credential("", False, "", stored) == ByToken(
        "afu_stored", "the login stored in /x/controller-token.json", "olga"
    )
    assert choose_credential("olga", False, "", stored) == ByToken(
        "afu_stored", "the login stored in /x/controller-token.json", "olga"
    )
    # someone else's stored login never stands in for adam: his password is asked
    assert choose_credential("adam", False, "", stored) == ByPassword("adam", from_stdin=False)
    for refused in (choose_credential("", False, "", None), choose_credential("", True, "", None)):
        assert isinstance(refused, str)
