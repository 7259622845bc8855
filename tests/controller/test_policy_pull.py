"""Cheap policy pulls: an unchanged bundle costs a 304, any change to its inputs a new one.

The rule checked is the one an agent relies on: a conditional pull answers 304 only when
the bundle it would get is the one it holds (same content), and the ETag moves before the
held bundle could expire. The agent side is the real ``Uplink`` with the real ``PolicyGuard``
talking to the real app.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy.engine import Engine
from sqlmodel import Session

from agent.policy import PolicyGuard
from agent.uplink import Uplink, revalidate
from contract.policy import PolicyBundle, PolicyContent
from controller import bundles, signing
from controller.app import create_app
from controller.models import Site
from controller.settings import Settings
from tests.controller import test_policy_bundle
from tests.controller.conftest import TestUser
from tests.controller.test_policy_bundle import (
    API,
    POOL,
    Agent,
    add_machine,
    site_id,
)

# The bundle tests' fixtures: two sites, three people and an enrolled agent of site alpha.
people = test_policy_bundle.people
agent = test_policy_bundle.agent
IP = "127.77.1.5"


class Puller:
    """An agent that remembers the ETag of the last bundle, as the uplink does."""

    def __init__(self, client: TestClient, agent: Agent) -> None:
        self.client, self.agent = client, agent
        self.etag: str | None = None
        self.bundle: PolicyBundle | None = None

    def pull(self) -> int:
        headers = dict(self.agent.headers)
        if self.etag is not None:
            headers["If-None-Match"] = self.etag
        resp = self.client.get(f"{API}/agent/policy", headers=headers)
        assert resp.status_code in (200, 304), resp.text
        assert resp.headers["ETag"]
        if resp.status_code == 304:
            assert resp.content == b""
            assert resp.headers["ETag"] == self.etag
        else:
            self.bundle = PolicyBundle.model_validate_json(resp.content)
        self.etag = resp.headers["ETag"]
        return resp.status_code


def content_now(engine: Engine) -> str:
    """The hash of what a full build gives right now (the truth a 304 must agree with)."""
    with Session(engine) as session:
        site = session.get(Site, site_id(engine))
        assert site is not None
        return bundles.content_hash(bundles.build_bundle(session, site, datetime.now(UTC)))


def report(client: TestClient, agent: Agent, sequence: int, **identity: str) -> None:
    now = datetime.now(UTC).isoformat()
    batch: dict[str, object] = {
        "contract_version": "1.0",
        "batch_id": str(uuid.uuid4()),
        "agent_clock": now,
        "sequence": sequence,
        "observations": [{"ip": IP, "observed_at": now, "reachable": True, "mac": identity["mac"]}],
    }
    if len(identity) > 1:
        batch["identities"] = [{"ip": IP, "observed_at": now, **identity}]
    resp = client.post(f"{API}/agent/reports", json=batch, headers=agent.headers)
    assert resp.status_code == 200, resp.text


def test_a_304_only_when_the_content_is_the_same(
    engine: Engine, app_client: TestClient, agent: Agent, people: dict[str, TestUser]
) -> None:
    """Walk through every kind of input change; after each, the conditional pull must answer
    304 exactly when a full build gives the content the agent already holds."""
    olga, carl, tess = (people[n].headers for n in ("olga", "carl", "tess"))
    machine = add_machine(
        engine, site_id=site_id(engine), reported_serial="SN1", mac="aa:bb:cc:00:00:01"
    )
    puller = Puller(app_client, agent)
    assert puller.pull() == 200
    held = content_now(engine)
    answers: dict[str, int] = {}
    sequence = iter(range(1, 100))

    def after(step: str) -> None:
        nonlocal held
        truth = content_now(engine)
        answers[step] = puller.pull()
        assert (answers[step] == 304) == (truth == held), (step, answers[step])
        assert puller.bundle is not None
        assert bundles.content_hash(puller.bundle.content) == truth, step
        held = truth

    after("nothing changed")
    assert app_client.post(f"{API}/sites/alpha/pool-sets", json=POOL, headers=olga).is_success
    after("a proposal, not in force")
    assert app_client.post(f"{API}/sites/alpha/pool-sets/1/approve", headers=carl).is_success
    after("pool set approved")
    report(app_client, agent, next(sequence), mac="aa:bb:cc:00:00:01")
    after("an observation: last_seen only")
    report(app_client, agent, next(sequence), mac="aa:bb:cc:00:00:01", serial="SN1-REFLASHED")
    after("the miner reports another serial")
    claim = {"site": "alpha", "container": "C1", "rack": "R1", "shelf": "2", "slot": "7"}
    claim["label_serial"] = "SN1-REFLASHED"
    claimed = app_client.post(
        f"{API}/machines/{machine.machine_id}/claim", json=claim, headers=tess
    )
    assert claimed.status_code == 200, claimed.text
    after("claimed")
    same = {"mode": "observe"}
    assert app_client.patch(f"{API}/sites/alpha/policy", json=same, headers=olga).is_success
    after("policy saved unchanged")
    template = {"worker_template": "{account}.{rack}.{machine_id}"}
    assert app_client.patch(f"{API}/sites/alpha/policy", json=template, headers=olga).is_success
    after("worker template")
    ends = (datetime.now(UTC) + timedelta(days=2)).isoformat()
    made = app_client.post(
        f"{API}/machines/{machine.machine_id}/exemptions",
        json={"reason": "firmware trial", "ends_at": ends},
        headers=olga,
    )
    assert made.status_code == 201, made.text
    after("exemption proposed")
    approve = f"{API}/machines/{machine.machine_id}/exemptions/{made.json()['id']}/approve"
    assert app_client.post(approve, headers=carl).is_success
    after("exemption approved")
    report(app_client, agent, next(sequence), mac="aa:bb:cc:00:00:02")  # a new miner appears
    after("a machine discovered")
    retired = app_client.post(
        f"{API}/machines/{machine.machine_id}/state",
        json={"state": "decommissioned", "reason": "scrapped"},
        headers=tess,
    )
    assert retired.status_code == 200, retired.text
    after("decommissioned")

    assert answers["nothing changed"] == 304
    assert answers["an observation: last_seen only"] == 304
    assert answers["pool set approved"] == 200 and answers["decommissioned"] == 200


def test_etag_moves_when_an_exemption_ends_with_the_key_and_every_half_lifetime(
    engine: Engine,
    app_client: TestClient,
    agent: Agent,
    people: dict[str, TestUser],
    tmp_path: Path,
) -> None:
    alpha = site_id(engine)
    machine = add_machine(engine, site_id=alpha, reported_serial="SN1")
    ends = datetime.now(UTC) + timedelta(days=2)
    made = app_client.post(
        f"{API}/machines/{machine.machine_id}/exemptions",
        json={"reason": "firmware trial", "ends_at": ends.isoformat()},
        headers=people["olga"].headers,
    )
    approve = f"{API}/machines/{machine.machine_id}/exemptions/{made.json()['id']}/approve"
    assert app_client.post(approve, headers=people["carl"].headers).is_success
    key = signing.load_or_create(tmp_path / "one")
    other_key = signing.load_or_create(tmp_path / "two")
    ttl = timedelta(days=7)
    with Session(engine) as session:
        site = session.get(Site, alpha)
        assert site is not None

        def etag(at: datetime, k: signing.SigningKey = key) -> str:
            return bundles.bundle_etag(session, site, k, ttl, at)

        def inputs(at: datetime) -> object:
            return bundles.inputs_fingerprint(session, site, at)

        assert inputs(ends - timedelta(seconds=1)) != inputs(ends + timedelta(seconds=1))
        assert inputs(ends + timedelta(seconds=1)) == inputs(ends + timedelta(days=1))
        now = datetime.now(UTC)
        assert etag(now) == etag(now)
        assert etag(now) != etag(now, other_key)
        assert etag(now) != etag(now + ttl / 2)  # re-signed at least every half lifetime


def test_a_held_bundle_near_expiry_is_fetched_again() -> None:
    issued = datetime(2026, 12, 1, tzinfo=UTC)
    bundle = PolicyBundle(
        version=1,
        issued_at=issued,
        expires_at=issued + timedelta(days=4),
        content=PolicyContent(site="alpha"),
    )
    assert revalidate(bundle, issued + timedelta(days=2))
    assert not revalidate(bundle, issued + timedelta(days=3, seconds=1))
    assert not revalidate(bundle, issued + timedelta(days=5))


async def test_uplink_sends_if_none_match_and_keeps_its_bundle_on_304(
    engine: Engine,
    settings: Settings,
    app_client: TestClient,
    agent: Agent,
    people: dict[str, TestUser],
    tmp_path: Path,
) -> None:
    """The real uplink and guard against the real app: the second pull is a 304 (no body) and
    still hands back the verified bundle; a change gives the new bundle through the guard."""
    add_machine(engine, site_id=site_id(engine), reported_serial="SN1")
    seen: list[tuple[str | None, int, int]] = []
    app = httpx.ASGITransport(app=create_app(settings, engine))

    class Recording(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            response = await app.handle_async_request(request)
            body = await response.aread()
            seen.append((request.headers.get("If-None-Match"), response.status_code, len(body)))
            return httpx.Response(response.status_code, headers=response.headers, content=body)

    guard = PolicyGuard(agent.public_key, tmp_path / "policy.json", site="alpha")
    transport = Recording()
    secret = SecretStr(agent.headers["Authorization"].removeprefix("Bearer "))
    async with Uplink(
        "http://controller.test", secret, verify_policy=guard.accept, transport=transport
    ) as uplink:
        first = await uplink.pull_policy()
        again = await uplink.pull_policy()
        assert again == first and guard.current == first
        assert app_client.post(
            f"{API}/sites/alpha/pool-sets", json=POOL, headers=people["olga"].headers
        ).is_success
        assert app_client.post(
            f"{API}/sites/alpha/pool-sets/1/approve", headers=people["carl"].headers
        ).is_success
        changed = await uplink.pull_policy()
    assert changed.version == first.version + 1 and changed.content.pool_set is not None
    assert guard.current == changed
    (tag1, status1, size1), (tag2, status2, size2), (tag3, status3, _) = seen
    assert (tag1, status1) == (None, 200) and size1 > 0
    assert tag2 is not None and (status2, size2) == (304, 0)
    assert tag3 == tag2 and status3 == 200
