"""Ingestion through ``POST /api/v1/agent/reports`` on SQLite and PostgreSQL.

Idempotent batches, 422 with nothing applied, segment confinement (refused and logged),
identities reconciled into the register with events and audit entries, observations
(latest, history buckets, last seen), agent events, missing machines.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from httpx import Response
from sqlalchemy import func
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from contract import BatchAck, ReportBatch
from controller.api.deps import Principal
from controller.audit_verify import verify_chain
from controller.ingest import ingest_batch, sweep_missing
from controller.models import (
    Agent,
    AuditEntry,
    IngestedBatch,
    LatestObservation,
    LifecycleState,
    Machine,
    MachineStateChange,
    ObservationHistory,
    RegisterEvent,
    Role,
    Segment,
    Site,
    utcnow,
)
from controller.security import AGENT_SECRET_PREFIX, new_token, token_hash
from controller.settings import Settings
from tests.controller.conftest import UserFactory

REPORTS = "/api/v1/agent/reports"
MAC1, MAC2 = "aa:bb:cc:00:00:01", "aa:bb:cc:00:00:02"


@dataclass(frozen=True)
class AgentCred:
    id: str
    name: str
    secret: str
    site_id: int

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}

    @property
    def principal(self) -> Principal:
        return Principal(
            kind="agent",
            name=f"agent:{self.name}",
            agent_id=self.id,
            site_id=self.site_id,
            source="test",
        )


def make_agent(engine: Engine, site_id: int, name: str, cidrs: list[str]) -> AgentCred:
    secret = new_token(AGENT_SECRET_PREFIX)
    agent_id = f"AG{name.upper()}"
    with Session(engine) as session:
        session.add(Agent(id=agent_id, name=name, site_id=site_id, secret_hash=token_hash(secret)))
        session.flush()
        for cidr in cidrs:
            session.add(Segment(site_id=site_id, cidr=cidr, agent_id=agent_id))
        session.commit()
    return AgentCred(id=agent_id, name=name, secret=secret, site_id=site_id)


@pytest.fixture
def site_id(engine: Engine) -> int:
    with Session(engine) as session:
        site = Site(name="ekibastuz-1", licence_number="KZ-DM-0042")
        session.add(site)
        session.commit()
        assert site.id is not None
        return site.id


@pytest.fixture
def agent(engine: Engine, site_id: int) -> AgentCred:
    return make_agent(engine, site_id, "a1", ["10.1.0.0/24", "10.1.1.0/24"])


@pytest.fixture
def other_agent(engine: Engine, site_id: int) -> AgentCred:
    return make_agent(engine, site_id, "a2", ["10.2.0.0/24"])


def ts(value: datetime) -> str:
    return value.isoformat()


def batch(**items: Any) -> dict[str, Any]:
    """A batch body with a fresh id; items are observations/identities/events lists."""
    body: dict[str, Any] = {
        "contract_version": "1.0",
        "batch_id": str(uuid.uuid4()),
        "agent_clock": ts(utcnow()),
        "sequence": 1,
    }
    body.update(items)
    return body


def identity(ip: str, mac: str | None, serial: str | None, **kw: Any) -> dict[str, Any]:
    return {"ip": ip, "mac": mac, "serial": serial, "observed_at": ts(kw.pop("at", utcnow())), **kw}


def observation(ip: str, at: datetime | None = None, **kw: Any) -> dict[str, Any]:
    kw.setdefault("reachable", True)
    return {"ip": ip, "observed_at": ts(at or utcnow()), **kw}


def post(client: TestClient, agent: AgentCred, body: dict[str, Any]) -> Response:
    response: Response = client.post(REPORTS, json=body, headers=agent.headers)
    return response


def ok(client: TestClient, agent: AgentCred, body: dict[str, Any]) -> dict[str, Any]:
    response = post(client, agent, body)
    assert response.status_code == 200, response.text
    ack: dict[str, Any] = response.json()
    return ack


COUNTED = (
    Machine,
    MachineStateChange,
    LatestObservation,
    ObservationHistory,
    RegisterEvent,
    IngestedBatch,
    AuditEntry,
)


def counts(engine: Engine) -> dict[str, int]:
    with Session(engine) as session:
        return {
            model.__name__: session.exec(select(func.count()).select_from(model)).one()
            for model in COUNTED
        }


def machines(engine: Engine) -> list[Machine]:
    with Session(engine) as session:
        return list(session.exec(select(Machine).order_by(col(Machine.id))).all())


def events(engine: Engine, kind: str | None = None) -> list[RegisterEvent]:
    with Session(engine) as session:
        query = select(RegisterEvent).order_by(col(RegisterEvent.id))
        if kind is not None:
            query = query.where(RegisterEvent.kind == kind)
        return list(session.exec(query).all())


def audit(engine: Engine, action: str) -> list[AuditEntry]:
    with Session(engine) as session:
        query = select(AuditEntry).where(AuditEntry.action == action)
        return list(session.exec(query.order_by(col(AuditEntry.seq))).all())


def chain_ok(engine: Engine) -> bool:
    with Session(engine) as session:
        return verify_chain(session).ok


# --- idempotency and validation ----------------------------------------------------------------


def test_repeated_batch_returns_the_same_ack_and_adds_nothing(
    app_client: TestClient, engine: Engine, agent: AgentCred
) -> None:
    body = batch(
        identities=[identity("10.1.0.5", MAC1, "SN1")],
        observations=[observation("10.1.0.5", is_mining=True), observation("10.9.9.9")],
        events=[{"kind": "disk_full", "at": ts(utcnow()), "severity": "warning"}],
    )
    first = ok(app_client, agent, body)
    assert first["duplicate"] is False
    assert (first["identities"], first["observations"], first["events"]) == (1, 1, 1)
    assert first["refused"] == ["observation 1 (10.9.9.9): outside this agent's segments"]
    before = counts(engine)
    assert before["Machine"] == 1 and before["IngestedBatch"] == 1

    again = ok(app_client, agent, body)
    assert again == {**first, "duplicate": True}
    assert counts(engine) == before


def test_malformed_batches_get_a_precise_422_and_change_nothing(
    app_client: TestClient, engine: Engine, agent: AgentCred
) -> None:
    good_obs = observation("10.1.0.5")
    naive = observation("10.1.0.6")
    naive["observed_at"] = "2026-03-01T12:00:00"
    cases: list[tuple[dict[str, Any] | str, str, str]] = [
        (batch(contract_version="2.0"), "contract_version", "not supported"),
        (batch(contract_version="one"), "contract_version", "MAJOR.MINOR"),
        ({k: v for k, v in batch().items() if k != "batch_id"}, "batch_id", "required"),
        (batch(observations=[good_obs, naive]), "observations.1.observed_at", "timezone"),
        (batch(identities=[identity("10.1.0.999", MAC1, "SN1")]), "identities.0.ip", "IPv4"),
        (batch(observations=[observation("10.1.0.5", hashrate_ths=-1)]), "hashrate_ths", ""),
        (batch(sequence=-1), "sequence", ""),
        ('{"batch_id": ', "", "JSON"),
    ]
    for body, where, says in cases:
        if isinstance(body, str):
            response = app_client.post(
                REPORTS, content=body, headers={**agent.headers, "content-type": "application/json"}
            )
        else:
            body.setdefault("identities", [identity("10.1.0.5", MAC1, "SN1")])
            response = post(app_client, agent, body)
        assert response.status_code == 422, (where, response.text)
        detail = response.json()["detail"]
        locs = [".".join(str(p) for p in err["loc"][1:]) for err in detail]
        assert any(loc.endswith(where) for loc in locs), (where, detail)
        assert any(says.lower() in err["msg"].lower() for err in detail), (says, detail)
    assert counts(engine) == dict.fromkeys(counts(engine), 0)
    with Session(engine) as session:
        assert session.get(Agent, agent.id).last_seen_at is None  # type: ignore[union-attr]


def test_only_agents_may_report(
    app_client: TestClient, engine: Engine, agent: AgentCred, make_user: UserFactory
) -> None:
    body = batch(identities=[identity("10.1.0.5", MAC1, "SN1")])
    assert app_client.post(REPORTS, json=body).status_code == 401
    bad = {"Authorization": "Bearer afa_not-a-real-secret"}
    assert app_client.post(REPORTS, json=body, headers=bad).status_code == 401
    admin = make_user(Role.ADMIN)
    response = app_client.post(REPORTS, json=body, headers=admin.headers)
    assert response.status_code == 403
    assert counts(engine)["Machine"] == 0


def test_batch_id_of_another_agent_is_a_conflict(
    app_client: TestClient, engine: Engine, agent: AgentCred, other_agent: AgentCred
) -> None:
    body = batch(identities=[identity("10.1.0.5", MAC1, "SN1")])
    ok(app_client, agent, body)
    before = counts(engine)
    response = post(app_client, other_agent, body)
    assert response.status_code == 409
    assert "another agent" in response.json()["detail"]
    assert counts(engine) == before


def test_concurrent_deliveries_of_one_batch_apply_once(
    engine: Engine, settings: Settings, agent: AgentCred
) -> None:
    report = ReportBatch.model_validate(
        batch(
            identities=[
                identity(f"10.1.0.{i}", f"aa:bb:cc:00:01:{i:02x}", f"SN{i}") for i in range(1, 40)
            ]
        )
    )
    acks: list[BatchAck] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def deliver() -> None:
        try:
            start.wait()
            with Session(engine, expire_on_commit=False) as session:
                acks.append(ingest_batch(session, agent.principal, report, settings))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=deliver) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert sorted(a.duplicate for a in acks) == [False, True, True, True]
    assert counts(engine)["Machine"] == 39
    assert len(audit(engine, "machine.discover")) == 39
    assert chain_ok(engine)


# --- segments ----------------------------------------------------------------------------------


def test_items_outside_the_agents_segments_are_refused_and_logged(
    app_client: TestClient, engine: Engine, agent: AgentCred, other_agent: AgentCred
) -> None:
    ack = ok(
        app_client,
        agent,
        batch(
            identities=[
                identity("10.1.1.7", MAC1, "SN1"),  # its own (second) segment
                identity("10.2.0.7", MAC2, "SN2"),  # the other agent's segment
            ],
            observations=[observation("172.16.0.1")],  # nobody's
            events=[{"kind": "scan", "at": ts(utcnow()), "ip": "10.2.0.9"}],
        ),
    )
    assert ack["refused"] == [
        "identity 1 (10.2.0.7): outside this agent's segments",
        "observation 0 (172.16.0.1): outside this agent's segments",
        "event 0 (10.2.0.9): outside this agent's segments",
    ]
    assert (ack["identities"], ack["observations"], ack["events"]) == (1, 0, 0)
    assert [m.current_ip for m in machines(engine)] == ["10.1.1.7"]
    [logged] = events(engine, "report_refused")
    assert logged.severity == "warning" and logged.agent_id == agent.id
    assert logged.data["count"] == 3
    assert [i["ip"] for i in logged.data["items"]] == ["10.2.0.7", "172.16.0.1", "10.2.0.9"]
    [entry] = audit(engine, "ingest.refuse")
    assert (entry.actor, entry.actor_kind, entry.entity_id) == ("agent:a1", "agent", agent.id)
    assert entry.after is not None and entry.after["count"] == 3
    assert entry.reason == "outside the agent's segments"
    # The other agent may report its own segment.
    ok(app_client, other_agent, batch(identities=[identity("10.2.0.7", MAC2, "SN2")]))
    assert sorted(m.current_ip or "" for m in machines(engine)) == ["10.1.1.7", "10.2.0.7"]


# --- identities ----------------------------------------------------------------------------------


def test_identities_discover_then_move_and_swap_with_events_and_audit(
    app_client: TestClient, engine: Engine, agent: AgentCred
) -> None:
    earlier = utcnow() - timedelta(hours=1)
    ok(
        app_client,
        agent,
        batch(
            identities=[
                identity(
                    "10.1.0.5",
                    "AA-BB-CC-00-00-01",
                    "htm3x01",
                    at=earlier,
                    control_board_serial="CB1",
                    hashboard_serials=["HB1", "HB2", "HB3"],
                    make="Bitmain",
                    model="S19j Pro",
                )
            ]
        ),
    )
    [m] = machines(engine)
    assert m.lifecycle_state == LifecycleState.DISCOVERED
    assert (m.mac, m.reported_serial, m.current_ip) == (MAC1, "HTM3X01", "10.1.0.5")
    assert (m.site_id, m.agent_id, m.vendor) == (agent.site_id, agent.id, "Bitmain")
    assert m.hashboard_serials == ["HB1", "HB2", "HB3"]
    assert m.first_seen == m.last_seen == earlier
    with Session(engine) as session:
        [change] = session.exec(select(MachineStateChange)).all()
    assert (change.from_state, change.to_state, change.actor) == (None, "discovered", "agent:a1")
    [discovered] = events(engine, "machine_discovered")
    assert discovered.machine_pk == m.id and discovered.agent_id == agent.id
    [entry] = audit(engine, "machine.discover")
    assert (entry.actor, entry.actor_kind, entry.entity_id) == ("agent:a1", "agent", m.machine_id)
    assert entry.after is not None and entry.after["mac"] == MAC1
    assert entry.source == "testclient"

    # Moved: same identity, another address.
    ok(app_client, agent, batch(identities=[identity("10.1.0.6", MAC1, "HTM3X01", at=earlier)]))
    [moved] = events(engine, "machine_moved")
    assert moved.data["from_ip"] == "10.1.0.5" and moved.data["to_ip"] == "10.1.0.6"
    [entry] = audit(engine, "machine.reconcile")
    assert entry.before == {"current_ip": "10.1.0.5"} and entry.after == {"current_ip": "10.1.0.6"}
    assert entry.reason == "machine_moved"

    # Control board replaced: same serial, new MAC and board serial, at the same address.
    new_board = identity("10.1.0.6", MAC2, "HTM3X01", control_board_serial="CB2")
    ok(app_client, agent, batch(identities=[new_board]))
    [swap] = events(engine, "control_board_swap")
    assert swap.severity == "warning"
    assert swap.data["mac"] == [MAC1, MAC2]
    assert swap.data["control_board_serial"] == ["CB1", "CB2"]
    entry = audit(engine, "machine.reconcile")[-1]
    assert entry.after == {"mac": MAC2, "control_board_serial": "CB2"}

    # Hashboard replaced.
    boards = identity("10.1.0.6", MAC2, "HTM3X01", hashboard_serials=["HB1", "HB7", "HB3"])
    ok(app_client, agent, batch(identities=[boards]))
    [hb] = events(engine, "hashboard_swap")
    assert hb.data["added"] == ["HB7"] and hb.data["removed"] == ["HB2"]

    # Same MAC, another serial: flagged for a technician.
    ok(app_client, agent, batch(identities=[identity("10.1.0.6", MAC2, "OTHER-SN")]))
    [changed] = events(engine, "serial_changed")
    assert changed.severity == "warning"
    [m] = machines(engine)
    assert m.reported_serial == "OTHER-SN" and m.serial_unconfirmed is True
    assert "serial_changed" in m.flags
    assert m.record_version == 5
    assert chain_ok(engine)


def test_duplicate_serial_and_unreadable_serial_through_http(
    app_client: TestClient, engine: Engine, agent: AgentCred
) -> None:
    ack = ok(
        app_client,
        agent,
        batch(
            identities=[
                identity("10.1.0.1", MAC1, "SN1"),
                identity("10.1.0.2", MAC2, "SN1"),
                identity("10.1.0.3", "aa:bb:cc:00:00:03", ""),
                identity("10.1.0.4", None, "unknown"),
            ]
        ),
    )
    assert ack["identities"] == 3
    assert ack["refused"] == ["identity 3 (10.1.0.4): neither a readable serial nor a MAC"]
    found = {m.current_ip: m for m in machines(engine)}
    assert set(found) == {"10.1.0.1", "10.1.0.2", "10.1.0.3"}
    assert "duplicate_serial" in found["10.1.0.1"].flags
    assert "duplicate_serial" in found["10.1.0.2"].flags
    assert found["10.1.0.3"].serial_unconfirmed is True
    assert len(events(engine, "duplicate_serial")) == 2
    assert len(events(engine, "serial_unreadable")) == 1
    [unusable] = events(engine, "identity_unusable")
    assert unusable.ip == "10.1.0.4" and unusable.machine_pk is None


# --- observations --------------------------------------------------------------------------------


def discover(client: TestClient, agent: AgentCred, ip: str, mac: str, serial: str) -> Machine:
    ok(
        client,
        agent,
        batch(identities=[identity(ip, mac, serial, at=utcnow() - timedelta(days=1))]),
    )
    return next(m for m in machines_of(client) if m.current_ip == ip)


def machines_of(client: TestClient) -> list[Machine]:
    engine: Engine = client.app.state.engine  # type: ignore[attr-defined]
    return machines(engine)


def history(engine: Engine) -> list[ObservationHistory]:
    with Session(engine) as session:
        query = select(ObservationHistory).order_by(col(ObservationHistory.observed_at))
        return list(session.exec(query).all())


def latest(engine: Engine, pk: int | None) -> LatestObservation:
    with Session(engine) as session:
        row = session.get(LatestObservation, pk)
        assert row is not None
        return row


def test_observations_keep_latest_history_buckets_and_last_seen(
    app_client: TestClient, engine: Engine, agent: AgentCred, settings: Settings
) -> None:
    m = discover(app_client, agent, "10.1.0.5", MAC1, "SN1")
    step = settings.history_resolution_s
    t0 = datetime.fromtimestamp((utcnow().timestamp() // step - 12) * step, UTC)
    pools = [{"url": "stratum+tcp://dmp.kz:3333", "user": "acct.M1", "status": "alive"}]

    def send(at: datetime, **kw: Any) -> dict[str, Any]:
        return ok(app_client, agent, batch(observations=[observation("10.1.0.5", at, **kw)]))

    assert send(t0, hashrate_ths=95.5, power_w=3250, pools=pools)["observations"] == 1
    send(t0 + timedelta(seconds=60), hashrate_ths=96.0)  # same bucket: history keeps the first
    send(t0 + timedelta(seconds=step + 1), hashrate_ths=97.0)  # next bucket
    rows = history(engine)
    assert [(r.observed_at, r.hashrate_ths) for r in rows] == [
        (t0, 95.5),
        (t0 + timedelta(seconds=step + 1), 97.0),
    ]
    assert rows[0].pools == pools and rows[0].bucket == int(t0.timestamp()) // step
    newest = latest(engine, m.id)
    assert (newest.observed_at, newest.hashrate_ths, newest.ip) == (
        t0 + timedelta(seconds=step + 1),
        97.0,
        "10.1.0.5",
    )
    [m] = machines(engine)
    assert m.last_seen == t0 + timedelta(seconds=step + 1)

    # A replayed older poll changes neither the latest row nor last_seen.
    send(t0 + timedelta(seconds=30), hashrate_ths=1.0)
    assert latest(engine, m.id).hashrate_ths == 97.0
    assert len(history(engine)) == 2
    # An unreachable poll is the latest news but not a sighting.
    later = t0 + timedelta(seconds=2 * step + 5)
    send(later, reachable=False, error="timeout")
    assert latest(engine, m.id).reachable is False and latest(engine, m.id).error == "timeout"
    assert machines(engine)[0].last_seen == t0 + timedelta(seconds=step + 1)
    # A poll stamped a little ahead (within the allowed skew) counts as seen now, not then.
    before = utcnow()
    send(utcnow() + timedelta(seconds=settings.report_max_skew_s // 2))
    seen = machines(engine)[0].last_seen
    assert seen is not None and before <= seen <= utcnow()


def test_observations_for_unknown_addresses_are_refused_and_macs_followed(
    app_client: TestClient, engine: Engine, agent: AgentCred
) -> None:
    m = discover(app_client, agent, "10.1.0.5", MAC1, "SN1")
    ack = ok(
        app_client,
        agent,
        batch(
            observations=[
                observation("10.1.0.8"),  # nothing known there
                observation("10.1.0.9", mac="AA-BB-CC-00-00-01"),  # our machine, readdressed
                observation("10.1.0.5", mac=MAC2),  # the old address, now another device
            ]
        ),
    )
    assert ack["observations"] == 1
    assert ack["refused"] == [
        "observation 0 (10.1.0.8): no machine known at this address (report its identity first)",
        "observation 2 (10.1.0.5): no machine known at this address (report its identity first)",
    ]
    assert latest(engine, m.id).ip == "10.1.0.9"
    assert machines(engine)[0].current_ip == "10.1.0.5"  # only identities move machines
    assert events(engine, "report_refused") == []  # unknown is not a violation


def test_hashing_but_unregistered_is_alerted_once_per_condition(
    app_client: TestClient, engine: Engine, agent: AgentCred
) -> None:
    m = discover(app_client, agent, "10.1.0.5", MAC1, "SN1")
    for _ in range(2):
        ok(app_client, agent, batch(observations=[observation("10.1.0.5", is_mining=True)]))
    [alert] = events(engine, "unregistered_hashing")
    assert alert.severity == "critical" and alert.machine_pk == m.id and alert.resolved_at is None
    assert "unregistered_hashing" in machines(engine)[0].flags
    ok(app_client, agent, batch(observations=[observation("10.1.0.5", is_mining=False)]))
    [alert] = events(engine, "unregistered_hashing")
    assert alert.resolved_at is not None
    assert "unregistered_hashing" not in machines(engine)[0].flags


def test_agent_events_are_recorded_against_their_machine(
    app_client: TestClient, engine: Engine, agent: AgentCred
) -> None:
    m = discover(app_client, agent, "10.1.0.5", MAC1, "SN1")
    at = utcnow() - timedelta(minutes=3)
    ok(
        app_client,
        agent,
        batch(
            events=[
                {"kind": "miner_unreachable", "at": ts(at), "severity": "warning",
                 "ip": "10.1.0.5", "detail": "3 polls timed out"},
                {"kind": "outbox_full", "at": ts(at), "severity": "critical"},
            ]
        ),
    )  # fmt: skip
    unreachable, full = events(engine, "miner_unreachable")[0], events(engine, "outbox_full")[0]
    assert (unreachable.machine_pk, unreachable.at, unreachable.detail) == (
        m.id,
        at,
        "3 polls timed out",
    )
    assert unreachable.agent_id == agent.id and unreachable.data == {"origin": "agent"}
    assert full.machine_pk is None and full.severity == "critical"
    with Session(engine) as session:
        seen = session.get(Agent, agent.id)
        assert seen is not None and seen.last_seen_at is not None
        assert seen.last_address == "testclient"


# --- missing -------------------------------------------------------------------------------------


def test_missing_machines_are_flagged_and_return_when_seen(
    app_client: TestClient, engine: Engine, agent: AgentCred
) -> None:
    m = discover(app_client, agent, "10.1.0.5", MAC1, "SN1")
    with Session(engine) as session:
        row = session.get(Machine, m.id)
        assert row is not None
        row.lifecycle_state = LifecycleState.ACTIVE
        session.add(row)
        session.commit()
    now = utcnow()
    with Session(engine) as session:
        assert sweep_missing(session, now=now, after=timedelta(minutes=15)) == 1
    with Session(engine) as session:
        assert sweep_missing(session, now=now, after=timedelta(minutes=15)) == 0  # once
    [missing] = events(engine, "machine_missing")
    assert missing.machine_pk == m.id and missing.resolved_at is None
    assert "machine_missing" in machines(engine)[0].flags
    [entry] = audit(engine, "machine.reconcile")
    assert entry.actor_kind == "system" and entry.reason == "machine_missing"

    ok(app_client, agent, batch(observations=[observation("10.1.0.5")]))
    [missing] = events(engine, "machine_missing")
    assert missing.resolved_at is not None
    assert len(events(engine, "machine_returned")) == 1
    assert machines(engine)[0].flags == []
    assert chain_ok(engine)
