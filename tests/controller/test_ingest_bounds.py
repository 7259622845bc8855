"""Ingestion bounds through ``POST /api/v1/agent/reports`` on SQLite and PostgreSQL.

Each test first performs the attack a hostile or broken agent could make, then checks that it
fails safely: refused per item with a reason in the acknowledgement, never a 500, and nothing
written where it should not be.

- site confinement: an agent of site A names a site-B machine by MAC, serial or machine id;
- time: items dated far in the future (2027, 9999-12-31) or the past (1970);
- text: NUL bytes and lone surrogates in serials, hostnames, details, event data; over-long
  serials;
- clock skew: measured from ``sent_at`` and shown in the agents list.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from controller.models import (
    Agent,
    LifecycleState,
    Machine,
    PoolSet,
    PoolSetStatus,
    Role,
    Site,
    SitePolicy,
    utcnow,
)
from tests.controller.conftest import CliInvoker, UserFactory
from tests.controller.test_ingest import (
    AgentCred,
    batch,
    events,
    identity,
    latest,
    machines,
    make_agent,
    observation,
    ok,
    ts,
)

DMP = ["stratum+tcp://dmp.example.kz:3333", "stratum+tcp://dmp-backup.example.kz:3333"]
EVIL = "stratum+tcp://evil.example.net:4444"
MAC_B = "aa:bb:cc:5b:00:07"
SERIAL_B = "SN-SITE-B-7"


def make_site(engine: Engine, name: str) -> int:
    """A site with an approved pool set in enforce mode (so its machines are judged)."""
    with Session(engine) as session:
        site = Site(name=name, licence_number=f"KZ-{name}")
        session.add(site)
        session.flush()
        assert site.id is not None
        session.add(
            PoolSet(
                site_id=site.id,
                version=1,
                name="DMP",
                urls=DMP,
                account="farm",
                status=PoolSetStatus.APPROVED,
                proposed_by="alice",
                decided_by="bob",
                decided_at=utcnow() - timedelta(days=2),
            )
        )
        session.add(SitePolicy(site_id=site.id, mode="enforce"))
        session.commit()
        return site.id


def pools(worker: str, *, evil: bool = False) -> list[dict[str, Any]]:
    good = [{"url": url, "user": worker, "status": "alive"} for url in DMP]
    return [{"url": EVIL, "user": "thief.rig1"}, *good[1:]] if evil else good


def machine(engine: Engine, machine_id: str) -> Machine:
    with Session(engine) as session:
        return session.exec(select(Machine).where(Machine.machine_id == machine_id)).one()


def timeline_status(client: TestClient, user_headers: dict[str, str], machine_id: str) -> str:
    response = client.get(f"/api/v1/machines/{machine_id}/compliance", headers=user_headers)
    assert response.status_code == 200, response.text
    status: str = response.json()["current_status"]
    return status


@pytest.fixture
def agent(engine: Engine) -> AgentCred:
    return make_agent(engine, make_site(engine, "site-x"), "x1", ["10.1.0.0/24"])


@pytest.fixture
def two_sites(engine: Engine) -> tuple[AgentCred, AgentCred]:
    """Agents of two sites, each with its own segment."""
    site_a, site_b = make_site(engine, "site-a"), make_site(engine, "site-b")
    return (
        make_agent(engine, site_a, "sa", ["10.60.0.0/24"]),
        make_agent(engine, site_b, "sb", ["10.50.0.0/24"]),
    )


# --- site confinement --------------------------------------------------------------------------


def test_an_agent_cannot_flip_another_sites_machine_by_mac_serial_or_machine_id(
    app_client: TestClient,
    engine: Engine,
    make_user: UserFactory,
    two_sites: tuple[AgentCred, AgentCred],
) -> None:
    agent_a, agent_b = two_sites
    inspector = make_user(Role.INSPECTOR)
    now = utcnow()
    # Site B's machine, hijacked: its own agent reports the evil pool.
    ok(app_client, agent_b, batch(identities=[identity("10.50.0.7", MAC_B, SERIAL_B)]))
    [m_b] = machines(engine)
    worker = f"farm.{m_b.machine_id}"
    ok(
        app_client,
        agent_b,
        batch(
            observations=[
                observation(
                    "10.50.0.7", now - timedelta(seconds=30), pools=pools(worker, evil=True)
                )
            ]
        ),
    )
    assert timeline_status(app_client, inspector.headers, m_b.machine_id) == "non_compliant"

    # The attack: site A's agent reports B's MAC at an address of its own LAN, good pools,
    # newer than B's poll; then B's serial in an identity, then B's machine id in an event.
    attack = batch(
        observations=[
            observation("10.60.0.99", now, mac=MAC_B, pools=pools(worker)),
            observation("10.50.0.7", now, pools=pools(worker)),  # B's address itself
        ],
        identities=[identity("10.60.0.98", "aa:bb:cc:5a:00:98", SERIAL_B)],
        events=[
            {
                "kind": "pool_verified",
                "at": ts(now),
                "ip": "10.60.0.99",
                "data": {"machine_id": m_b.machine_id, "verified_at": ts(now), "attempts": 1},
            }
        ],
    )
    ack = ok(app_client, agent_a, attack)
    assert (ack["observations"], ack["identities"], ack["events"]) == (0, 0, 0)
    conflict = f"names machine {m_b.machine_id} of another site"
    assert [r.split(": ", 1)[0] for r in ack["refused"]] == [
        "identity 0 (10.60.0.98)",
        "observation 1 (10.50.0.7)",
        "event 0 (10.60.0.99)",
        "observation 0 (10.60.0.99)",
    ]
    assert sum(conflict in r for r in ack["refused"]) == 3
    assert ack["refused"][1].endswith("outside this agent's segments")

    # Site B's machine is untouched: still non-compliant, same site, address, poll.
    assert timeline_status(app_client, inspector.headers, m_b.machine_id) == "non_compliant"
    after = machine(engine, m_b.machine_id)
    assert (after.site_id, after.current_ip, after.mac) == (agent_b.site_id, "10.50.0.7", MAC_B)
    assert latest(engine, after.id).pools[0]["url"] == EVIL
    assert len(machines(engine)) == 1  # no twin created at site A either

    # One critical alert for the machine, listed with the alerts; not repeated next time.
    [alert] = events(engine, "cross_site_report")
    assert alert.severity == "critical" and alert.machine_pk == m_b.id
    assert alert.agent_id == agent_a.id and alert.resolved_at is None
    assert "site-a" in alert.detail and "site-b" in alert.detail
    assert {i["item"] for i in alert.data["items"]} == {"identity", "observation", "event"}
    listed = app_client.get("/api/v1/alerts", headers=inspector.headers).json()
    assert any(a["kind"] == "cross_site_report" for a in listed)
    again = ok(app_client, agent_a, {**attack, "batch_id": str(uuid.uuid4())})
    assert again["observations"] == 0
    assert len(events(engine, "cross_site_report")) == 1
    [logged, _] = events(engine, "report_refused")
    assert logged.data["by_reason"] == {"outside_segments": 1, "other_site": 3}

    # Site B's own agent still reports its machine.
    ack_b = ok(
        app_client,
        agent_b,
        batch(observations=[observation("10.50.0.7", utcnow(), mac=MAC_B, pools=pools(worker))]),
    )
    assert ack_b["observations"] == 1 and ack_b["refused"] == []
    assert timeline_status(app_client, inspector.headers, m_b.machine_id) == "compliant"


def test_an_enforcement_event_by_address_cannot_reach_another_sites_machine(
    app_client: TestClient,
    engine: Engine,
    make_user: UserFactory,
    two_sites: tuple[AgentCred, AgentCred],
) -> None:
    """A site-B machine now standing at an address of site A's LAN (carried over before it
    was re-registered): an event that names a machine only by IP is resolved among site A's
    machines, never B's."""
    agent_a, agent_b = two_sites
    inspector = make_user(Role.INSPECTOR)
    now = utcnow()
    ok(app_client, agent_b, batch(identities=[identity("10.50.0.7", MAC_B, SERIAL_B)]))
    [m_b] = machines(engine)
    worker = f"farm.{m_b.machine_id}"
    hijacked = observation("10.50.0.7", now - timedelta(seconds=30), pools=pools(worker, evil=True))
    ok(app_client, agent_b, batch(observations=[hijacked]))
    assert timeline_status(app_client, inspector.headers, m_b.machine_id) == "non_compliant"
    with Session(engine) as session:
        moved = session.get(Machine, m_b.id)
        assert moved is not None
        moved.current_ip = "10.60.0.7"  # inside site A's segment, still site B's machine
        session.add(moved)
        session.commit()
    # Site A's agent: "I saw the machine at 10.60.0.7 on the approved pools".
    drift = {
        "kind": "pool_drift",
        "at": ts(now),
        "ip": "10.60.0.7",
        "data": {"observed": pools(worker), "detected_at": ts(now), "problems": ["x"]},
    }
    ok(app_client, agent_a, batch(events=[drift]))
    assert timeline_status(app_client, inspector.headers, m_b.machine_id) == "non_compliant"
    assert machine(engine, m_b.machine_id).site_id == agent_b.site_id


