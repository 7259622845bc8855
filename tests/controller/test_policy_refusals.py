"""A man in the middle of the policy pull, against the real controller and the real agent code.

The agent (its policy guard, outbox and uplink) talks to the real controller application. Three
bundles that did not come from the controller as they are — one tampered in transit, one
genuine but expired (a replay), one genuine but older than the version in force — are each
refused; the last valid bundle stays in force (in memory and on disk) and every refusal reaches
the controller as an alert that a compliance user sees.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from fastapi.testclient import TestClient
from pydantic import SecretStr
from sqlalchemy.engine import Engine
from sqlmodel import Session

from agent.config import AgentConfig
from agent.daemon import FleetAgent
from agent.outbox import Outbox
from agent.policy import PolicyGuard, policy_path
from agent.uplink import Uplink
from contract.policy import ApprovedPoolSet, PolicyBundle
from controller import signing
from controller.models import RegisterEvent, Role
from controller.settings import Settings
from tests.controller.conftest import DEFAULT_PASSWORD, CliInvoker, UserFactory

API = "/api/v1"
POOL = {
    "name": "Example DMP",
    "accreditation_ref": "AIFC-DMP-0042",
    "urls": ["stratum+tcp://pool.example.kz:3333"],
    "account": "farm1",
}
SEGMENT = "127.77.1.0/24"  # no miner is contacted: only the policy conversation is exercised


class ThroughTestClient(httpx.AsyncBaseTransport):
    """Carry the agent's real HTTP requests into the controller app (no socket needed)."""

    def __init__(self, client: TestClient) -> None:
        self.client = client

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url.raw_path.decode()
        answer = self.client.request(
            request.method, url, content=request.read(), headers=dict(request.headers)
        )
        return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)


