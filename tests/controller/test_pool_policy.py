"""Pool policy: approved pool sets with four eyes, site enforcement settings, exemptions, the
dry run, and the console commands — through the real API and CLI on both databases."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from contract.policy import ApprovedPoolSet
from controller.audit_verify import verify_chain
from controller.bundles import classify
from controller.exemptions import window_problem
from controller.models import (
    AuditEntry,
    LatestObservation,
    LifecycleState,
    Machine,
    PoolSet,
    Role,
    Site,
)
from controller.pool_policy import decision_problem, stratum_url_problem
from tests.controller.conftest import DEFAULT_PASSWORD, CliInvoker, TestUser, UserFactory

API = "/api/v1"
POOL = {
    "name": "Example DMP",
    "accreditation_ref": "AIFC-DMP-0042",
    "urls": ["stratum+tcp://pool.example.kz:3333", "stratum+tcp://backup.example.kz:3333"],
    "account": "farm1",
}


# --- fixtures and helpers ----------------------------------------------------------------------


def add_site(engine: Engine, name: str = "alpha") -> int:
    with Session(engine) as session:
        site = Site(name=name, licence_number=f"LIC-{name}")
        session.add(site)
        session.commit()
        assert site.id is not None
        return site.id


def add_machine(engine: Engine, **fields: Any) -> Machine:
    with Session(engine, expire_on_commit=False) as session:
        machine = Machine(**fields)
        session.add(machine)
        session.commit()
        return machine


def observe(
    engine: Engine, machine: Machine, pools: list[dict[str, str]], reachable: bool = True
) -> None:
    with Session(engine) as session:
        assert machine.id is not None
        session.add(
            LatestObservation(
                machine_pk=machine.id,
                observed_at=datetime.now(UTC),
                reachable=reachable,
                pools=pools,
            )
        )
        session.commit()


def audit(engine: Engine, prefix: str) -> list[AuditEntry]:
    with Session(engine) as session:
        return list(
            session.exec(
                select(AuditEntry)
                .where(col(AuditEntry.action).startswith(prefix))
                .order_by(col(AuditEntry.seq))
            )
        )


@pytest.fixture
def people(make_user: UserFactory) -> dict[str, TestUser]:
    return {
        "olga": make_user(Role.OPERATOR, name="olga"),
        "carl": make_user(Role.COMPLIANCE, name="carl"),
        "cora": make_user(Role.COMPLIANCE, name="cora"),
        "adam": make_user(Role.ADMIN, name="adam"),
        "ada": make_user(Role.ADMIN, name="ada"),
        "tess": make_user(Role.TECHNICIAN, name="tess"),
        "ina": make_user(Role.INSPECTOR, name="ina"),
    }


def propose(client: TestClient, user: TestUser, site: str = "alpha", **over: Any) -> Any:
    return client.post(f"{API}/sites/{site}/pool-sets", json={**POOL, **over}, headers=user.headers)


def approve(client: TestClient, user: TestUser, version: int, site: str = "alpha") -> Any:
    return client.post(
        f"{API}/sites/{site}/pool-sets/{version}/approve", json={}, headers=user.headers
    )


# --- pure rules --------------------------------------------------------------------------------


def test_stratum_urls() -> None:
    for good in (
        "stratum+tcp://pool.example.kz:3333",
        "stratum+ssl://pool.example.kz:443",
        "stratum2+tcp://v2.example.com/u95GEReVMjK6k5YqiSFNqqTnKU4ypU2Wm8awa6tmbmDmk1bWt",
        "pool.example.kz:3333",
        "10.1.2.3:3333",
        "stratum+tcp://[2001:db8::1]:3333",
    ):
        assert stratum_url_problem(good) is None, good
    assert "add the port" in (stratum_url_problem("stratum+tcp://pool.example.kz") or "")
    assert "scheme" in (stratum_url_problem("http://pool.example.kz:3333") or "")
    assert "port must be" in (stratum_url_problem("pool.example.kz:99999") or "")
    assert "not a host" in (stratum_url_problem("stratum+tcp://bad_host!:3333") or "")
    assert "empty" in (stratum_url_problem("  ") or "")


def test_four_eyes_rule() -> None:
    own = decision_problem(proposer="carl", decider="carl", decider_role=Role.COMPLIANCE)
    assert own is not None and "cannot decide" in own
    admin = decision_problem(proposer="olga", decider="adam", decider_role=Role.ADMIN)
    assert admin is not None and "compliance role" in admin
    assert decision_problem(proposer="olga", decider="carl", decider_role=Role.COMPLIANCE) is None


def test_exemption_window() -> None:
    now = datetime(2026, 11, 1, tzinfo=UTC)
    assert window_problem(now, now + timedelta(days=30), now) is None
    assert "at most 30 days" in (window_problem(now, now + timedelta(days=31), now) or "")
    assert "not in the future" in (window_problem(now, now - timedelta(hours=1), now) or "")
    later = now + timedelta(days=2)
    assert "after the start" in (window_problem(later, later - timedelta(hours=1), now) or "")


def test_classify_one_machine() -> None:
    pool_set = ApprovedPoolSet(name="P", urls=["pool.example.kz:3333"], account="farm1")
    good = [{"url": "stratum+tcp://pool.example.kz:3333", "user": "farm1.M1"}]
    bad = [{"url": "stratum+tcp://evil.example.com:3333", "user": "thief.M1"}]
    kw = {"registered": True, "exempt": False, "reachable": True}
    assert classify(pool_set, "farm1.M1", pools=good, **kw) == ("compliant", [])
    outcome, problems = classify(pool_set, "farm1.M1", pools=bad, **kw)
    assert outcome == "would_write" and any("evil.example.com" in p for p in problems)
    unregistered = {**kw, "registered": False}  # written too, as the agent does …
    assert classify(pool_set, "farm1.M1", pools=bad, **unregistered)[0] == "would_write"
    quarantined = {**unregistered, "quarantine_unregistered": True}  # … unless quarantined
    assert classify(pool_set, "farm1.M1", pools=good, **quarantined)[0] == "would_quarantine"
    assert classify(pool_set, "farm1.M1", pools=bad, **{**kw, "exempt": True})[0] == "exempt"
    assert classify(pool_set, "farm1.M1", pools=[], **{**kw, "reachable": None})[0] == "unknown"
    assert classify(pool_set, "farm1.M1", pools=good, **{**kw, "reachable": False})[0] == "unknown"


# --- pool sets and four eyes --------------------------------------------------------------------


def test_one_user_cannot_both_propose_and_approve(
    engine: Engine, app_client: TestClient, people: dict[str, TestUser]
) -> None:
    add_site(engine)
    carl, cora = people["carl"], people["cora"]
    created = propose(app_client, carl, reason="new DMP contract")
    assert created.status_code == 201, created.text
    assert created.json()["version"] == 1 and created.json()["status"] == "proposed"

    own = approve(app_client, carl, 1)
    assert own.status_code == 403
    assert "carl proposed this change and cannot decide on it" in own.json()["detail"]

    ok = approve(app_client, cora, 1)
    assert ok.status_code == 200, ok.text
    assert ok.json()["status"] == "approved" and ok.json()["decided_by"] == "cora"
    again = approve(app_client, cora, 1)
    assert again.status_code == 409 and "is approved" in again.json()["detail"]

    entries = audit(engine, "pool_set.")
    assert [(e.action, e.actor, e.entity, e.entity_id) for e in entries] == [
        ("pool_set.propose", "carl", "pool_set", "alpha/v1"),
        ("pool_set.approve", "cora", "pool_set", "alpha/v1"),
    ]
    assert entries[0].after is not None and entries[0].after["urls"] == POOL["urls"]
    assert entries[1].before is not None and entries[1].before["status"] == "proposed"
    assert entries[1].after is not None and entries[1].after["status"] == "approved"
    with Session(engine) as session:
        assert verify_chain(session).ok


def test_admin_does_not_bypass_four_eyes(
    engine: Engine, app_client: TestClient, people: dict[str, TestUser]
) -> None:
    add_site(engine)
    assert propose(app_client, people["adam"]).status_code == 201
    for who in ("adam", "ada"):  # neither the proposer nor another admin may approve
        refused = approve(app_client, people[who], 1)
        assert refused.status_code == 403, who
        assert (
            "compliance role" in refused.json()["detail"]
            or "cannot decide" in (refused.json()["detail"])
        )
    for who in ("olga", "tess", "ina"):  # roles that never decide
        assert approve(app_client, people[who], 1).status_code == 403, who
    assert approve(app_client, people["carl"], 1).status_code == 200


def test_propose_roles_and_bad_input(
    engine: Engine, app_client: TestClient, people: dict[str, TestUser]
) -> None:
    add_site(engine)
    for who in ("tess", "ina"):
        assert propose(app_client, people[who]).status_code == 403, who
    bad = propose(app_client, people["olga"], urls=["http://pool.example.kz:3333"])
    assert bad.status_code == 422 and "scheme must be one of" in bad.text
    assert propose(app_client, people["olga"], urls=[]).status_code == 422
    four = [f"pool{i}.example.kz:3333" for i in range(4)]
    assert propose(app_client, people["olga"], urls=four).status_code == 422
    assert propose(app_client, people["olga"], account=" ").status_code == 422
    assert propose(app_client, people["olga"], accreditation_ref="").status_code == 422
    assert propose(app_client, people["olga"], site="nowhere").status_code == 404
    assert audit(engine, "pool_set.") == []


def test_pending_proposal_blocks_another_and_approval_supersedes(
    engine: Engine, app_client: TestClient, people: dict[str, TestUser]
) -> None:
    add_site(engine)
    olga, carl = people["olga"], people["carl"]
    assert propose(app_client, olga).status_code == 201
    second = propose(app_client, olga, account="farm2")
    assert second.status_code == 409 and "v1 waiting for approval" in second.json()["detail"]
    assert approve(app_client, carl, 1).status_code == 200
    same = propose(app_client, olga)
    assert same.status_code == 409 and "identical" in same.json()["detail"]

    assert propose(app_client, olga, account="farm2").json()["version"] == 2
    assert approve(app_client, carl, 2).status_code == 200
    listed = app_client.get(f"{API}/sites/alpha/pool-sets", headers=people["tess"].headers)
    assert [(r["version"], r["status"]) for r in listed.json()] == [
        (2, "approved"),
        (1, "superseded"),
    ]
    approve_entry = audit(engine, "pool_set.approve")[-1]
    assert approve_entry.after is not None and approve_entry.after["supersedes"] == "alpha/v1"


def test_reject_and_withdraw(
    engine: Engine, app_client: TestClient, people: dict[str, TestUser]
) -> None:
    add_site(engine)
    olga, carl, ada = people["olga"], people["carl"], people["ada"]
    url = f"{API}/sites/alpha/pool-sets/1/reject"
    assert propose(app_client, olga).status_code == 201
    assert app_client.post(url, json={"reason": ""}, headers=carl.headers).status_code == 400
    assert app_client.post(url, json={"reason": "no"}, headers=ada.headers).status_code == 403
    rejected = app_client.post(url, json={"reason": "wrong account"}, headers=carl.headers)
    assert rejected.status_code == 200 and rejected.json()["status"] == "rejected"
    assert approve(app_client, people["cora"], 1).status_code == 409

    assert propose(app_client, olga).json()["version"] == 2
    withdrawn = app_client.post(
        f"{API}/sites/alpha/pool-sets/2/reject", json={"reason": "typo"}, headers=olga.headers
    )
    assert withdrawn.status_code == 200 and withdrawn.json()["decided_by"] == "olga"
    assert [e.action for e in audit(engine, "pool_set.")] == [
        "pool_set.propose",
        "pool_set.reject",
        "pool_set.propose",
        "pool_set.withdraw",
    ]


# --- site policy --------------------------------------------------------------------------------


def test_site_policy_changes_are_audited_and_warn(
    engine: Engine, app_client: TestClient, people: dict[str, TestUser]
) -> None:
    add_site(engine)
    url = f"{API}/sites/alpha/policy"
    shown = app_client.get(url, headers=people["ina"].headers).json()
    assert shown["mode"] == "observe" and shown["worker_template"] == "{account}.{machine_id}"
    assert shown["pool_set"] is None and shown["warnings"] == []

    change = {"mode": "enforce", "worker_template": "{account}.{rack}x{slot}.{machine_id}"}
    assert app_client.patch(url, json=change, headers=people["carl"].headers).status_code == 403
    changed = app_client.patch(url, json=change, headers=people["olga"].headers)
    assert changed.status_code == 200, changed.text
    assert changed.json()["mode"] == "enforce"
    assert "nothing is enforced" in changed.json()["warnings"][0]

    bad = app_client.patch(
        url, json={"worker_template": "{account}"}, headers=people["olga"].headers
    )
    assert bad.status_code == 422 and "must contain {machine_id} or {serial}" in bad.text
    thief = {"worker_template": "thief.{machine_id}"}  # the approved account decides the payee
    stolen = app_client.patch(url, json=thief, headers=people["olga"].headers)
    assert stolen.status_code == 422 and "must start with {account}" in stolen.text
    assert (
        app_client.patch(url, json={"mode": "fix"}, headers=people["olga"].headers).status_code
        == 422
    )
    assert (
        app_client.patch(url, json={"canary_size": 0}, headers=people["olga"].headers).status_code
        == 422
    )

    entries = audit(engine, "site_policy.")
    assert len(entries) == 1 and entries[0].actor == "olga" and entries[0].entity_id == "alpha"
    assert entries[0].after is not None and entries[0].after["mode"] == "enforce"

    assert propose(app_client, people["olga"]).status_code == 201
    assert approve(app_client, people["carl"], 1).status_code == 200
    shown = app_client.get(url, headers=people["ina"].headers).json()
    assert shown["warnings"] == [] and shown["pool_set"]["version"] == 1


# --- exemptions ---------------------------------------------------------------------------------


def test_exemption_needs_a_second_compliance_user(
    engine: Engine, app_client: TestClient, people: dict[str, TestUser]
) -> None:
    site_id = add_site(engine)
    m = add_machine(engine, site_id=site_id, reported_serial="SN1", mac="aa:bb:cc:00:00:01")
    carl, cora, olga = people["carl"], people["cora"], people["olga"]
    base = f"{API}/machines/{m.machine_id}/exemptions"
    until = (datetime.now(UTC) + timedelta(days=3)).isoformat()

    too_long = (datetime.now(UTC) + timedelta(days=45)).isoformat()
    long_resp = app_client.post(
        base, json={"reason": "x", "ends_at": too_long}, headers=carl.headers
    )
    assert long_resp.status_code == 400 and "at most 30 days" in long_resp.json()["detail"]
    assert app_client.post(base, json={"ends_at": until}, headers=carl.headers).status_code == 422
    assert (
        app_client.post(
            base, json={"reason": "x", "ends_at": until}, headers=people["tess"].headers
        )
    ).status_code == 403

    made = app_client.post(
        base, json={"reason": "repair trial", "ends_at": until}, headers=carl.headers
    )
    assert made.status_code == 201, made.text
    ex = made.json()
    assert ex["state"] == "pending" and ex["site"] == "alpha"

    own = app_client.post(f"{base}/{ex['id']}/approve", headers=carl.headers)
    assert own.status_code == 403 and "cannot approve" in own.json()["detail"]
    assert app_client.post(f"{base}/{ex['id']}/approve", headers=olga.headers).status_code == 403
    ok = app_client.post(f"{base}/{ex['id']}/approve", headers=cora.headers)
    assert ok.status_code == 200 and ok.json()["state"] == "active"

    listed = app_client.get(f"{API}/exemptions", params={"site": "alpha"}, headers=olga.headers)
    assert [(e["id"], e["state"]) for e in listed.json()] == [(ex["id"], "active")]

    revoked = app_client.post(
        f"{base}/{ex['id']}/revoke", json={"reason": "back in service"}, headers=olga.headers
    )
    assert revoked.status_code == 200 and revoked.json()["state"] == "revoked"
    assert (
        app_client.post(f"{base}/{ex['id']}/revoke", json={"reason": "again"}, headers=olga.headers)
    ).status_code == 409
    assert [e.action for e in audit(engine, "exemption.")] == [
        "exemption.request",
        "exemption.approve",
        "exemption.revoke",
    ]


# --- dry run ------------------------------------------------------------------------------------


def test_preview_counts_machines_by_outcome(
    engine: Engine, app_client: TestClient, people: dict[str, TestUser]
) -> None:
    site_id = add_site(engine)
    reg = LifecycleState.ACTIVE

    def machine(n: int, state: LifecycleState = reg) -> Machine:
        return add_machine(
            engine,
            machine_id=f"M00000000{n}",
            site_id=site_id,
            reported_serial=f"SN{n}",
            lifecycle_state=state,
        )

    def pools(worker: str, url: str = POOL["urls"][0]) -> list[dict[str, str]]:
        return [{"url": url, "user": worker}, {"url": POOL["urls"][1], "user": worker}]

    observe(engine, machine(1), pools("farm1.M000000001"))  # compliant
    observe(engine, machine(2), pools("farm1.M000000002"))  # compliant
    observe(engine, machine(3), pools("thief.x", "stratum+tcp://evil.example.com:3333"))
    observe(engine, machine(4), pools("farm1.M000000004"), reachable=False)  # unknown
    machine(5)  # never observed: unknown
    observe(engine, machine(6, LifecycleState.DISCOVERED), pools("thief.x"))  # unregistered
    exempt = machine(7)
    observe(engine, exempt, pools("someone.else"))
    observe(engine, machine(8, LifecycleState.DECOMMISSIONED), pools("x"))  # not counted

    olga, carl, cora = people["olga"], people["carl"], people["cora"]
    url = f"{API}/sites/alpha/policy/preview"
    none_yet = app_client.get(url, headers=olga.headers)
    assert none_yet.status_code == 409 and "no approved pool set" in none_yet.json()["detail"]

    assert propose(app_client, olga).status_code == 201
    until = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    ex = app_client.post(
        f"{API}/machines/{exempt.machine_id}/exemptions",
        json={"reason": "vendor test", "ends_at": until},
        headers=olga.headers,
    ).json()
    assert (
        app_client.post(
            f"{API}/machines/{exempt.machine_id}/exemptions/{ex['id']}/approve",
            headers=carl.headers,
        ).status_code
        == 200
    )

    pending = app_client.get(url, params={"version": 1}, headers=people["ina"].headers)
    assert pending.status_code == 200, pending.text
    body = pending.json()
    assert body["pool_set_status"] == "proposed"
    counts = {
        k: body[k]
        for k in (
            "machines",
            "compliant",
            "would_write",
            "would_quarantine",
            "unknown",
            "exempt",
        )
    }
    assert counts == {
        "machines": 7,
        "compliant": 2,
        "would_write": 2,
        "would_quarantine": 0,
        "unknown": 2,
        "exempt": 1,
    }
    assert [s["machine_id"] for s in body["samples"]] == ["M000000003", "M000000006"]
    assert any("evil.example.com" in p for p in body["samples"][0]["problems"])

    assert approve(app_client, cora, 1).status_code == 200
    approved = app_client.get(url, headers=olga.headers).json()
    assert (approved["pool_set_status"], approved["compliant"]) == ("approved", 2)
    assert app_client.get(url, params={"version": 9}, headers=olga.headers).status_code == 404
    with Session(engine) as session:  # a dry run changes nothing
        assert len(session.exec(select(PoolSet)).all()) == 1


# --- the console --------------------------------------------------------------------------------


def test_cli_propose_approve_and_refusals(
    engine: Engine, cli: CliInvoker, people: dict[str, TestUser]
) -> None:
    add_site(engine)
    pw = DEFAULT_PASSWORD + "\n"
    propose_args = [
        "pools", "propose", "alpha", "--name", "Example DMP",
        "--accreditation-ref", "AIFC-DMP-0042", "--url", POOL["urls"][0],
        "--url", POOL["urls"][1], "--account", "farm1",
    ]  # fmt: skip

    bad = cli(
        *propose_args[:-2],
        "--account",
        "farm1",
        "--url",
        "http://x:1",
        "--as",
        "olga",
        "--password-stdin",
        input=pw,
    )
    assert bad.exit_code == 2
    assert "scheme must be one of" in bad.output and "Traceback" not in bad.output
    assert len(bad.output.strip().splitlines()) == 1

    wrong_pw = cli(*propose_args, "--as", "olga", "--password-stdin", input="nope\n")
    assert wrong_pw.exit_code == 1 and "invalid user name or password" in wrong_pw.output

    dry = cli(*propose_args, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "dry run for site alpha against the proposed (unsaved) set" in dry.output

    made = cli(*propose_args, "--as", "olga", "--password-stdin", "--reason", "contract", input=pw)
    assert made.exit_code == 0, made.output
    assert "proposed alpha/v1" in made.output

    self_approve = cli(
        "pools", "approve", "alpha", "1", "--as", "olga", "--password-stdin", input=pw
    )
    assert self_approve.exit_code == 1
    # the same role rule as the API's route: an operator never decides (four eyes aside)
    assert self_approve.stderr.strip() == (
        "error: olga has the role operator; approving a pool set needs the role admin, compliance"
    )

    admin = cli("pools", "approve", "alpha", "1", "--as", "adam", "--password-stdin", input=pw)
    assert admin.exit_code == 1 and "compliance role" in admin.output

    ok = cli("pools", "approve", "alpha", "1", "--as", "carl", "--password-stdin", input=pw)
    assert ok.exit_code == 0, ok.output

    listed = cli("pools", "list", "alpha", "--json")
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.output)
    assert [(r["version"], r["status"], r["proposed_by"], r["decided_by"]) for r in rows] == [
        (1, "approved", "olga", "carl")
    ]
    entries = audit(engine, "pool_set.")
    assert [(e.action, e.actor, e.source) for e in entries] == [
        ("pool_set.propose", "olga", "cli"),
        ("pool_set.approve", "carl", "cli"),
    ]

    policy = cli(
        "policy", "set", "alpha", "--mode", "enforce", "--as", "olga", "--password-stdin", input=pw
    )
    assert policy.exit_code == 0, policy.output
    assert "mode enforce" in policy.output
    bad_template = cli(
        "policy",
        "set",
        "alpha",
        "--worker-template",
        "{acct}",
        "--as",
        "olga",
        "--password-stdin",
        input=pw,
    )
    assert bad_template.exit_code == 2 and "unknown field(s) acct" in bad_template.output
    shown = cli("policy", "show", "alpha", "--json")
    assert json.loads(shown.output)["pool_set"]["version"] == 1
    preview = cli("policy", "preview", "alpha")
    assert preview.exit_code == 0 and "pool set v1 (approved)" in preview.output


def test_cli_exemptions(engine: Engine, cli: CliInvoker, people: dict[str, TestUser]) -> None:
    site_id = add_site(engine)
    m = add_machine(engine, site_id=site_id, reported_serial="SN1")
    pw = DEFAULT_PASSWORD + "\n"
    made = cli(
        "exemptions",
        "request",
        m.machine_id,
        "--reason",
        "PSU swap test",
        "--until",
        "2d",
        "--as",
        "olga",
        "--password-stdin",
        input=pw,
    )
    assert made.exit_code == 0, made.output
    assert "exemption #1" in made.output
    too_long = cli(
        "exemptions",
        "request",
        m.machine_id,
        "--reason",
        "x",
        "--until",
        "40d",
        "--as",
        "olga",
        "--password-stdin",
        input=pw,
    )
    assert too_long.exit_code == 1 and "at most 30 days" in too_long.output
    nonsense = cli(
        "exemptions",
        "request",
        m.machine_id,
        "--reason",
        "x",
        "--until",
        "soon",
        "--as",
        "olga",
        "--password-stdin",
        input=pw,
    )
    assert (
        nonsense.exit_code == 2
        and "--until 'soon': expected a duration from now (7d, 36h)" in nonsense.output
    )
    ok = cli("exemptions", "approve", "1", "--as", "cora", "--password-stdin", input=pw)
    assert ok.exit_code == 0 and "is active" in ok.output, ok.output
    listed = cli("exemptions", "list", "--site", "alpha", "--state", "active")
    assert (
        listed.exit_code == 0
        and m.machine_id in listed.output
        and "approved by cora" in listed.output
    )
