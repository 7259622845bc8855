"""Property: whatever a machine went through, every export row agrees with its compliance
timeline, and no hour outside the machine's life or the clock is counted.

Hypothesis generates small fleets and their histories — drifts to a foreign pool, wrong
workers, fixes, control-board swaps, outages, silent gaps, approved exemptions and
decommissioning — and feeds them through the real paths: discovery and polls through batch
ingestion (``ingest_batch``), claims and lifecycle moves through ``controller.register``. The
expected answer is computed here from the generated history alone (an oracle that knows
nothing of intervals), then compared with the register as of a random moment and the
compliance report for a random period and a random "now" inside the history.

Each example uses a site, agent and loopback /24 of its own, so examples share one database
and the exports are filtered by site.
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from contract import IdentityRecord, Observation, PoolReading, ReportBatch
from controller import register
from controller.actors import ConsoleActor
from controller.api.deps import Principal
from controller.exports.compliance_report import ComplianceQuery, build_compliance
from controller.exports.register import INDEX, RegisterQuery, build_register
from controller.ingest import ingest_batch
from controller.models import (
    Agent,
    Exemption,
    LifecycleState,
    Machine,
    PoolSet,
    PoolSetStatus,
    Segment,
    Site,
)
from controller.register import ClaimRequest, StateChangeRequest
from controller.settings import Settings

STEP = timedelta(minutes=5)  # one poll per history bucket, so the history is exact
STALE = timedelta(minutes=15)
URLS = ["stratum+tcp://dmp.example.kz:3333", "stratum+tcp://dmp2.example.kz:3333"]
EVIL = "stratum+tcp://pool.hijack.example:3333"
ACCOUNT = "kzfarm"
TECH = ConsoleActor(name="tech:prop")
STEPS = 14
_examples = itertools.count(1)

POLLS = ("good", "evil", "worker", "down", "silent")


@dataclass(frozen=True)
class Plan:
    """One machine's generated history (steps are 5-minute ticks)."""

    discovered: int
    polls: tuple[str, ...]  # one per step from discovery on
    swap: int | None
    exemption: tuple[int, int] | None
    decommissioned: int | None


@st.composite
def plans(draw: Any) -> Plan:
    discovered = draw(st.integers(0, 4))
    polls = tuple(
        draw(
            st.lists(
                st.sampled_from(POLLS), min_size=STEPS - discovered, max_size=STEPS - discovered
            )
        )
    )
    swap = draw(st.none() | st.integers(discovered + 1, STEPS - 1))
    exemption = None
    if draw(st.booleans()):
        a = draw(st.integers(discovered, STEPS - 1))
        exemption = (a, draw(st.integers(a + 1, STEPS + 1)))
    decommissioned = draw(st.none() | st.integers(discovered + 1, STEPS))
    return Plan(discovered, polls, swap, exemption, decommissioned)


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@dataclass
class Truth:
    """What the oracle knows of one machine."""

    machine_id: str
    first_seen: datetime
    decommissioned: datetime | None
    polls: list[tuple[datetime, str, str]]  # (at, status, configured pools as text)
    worker: str


def pools_for(kind: str, worker: str) -> list[PoolReading]:
    good = [PoolReading(url=u, user=worker) for u in URLS]
    if kind == "evil":
        return [PoolReading(url=EVIL, user="bc1qthief.rig"), *good[1:]]
    if kind == "worker":
        return [PoolReading(url=u, user=f"{ACCOUNT}.someone-else") for u in URLS]
    return good


def text_of(pools: list[PoolReading]) -> str:
    return "; ".join(f"{p.url} ({p.user})" for p in pools)