def test_tampered_expired_and_older_bundles_are_refused_and_reported(
    app_client: TestClient, make_user: UserFactory, settings: Settings, tmp_path: Path
) -> None:
    operator = make_user(Role.OPERATOR, name="olga").headers
    compliance = make_user(Role.COMPLIANCE, name="carl").headers
    body = {"name": "alpha", "licence_number": "L-alpha"}
    assert app_client.post(f"{API}/sites", json=body, headers=operator).status_code == 201
    token = app_client.post(
        f"{API}/agents/enrollment-tokens",
        json={"site": "alpha", "segments": [SEGMENT]},
        headers=operator,
    ).json()["token"]
    enrolled = app_client.post(
        f"{API}/agents/enroll", json={"token": token, "agent_name": "a1", "agent_version": "0"}
    ).json()
    made = app_client.post(f"{API}/sites/alpha/pool-sets", json=POOL, headers=operator)
    assert made.status_code == 201, made.text
    approved = app_client.post(f"{API}/sites/alpha/pool-sets/1/approve", headers=compliance)
    assert approved.status_code == 200, approved.text

    config = AgentConfig.model_validate(
        {
            "agent_id": enrolled["agent_id"],
            "site": "alpha",
            "segments": [SEGMENT],
            "data_dir": str(tmp_path),
            "controller": {
                "url": "http://127.0.0.1:9",
                "public_key": enrolled["controller_public_key"],
            },
        }
    )
    guard = PolicyGuard(enrolled["controller_public_key"], policy_path(tmp_path), site="alpha")
    outbox = Outbox.from_config(config)
    agent = FleetAgent(config, outbox, policy=guard)
    uplink = Uplink(
        config.controller.url,
        SecretStr(enrolled["agent_secret"]),
        transport=ThroughTestClient(app_client),
    )

    async def conversation() -> list[bool]:
        first = await uplink.pull_policy()  # unverified here: the guard judges each one
        assert await agent.offer_policy(first)
        change = {"mode": "enforce"}
        assert app_client.patch(
            f"{API}/sites/alpha/policy", json=change, headers=operator
        ).status_code == 200  # fmt: skip
        second = await uplink.pull_policy()
        assert second.version > first.version and await agent.offer_policy(second)

        assert second.content.pool_set is not None
        foreign = ApprovedPoolSet(
            name="Example DMP", urls=["stratum+tcp://pool.hijack.example:3333"], account="x"
        )
        tampered = second.model_copy(
            update={"content": second.content.model_copy(update={"pool_set": foreign})}
        )
        past = datetime.now(UTC) - timedelta(days=30)
        key = signing.load_or_create(settings.data_dir)
        expired = key.sign_bundle(
            PolicyBundle(
                version=second.version + 5,
                issued_at=past,
                expires_at=past + timedelta(days=7),
                content=second.content,
            )
        )
        outcomes = [await agent.offer_policy(b) for b in (tampered, expired, first)]
        drained = await uplink.drain(outbox)
        assert drained.error is None and drained.remaining == 0
        await uplink.aclose()
        return outcomes

    try:
        assert asyncio.run(conversation()) == [False, False, False]
        in_force = guard.current
        assert in_force is not None and in_force.content.mode == "enforce"
        stored = PolicyBundle.model_validate_json(policy_path(tmp_path).read_text())
        assert stored == in_force
        assert stored.content.pool_set is not None
        assert stored.content.pool_set.urls == POOL["urls"]
    finally:
        outbox.close()

    alerts = app_client.get(f"{API}/alerts", headers=compliance)
    assert alerts.status_code == 200, alerts.text
    refused = [a for a in alerts.json() if a["kind"] == "policy_refused"]
    assert sorted(a["data"]["reason"] for a in refused) == [
        "bad_signature",
        "expired",
        "older_version",
    ]
    assert {a["agent_id"] for a in refused} == {enrolled["agent_id"]}
    assert all(a["severity"] == "critical" and a["site"] == "alpha" for a in refused)

    # an operator resolves one, saying what was done; it leaves the open alerts, audited
    first = refused[0]["id"]
    url = f"{API}/alerts/{first}/resolve"
    body = {"reason": "MITM on the agent's uplink found and removed"}
    technician = make_user(Role.TECHNICIAN, name="tess").headers
    assert app_client.post(url, json=body, headers=technician).status_code == 403
    assert app_client.post(url, json={"reason": ""}, headers=operator).status_code == 422
    done = app_client.post(url, json=body, headers=operator)
    assert done.status_code == 200, done.text
    assert done.json()["resolved_by"] == "olga" and done.json()["kind"] == "policy_refused"
    assert app_client.post(url, json=body, headers=operator).status_code == 409
    assert (
        app_client.post(f"{API}/alerts/999999/resolve", json=body, headers=operator).status_code
        == 404
    )
    still_open = [a["id"] for a in app_client.get(f"{API}/alerts", headers=compliance).json()]
    assert first not in still_open and len(still_open) == 2
    audit = app_client.get(f"{API}/audit", headers=compliance).json()
    entries = audit["data"] if isinstance(audit, dict) else audit
    resolved = [e for e in entries if e["action"] == "alert.resolve"]
    assert resolved and resolved[0]["reason"] == body["reason"] and resolved[0]["actor"] == "olga"


def test_resolve_alert_from_the_cli(
    cli: CliInvoker, engine: Engine, make_user: UserFactory
) -> None:
    make_user(Role.OPERATOR, name="olga")
    make_user(Role.TECHNICIAN, name="tess")
    with Session(engine, expire_on_commit=False) as session:
        halted = RegisterEvent(kind="rollout_halted", severity="critical", detail="canary failed")
        session.add(halted)
        session.commit()
    pw = DEFAULT_PASSWORD + "\n"
    args = ["resolve-alert", str(halted.id), "--reason", "firmware fixed", "--password-stdin"]
    refused = cli(*args, "--as", "tess", input=pw)
    assert refused.exit_code == 1
    assert "resolving an alert needs the role admin, compliance, operator" in refused.stderr
    assert cli(*args, "--as", "olga", input="wrong\n").exit_code == 1
    done = cli(*args, "--as", "olga", input=pw)
    assert done.exit_code == 0, done.output
    assert done.stdout.strip() == f"alert {halted.id} resolved"
    again = cli(*args, "--as", "olga", input=pw)
    assert again.exit_code == 1 and "already resolved" in again.stderr
    listed = cli("alerts", "--json")
    assert listed.exit_code == 0 and json.loads(listed.stdout) == []
