"""Sites, segments, enrollment and the signing key, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from contract.policy import PolicyBundle, PolicyContent
from controller import signing
from controller.models import Agent, AuditEntry, EnrollmentToken, Role, Segment, utcnow
from controller.security import token_hash
from controller.sites import find_overlap, parse_cidr
from tests.controller.conftest import CliInvoker, TestUser, UserFactory

SITE = {
    "name": "ekibastuz-1",
    "licence_number": "KZ-DM-0042",
    "dmp_account": "dmp-acct-7",
    "owner_name": "Steppe Hash LLP",
}


def audit_entries(engine: Engine, action: str) -> list[AuditEntry]:
    with Session(engine) as session:
        query = select(AuditEntry).where(AuditEntry.action == action)
        return list(session.exec(query.order_by(col(AuditEntry.seq))).all())


def enroll_body(token: str, name: str = "agent-a", **extra: Any) -> dict[str, Any]:
    return {"token": token, "agent_name": name, "agent_version": "0.1.0", "hostname": "h1", **extra}


@pytest.fixture
def operator(make_user: UserFactory) -> TestUser:
    return make_user(Role.OPERATOR, name="olga")


@pytest.fixture
def site(app_client: TestClient, operator: TestUser) -> dict[str, Any]:
    response = app_client.post("/api/v1/sites", json=SITE, headers=operator.headers)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def make_token(
    client: TestClient, user: TestUser, segments: list[str], site: str = "ekibastuz-1", **kw: Any
) -> str:
    response = client.post(
        "/api/v1/agents/enrollment-tokens",
        json={"site": site, "segments": segments, **kw},
        headers=user.headers,
    )
    assert response.status_code == 201, response.text
    token: str = response.json()["token"]
    return token


# --- pure rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("10.0.0.5/24", "host bits set; did you mean 10.0.0.0/24?"),
        ("10.0.0.0", "add a prefix length"),
        ("10.0.0.0/33", "not a valid IPv4 or IPv6 CIDR"),
        ("farm/24", "not a valid IPv4 or IPv6 CIDR"),
        ("10.0.0.0/8", "wider than /16"),
        ("fd00::/32", "wider than /48"),
    ],
)
def test_bad_cidrs_are_named(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem.replace("?", r"\?")):
        parse_cidr(text)


def test_good_cidrs_and_overlaps() -> None:
    assert str(parse_cidr(" 10.20.1.0/24 ")) == "10.20.1.0/24"
    assert str(parse_cidr("fd00:1::/64")) == "fd00:1::/64"
    existing = ["10.0.0.0/24", "10.0.2.0/23", "fd00::/64"]
    assert find_overlap(ipaddress.ip_network("10.0.0.128/25"), existing) == "10.0.0.0/24"
    assert find_overlap(ipaddress.ip_network("10.0.0.0/16"), existing) == "10.0.0.0/24"
    assert find_overlap(ipaddress.ip_network("10.0.3.0/24"), existing) == "10.0.2.0/23"
    assert find_overlap(ipaddress.ip_network("10.0.1.0/24"), existing) is None
    assert find_overlap(ipaddress.ip_network("fd00::/80"), existing) == "fd00::/64"


# --- sites and segments -------------------------------------------------------------------------


def test_sites_are_created_by_operators_and_read_by_everyone(
    app_client: TestClient, site: dict[str, Any], make_user: UserFactory, engine: Engine
) -> None:
    assert {k: site[k] for k in SITE} == SITE
    inspector = make_user(Role.INSPECTOR)
    listed = app_client.get("/api/v1/sites", headers=inspector.headers)
    assert [s["name"] for s in listed.json()] == ["ekibastuz-1"]
    shown = app_client.get("/api/v1/sites/ekibastuz-1", headers=inspector.headers)
    assert shown.json()["licence_number"] == "KZ-DM-0042"
    assert app_client.get("/api/v1/sites/nowhere", headers=inspector.headers).status_code == 404
    entry = audit_entries(engine, "site.create")[0]
    assert (entry.actor, entry.entity_id, entry.source) == ("olga", "ekibastuz-1", "testclient")
    assert entry.after == {k: SITE[k] for k in SITE}


def test_site_input_is_checked(
    app_client: TestClient, site: dict[str, Any], operator: TestUser
) -> None:
    again = app_client.post("/api/v1/sites", json=SITE, headers=operator.headers)
    assert again.status_code == 409
    no_licence = app_client.post("/api/v1/sites", json={"name": "b"}, headers=operator.headers)
    assert no_licence.status_code == 422
    assert no_licence.json()["detail"][0]["loc"] == ["body", "licence_number"]
    bad_name = {**SITE, "name": "a/b"}
    assert (
        app_client.post("/api/v1/sites", json=bad_name, headers=operator.headers).status_code == 422
    )


def test_segments_are_validated_and_may_not_overlap(
    app_client: TestClient, site: dict[str, Any], operator: TestUser, engine: Engine
) -> None:
    url = "/api/v1/sites/ekibastuz-1/segments"
    first = app_client.post(url, json={"cidr": "10.20.1.0/24"}, headers=operator.headers)
    assert first.status_code == 201
    assert first.json() == {"cidr": "10.20.1.0/24", "site": "ekibastuz-1", "agent_id": None}
    bad = app_client.post(url, json={"cidr": "10.20.2.7/24"}, headers=operator.headers)
    assert bad.status_code == 422
    assert "did you mean 10.20.2.0/24" in bad.json()["detail"][0]["msg"]

    inside = app_client.post(url, json={"cidr": "10.20.1.128/25"}, headers=operator.headers)
    assert inside.status_code == 409
    assert inside.json()["detail"] == "10.20.1.128/25 overlaps segment 10.20.1.0/24 of this site"
    other = app_client.post(
        "/api/v1/sites", json={**SITE, "name": "pavlodar"}, headers=operator.headers
    )
    assert other.status_code == 201
    across = app_client.post(
        "/api/v1/sites/pavlodar/segments", json={"cidr": "10.20.0.0/16"}, headers=operator.headers
    )
    assert across.status_code == 409
    assert "of site 'ekibastuz-1'" in across.json()["detail"]
    missing = app_client.post(
        "/api/v1/sites/nowhere/segments", json={"cidr": "10.9.0.0/24"}, headers=operator.headers
    )
    assert missing.status_code == 404

    app_client.post(url, json={"cidr": "10.20.0.0/24"}, headers=operator.headers)
    listed = app_client.get(url, headers=operator.headers).json()
    assert [s["cidr"] for s in listed] == ["10.20.0.0/24", "10.20.1.0/24"]
    assert [e.entity_id for e in audit_entries(engine, "segment.create")] == [
        "10.20.1.0/24",
        "10.20.0.0/24",
    ]


# --- enrollment tokens and enrollment -----------------------------------------------------------


def test_enrollment_end_to_end(
    app_client: TestClient,
    site: dict[str, Any],
    operator: TestUser,
    engine: Engine,
    data_dir: Path,
) -> None:
    app_client.post(
        "/api/v1/sites/ekibastuz-1/segments",
        json={"cidr": "10.20.1.0/24"},
        headers=operator.headers,
    )
    issued = app_client.post(
        "/api/v1/agents/enrollment-tokens",
        json={"site": "ekibastuz-1", "segments": ["10.20.1.0/24", "10.20.2.0/24"], "ttl_s": 600},
        headers=operator.headers,
    )
    assert issued.status_code == 201, issued.text
    token = issued.json()["token"]
    assert token.startswith("afe_")
    assert issued.json()["segments"] == ["10.20.1.0/24", "10.20.2.0/24"]
    expires = datetime.fromisoformat(issued.json()["expires_at"])
    assert timedelta(minutes=9) < expires - datetime.now(UTC) <= timedelta(minutes=10)

    enrolled = app_client.post("/api/v1/agents/enroll", json=enroll_body(token))
    assert enrolled.status_code == 201, enrolled.text
    body = enrolled.json()
    assert body["agent_secret"].startswith("afa_")
    assert body["site"] == "ekibastuz-1"
    assert body["segments"] == ["10.20.1.0/24", "10.20.2.0/24"]
    public = base64.b64decode(body["controller_public_key"])
    assert len(public) == 32
    key = signing.load(signing.key_path(data_dir))
    assert key.public_key_b64() == body["controller_public_key"]

    # The new credential is recognised as an agent (403 on a user route, not 401).
    agent_headers = {"Authorization": f"Bearer {body['agent_secret']}"}
    as_agent = app_client.get("/api/v1/agents", headers=agent_headers)
    assert as_agent.status_code == 403 and as_agent.json()["detail"] == "requires a user"

    agents = app_client.get("/api/v1/agents", headers=operator.headers).json()
    assert len(agents) == 1
    assert agents[0]["id"] == body["agent_id"]
    assert (agents[0]["name"], agents[0]["version"], agents[0]["site"]) == (
        "agent-a",
        "0.1.0",
        "ekibastuz-1",
    )
    assert agents[0]["segments"] == ["10.20.1.0/24", "10.20.2.0/24"]
    assert agents[0]["last_seen_at"] is not None

    with Session(engine) as session:
        segments = session.exec(select(Segment).order_by(col(Segment.cidr))).all()
        assert [s.agent_id for s in segments] == [body["agent_id"]] * 2
        row = session.exec(select(EnrollmentToken)).one()
        assert row.token_hash == token_hash(token) and row.used_at is not None
        assert row.agent_id == body["agent_id"] and row.created_by == "olga"
        agent = session.get(Agent, body["agent_id"])
        assert agent is not None and agent.secret_hash == token_hash(body["agent_secret"])
        everything = json.dumps(
            [[e.before, e.after] for e in session.exec(select(AuditEntry)).all()], default=str
        )
    assert token not in everything and body["agent_secret"] not in everything

    # The segment the token created on the site is audited, the enrollment too (by the agent).
    assert [e.entity_id for e in audit_entries(engine, "segment.create")][-1] == "10.20.2.0/24"
    made = audit_entries(engine, "enrollment_token.create")[0]
    assert made.actor == "olga" and made.after is not None
    assert made.after["segments"] == ["10.20.1.0/24", "10.20.2.0/24"]
    enrolled_entry = audit_entries(engine, "agent.enroll")[0]
    assert (enrolled_entry.actor, enrolled_entry.actor_kind) == ("agent:agent-a", "agent")
    assert enrolled_entry.source == "testclient"

    again = app_client.post("/api/v1/agents/enroll", json=enroll_body(token, "agent-b"))
    assert again.status_code == 410
    assert "already used" in again.json()["detail"]


def test_unknown_expired_and_malformed_enrollments(
    app_client: TestClient, site: dict[str, Any], operator: TestUser, engine: Engine
) -> None:
    unknown = app_client.post("/api/v1/agents/enroll", json=enroll_body("afe_" + "x" * 40))
    assert unknown.status_code == 401
    assert unknown.json()["detail"] == "unknown enrollment token"

    token = make_token(app_client, operator, ["10.30.0.0/24"])
    with Session(engine) as session:
        row = session.exec(select(EnrollmentToken)).one()
        row.expires_at = utcnow() - timedelta(seconds=1)
        session.add(row)
        session.commit()
    expired = app_client.post("/api/v1/agents/enroll", json=enroll_body(token))
    assert expired.status_code == 410
    assert "expired at" in expired.json()["detail"]

    no_name = app_client.post("/api/v1/agents/enroll", json={"token": token, "agent_version": "1"})
    assert no_name.status_code == 422
    assert no_name.json()["detail"][0]["loc"] == ["body", "agent_name"]
    future = app_client.post(
        "/api/v1/agents/enroll", json=enroll_body(token, contract_version="2.0")
    )
    assert future.status_code == 422
    assert "contract version 2.0 is not supported" in json.dumps(future.json())
    with Session(engine) as session:
        assert session.exec(select(Agent)).all() == []


def test_token_segments_must_belong_to_the_site(
    app_client: TestClient, site: dict[str, Any], operator: TestUser
) -> None:
    app_client.post("/api/v1/sites", json={**SITE, "name": "pavlodar"}, headers=operator.headers)
    app_client.post(
        "/api/v1/sites/pavlodar/segments", json={"cidr": "10.50.0.0/24"}, headers=operator.headers
    )

    def attempt(body: dict[str, Any]) -> Any:
        return app_client.post(
            "/api/v1/agents/enrollment-tokens", json=body, headers=operator.headers
        )

    theirs = attempt({"site": "ekibastuz-1", "segments": ["10.50.0.0/24"]})
    assert theirs.status_code == 409
    assert (
        theirs.json()["detail"]
        == "segment 10.50.0.0/24 belongs to site 'pavlodar', not site 'ekibastuz-1'"
    )
    overlapping = attempt({"site": "ekibastuz-1", "segments": ["10.50.0.0/25"]})
    assert overlapping.status_code == 409
    assert attempt({"site": "nowhere", "segments": ["10.60.0.0/24"]}).status_code == 404
    assert attempt({"site": "ekibastuz-1", "segments": []}).status_code == 422
    assert attempt({"site": "ekibastuz-1", "segments": ["10.60.0.1/24"]}).status_code == 422
    too_long = attempt({"site": "ekibastuz-1", "segments": ["10.60.0.0/24"], "ttl_s": 30 * 86400})
    assert too_long.status_code == 422
    # Nothing of the refused requests was kept (no half-created segments).
    listed = app_client.get("/api/v1/sites/ekibastuz-1/segments", headers=operator.headers)
    assert listed.json() == []


def test_reenrolling_a_segment_moves_it_and_disabling_cuts_an_agent_off(
    app_client: TestClient, site: dict[str, Any], operator: TestUser, engine: Engine
) -> None:
    first = app_client.post(
        "/api/v1/agents/enroll",
        json=enroll_body(make_token(app_client, operator, ["10.70.0.0/24"])),
    ).json()
    second = app_client.post(
        "/api/v1/agents/enroll",
        json=enroll_body(make_token(app_client, operator, ["10.70.0.0/24"]), "replacement"),
    ).json()
    segments = app_client.get("/api/v1/sites/ekibastuz-1/segments", headers=operator.headers)
    assert segments.json()[0]["agent_id"] == second["agent_id"]
    moved = audit_entries(engine, "segment.reassign")[0]
    assert moved.before == {"agent_id": first["agent_id"]}
    assert moved.after == {"agent_id": second["agent_id"]}

    headers = {"Authorization": f"Bearer {first['agent_secret']}"}
    assert app_client.get("/api/v1/users/me", headers=headers).status_code == 403
    off = app_client.patch(
        f"/api/v1/agents/{first['agent_id']}", json={"disabled": True}, headers=operator.headers
    )
    assert off.status_code == 200 and off.json()["disabled"] is True
    assert app_client.get("/api/v1/users/me", headers=headers).status_code == 401
    assert audit_entries(engine, "agent.disable")[0].actor == "olga"
    missing = app_client.patch(
        "/api/v1/agents/Anope", json={"disabled": True}, headers=operator.headers
    )
    assert missing.status_code == 404


def test_one_token_enrolls_exactly_one_of_two_racing_agents(
    app_client: TestClient, site: dict[str, Any], operator: TestUser, engine: Engine
) -> None:
    token = make_token(app_client, operator, ["10.80.0.0/24"])
    barrier = threading.Barrier(2)
    codes: list[int] = []

    def race(name: str) -> None:
        barrier.wait()
        codes.append(
            app_client.post("/api/v1/agents/enroll", json=enroll_body(token, name)).status_code
        )

    threads = [threading.Thread(target=race, args=(f"racer-{i}",)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(codes) == [201, 410]
    with Session(engine) as session:
        assert len(session.exec(select(Agent)).all()) == 1


# --- the signing key ----------------------------------------------------------------------------


def test_signing_key_is_private_and_signs_bundles(tmp_path: Path) -> None:
    data_dir = tmp_path / "fresh"
    key = signing.load_or_create(data_dir)
    path = signing.key_path(data_dir)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert signing.load_or_create(data_dir).public_key_b64() == key.public_key_b64()
    now = datetime.now(UTC)
    bundle = PolicyBundle(
        version=1,
        issued_at=now,
        expires_at=now + timedelta(hours=1),
        content=PolicyContent(site="ekibastuz-1"),
    )
    signed = key.sign_bundle(bundle)
    assert signed.signature is not None
    assert signing.verify(key.public_key_b64(), signed.signing_bytes(), signed.signature)
    tampered = signed.model_copy(update={"version": 2})
    assert not signing.verify(key.public_key_b64(), tampered.signing_bytes(), signed.signature)


def test_a_key_file_others_can_read_is_refused(
    app_client: TestClient, site: dict[str, Any], operator: TestUser, data_dir: Path
) -> None:
    path = signing.key_path(data_dir)
    signing.load_or_create(data_dir)
    os.chmod(path, 0o644)
    with pytest.raises(signing.SigningKeyError, match=r"mode 0644.*chmod 600"):
        signing.load(path)
    token = make_token(app_client, operator, ["10.90.0.0/24"])
    refused = app_client.post("/api/v1/agents/enroll", json=enroll_body(token))
    assert refused.status_code == 503
    assert "signing key is unusable" in refused.json()["detail"]
    os.chmod(path, 0o600)
    # The refused attempt did not spend the token.
    assert app_client.post("/api/v1/agents/enroll", json=enroll_body(token)).status_code == 201


def test_permission_rule() -> None:
    regular = stat.S_IFREG
    assert signing.permission_problem(regular | 0o600) is None
    assert signing.permission_problem(regular | 0o400) is None
    assert signing.permission_problem(regular | 0o640) is not None
    assert signing.permission_problem(regular | 0o602) is not None
    assert signing.permission_problem(stat.S_IFDIR | 0o700) == "is not a regular file"


# --- the CLI ------------------------------------------------------------------------------------


def test_cli_sites_segments_tokens_and_agents(
    cli: CliInvoker, app_client: TestClient, engine: Engine, make_user: UserFactory
) -> None:
    nobody = cli("site", "add", "ekibastuz-1", "--licence", "KZ-1")
    assert nobody.exit_code == 2 and "must say who acts" in nobody.stderr
    tech = make_user(Role.TECHNICIAN, name="tom")
    refused = cli("site", "add", "ekibastuz-1", "--licence", "KZ-1", as_user=tech)
    assert refused.exit_code == 1
    assert refused.stderr.strip() == (
        "error: tom has the role technician; adding a site needs the role admin, operator"
    )
    op = make_user(Role.OPERATOR, name="oleg")
    added = cli(
        "site", "add", "ekibastuz-1", "--licence", "KZ-1", "--dmp-account", "acct", "--owner", "O",
        as_user=op,
    )  # fmt: skip
    assert added.exit_code == 0, added.output
    duplicate = cli("site", "add", "ekibastuz-1", "--licence", "KZ-1", as_user=op)
    assert duplicate.exit_code == 1
    assert duplicate.stderr.strip() == "error: site 'ekibastuz-1' already exists"

    assert cli("site", "segment", "add", "ekibastuz-1", "10.20.1.0/24", as_user=op).exit_code == 0
    overlap = cli("site", "segment", "add", "ekibastuz-1", "10.20.0.0/16", as_user=op)
    assert overlap.exit_code == 1
    assert overlap.stderr.strip() == (
        "error: 10.20.0.0/16 overlaps segment 10.20.1.0/24 of this site"
    )
    bad = cli("site", "segment", "add", "ekibastuz-1", "10.20.2.9/24", as_user=op)
    assert bad.exit_code == 1 and "did you mean 10.20.2.0/24" in bad.stderr
    nowhere = cli("site", "segment", "add", "nowhere", "10.40.0.0/24", as_user=op)
    assert nowhere.exit_code == 1 and nowhere.stderr.strip() == "error: no site named 'nowhere'"

    made = cli(
        "agent", "token", "--site", "ekibastuz-1",
        "--segment", "10.20.1.0/24", "--segment", "10.20.2.0/24", "--ttl", "1h", as_user=op,
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    token = made.stdout.strip()
    assert token.startswith("afe_") and "\n" not in token  # only the token on stdout
    assert "valid once until" in made.stderr
    with Session(engine) as session:
        row = session.exec(select(EnrollmentToken)).one()
    assert timedelta(minutes=59) < row.expires_at - utcnow() <= timedelta(hours=1)
    bad_ttl = cli(
        "agent",
        "token",
        "--site",
        "ekibastuz-1",
        "--segment",
        "10.20.1.0/24",
        "--ttl",
        "soon",
        as_user=op,
    )
    assert bad_ttl.exit_code == 2 and "--ttl 'soon': expected a positive duration" in bad_ttl.stderr

    assert cli("agent", "list").stderr.strip() == "no agents enrolled"
    enrolled = app_client.post("/api/v1/agents/enroll", json=enroll_body(token, "container-7"))
    assert enrolled.status_code == 201
    listed = cli("agent", "list")
    assert listed.exit_code == 0
    assert "container-7" in listed.stdout and "0.1.0" in listed.stdout
    assert "10.20.1.0/24,10.20.2.0/24" in listed.stdout
    as_json = json.loads(cli("agent", "list", "--json").stdout)
    assert as_json[0]["name"] == "container-7" and as_json[0]["last_seen_at"]

    actor = "oleg"  # the named controller user, not the OS account
    for action in ("site.create", "segment.create", "enrollment_token.create"):
        entries = audit_entries(engine, action)
        assert entries and all(e.actor == actor and e.source == "cli" for e in entries), action