def test_a_decommissioned_machine_moved_to_another_site_is_discovered_there(
    app_client: TestClient, engine: Engine, two_sites: tuple[AgentCred, AgentCred]
) -> None:
    agent_a, agent_b = two_sites
    ok(app_client, agent_b, batch(identities=[identity("10.50.0.7", MAC_B, SERIAL_B)]))
    with Session(engine) as session:
        old = session.exec(select(Machine)).one()
        old.lifecycle_state = LifecycleState.DECOMMISSIONED
        session.add(old)
        session.commit()
    ack = ok(app_client, agent_a, batch(identities=[identity("10.60.0.20", MAC_B, SERIAL_B)]))
    assert ack["refused"] == [] and ack["identities"] == 1
    by_site = {m.site_id: m for m in machines(engine)}
    assert by_site[agent_a.site_id].current_ip == "10.60.0.20"
    assert by_site[agent_b.site_id].lifecycle_state == LifecycleState.DECOMMISSIONED
    assert by_site[agent_b.site_id].current_ip == "10.50.0.7"  # the old record is kept
    assert events(engine, "cross_site_report") == []


# --- time --------------------------------------------------------------------------------------


def test_items_dated_outside_the_window_are_refused_per_item(
    app_client: TestClient, engine: Engine, make_user: UserFactory, agent: AgentCred
) -> None:
    tech = make_user(Role.TECHNICIAN)
    ok(app_client, agent, batch(identities=[identity("10.1.0.5", "aa:bb:cc:00:00:01", "SN1")]))
    [m] = machines(engine)
    now = utcnow()
    dates = {
        "2027": datetime(2027, 6, 1, tzinfo=UTC),
        "9999": datetime(9999, 12, 31, 23, 59, tzinfo=UTC),
        "1970": datetime(1970, 1, 1, tzinfo=UTC),
        "fine": now - timedelta(minutes=1),
    }
    ack = ok(
        app_client,
        agent,
        batch(
            observations=[
                observation(
                    "10.1.0.5", at, pools=[{"url": EVIL, "user": "x"}] if k != "fine" else []
                )
                for k, at in dates.items()
            ],
            identities=[identity("10.1.0.6", "aa:bb:cc:00:00:02", "SN2", at=dates["9999"])],
            events=[{"kind": "scan", "at": ts(dates["9999"]), "ip": "10.1.0.5"}],
        ),
    )
    assert ack["observations"] == 1 and ack["identities"] == 0 and ack["events"] == 0
    refused = ack["refused"]
    assert len(refused) == 5
    assert refused[0].startswith("identity 0 (10.1.0.6): observed_at 9999-12-31")
    assert refused[1].startswith("observation 0 (10.1.0.5): observed_at 2027-06-01")
    assert (
        "ahead of the controller's clock" in refused[1] and "check the agent's clock" in refused[1]
    )
    assert "observed_at 1970-01-01" in refused[3] and "report_max_age_days" in refused[3]
    assert refused[4].startswith("event 0 (10.1.0.5): at 9999-12-31")
    # The machine's latest state is the real poll, not the one from the future.
    row = latest(engine, m.id)
    assert row.observed_at == dates["fine"] and row.pools == []
    assert len(machines(engine)) == 1
    # And the fleet status still answers for every user.
    response = app_client.get("/api/v1/compliance/status", headers=tech.headers)
    assert response.status_code == 200, response.text
    [logged] = events(engine, "report_refused")
    assert logged.data["by_reason"] == {"time": 5}
    assert logged.data["items"][1]["at"].startswith("2027-06-01")


