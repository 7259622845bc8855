"""Logging in, API tokens, user administration and `user add`, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import pwd
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from controller.accounts import leaves_no_admin, name_problem, password_problem
from controller.models import ApiToken, AuditEntry, Role, User, utcnow
from controller.security import token_hash
from tests.controller.conftest import CliInvoker, TestUser, UserFactory

PASSWORD = "a long enough password"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def audit_entries(engine: Engine, action: str | None = None) -> list[AuditEntry]:
    with Session(engine) as session:
        query = select(AuditEntry).order_by(col(AuditEntry.seq))
        if action is not None:
            query = query.where(AuditEntry.action == action)
        return list(session.exec(query).all())


def login(client: TestClient, name: str, password: str) -> str:
    response = client.post("/api/v1/auth/token", json={"name": name, "password": password})
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


# --- pure rules ---------------------------------------------------------------------------------


def test_name_and_password_rules() -> None:
    assert name_problem("alice") is None
    assert name_problem("ops.bot@farm-1") is None
    assert name_problem("me") is not None  # /users/me
    assert name_problem("cli:root") is not None  # audit actors of the CLI can't be impersonated
    assert name_problem("") is not None
    assert password_problem("short") == "password must be at least 10 characters"
    assert password_problem("x" * 10) is None


def test_last_admin_rule() -> None:
    admin = User(name="a", password_hash="-", role=Role.ADMIN)
    assert leaves_no_admin(admin, new_role=Role.OPERATOR, new_disabled=None, active_admins=1)
    assert leaves_no_admin(admin, new_role=None, new_disabled=True, active_admins=1)
    assert not leaves_no_admin(admin, new_role=Role.OPERATOR, new_disabled=None, active_admins=2)
    assert not leaves_no_admin(admin, new_role=Role.ADMIN, new_disabled=False, active_admins=1)
    operator = User(name="o", password_hash="-", role=Role.OPERATOR)
    assert not leaves_no_admin(operator, new_role=None, new_disabled=True, active_admins=1)


# --- logging in ---------------------------------------------------------------------------------


def test_login_with_json_and_with_oauth2_form(
    app_client: TestClient, make_user: UserFactory, engine: Engine
) -> None:
    user = make_user(Role.TECHNICIAN, name="tess", password=PASSWORD)
    response = app_client.post("/api/v1/auth/token", json={"name": "tess", "password": PASSWORD})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "bearer"
    assert body["access_token"].startswith("afu_")
    assert (body["user"], body["role"]) == ("tess", "technician")
    me = app_client.get("/api/v1/users/me", headers=bearer(body["access_token"]))
    assert me.status_code == 200
    assert me.json()["role"] == "technician"

    form = app_client.post(
        "/api/v1/auth/token",
        data={"username": "tess", "password": PASSWORD, "grant_type": "password"},
    )
    assert form.status_code == 200, form.text
    # one spelling for both bodies: JSON may say username, the form may say name
    as_username = app_client.post(
        "/api/v1/auth/token", json={"username": "tess", "password": PASSWORD}
    )
    assert as_username.status_code == 200, as_username.text
    named_form = app_client.post("/api/v1/auth/token", data={"name": "tess", "password": PASSWORD})
    assert named_form.status_code == 200, named_form.text
    both = app_client.post(
        "/api/v1/auth/token", json={"name": "tess", "username": "olga", "password": PASSWORD}
    )
    assert both.status_code == 422 and "name and username" in both.text

    with Session(engine) as session:
        row = session.exec(
            select(ApiToken).where(ApiToken.token_hash == token_hash(body["access_token"]))
        ).one()
    assert row.user_id == user.id and row.name == "login"
    assert row.expires_at is not None
    assert timedelta(hours=11, minutes=59) < row.expires_at - utcnow() <= timedelta(hours=12)
    logins = audit_entries(engine, "auth.login")
    assert [e.actor for e in logins] == ["tess"] * 4
    assert logins[0].source == "testclient"


def test_wrong_password_unknown_user_and_disabled_user_look_the_same(
    app_client: TestClient, make_user: UserFactory, admin: TestUser
) -> None:
    make_user(Role.OPERATOR, name="olga", password=PASSWORD)
    make_user(Role.OPERATOR, name="gone", password=PASSWORD)
    disabled = app_client.patch(
        "/api/v1/users/gone", json={"disabled": True}, headers=admin.headers
    )
    assert disabled.status_code == 200
    answers = [
        app_client.post("/api/v1/auth/token", json={"name": name, "password": password})
        for name, password in [
            ("olga", "not the password"),
            ("nobody", PASSWORD),
            ("gone", PASSWORD),
        ]
    ]
    assert [a.status_code for a in answers] == [401, 401, 401]
    assert {a.json()["detail"] for a in answers} == {"invalid name or password"}


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"content": b"{not json", "headers": {"content-type": "application/json"}}, "JSON"),
        ({"json": {"name": "x"}}, "password"),
        ({"json": ["x", "y"]}, "JSON object"),
        ({"content": b"x", "headers": {"content-type": "text/plain"}}, "expected"),
    ],
)
def test_malformed_login_is_422_naming_the_problem(
    app_client: TestClient, kwargs: dict[str, object], problem: str
) -> None:
    response = app_client.post("/api/v1/auth/token", **kwargs)
    assert response.status_code == 422
    assert problem in json.dumps(response.json())


def test_requests_without_a_valid_token_are_401(
    app_client: TestClient, make_user: UserFactory, engine: Engine
) -> None:
    assert app_client.get("/api/v1/users/me").status_code == 401
    assert app_client.get("/api/v1/users/me", headers=bearer("afu_nonsense")).status_code == 401
    user = make_user(Role.INSPECTOR)
    with Session(engine) as session:
        row = session.exec(select(ApiToken).where(ApiToken.user_id == user.id)).one()
        row.expires_at = utcnow() - timedelta(seconds=1)
        session.add(row)
        session.commit()
    assert app_client.get("/api/v1/users/me", headers=user.headers).status_code == 401


# --- API tokens ---------------------------------------------------------------------------------


def test_named_api_tokens_create_list_use_and_revoke(
    app_client: TestClient, make_user: UserFactory, engine: Engine
) -> None:
    user = make_user(Role.COMPLIANCE, name="carla")
    other = make_user(Role.COMPLIANCE, name="chris")
    created = app_client.post(
        "/api/v1/users/me/tokens",
        json={"name": "nightly-export", "expires_in_days": None},
        headers=user.headers,
    )
    assert created.status_code == 201, created.text
    issued = created.json()
    assert issued["token"].startswith("afu_") and issued["expires_at"] is None
    script = bearer(issued["token"])
    assert app_client.get("/api/v1/users/me", headers=script).json()["name"] == "carla"

    listed = app_client.get("/api/v1/users/me/tokens", headers=user.headers).json()
    assert {t["name"] for t in listed} == {"test", "nightly-export"}
    assert all("token" not in t for t in listed)  # the secret is shown once only

    # Someone else's token id is "not found", not "forbidden": ids are not confirmed.
    stolen = app_client.delete(f"/api/v1/users/me/tokens/{issued['id']}", headers=other.headers)
    assert stolen.status_code == 404
    revoked = app_client.delete(f"/api/v1/users/me/tokens/{issued['id']}", headers=user.headers)
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    assert app_client.get("/api/v1/users/me", headers=script).status_code == 401
    active = app_client.get("/api/v1/users/me/tokens", headers=user.headers).json()
    assert [t["name"] for t in active] == ["test"]
    everything = app_client.get(
        "/api/v1/users/me/tokens", params={"include_inactive": True}, headers=user.headers
    ).json()
    assert len(everything) == 2

    with Session(engine) as session:
        stored = session.get(ApiToken, issued["id"])
        assert stored is not None and stored.token_hash == token_hash(issued["token"])
    actions = [(e.action, e.actor) for e in audit_entries(engine)]
    assert ("api_token.create", "carla") in actions
    assert ("api_token.revoke", "carla") in actions


def test_token_body_is_validated(app_client: TestClient, make_user: UserFactory) -> None:
    user = make_user(Role.INSPECTOR)
    bad = app_client.post(
        "/api/v1/users/me/tokens", json={"name": "", "expires_in_days": 0}, headers=user.headers
    )
    assert bad.status_code == 422
    assert {e["loc"][-1] for e in bad.json()["detail"]} == {"name", "expires_in_days"}


# --- user administration ------------------------------------------------------------------------


def test_admin_creates_changes_and_disables_users(
    app_client: TestClient, admin: TestUser, engine: Engine
) -> None:
    created = app_client.post(
        "/api/v1/users",
        json={"name": "otto", "role": "operator", "password": PASSWORD},
        headers=admin.headers,
    )
    assert created.status_code == 201, created.text
    assert created.json()["role"] == "operator"
    duplicate = app_client.post(
        "/api/v1/users",
        json={"name": "otto", "role": "inspector", "password": PASSWORD},
        headers=admin.headers,
    )
    assert duplicate.status_code == 409
    assert "already exists" in duplicate.json()["detail"]

    otto = login(app_client, "otto", PASSWORD)
    promoted = app_client.patch(
        "/api/v1/users/otto", json={"role": "technician"}, headers=admin.headers
    )
    assert promoted.status_code == 200 and promoted.json()["role"] == "technician"
    assert app_client.get("/api/v1/users/me", headers=bearer(otto)).json()["role"] == "technician"

    off = app_client.patch("/api/v1/users/otto", json={"disabled": True}, headers=admin.headers)
    assert off.status_code == 200 and off.json()["disabled"] is True
    assert app_client.get("/api/v1/users/me", headers=bearer(otto)).status_code == 401
    on = app_client.patch("/api/v1/users/otto", json={"disabled": False}, headers=admin.headers)
    assert on.status_code == 200
    # Disabling revoked the old tokens; re-enabling does not bring them back.
    assert app_client.get("/api/v1/users/me", headers=bearer(otto)).status_code == 401
    login(app_client, "otto", PASSWORD)

    names = [u["name"] for u in app_client.get("/api/v1/users", headers=admin.headers).json()]
    assert names == ["admin", "otto"]
    missing = app_client.patch(
        "/api/v1/users/nobody", json={"role": "admin"}, headers=admin.headers
    )
    assert missing.status_code == 404

    updates = audit_entries(engine, "user.update")
    assert [e.actor for e in updates] == ["admin", "admin", "admin"]
    assert updates[0].before == {"name": "otto", "role": "operator", "disabled": False}
    assert updates[0].after == {"name": "otto", "role": "technician", "disabled": False}
    assert updates[1].after is not None and updates[1].after["tokens_revoked"] == 1
    assert all(e.source == "testclient" for e in updates)
    create = audit_entries(engine, "user.create")[0]
    assert create.after == {"name": "otto", "role": "operator", "disabled": False}


def test_user_input_is_validated(app_client: TestClient, admin: TestUser) -> None:
    cases = [
        ({"name": "ok-name", "role": "operator", "password": "short"}, "password"),
        ({"name": "ok-name", "role": "wizard", "password": PASSWORD}, "role"),
        ({"name": "bad name!", "role": "operator", "password": PASSWORD}, "name"),
    ]
    for body, field in cases:
        response = app_client.post("/api/v1/users", json=body, headers=admin.headers)
        assert response.status_code == 422, body
        assert [e["loc"][-1] for e in response.json()["detail"]] == [field]


def test_the_last_admin_cannot_be_demoted_or_disabled(
    app_client: TestClient, admin: TestUser, make_user: UserFactory
) -> None:
    for change in ({"role": "operator"}, {"disabled": True}):
        refused = app_client.patch("/api/v1/users/admin", json=change, headers=admin.headers)
        assert refused.status_code == 403
        assert "last active admin" in refused.json()["detail"]
    make_user(Role.ADMIN, name="second")
    demoted = app_client.patch(
        "/api/v1/users/admin", json={"role": "operator"}, headers=admin.headers
    )
    assert demoted.status_code == 200


def test_passwords_are_argon2_and_never_audited(
    app_client: TestClient, admin: TestUser, engine: Engine
) -> None:
    app_client.post(
        "/api/v1/users",
        json={"name": "ivan", "role": "inspector", "password": PASSWORD},
        headers=admin.headers,
    )
    reset = app_client.patch(
        "/api/v1/users/ivan", json={"password": "another long password"}, headers=admin.headers
    )
    assert reset.status_code == 200
    login(app_client, "ivan", "another long password")
    with Session(engine) as session:
        user = session.exec(select(User).where(User.name == "ivan")).one()
    assert user.password_hash.startswith("$argon2id$")
    dump = json.dumps([[e.before, e.after] for e in audit_entries(engine)])
    assert "argon2" not in dump and PASSWORD not in dump and "another long" not in dump
    assert audit_entries(engine, "user.update")[0].after == {
        "name": "ivan",
        "role": "inspector",
        "disabled": False,
        "password_changed": True,
    }


# --- the CLI ------------------------------------------------------------------------------------


def test_cli_user_add_reads_the_password_from_stdin(
    cli: CliInvoker, app_client: TestClient, engine: Engine, make_user: UserFactory
) -> None:
    not_admin = cli("user", "add", "root", "--role", "operator", "--password-stdin", input=PASSWORD)
    assert not_admin.exit_code == 2
    assert "the first user must be an admin" in not_admin.stderr
    # the bootstrap: with no users yet, the OS account adds the first admin
    added = cli("user", "add", "root", "--role", "admin", "--password-stdin", input=PASSWORD + "\n")
    assert added.exit_code == 0, added.output
    assert PASSWORD not in added.output
    login(app_client, "root", PASSWORD)
    entry = audit_entries(engine, "user.create")[0]
    assert entry.actor == f"cli:{pwd.getpwuid(os.getuid()).pw_name}"  # not $USER
    assert (entry.actor_kind, entry.source) == ("user", "cli")

    # afterwards the OS account is nobody: adding a user needs a named admin
    anonymous = cli("user", "add", "kid", "--role", "operator", "--password-stdin", input=PASSWORD)
    assert anonymous.exit_code == 2
    assert anonymous.stderr.startswith("error: this command changes the controller")
    assert len(anonymous.stderr.strip().splitlines()) == 1
    boss = make_user(Role.ADMIN, name="boss")
    olga = make_user(Role.OPERATOR, name="olga")
    refused = cli(
        "user", "add", "kid", "--role", "operator", "--password-stdin", input=PASSWORD, as_user=olga
    )
    assert refused.exit_code == 1
    assert refused.stderr.strip() == (
        "error: olga has the role operator; adding a user needs the role admin"
    )

    again = cli(
        "user",
        "add",
        "root",
        "--role",
        "operator",
        "--password-stdin",
        input=PASSWORD,
        as_user=boss,
    )
    assert again.exit_code == 1
    assert again.stderr.strip() == "error: user 'root' already exists"

    short = cli(
        "user", "add", "kid", "--role", "operator", "--password-stdin", input="tiny\n", as_user=boss
    )
    assert short.exit_code == 1
    assert short.stderr.strip() == "error: password must be at least 10 characters"

    empty = cli(
        "user", "add", "kid", "--role", "operator", "--password-stdin", input="", as_user=boss
    )
    assert empty.exit_code == 1 and "no password" in empty.stderr

    role = cli("user", "add", "kid", "--role", "wizard", "--password-stdin", input=PASSWORD)
    assert role.exit_code == 2

    kid = cli(
        "user", "add", "kid", "--role", "technician", "--password-stdin", input=PASSWORD,
        as_user=boss,
    )  # fmt: skip
    assert kid.exit_code == 0, kid.output
    assert [(e.actor, e.source) for e in audit_entries(engine, "user.create")][1:] == [
        ("boss", "cli")
    ]
    listed = cli("user", "list")
    assert listed.exit_code == 0 and "root" in listed.stdout and "admin" in listed.stdout
