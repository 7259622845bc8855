"""The technician flow: claims, bulk claims from CSV, serial overrides, lifecycle, confirmation.

Discovered machines are inserted directly (ingestion is tested elsewhere); every change is
made through the API or the CLI and checked in the database, including its audit entries.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from controller import register
from controller.actors import ConsoleActor
from controller.audit_verify import verify_chain
from controller.errors import Conflict
from controller.models import (
    AuditEntry,
    LatestObservation,
    LifecycleState,
    Machine,
    MachineStateChange,
    Role,
    Site,
)
from controller.register import (
    ClaimRequest,
    judge_serial,
    normalize_mac,
    parse_claims_csv,
    transition_problem,
)
from tests.controller.conftest import DEFAULT_PASSWORD, CliInvoker, TestUser, UserFactory

S = LifecycleState
API = "/api/v1/machines"


# --- fixtures and helpers ----------------------------------------------------------------------


def add_site(engine: Engine, name: str) -> int:
    with Session(engine) as session:
        site = Site(name=name, licence_number=f"LIC-{name}")
        session.add(site)
        session.commit()
        assert site.id is not None
        return site.id


def add_machine(engine: Engine, **fields: Any) -> Machine:
    """A machine as ingestion would leave it: discovered, with what the agent reported."""
    with Session(engine, expire_on_commit=False) as session:
        machine = Machine(**fields)
        session.add(machine)
        session.commit()
        return machine


def get_machine(engine: Engine, machine_id: str) -> Machine:
    with Session(engine) as session:
        return session.exec(select(Machine).where(Machine.machine_id == machine_id)).one()


def audit_entries(engine: Engine, action: str | None = None) -> list[AuditEntry]:
    with Session(engine) as session:
        query = select(AuditEntry).order_by(col(AuditEntry.seq))
        if action is not None:
            query = query.where(AuditEntry.action == action)
        return list(session.exec(query))


@pytest.fixture
def farm(engine: Engine) -> dict[str, Machine]:
    """Two sites and four discovered machines on site alpha."""
    alpha = add_site(engine, "alpha")
    add_site(engine, "beta")
    return {
        f"m{i}": add_machine(
            engine,
            mac=f"aa:bb:cc:00:00:0{i}",  # as ingestion stores MACs
            current_ip=f"10.0.0.{i}",
            reported_serial=f"SN000{i}",
            model="S19",
            vendor="antminer",
            site_id=alpha,
        )
        for i in range(1, 5)
    }


@pytest.fixture
def tech(make_user: UserFactory) -> TestUser:
    return make_user(Role.TECHNICIAN, name="tess")


def claim_body(slot: str | int = "1", serial: str = "SN0001", **extra: Any) -> dict[str, Any]:
    return {
        "site": "alpha",
        "container": "C1",
        "rack": "R1",
        "shelf": "2",
        "slot": slot,
        "label_serial": serial,
        **extra,
    }


# --- pure decisions ----------------------------------------------------------------------------


def test_transition_table() -> None:
    assert transition_problem(S.REGISTERED, S.ACTIVE) is None
    assert transition_problem(S.ACTIVE, S.MAINTENANCE) is None
    assert transition_problem(S.MAINTENANCE, S.RMA) is None
    assert transition_problem(S.RMA, S.ACTIVE) is None
    assert transition_problem(S.ACTIVE, S.DECOMMISSIONED) is None
    assert "already active" in (transition_problem(S.ACTIVE, S.ACTIVE) or "")
    assert "final" in (transition_problem(S.DECOMMISSIONED, S.ACTIVE) or "")
    assert "claim" in (transition_problem(S.DISCOVERED, S.REGISTERED) or "")
    assert "claim" in (transition_problem(S.DISCOVERED, S.ACTIVE) or "")
    problem = transition_problem(S.ACTIVE, S.REGISTERED) or ""
    assert "cannot go from active to registered" in problem
    assert "allowed: decommissioned, maintenance, rma" in problem


def test_judge_serial() -> None:
    assert judge_serial("sn1 ", "SN1", None).accepted
    assert not judge_serial("SN1", "SN1", None).mismatch
    assert judge_serial("SN1", None, None).accepted  # unreadable serial: nothing to contradict
    refused = judge_serial("SN1", "SN2", None)
    assert not refused.accepted and refused.mismatch
    overridden = judge_serial("SN1", "SN2", "control board replaced by vendor")
    assert overridden.accepted and overridden.mismatch


def test_normalize_mac() -> None:
    assert normalize_mac("AA-BB-CC-DD-EE-FF") == "aa:bb:cc:dd:ee:ff"
    assert normalize_mac("aabb.ccdd.eeff") == "aa:bb:cc:dd:ee:ff"
    assert normalize_mac("AABBCCDDEEFF") == "aa:bb:cc:dd:ee:ff"
    assert normalize_mac("M0123456789") is None
    assert normalize_mac("10.0.0.1") is None


def test_parse_csv_shapes() -> None:
    good = parse_claims_csv(
        "\ufeffMAC;Site;Container;Rack;Shelf;Slot;Label_Serial\r\n"
        "\r\n"
        "aa:bb:cc:00:00:01;alpha;C1;R1;1;1;sn1\r\n"
    )
    assert not good.file_errors and not good.bad
    assert [(r.line, r.ref, r.claim.label_serial) for r in good.rows] == [
        (3, "aa:bb:cc:00:00:01", "sn1")
    ]
    bad_header = parse_claims_csv("mac,site,container,rack,slot,lable_serial\n")
    assert bad_header.file_errors == [
        "line 1: unknown column(s) 'lable_serial' (expected mac or ip, site, container, "
        "rack, shelf, slot, label_serial, optional override_reason)",
        "line 1: missing column(s): shelf, label_serial",
    ]
    assert parse_claims_csv("").file_errors == ["the file is empty (expected a header line)"]
    no_id = parse_claims_csv("site,container,rack,shelf,slot,label_serial\nalpha,C,R,1,1,S\n")
    assert "needs a mac or an ip column" in no_id.file_errors[0]
    rows = parse_claims_csv(
        "ip,site,container,rack,shelf,slot,label_serial\n"
        '10.0.0.1,alpha,"C\n1",R1,1,1,SN1\n'  # a quoted field spanning two lines
        "10.0.0.300,alpha,C1,R1,1,2,SN2\n"
        "10.0.0.2,alpha,C1,R1,1,,SN3\n"
    )
    assert [r.line for r in rows.rows] == [2]
    assert [(b.line, b.errors) for b in rows.bad] == [
        (4, ["ip '10.0.0.300' is not an IP address"]),
        (5, ["slot is empty"]),
    ]


# --- single claims -----------------------------------------------------------------------------


def test_claim_registers_machine_with_location(
    engine: Engine, app_client: TestClient, farm: dict[str, Machine], tech: TestUser
) -> None:
    m = farm["m1"]
    resp = app_client.post(f"{API}/{m.machine_id}/claim", json=claim_body(), headers=tech.headers)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["lifecycle_state"] == "registered"
    assert (body["site"], body["container"], body["rack"], body["shelf"], body["slot"]) == (
        "alpha",
        "C1",
        "R1",
        "2",
        "1",
    )
    assert body["label_serial"] == "SN0001"
    assert body["commissioned_at"] is not None
    assert [(h["from_state"], h["to_state"], h["actor"]) for h in body["history"]] == [
        ("discovered", "registered", "tess")
    ]
    stored = get_machine(engine, m.machine_id)
    assert stored.lifecycle_state == S.REGISTERED
    assert stored.commissioned_at is not None and stored.record_version == 2
    assert stored.flags == []
    (entry,) = audit_entries(engine, "machine.claim")
    assert (entry.actor, entry.actor_kind, entry.entity_id) == ("tess", "user", m.machine_id)
    assert entry.before is not None and entry.before["lifecycle_state"] == "discovered"
    assert entry.after is not None and entry.after["slot"] == "1"
    assert entry.source == "testclient"


def test_claim_by_mac_or_ip(
    engine: Engine, app_client: TestClient, farm: dict[str, Machine], tech: TestUser
) -> None:
    by_mac = app_client.post(
        f"{API}/AA-BB-CC-00-00-02/claim",
        json=claim_body(slot="2", serial="sn0002"),
        headers=tech.headers,
    )
    assert by_mac.status_code == 200, by_mac.text
    assert by_mac.json()["machine_id"] == farm["m2"].machine_id
    by_ip = app_client.post(
        f"{API}/10.0.0.3/claim", json=claim_body(slot="3", serial="SN0003"), headers=tech.headers
    )
    assert by_ip.status_code == 200, by_ip.text
    assert by_ip.json()["machine_id"] == farm["m3"].machine_id
    shown = app_client.get(f"{API}/AA:BB:CC:00:00:03", headers=tech.headers)
    assert shown.json()["machine_id"] == farm["m3"].machine_id


def test_serial_mismatch_is_refused_with_both_values(
    engine: Engine, app_client: TestClient, farm: dict[str, Machine], tech: TestUser
) -> None:
    m = farm["m1"]
    resp = app_client.post(
        f"{API}/{m.machine_id}/claim", json=claim_body(serial="SN9999"), headers=tech.headers
    )
    assert resp.status_code == 409
    body = resp.json()
    assert body["label_serial"] == "SN9999"
    assert body["reported_serial"] == "SN0001"
    assert "'SN9999'" in body["detail"] and "'SN0001'" in body["detail"]
    assert get_machine(engine, m.machine_id).lifecycle_state == S.DISCOVERED
    assert audit_entries(engine) == []


def test_serial_override_is_audited_with_reason_and_flagged(
    engine: Engine, app_client: TestClient, farm: dict[str, Machine], tech: TestUser
) -> None:
    m = farm["m1"]
    reason = "control board replaced under warranty; label is the chassis"
    resp = app_client.post(
        f"{API}/{m.machine_id}/claim",
        json=claim_body(serial="SN9999", override_reason=reason),
        headers=tech.headers,
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["flags"] == [register.SERIAL_MISMATCH_FLAG]
    stored = get_machine(engine, m.machine_id)
    assert (stored.label_serial, stored.reported_serial) == ("SN9999", "SN0001")
    assert register.SERIAL_MISMATCH_FLAG in stored.flags
    (entry,) = audit_entries(engine, "machine.claim")
    assert entry.reason == reason
    assert entry.after is not None and entry.after["serial_override"] is True
    with Session(engine) as session:
        change = session.exec(select(MachineStateChange)).one()
    assert reason in change.reason


def test_claim_refusals(
    engine: Engine,
    app_client: TestClient,
    farm: dict[str, Machine],
    tech: TestUser,
) -> None:
    m1, m2 = farm["m1"], farm["m2"]
    assert (
        app_client.post(f"{API}/{m1.machine_id}/claim", json=claim_body(), headers=tech.headers)
    ).status_code == 200

    def claim(ref: str, **body: Any) -> tuple[int, str]:
        resp = app_client.post(f"{API}/{ref}/claim", json=body, headers=tech.headers)
        return resp.status_code, json.dumps(resp.json().get("detail", ""))

    code, detail = claim(m1.machine_id, **claim_body(slot="9"))
    assert code == 409 and "already on the register (registered)" in detail
    code, detail = claim(m2.machine_id, **claim_body(slot="1", serial="SN0002"))
    assert code == 409 and f"location alpha/C1/R1/2/1 is taken by machine {m1.machine_id}" in detail
    code, detail = claim(
        m2.machine_id, **claim_body(slot="2", serial="SN0001", override_reason="x")
    )
    assert code == 409 and f"already on the register as machine {m1.machine_id}" in detail
    code, detail = claim(m2.machine_id, **(claim_body(slot="2", serial="SN0002") | {"site": "x"}))
    assert code == 404 and "no site named 'x'" in detail
    code, detail = claim(
        m2.machine_id, **(claim_body(slot="2", serial="SN0002") | {"site": "beta"})
    )
    assert code == 409 and "reported from another site than 'beta'" in detail
    code, detail = claim("MZZZZZZZZZ", **claim_body(slot="2", serial="SN0002"))
    assert code == 404 and "no machine with machine MZZZZZZZZZ" in detail
    code, detail = claim("10.9.9.9", **claim_body(slot="2", serial="SN0002"))
    assert code == 404 and "no machine with IP 10.9.9.9" in detail
    code, detail = claim(m2.machine_id, **claim_body(slot="  ", serial="SN0002"))
    assert code == 422 and "slot" in detail
    code, detail = claim(m2.machine_id, **claim_body(slot="2", serial="SN0002", colour="red"))
    assert code == 422 and "colour" in detail
    # Numbers are fine where a JSON client sends them.
    code, _ = claim(m2.machine_id, **claim_body(slot=2, serial="SN0002"))
    assert code == 200
    assert len(audit_entries(engine)) == 2


def test_ambiguous_ip_needs_a_machine_id(
    engine: Engine, app_client: TestClient, farm: dict[str, Machine], tech: TestUser
) -> None:
    add_machine(engine, current_ip="10.0.0.1", mac="AA:BB:CC:00:00:99")
    resp = app_client.post(f"{API}/10.0.0.1/claim", json=claim_body(), headers=tech.headers)
    assert resp.status_code == 409
    assert "matches several machines" in resp.json()["detail"]


def test_concurrent_change_is_refused(engine: Engine, farm: dict[str, Machine]) -> None:
    """A stale read (someone changed the row meanwhile) makes the second writer fail cleanly."""
    with Session(engine, expire_on_commit=False) as session:
        machine = session.exec(
            select(Machine).where(Machine.machine_id == farm["m1"].machine_id)
        ).one()
        with engine.begin() as other:
            other.execute(
                text("UPDATE machine SET record_version = record_version + 1 WHERE id = :id"),
                {"id": machine.id},
            )
        with pytest.raises(Conflict, match="changed meanwhile"):
            register._take(session, machine)


def test_roles(
    app_client: TestClient, farm: dict[str, Machine], make_user: UserFactory, engine: Engine
) -> None:
    m = farm["m1"]
    for role in Role:
        user = make_user(role)
        assert app_client.get(API, headers=user.headers).status_code == 200
        assert app_client.get(f"{API}/{m.machine_id}", headers=user.headers).status_code == 200
        may_change = role in (Role.ADMIN, Role.OPERATOR, Role.TECHNICIAN)
        # An invalid body: allowed roles get 422, the others 403 before the body matters.
        resp = app_client.post(f"{API}/{m.machine_id}/claim", json={}, headers=user.headers)
        assert resp.status_code == (422 if may_change else 403), (role, resp.text)
        resp = app_client.post(f"{API}/{m.machine_id}/state", json={}, headers=user.headers)
        assert resp.status_code == (422 if may_change else 403), (role, resp.text)
        resp = app_client.post(
            f"{API}/{m.machine_id}/confirm-serial", json={}, headers=user.headers
        )
        assert resp.status_code == (422 if may_change else 403), (role, resp.text)
        resp = app_client.post(
            f"{API}/import-claims",
            content=b"",
            headers=user.headers | {"content-type": "text/csv"},
        )
        assert resp.status_code == (422 if may_change else 403), (role, resp.text)
    assert app_client.get(API).status_code == 401
    assert app_client.post(f"{API}/{m.machine_id}/claim", json=claim_body()).status_code == 401
    assert app_client.post(f"{API}/import-claims", content=b"x").status_code == 401


# --- lifecycle and serial confirmation ---------------------------------------------------------


def test_lifecycle_transitions_with_history(
    engine: Engine, app_client: TestClient, farm: dict[str, Machine], make_user: UserFactory
) -> None:
    operator = make_user(Role.OPERATOR, name="otto")
    m = farm["m1"]
    url = f"{API}/{m.machine_id}/state"
    refused = app_client.post(url, json={"state": "active"}, headers=operator.headers)
    assert refused.status_code == 409
    assert "must be claimed" in refused.json()["detail"]
    app_client.post(f"{API}/{m.machine_id}/claim", json=claim_body(), headers=operator.headers)
    for target, reason in (
        ("active", ""),
        ("maintenance", "fan noise"),
        ("active", ""),
        ("rma", "RMA-1234: hashboard 2 dead"),
    ):
        resp = app_client.post(
            url, json={"state": target, "reason": reason}, headers=operator.headers
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["lifecycle_state"] == target
    no_reason = app_client.post(url, json={"state": "decommissioned"}, headers=operator.headers)
    assert no_reason.status_code == 422
    assert "a reason is required to move a machine to decommissioned" in no_reason.text
    bad_state = app_client.post(url, json={"state": "stolen"}, headers=operator.headers)
    assert bad_state.status_code == 422
    resp = app_client.post(
        url, json={"state": "decommissioned", "reason": "scrapped"}, headers=operator.headers
    )
    assert resp.status_code == 200
    assert resp.json()["decommissioned_at"] is not None
    final = app_client.post(url, json={"state": "active"}, headers=operator.headers)
    assert final.status_code == 409
    assert final.json()["detail"] == (
        f"machine {m.machine_id}: decommissioned is final; no transition leaves it"
    )
    history = app_client.get(f"{API}/{m.machine_id}", headers=operator.headers).json()["history"]
    assert [(h["from_state"], h["to_state"]) for h in history] == [
        ("discovered", "registered"),
        ("registered", "active"),
        ("active", "maintenance"),
        ("maintenance", "active"),
        ("active", "rma"),
        ("rma", "decommissioned"),
    ]
    assert history[4]["reason"] == "RMA-1234: hashboard 2 dead"
    states = audit_entries(engine, "machine.state")
    assert len(states) == 5
    assert states[-1].before is not None and states[-1].before["lifecycle_state"] == "rma"
    assert states[-1].after is not None and states[-1].after["lifecycle_state"] == "decommissioned"
    assert states[-1].reason == "scrapped" and states[-1].actor == "otto"
    assert verify_chain_ok(engine)


def verify_chain_ok(engine: Engine) -> bool:
    with Session(engine) as session:
        return verify_chain(session).ok


def test_confirm_serial_clears_the_flag(
    engine: Engine, app_client: TestClient, farm: dict[str, Machine], tech: TestUser
) -> None:
    m = add_machine(
        engine,
        mac="AA:BB:CC:00:01:00",
        current_ip="10.0.1.1",
        reported_serial=None,
        serial_unconfirmed=True,
        flags=["serial_unreadable", "serial_changed"],
    )
    url = f"{API}/{m.machine_id}/confirm-serial"
    resp = app_client.post(url, json={"serial": " sn-label-7 "}, headers=tech.headers)
    assert resp.status_code == 200, resp.text
    assert resp.json()["serial_unconfirmed"] is False
    assert resp.json()["flags"] == ["serial_unreadable"]  # still true of the agent
    stored = get_machine(engine, m.machine_id)
    assert (stored.label_serial, stored.serial_unconfirmed) == ("SN-LABEL-7", False)
    (entry,) = audit_entries(engine, "machine.confirm_serial")
    assert entry.before is not None and entry.before["serial_unconfirmed"] is True
    assert entry.after is not None and entry.after["serial_unconfirmed"] is False
    again = app_client.post(url, json={"serial": "SN-LABEL-7"}, headers=tech.headers)
    assert again.status_code == 409
    assert "not awaiting confirmation" in again.json()["detail"]
    # A machine whose serial later became readable and contradicts the label.
    m2 = add_machine(
        engine, mac="AA:BB:CC:00:01:01", reported_serial="RS1", serial_unconfirmed=True
    )
    url2 = f"{API}/{m2.machine_id}/confirm-serial"
    mismatch = app_client.post(url2, json={"serial": "LS1"}, headers=tech.headers)
    assert mismatch.status_code == 409
    assert (mismatch.json()["label_serial"], mismatch.json()["reported_serial"]) == ("LS1", "RS1")
    ok = app_client.post(
        url2,
        json={"serial": "LS1", "override_reason": "vendor swapped board"},
        headers=tech.headers,
    )
    assert ok.status_code == 200
    assert ok.json()["flags"] == [register.SERIAL_MISMATCH_FLAG]
    assert audit_entries(engine, "machine.confirm_serial")[-1].reason == "vendor swapped board"


# --- reading -----------------------------------------------------------------------------------


def test_list_filters_and_pages(
    engine: Engine, app_client: TestClient, farm: dict[str, Machine], tech: TestUser
) -> None:
    m1 = farm["m1"]
    app_client.post(f"{API}/{m1.machine_id}/claim", json=claim_body(), headers=tech.headers)
    add_machine(engine, mac="AA:BB:CC:00:02:00")  # no site yet
    everything = app_client.get(API, headers=tech.headers).json()
    assert everything["count"] == 5 and len(everything["data"]) == 5
    registered = app_client.get(API, params={"state": "registered"}, headers=tech.headers).json()
    assert [m["machine_id"] for m in registered["data"]] == [m1.machine_id]
    discovered_alpha = app_client.get(
        API, params={"state": "discovered", "site": "alpha"}, headers=tech.headers
    ).json()
    assert discovered_alpha["count"] == 3
    assert app_client.get(API, params={"site": "beta"}, headers=tech.headers).json() == {
        "data": [],
        "count": 0,
    }
    page = app_client.get(API, params={"skip": 1, "limit": 2}, headers=tech.headers).json()
    assert page["count"] == 5
    assert [m["machine_id"] for m in page["data"]] == [
        farm["m2"].machine_id,
        farm["m3"].machine_id,
    ]
    assert app_client.get(API, params={"site": "nowhere"}, headers=tech.headers).status_code == 404
    assert app_client.get(API, params={"state": "lost"}, headers=tech.headers).status_code == 422
    assert app_client.get(API, params={"limit": 0}, headers=tech.headers).status_code == 422
    assert app_client.get(f"{API}/MNOPE00000", headers=tech.headers).status_code == 404


def test_detail_has_latest_observation(
    engine: Engine, app_client: TestClient, farm: dict[str, Machine], tech: TestUser
) -> None:
    m = farm["m1"]
    assert (
        app_client.get(f"{API}/{m.machine_id}", headers=tech.headers).json()["latest_observation"]
        is None
    )
    with Session(engine) as session:
        assert m.id is not None
        session.add(
            LatestObservation(
                machine_pk=m.id,
                observed_at=datetime(2026, 11, 1, 12, 0, tzinfo=UTC),
                reachable=True,
                is_mining=True,
                hashrate_ths=95.5,
                power_w=3250.0,
                pools=[{"url": "stratum+tcp://pool.example:3333", "user": "acct.M1"}],
                ip="10.0.0.1",
            )
        )
        session.commit()
    obs = app_client.get(f"{API}/{m.machine_id}", headers=tech.headers).json()["latest_observation"]
    assert obs["hashrate_ths"] == 95.5 and obs["reachable"] is True
    assert obs["observed_at"].startswith("2026-11-01T12:00:00")
    assert obs["pools"][0]["user"] == "acct.M1"


# --- bulk claims -------------------------------------------------------------------------------

HEADER = "mac,ip,site,container,rack,shelf,slot,label_serial,override_reason\n"


def test_bulk_claim_good_file(
    engine: Engine, app_client: TestClient, farm: dict[str, Machine], tech: TestUser
) -> None:
    csv_text = (
        HEADER + "aa:bb:cc:00:00:01,,alpha,C1,R1,1,1,SN0001,\n"
        ",10.0.0.2,alpha,C1,R1,1,2,SN0002,\n"
        "AA-BB-CC-00-00-03,10.0.0.3,alpha,C1,R1,1,3,OTHER3,sticker replaced by vendor\n"
    )
    dry = app_client.post(
        f"{API}/import-claims",
        params={"dry_run": True},
        content=csv_text,
        headers=tech.headers | {"content-type": "text/csv"},
    )
    assert dry.status_code == 200 and dry.json()["dry_run"] is True
    assert get_machine(engine, farm["m1"].machine_id).lifecycle_state == S.DISCOVERED
    resp = app_client.post(
        f"{API}/import-claims",
        content=csv_text,
        headers=tech.headers | {"content-type": "text/csv; charset=utf-8"},
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["ok"] is True and body["imported"] == 3
    assert [(r["line"], r["machine_id"], r["status"], r["override"]) for r in body["rows"]] == [
        (2, farm["m1"].machine_id, "claimed", False),
        (3, farm["m2"].machine_id, "claimed", False),
        (4, farm["m3"].machine_id, "claimed", True),
    ]
    for key in ("m1", "m2", "m3"):
        assert get_machine(engine, farm[key].machine_id).lifecycle_state == S.REGISTERED
    assert get_machine(engine, farm["m3"].machine_id).flags == [register.SERIAL_MISMATCH_FLAG]
    claims = audit_entries(engine, "machine.claim")
    assert [e.entity_id for e in claims] == [farm[k].machine_id for k in ("m1", "m2", "m3")]
    assert claims[2].reason == "sticker replaced by vendor"
    assert claims[0].reason == ""
    (summary,) = audit_entries(engine, "machine.import_claims")
    assert summary.after is not None and summary.after["rows"] == 3
    assert verify_chain_ok(engine)


def test_bulk_claim_bad_file_imports_nothing(
    engine: Engine, app_client: TestClient, farm: dict[str, Machine], tech: TestUser
) -> None:
    csv_text = (
        HEADER + "aa:bb:cc:00:00:01,,alpha,C1,R1,1,1,SN0001,\n"  # fine
        "aa:bb:cc:00:00:02,,alpha,C1,R1,1,2,WRONG,\n"  # mismatch without a reason
        "aa:bb:cc:00:00:03,,alpha,C1,R1,1,1,SN0003,\n"  # same slot as line 2
        "aa:bb:cc:00:00:77,,alpha,C1,R1,1,7,SN0077,\n"  # no such machine
        ",10.0.0.4,alpha,C1,R1,1,,SN0004,\n"  # slot missing
        "aa:bb:cc:00:00:04,10.0.0.1,alpha,C1,R1,1,8,SN0004,\n"  # mac and ip disagree
        "aa:bb:cc:00:00:01,,alpha,C1,R1,1,9,SN0001,\n"  # m1 again
    )
    resp = app_client.post(
        f"{API}/import-claims",
        files={"file": ("claims.csv", csv_text.encode(), "text/csv")},
        headers=tech.headers,
    )
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert body["ok"] is False and body["imported"] == 0
    by_line = {r["line"]: r for r in body["rows"]}
    assert by_line[2]["status"] == "ok"
    assert by_line[3]["errors"] == [
        "label serial 'WRONG' differs from the reported serial 'SN0002' "
        "(give override_reason to claim it anyway)"
    ]
    assert by_line[3]["reported_serial"] == "SN0002"
    assert by_line[4]["errors"] == [
        f"location alpha/C1/R1/1/1 is taken by machine {farm['m1'].machine_id}"
    ]
    assert by_line[5]["errors"] == ["no machine with MAC aa:bb:cc:00:00:77"]
    assert by_line[6]["errors"] == ["slot is empty"]
    assert "the row names different machines" in by_line[7]["errors"][0]
    assert by_line[8]["errors"] == [
        f"machine {farm['m1'].machine_id} is claimed twice in this file (also on line 2)"
    ]
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7, 8]
    for machine in farm.values():
        assert get_machine(engine, machine.machine_id).lifecycle_state == S.DISCOVERED
    assert audit_entries(engine) == []
    with Session(engine) as session:
        assert session.exec(select(MachineStateChange)).all() == []


def test_bulk_claim_bad_uploads(
    app_client: TestClient, farm: dict[str, Machine], tech: TestUser
) -> None:
    url = f"{API}/import-claims"
    csv_headers = tech.headers | {"content-type": "text/csv"}
    bad_header = app_client.post(url, content="mac,site\nx,y\n", headers=csv_headers)
    assert bad_header.status_code == 422
    assert bad_header.json()["file_errors"] == [
        "line 1: missing column(s): container, rack, shelf, slot, label_serial"
    ]
    latin1 = app_client.post(url, content=HEADER.encode() + b"\xff\n", headers=csv_headers)
    assert latin1.status_code == 422 and "not UTF-8" in latin1.json()["detail"]
    json_body = app_client.post(url, json={"rows": []}, headers=tech.headers)
    assert json_body.status_code == 415
    no_file = app_client.post(url, files={"note": (None, "hi")}, headers=tech.headers)
    assert no_file.status_code == 422 and "without a file" in no_file.json()["detail"]
    app_client.app.state.settings.max_batch_bytes = 1024  # type: ignore[attr-defined]
    big = HEADER + "x" * 2048
    too_big = app_client.post(url, content=big, headers=csv_headers)
    assert too_big.status_code == 413 and "larger than 1024 bytes" in too_big.json()["detail"]
    too_big = app_client.post(
        url, files={"file": ("c.csv", big.encode(), "text/csv")}, headers=tech.headers
    )
    assert too_big.status_code == 413


# --- the CLI -----------------------------------------------------------------------------------


def test_cli_list_show_claim(
    cli: CliInvoker, engine: Engine, farm: dict[str, Machine], make_user: UserFactory
) -> None:
    m1, m2 = farm["m1"], farm["m2"]
    tess = make_user(Role.TECHNICIAN, name="tess")
    listed = cli("machines", "list", "--json")
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.stdout)["count"] == 4
    table = cli("machines", "list", "--site", "alpha", "--state", "discovered")
    assert table.exit_code == 0 and m1.machine_id in table.stdout
    assert cli("machines", "list", "--state", "lost").exit_code == 2
    unknown_site = cli("machines", "list", "--site", "nowhere")
    assert unknown_site.exit_code == 1 and "no site named 'nowhere'" in unknown_site.stderr

    args = ["--site", "alpha", "--container", "C2", "--rack", "R4", "--shelf", "1", "--slot"]
    nobody = cli("machines", "claim", m1.machine_id, *args, "5", "--label-serial", "SN0001")
    assert nobody.exit_code == 2 and "must say who acts" in nobody.stderr
    wrong = cli(
        "machines", "claim", m1.machine_id, *args, "5", "--label-serial", "SN0001",
        "--as", "tess", "--password-stdin", input="not her password\n",
    )  # fmt: skip
    assert wrong.exit_code == 1
    assert wrong.stderr == "error: --as tess: invalid user name or password\n"
    refused = cli(
        "machines", "claim", m1.machine_id, *args, "5", "--label-serial", "BAD", as_user=tess
    )
    assert refused.exit_code == 1
    assert "'BAD'" in refused.stderr and "'SN0001'" in refused.stderr
    assert "Traceback" not in refused.output
    ok = cli(
        "machines", "claim", m1.machine_id, *args, "5", "--label-serial", "SN0001",
        "--as", "tess", "--password-stdin", input=DEFAULT_PASSWORD + "\n",
    )  # fmt: skip
    assert ok.exit_code == 0, ok.output
    assert f"claimed {m1.machine_id} at alpha/C2/R4/1/5" in ok.stdout
    override = cli(
        "machines",
        "claim",
        "10.0.0.2",
        *args,
        "6",
        "--label-serial",
        "OTHER",
        "--override-reason",
        "label reprinted",
        as_user=tess,
    )
    assert override.exit_code == 0, override.output
    entries = audit_entries(engine, "machine.claim")
    assert [e.actor for e in entries] == ["tess"] * 2
    assert {e.source for e in entries} == {"cli"}
    assert entries[1].reason == "label reprinted"
    empty_slot = cli(
        "machines", "claim", m2.machine_id, *args, " ", "--label-serial", "X", as_user=tess
    )
    assert empty_slot.exit_code == 2 and "slot" in empty_slot.stderr

    shown = cli("machines", "show", m1.machine_id, "--json")
    assert shown.exit_code == 0
    detail = json.loads(shown.stdout)
    assert detail["lifecycle_state"] == "registered"
    assert detail["history"][0]["actor"] == "tess"
    pretty = cli("machines", "show", "aa:bb:cc:00:00:01")
    assert pretty.exit_code == 0 and "lifecycle" in pretty.stdout
    missing = cli("machines", "show", "MNOPE00000")
    assert missing.exit_code == 1 and "no machine with machine MNOPE00000" in missing.stderr

    moved = cli("machines", "state", m1.machine_id, "active", as_user=tess)
    assert moved.exit_code == 0 and "is now active" in moved.stdout
    invalid = cli("machines", "state", m1.machine_id, "registered", as_user=tess)
    assert invalid.exit_code == 1 and "cannot go from active to registered" in invalid.stderr
    no_reason = cli("machines", "state", m1.machine_id, "rma", as_user=tess)
    assert no_reason.exit_code == 2 and "reason is required" in no_reason.stderr


def test_cli_import_claims(
    cli: CliInvoker,
    engine: Engine,
    farm: dict[str, Machine],
    tmp_path: Path,
    make_user: UserFactory,
) -> None:
    oleg = make_user(Role.OPERATOR, name="oleg")
    bad = tmp_path / "bad.csv"
    bad.write_text(
        HEADER
        + "aa:bb:cc:00:00:01,,alpha,C1,R1,1,1,SN0001,\naa:bb:cc:00:00:02,,alpha,C1,R1,1,2,X,\n"
    )
    result = cli("machines", "import-claims", str(bad), as_user=oleg)
    assert result.exit_code == 1
    assert "nothing imported: 1 bad row(s)" in result.stdout
    assert "differs from the reported serial" in result.stdout
    assert audit_entries(engine) == []
    assert get_machine(engine, farm["m1"].machine_id).lifecycle_state == S.DISCOVERED

    good = tmp_path / "good.csv"
    good.write_text(
        HEADER + "aa:bb:cc:00:00:01,,alpha,C1,R1,1,1,SN0001,\n,10.0.0.2,alpha,C1,R1,1,2,SN0002,\n"
    )
    dry = cli("machines", "import-claims", str(good), "--dry-run", as_user=oleg)
    assert dry.exit_code == 0 and "nothing imported" in dry.stdout
    assert audit_entries(engine) == []
    result = cli("machines", "import-claims", str(good), "--json", as_user=oleg)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["imported"] == 2
    assert len(audit_entries(engine, "machine.claim")) == 2
    (summary,) = audit_entries(engine, "machine.import_claims")
    assert summary.after is not None and summary.after["file"] == "good.csv"
    assert {e.actor for e in audit_entries(engine)} == {"oleg"}

    missing = cli("machines", "import-claims", str(tmp_path / "nope.csv"), as_user=oleg)
    assert missing.exit_code == 1 and "no such file" in missing.stderr
    header_only = tmp_path / "header.csv"
    header_only.write_text("mac,site\n")
    result = cli("machines", "import-claims", str(header_only), as_user=oleg)
    assert result.exit_code == 1 and "missing column(s)" in result.stderr


def test_console_actor_is_an_actor(engine: Engine, farm: dict[str, Machine]) -> None:
    """Services take any Actor; the CLI's identity reaches the audit log as given."""
    with Session(engine) as session:
        register.claim(
            session,
            ConsoleActor(name="cli:someone"),
            farm["m4"].machine_id,
            ClaimRequest(
                site="alpha", container="C", rack="R", shelf="S", slot="1", label_serial="SN0004"
            ),
        )
        session.commit()
    (entry,) = audit_entries(engine, "machine.claim")
    assert (entry.actor, entry.source) == ("cli:someone", "cli")