def test_times_inside_an_enforcement_event_are_bounded_like_its_own(
    app_client: TestClient, engine: Engine, agent: AgentCred
) -> None:
    """The evidence dates a drift by its detected_at: one dated 9999 would pin the machine's
    interval and hide every later poll."""
    ok(app_client, agent, batch(identities=[identity("10.1.0.5", "aa:bb:cc:00:00:01", "SN1")]))
    [m] = machines(engine)
    now = utcnow()
    worker = f"farm.{m.machine_id}"
    far = {"9999": "9999-12-31T23:59:00+00:00", "1970": "1970-01-01T00:00:00+00:00"}
    hostile = [
        {
            "kind": "pool_drift",
            "at": ts(now),
            "ip": "10.1.0.5",
            "data": {"machine_id": m.machine_id, key: value, "observed": pools(worker)},
        }
        for key, value in (("detected_at", far["9999"]), ("verified_at", far["1970"]))
    ]
    hostile.append(
        {"kind": "pool_drift", "at": ts(now), "ip": "10.1.0.5", "data": {"written_at": "soon"}}
    )
    ack = ok(app_client, agent, batch(events=hostile))
    assert ack["events"] == 0
    assert [r.split(": ", 1)[1].split(" ", 1)[0] for r in ack["refused"]] == [
        "data.detected_at",
        "data.verified_at",
        "data.written_at",
    ]
    assert "ahead of the controller's clock" in ack["refused"][0]
    assert ack["refused"][2].endswith("data.written_at is not a time with a zone")
    # Real polls still decide: the machine is judged on what it reports.
    ok(
        app_client,
        agent,
        batch(observations=[observation("10.1.0.5", now, pools=pools(worker, evil=True))]),
    )
    with Session(engine) as session:
        from controller.models import ComplianceInterval

        [open_interval] = session.exec(
            select(ComplianceInterval).where(
                ComplianceInterval.machine_pk == m.id,
                ComplianceInterval.ended_at == None,  # noqa: E711
            )
        ).all()
    assert open_interval.status == "non_compliant"