def build_history(
    engine: Engine, cfg: Settings, clock: Clock, fleet: list[Plan], t0: datetime, n: int
) -> tuple[str, list[Truth]]:
    site_name, agent_id = f"prop-{n}", f"AGPROP{n}"
    subnet = f"127.{89 + n // 250}.{n % 250}"  # a /24 of its own (127.89.0.0 upwards)
    with Session(engine) as session:
        site = Site(name=site_name, licence_number=f"KZ-P-{n}")
        session.add(site)
        session.flush()
        assert site.id is not None
        session.add(Agent(id=agent_id, name=agent_id, site_id=site.id, secret_hash="x"))
        session.flush()
        session.add(Segment(site_id=site.id, cidr=f"{subnet}.0/24", agent_id=agent_id))
        session.add(
            PoolSet(site_id=site.id, version=1, name="DMP", urls=URLS, account=ACCOUNT,
                    status=PoolSetStatus.APPROVED, proposed_by="a", decided_by="b",
                    decided_at=t0 - timedelta(days=1), password="x")
        )  # fmt: skip
        session.commit()
        site_id = site.id
    agent = Principal(
        kind="agent", name=f"agent:{agent_id}", agent_id=agent_id, site_id=site_id, source="t"
    )
    sequence = itertools.count(1)

    def send(at: datetime, **items: Any) -> None:
        with Session(engine) as session:
            batch = ReportBatch(
                batch_id=uuid.uuid4(), agent_clock=at, sequence=next(sequence), **items
            )
            ack = ingest_batch(session, agent, batch, cfg, now=at)
            assert not ack.refused, ack.refused

    def identity(i: int, at: datetime, board: str) -> IdentityRecord:
        return IdentityRecord(
            ip=f"{subnet}.{i + 10}",  # type: ignore[arg-type]
            observed_at=at, mac=f"aa:89:{n % 250:02x}:{i:02x}:{board == 'B':02x}:01",
            serial=f"SN-{n}-{i}", serial_source="api", control_board_serial=f"CB{i}{board}",
            make="Bitmain", model="Antminer S19 Pro", firmware="stock", firmware_version="1",
        )  # fmt: skip

    truths: dict[int, Truth] = {}
    for step in range(STEPS):
        tick = t0 + step * STEP
        for i, plan in enumerate(fleet):
            if plan.discovered == step:
                send(tick, identities=[identity(i, tick, "A")])
                with Session(engine) as session:
                    machine = session.exec(
                        select(Machine).where(Machine.reported_serial == f"SN-{n}-{i}")
                    ).one()
                    mid, pk = machine.machine_id, machine.id
                    assert pk is not None
                    if plan.exemption is not None:
                        a, b = plan.exemption
                        session.add(
                            Exemption(machine_pk=pk, reason="maintenance", requested_by="c1",
                                      approved_by="c2", approved_at=tick,
                                      starts_at=t0 + a * STEP + timedelta(seconds=30),
                                      ends_at=t0 + b * STEP + timedelta(seconds=30))
                        )  # fmt: skip
                    session.commit()
                clock.now = tick + timedelta(seconds=10)
                with Session(engine) as session:
                    register.claim(
                        session, TECH, mid,
                        ClaimRequest(site=site_name, container="C1", rack="R1", shelf="S1",
                                     slot=str(i + 1), label_serial=f"SN-{n}-{i}"),
                    )  # fmt: skip
                    session.commit()
                clock.now = tick + timedelta(seconds=20)
                with Session(engine) as session:
                    register.change_state(
                        session, TECH, mid, StateChangeRequest(state=LifecycleState.ACTIVE)
                    )
                    session.commit()
                truths[i] = Truth(mid, tick, None, [], f"{ACCOUNT}.{mid}")
            if plan.swap == step:
                send(tick, identities=[identity(i, tick, "B")])
            if plan.decommissioned == step and i in truths:
                clock.now = tick + timedelta(seconds=30)
                with Session(engine) as session:
                    register.change_state(
                        session, TECH, truths[i].machine_id,
                        StateChangeRequest(state=LifecycleState.DECOMMISSIONED, reason="sold"),
                    )  # fmt: skip
                    session.commit()
                truths[i].decommissioned = clock.now
        observations = []
        at = tick + timedelta(minutes=1)
        for i, plan in enumerate(fleet):
            if i not in truths or step < plan.discovered:
                continue
            if plan.decommissioned is not None and step >= plan.decommissioned:
                continue  # unplugged
            kind = plan.polls[step - plan.discovered]
            if kind == "silent":
                continue
            truth = truths[i]
            ip = f"{subnet}.{i + 10}"
            if kind == "down":
                observations.append(
                    Observation(ip=ip, observed_at=at, reachable=False, error="timeout")  # type: ignore[arg-type]
                )
                truth.polls.append((at, "unknown", ""))
                continue
            pools = pools_for(kind, truth.worker)
            observations.append(Observation(ip=ip, observed_at=at, reachable=True, pools=pools))  # type: ignore[arg-type]
            status = "compliant" if kind == "good" else "non_compliant"
            if plan.exemption is not None:
                a, b = plan.exemption
                if (
                    t0 + a * STEP + timedelta(seconds=30)
                    <= at
                    < t0 + b * STEP + timedelta(seconds=30)
                ):
                    status = "exempt"
            truth.polls.append((at, status, text_of(pools)))
        if observations:
            send(at, observations=observations)
    return site_name, list(truths.values())