def test_the_console_names_a_model_once_and_prints_no_none(cli: CliInvoker, engine: Engine) -> None:
    """pyasic's vendor is "AntMiner" and its model "Antminer S19j Pro"; an unreported power
    reading is left out, not printed as "None W"."""
    site = add_site(engine, "alpha")
    machine = add_machine(
        engine,
        site_id=site,
        vendor="AntMiner",
        model="Antminer S19j Pro",
        current_ip="127.9.0.7",
    )
    with Session(engine) as session:
        assert machine.id is not None
        session.add(
            LatestObservation(
                machine_pk=machine.id, observed_at=datetime.now(UTC), reachable=True,
                is_mining=True, hashrate_ths=104.5, power_w=None, temperature_c=None,
                ip="127.9.0.7",
            )
        )  # fmt: skip
        session.commit()
    listed = cli("machines", "list", "--site", "alpha")
    assert listed.exit_code == 0, listed.output
    assert "Antminer S19j Pro" in listed.stdout and "AntMiner Antminer" not in listed.stdout
    shown = cli("machines", "show", machine.machine_id)
    assert shown.exit_code == 0, shown.output
    assert "reachable, mining=yes, 104.5 TH/s, ip 127.9.0.7" in shown.stdout
    assert "None" not in shown.stdout.split("latest observation", 1)[1]