def test_skew_inside_the_allowance_is_accepted_and_measured(
    app_client: TestClient,
    engine: Engine,
    agent: AgentCred,
    make_user: UserFactory,
    cli: CliInvoker,
) -> None:
    ok(app_client, agent, batch(identities=[identity("10.1.0.5", "aa:bb:cc:00:00:01", "SN1")]))
    fast = utcnow() + timedelta(seconds=90)  # the agent's clock runs 90 s ahead
    body = batch(observations=[observation("10.1.0.5", fast)])
    body["sent_at"] = ts(fast)
    ack = ok(app_client, agent, body)
    assert ack["observations"] == 1 and ack["refused"] == []
    received = datetime.fromisoformat(ack["received_at"])
    assert abs((fast - received).total_seconds() - ack["clock_skew_s"]) < 0.01
    assert 60 < ack["clock_skew_s"] <= 90
    with Session(engine) as session:
        row = session.get(Agent, agent.id)
        assert row is not None and row.clock_skew_s == ack["clock_skew_s"]
    listed = app_client.get("/api/v1/agents", headers=make_user(Role.TECHNICIAN).headers).json()
    assert [a["clock_skew_s"] for a in listed if a["id"] == agent.id] == [ack["clock_skew_s"]]
    # The CLI reads the same record.
    shown = cli("agent", "list", "--json")
    assert shown.exit_code == 0, shown.output
    [row] = [a for a in json.loads(shown.stdout) if a["id"] == agent.id]
    assert row["clock_skew_s"] == ack["clock_skew_s"]
    table = cli("agent", "list")
    assert f"{ack['clock_skew_s']:+.1f}s" in table.stdout