def status_at(truth: Truth, moment: datetime) -> tuple[str, str, str | None, datetime | None]:
    """(status, configured pools, worker, last check) as of ``moment`` per the oracle."""
    before = [p for p in truth.polls if p[0] <= moment]
    if not before:
        return "unknown", "", None, None
    at, status, pools = before[-1]
    return status, pools, truth.worker, at


def seconds_by_status(truth: Truth, lo: datetime, hi: datetime) -> dict[str, float]:
    """The oracle's time shares over [lo, hi): a poll's status holds until the next poll;
    after the last poll, for ``STALE``; before the first and after that, unknown."""
    out = dict.fromkeys(("compliant", "non_compliant", "unknown", "exempt"), 0.0)
    edges: list[tuple[datetime, datetime, str]] = []
    polls = truth.polls
    for index, (at, status, _pools) in enumerate(polls):
        end = polls[index + 1][0] if index + 1 < len(polls) else at + STALE
        edges.append((at, end, status))
    covered = 0.0
    for start, end, status in edges:
        span = (min(end, hi) - max(start, lo)).total_seconds()
        if span > 0:
            out[status] += span
            covered += span
    out["unknown"] += max(0.0, (hi - lo).total_seconds() - covered)
    return out


T0 = datetime(2026, 4, 1, tzinfo=UTC)


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    fleet=st.lists(plans(), min_size=1, max_size=3),
    as_of_s=st.integers(-600, (STEPS + 4) * 300),
    period=st.tuples(st.integers(-3600, STEPS * 300), st.integers(60, 3 * 3600)),
    now_s=st.integers(0, (STEPS + 6) * 300),
)
def test_every_export_row_agrees_with_the_timeline(
    engine: Engine,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    fleet: list[Plan],
    as_of_s: int,
    period: tuple[int, int],
    now_s: int,
) -> None:
    clock = Clock()
    monkeypatch.setattr(register, "utcnow", clock)
    n = next(_examples)
    t0 = T0 + timedelta(days=n)  # each example on its own day and site
    site, truths = build_history(engine, settings, clock, fleet, t0, n)
    by_id = {t.machine_id: t for t in truths}

    # the register as of a moment
    as_of = t0 + timedelta(seconds=as_of_s)
    with Session(engine) as session:
        table = build_register(
            session, RegisterQuery(as_of=as_of, site=site), settings.history_resolution_s
        )
    listed = {row[INDEX["machine_id"]]: row for row in table.rows}
    assert set(listed) == {t.machine_id for t in truths if t.first_seen <= as_of}
    for machine_id, row in listed.items():
        status, pools, worker, checked = status_at(by_id[machine_id], as_of)
        got = (
            row[INDEX["pool_compliance"]],
            row[INDEX["configured_pools"]] or "",
            row[INDEX["worker_name"]],
            row[INDEX["last_pool_check"]],
        )
        assert got == (status, pools, worker, checked), (machine_id, as_of)
        if status == "compliant":  # the headline: compliant sits next to the approved set
            assert pools == "; ".join(f"{u} ({worker})" for u in URLS)

    # the compliance report for a period, made at "now"
    start = t0 + timedelta(seconds=period[0])
    end = start + timedelta(seconds=period[1])
    now = t0 + timedelta(seconds=now_s)
    with Session(engine) as session:
        report = build_compliance(
            session, ComplianceQuery((start, end), site, now=now, stale_after=STALE), "en"
        )
    rows = {r[0]: r for r in report.machines.rows}
    expected: dict[str, tuple[float, ...]] = {}
    for truth in truths:
        lo = max(start, truth.first_seen)
        hi = min(end, now, truth.decommissioned or end)
        if truth.first_seen >= end or hi <= lo:
            continue  # not on the register yet, or no hour of its life in the period so far
        shares = seconds_by_status(truth, lo, hi)
        statuses = ("compliant", "non_compliant", "unknown", "exempt")
        expected[truth.machine_id] = (
            round((hi - lo).total_seconds() / 3600, 2),
            *(round(shares[s] / 3600, 2) for s in statuses),
        )
    assert set(rows) == set(expected), (start, end, now)
    for machine_id, row in rows.items():
        got_h = (row[4], row[6], row[7], row[8], row[9])
        assert got_h == pytest.approx(expected[machine_id], abs=0.011), (machine_id, start, end)
        # never more hours than the machine lived in the period up to now
        assert row[4] * 3600 <= (min(end, now) - start).total_seconds() + 36
