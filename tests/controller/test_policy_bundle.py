"""The signed policy bundle an agent pulls: signature, lazy versioning, content (workers,
registration, exemptions, rollout) and a constant number of queries however big the site."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from contract.policy import EnforcementMode, PolicyBundle
from controller import signing
from controller.bundles import build_bundle, policy_version
from controller.models import Exemption, LifecycleState, Machine, Role, Site
from tests.controller.conftest import TestUser, UserFactory

API = "/api/v1"
POOL = {
    "name": "Example DMP",
    "accreditation_ref": "AIFC-DMP-0042",
    "urls": ["stratum+tcp://pool.example.kz:3333"],
    "account": "farm1",
}


@dataclass(frozen=True)
class Agent:
    headers: dict[str, str]
    public_key: str


@pytest.fixture
def people(make_user: UserFactory) -> dict[str, TestUser]:
    return {
        "olga": make_user(Role.OPERATOR, name="olga"),
        "carl": make_user(Role.COMPLIANCE, name="carl"),
        "tess": make_user(Role.TECHNICIAN, name="tess"),
    }


@pytest.fixture
def agent(app_client: TestClient, people: dict[str, TestUser]) -> Agent:
    """Site alpha (plus beta) and an agent of alpha, enrolled the real way."""
    olga = people["olga"].headers
    for name in ("alpha", "beta"):
        body = {"name": name, "licence_number": f"L-{name}"}
        assert app_client.post(f"{API}/sites", json=body, headers=olga).status_code == 201
    token = app_client.post(
        f"{API}/agents/enrollment-tokens",
        json={"site": "alpha", "segments": ["127.77.1.0/24"]},
        headers=olga,
    ).json()["token"]
    enrolled = app_client.post(
        f"{API}/agents/enroll",
        json={"token": token, "agent_name": "a1", "agent_version": "0.1.0"},
    )
    assert enrolled.status_code == 201, enrolled.text
    body = enrolled.json()
    return Agent({"Authorization": f"Bearer {body['agent_secret']}"}, body["controller_public_key"])


def site_id(engine: Engine, name: str = "alpha") -> int:
    with Session(engine) as session:
        found = session.exec(select(Site.id).where(Site.name == name)).one()
        assert found is not None
        return found


def add_machine(engine: Engine, **fields: Any) -> Machine:
    with Session(engine, expire_on_commit=False) as session:
        machine = Machine(**fields)
        session.add(machine)
        session.commit()
        return machine


def pull(client: TestClient, agent: Agent) -> PolicyBundle:
    resp = client.get(f"{API}/agent/policy", headers=agent.headers)
    assert resp.status_code == 200, resp.text
    return PolicyBundle.model_validate_json(resp.content)


def approve_pool_set(client: TestClient, people: dict[str, TestUser], **over: Any) -> int:
    made = client.post(
        f"{API}/sites/alpha/pool-sets", json={**POOL, **over}, headers=people["olga"].headers
    )
    assert made.status_code == 201, made.text
    version: int = made.json()["version"]
    ok = client.post(
        f"{API}/sites/alpha/pool-sets/{version}/approve", headers=people["carl"].headers
    )
    assert ok.status_code == 200, ok.text
    return version


# --- signature ---------------------------------------------------------------------------------


def test_bundle_is_signed_with_the_key_the_agent_pinned(
    app_client: TestClient, agent: Agent, people: dict[str, TestUser]
) -> None:
    approve_pool_set(app_client, people)
    bundle = pull(app_client, agent)
    assert bundle.signature is not None
    assert signing.verify(agent.public_key, bundle.signing_bytes(), bundle.signature)
    assert bundle.expires_at - bundle.issued_at == timedelta(days=7)
    assert bundle.content.site == "alpha" and bundle.content.pool_set is not None

    redirected = bundle.content.pool_set.model_copy(
        update={"urls": ["stratum+tcp://evil.example.com:3333"]}
    )
    tampered = bundle.model_copy(
        update={"content": bundle.content.model_copy(update={"pool_set": redirected})}
    )
    assert not signing.verify(agent.public_key, tampered.signing_bytes(), bundle.signature)
    extended = bundle.model_copy(update={"expires_at": bundle.expires_at + timedelta(days=99)})
    assert not signing.verify(agent.public_key, extended.signing_bytes(), bundle.signature)


def test_only_agents_pull_bundles(app_client: TestClient, people: dict[str, TestUser]) -> None:
    assert app_client.get(f"{API}/agent/policy").status_code == 401
    resp = app_client.get(f"{API}/agent/policy", headers=people["olga"].headers)
    assert resp.status_code == 403


# --- versions ----------------------------------------------------------------------------------


def test_version_changes_exactly_when_content_changes(
    engine: Engine, app_client: TestClient, agent: Agent, people: dict[str, TestUser]
) -> None:
    alpha = site_id(engine)
    m = add_machine(
        engine,
        site_id=alpha,
        reported_serial="SN1",
        mac="aa:bb:cc:00:00:01",
        current_ip="127.77.1.5",
    )
    first = pull(app_client, agent)
    assert pull(app_client, agent).version == first.version  # nothing changed
    assert first.content.pool_set is None and first.content.machines[0].registered is False

    proposed = app_client.post(
        f"{API}/sites/alpha/pool-sets", json=POOL, headers=people["olga"].headers
    )
    assert proposed.status_code == 201
    assert pull(app_client, agent).version == first.version  # a proposal is not in force

    app_client.post(f"{API}/sites/alpha/pool-sets/1/approve", headers=people["carl"].headers)
    approved = pull(app_client, agent)
    assert approved.version == first.version + 1
    assert approved.content.pool_set is not None and approved.content.pool_set.version == 1

    claim = {
        "site": "alpha",
        "container": "C1",
        "rack": "R1",
        "shelf": "2",
        "slot": "7",
        "label_serial": "SN1",
    }
    claimed = app_client.post(
        f"{API}/machines/{m.machine_id}/claim", json=claim, headers=people["tess"].headers
    )
    assert claimed.status_code == 200, claimed.text
    after_claim = pull(app_client, agent)
    assert after_claim.version == approved.version + 1
    assert after_claim.content.machines[0].registered is True

    same = {"mode": "observe"}
    patched = app_client.patch(
        f"{API}/sites/alpha/policy", json=same, headers=people["olga"].headers
    )
    assert patched.status_code == 200
    assert pull(app_client, agent).version == after_claim.version  # same settings, same content

    enforce = app_client.patch(
        f"{API}/sites/alpha/policy", json={"mode": "enforce"}, headers=people["olga"].headers
    )
    assert enforce.json()["bundle_version"] == after_claim.version
    final = pull(app_client, agent)
    assert final.version == after_claim.version + 1
    assert final.content.mode is EnforcementMode.ENFORCE


# --- content -----------------------------------------------------------------------------------


def test_content_lists_machines_with_their_workers(
    engine: Engine, app_client: TestClient, agent: Agent, people: dict[str, TestUser]
) -> None:
    alpha, beta = site_id(engine), site_id(engine, "beta")
    racked = add_machine(
        engine,
        machine_id="MAAAAAAAA1",
        site_id=alpha,
        reported_serial="SN-REPORTED",
        label_serial="SN-LABEL",
        mac="aa:bb:cc:00:00:01",
        container="C1",
        rack="R 7",
        shelf="2",
        slot="3",
        lifecycle_state=LifecycleState.ACTIVE,
    )
    add_machine(
        engine, machine_id="MAAAAAAAA2", site_id=alpha, label_serial="LBL2", mac="aa:bb:cc:00:00:02"
    )
    add_machine(engine, site_id=alpha, lifecycle_state=LifecycleState.DECOMMISSIONED)
    add_machine(engine, site_id=beta, reported_serial="OTHER")
    approve_pool_set(app_client, people)
    settings = {
        "worker_template": "{account}.{rack}.{machine_id}",
        "quarantine_unregistered": True,
        "canary_size": 5,
        "max_failure_rate": 0.1,
        "writes_per_segment": 4,
    }
    patched = app_client.patch(
        f"{API}/sites/alpha/policy", json=settings, headers=people["olga"].headers
    )
    assert patched.status_code == 200, patched.text

    content = pull(app_client, agent).content
    by_id = {m.machine_id: m for m in content.machines}
    assert sorted(by_id) == ["MAAAAAAAA1", "MAAAAAAAA2"]  # no decommissioned, no other site
    first = by_id[racked.machine_id]
    assert (first.serial, first.mac, first.registered) == ("SN-REPORTED", "aa:bb:cc:00:00:01", True)
    assert first.worker == "farm1.R_7.MAAAAAAAA1"
    second = by_id["MAAAAAAAA2"]
    assert (second.serial, second.registered, second.worker) == (
        "LBL2",
        False,
        "farm1.x.MAAAAAAAA2",
    )
    assert content.quarantine_unregistered is True
    assert (content.rollout.canary_size, content.rollout.max_failure_rate) == (5, 0.1)
    assert content.rollout.writes_per_segment == 4


def test_only_approved_current_exemptions_reach_the_bundle(
    engine: Engine, app_client: TestClient, agent: Agent, people: dict[str, TestUser]
) -> None:
    alpha = site_id(engine)
    m = add_machine(engine, site_id=alpha, reported_serial="SN1")
    now = datetime.now(UTC)
    ends = now + timedelta(days=2)
    made = app_client.post(
        f"{API}/machines/{m.machine_id}/exemptions",
        json={"reason": "vendor firmware trial", "ends_at": ends.isoformat()},
        headers=people["olga"].headers,
    )
    assert made.status_code == 201, made.text
    ex_id = made.json()["id"]
    assert pull(app_client, agent).content.machines[0].exempt_until is None  # pending

    approved = app_client.post(
        f"{API}/machines/{m.machine_id}/exemptions/{ex_id}/approve",
        headers=people["carl"].headers,
    )
    assert approved.status_code == 200, approved.text
    entry = pull(app_client, agent).content.machines[0]
    assert entry.exempt_until == ends and entry.exempt_reason == "vendor firmware trial"

    with Session(engine) as session:
        site = session.get(Site, alpha)
        assert site is not None
        later = build_bundle(session, site, ends + timedelta(seconds=1))
        assert later.machines[0].exempt_until is None  # expired
        early = build_bundle(session, site, now - timedelta(hours=1))
        row = session.get(Exemption, ex_id)
        assert row is not None and row.starts_at > now - timedelta(hours=1)
        assert early.machines[0].exempt_until is None  # not started yet

    revoked = app_client.post(
        f"{API}/machines/{m.machine_id}/exemptions/{ex_id}/revoke",
        json={"reason": "trial over"},
        headers=people["olga"].headers,
    )
    assert revoked.status_code == 200
    assert pull(app_client, agent).content.machines[0].exempt_until is None


# --- scale -------------------------------------------------------------------------------------


@contextmanager
def count_statements(engine: Engine) -> Iterator[list[str]]:
    seen: list[str] = []

    def on_execute(*args: Any) -> None:
        seen.append(str(args[2]))

    event.listen(engine, "before_cursor_execute", on_execute)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", on_execute)


def test_building_a_bundle_takes_the_same_queries_for_any_site_size(
    engine: Engine, app_client: TestClient, agent: Agent, people: dict[str, TestUser]
) -> None:
    alpha = site_id(engine)
    approve_pool_set(app_client, people)

    def statements() -> int:
        with Session(engine) as session, count_statements(engine) as seen:
            site = session.get(Site, alpha)
            assert site is not None
            build_bundle(session, site, datetime.now(UTC))
        return len(seen)

    for i in range(3):
        add_machine(engine, site_id=alpha, reported_serial=f"A{i}")
    small = statements()
    with Session(engine) as session:
        session.add_all(
            Machine(site_id=alpha, reported_serial=f"B{i}", lifecycle_state=LifecycleState.ACTIVE)
            for i in range(200)
        )
        session.commit()
    assert statements() == small
    assert small <= 6


def test_versions_only_grow(engine: Engine, agent: Agent) -> None:
    """Going back to earlier content is a new version, never a reused one (agents refuse older)."""
    alpha = site_id(engine)
    now = datetime.now(UTC)
    with Session(engine) as session:
        assert policy_version(session, alpha, "a" * 64, now) == 1
        assert policy_version(session, alpha, "a" * 64, now) == 1
        assert policy_version(session, alpha, "b" * 64, now) == 2
        assert policy_version(session, alpha, "a" * 64, now) == 3
        session.commit()
    with Session(engine) as session:
        assert policy_version(session, alpha, "a" * 64, now) == 3