# --- text --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["\x00", "\ud800"], ids=["nul", "lone-surrogate"])
def test_hostile_text_is_stored_cleaned_or_refused_per_item_never_a_500(
    app_client: TestClient, engine: Engine, agent: AgentCred, bad: str
) -> None:
    at = ts(utcnow() - timedelta(minutes=1))
    body = batch(
        identities=[
            identity("10.1.0.5", "aa:bb:cc:00:00:01", "SN1", hostname=f"rig{bad}1"),
            identity("10.1.0.6", "aa:bb:cc:00:00:02", f"SN{bad}2"),
            identity("10.1.0.7", "aa:bb:cc:00:00:03", "S" * 300),
        ],
        observations=[
            observation("10.1.0.5", error=f"boom{bad}", pools=[{"url": f"stratum+tcp://p{bad}:1"}]),
            observation("10.1.0.9", error=f"x{bad}"),  # cleaned, but nothing known there
        ],
        events=[
            {
                "kind": f"odd{bad}",
                "at": at,
                "ip": "10.1.0.5",
                "detail": f"detail{bad}",
                "data": {f"k{bad}": [f"v{bad}", 2**70]},
            }
        ],
    )
    # What a hostile agent sends: the raw characters, JSON-escaped (json.dumps keeps "\ud800").
    raw = json.dumps(body).encode()
    headers = {**agent.headers, "Content-Type": "application/json"}
    response = app_client.post("/api/v1/agent/reports", content=raw, headers=headers)
    assert response.status_code == 200, response.text
    ack = response.json()
    assert (ack["identities"], ack["observations"], ack["events"]) == (1, 1, 1)
    kind = "NUL" if bad == "\x00" else "lone surrogate"
    what = f"1 invalid character(s) replaced ({kind})"
    assert ack["refused"] == [
        f"identity 1 (10.1.0.6): serial: {what}: a damaged identity key cannot name a machine",
        "identity 2 (10.1.0.7): serial: cut from 300 to 128 characters: a damaged identity "
        "key cannot name a machine",
        "observation 1 (10.1.0.9): no machine known at this address (report its identity first)",
    ]
    assert ack["cleaned"] == [
        f"identity 0 (10.1.0.5): stored cleaned: hostname: {what}",
        f"observation 0 (10.1.0.5): stored cleaned: error: {what}; pools[0].url: {what}",
        f"event 0 (10.1.0.5): stored cleaned: kind: {what}; detail: {what}; data key: {what}; "
        f"data.k\ufffd[0]: {what}; data.k\ufffd[1]: integer beyond 64 bits, stored as text",
    ]
    [m] = machines(engine)
    assert m.hostname == "rig\ufffd1" and m.reported_serial == "SN1"
    row = latest(engine, m.id)
    assert row.error == "boom\ufffd" and row.pools[0]["url"] == "stratum+tcp://p\ufffd:1"
    [event] = events(engine, "odd\ufffd")
    assert event.detail == "detail\ufffd" and event.machine_pk == m.id
    assert event.data["k\ufffd"] == ["v\ufffd", str(2**70)]
    assert event.data["cleaned"][0] == f"kind: {what}"
    # Delivered again, the same acknowledgement (stored cleaned on both databases).
    again = app_client.post("/api/v1/agent/reports", content=raw, headers=headers)
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert again.json()["cleaned"] == ack["cleaned"]
