"""Compliance evidence, on SQLite and PostgreSQL: report batches go through the real ingest
path (``POST /api/v1/agent/reports``); the evidence is read back through the API and the CLI.

The controller judges every poll itself against the site's approved pool set; the agent's
enforcement events add when it wrote and when it verified.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from httpx import Response
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from contract import EnforcementEvent, EnforcementFacts, PoolReading, PoolStatus
from controller.compliance_logic import (
    IncidentRow,
    IntervalRow,
    Signal,
    Verdict,
    is_repeat_offender,
    percentile,
    plan_machine,
    streak_start,
)
from controller.evidence_report import compliance_status
from controller.models import (
    Agent,
    ComplianceInterval,
    DriftIncident,
    Exemption,
    Machine,
    PoolSet,
    PoolSetStatus,
    RegisterEvent,
    Role,
    Segment,
    Site,
    SitePolicy,
)
from controller.security import AGENT_SECRET_PREFIX, new_token, token_hash
from controller.settings import Settings
from tests.controller.conftest import CliInvoker, TestUser, UserFactory

REPORTS = "/api/v1/agent/reports"
IP, MAC, SERIAL = "127.77.0.5", "aa:bb:cc:77:00:05", "SN-EVIDENCE-1"
DMP = ["stratum+tcp://dmp.example.kz:3333", "stratum+tcp://dmp-backup.example.kz:3333"]
EVIL = "stratum+tcp://evil.example.net:4444"
T0 = datetime(2026, 3, 2, 8, 0, tzinfo=UTC)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """These histories are replayed from T0 (March 2026): accept reports that old."""
    return settings.model_copy(update={"report_max_age_days": 3650})


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


@dataclass
class Farm:
    client: TestClient
    engine: Engine
    site_id: int
    secret: str
    machine_id: str
    user: TestUser
    sequence: int = 0

    @property
    def worker(self) -> str:
        return f"farm.{self.machine_id}"

    def post(self, *, observations: Any = (), events: Any = (), identities: Any = ()) -> None:
        self.sequence += 1
        body = {
            "contract_version": "1.1",
            "batch_id": str(uuid.uuid4()),
            "agent_clock": datetime.now(UTC).isoformat(),
            "sequence": self.sequence,
            "observations": list(observations),
            "identities": list(identities),
            "events": list(events),
        }
        response = self.client.post(
            REPORTS, json=body, headers={"Authorization": f"Bearer {self.secret}"}
        )
        assert response.status_code == 200, response.text
        assert response.json()["refused"] == []

    def poll(self, when: datetime, pools: list[dict[str, Any]] | None) -> dict[str, Any]:
        """An observation: ``None`` pools means the miner did not answer."""
        if pools is None:
            return {
                "ip": IP,
                "observed_at": when.isoformat(),
                "reachable": False,
                "error": "timeout",
            }
        return {"ip": IP, "observed_at": when.isoformat(), "reachable": True, "pools": pools}

    def good(self) -> list[dict[str, Any]]:
        return [{"url": url, "user": self.worker, "status": "alive"} for url in DMP]

    def evil(self) -> list[dict[str, Any]]:
        return [{"url": EVIL, "user": "thief.rig1"}, *self.good()[1:]]

    def event(self, kind: str, when: datetime, **facts: Any) -> dict[str, Any]:
        data = EnforcementFacts(machine_id=self.machine_id, **facts).model_dump(mode="json")
        return {"kind": kind, "at": when.isoformat(), "ip": IP, "data": data}

    def get(self, path: str, **params: Any) -> Any:
        response: Response = self.client.get(path, params=params, headers=self.user.headers)
        assert response.status_code == 200, response.text
        return response.json()

    def timeline(self, start: datetime = T0 - timedelta(hours=1), hours: float = 48) -> Any:
        end = start + timedelta(hours=hours)
        return self.get(
            f"/api/v1/machines/{self.machine_id}/compliance",
            start=start.isoformat(),
            end=end.isoformat(),
        )

    def drift_and_fix(self, minute: float) -> None:
        """Malware changes slot 1; the agent detects, writes, verifies (one batch)."""
        self.post(
            observations=[
                self.poll(at(minute), self.evil()),
                self.poll(at(minute + 1), self.good()),
            ],
            events=[
                self.event("pool_drift", at(minute), detected_at=at(minute).isoformat()),
                self.event("pool_write", at(minute + 0.5), written_at=at(minute + 0.5).isoformat()),
                self.event(
                    "pool_verified",
                    at(minute + 1),
                    written_at=at(minute + 0.5).isoformat(),
                    verified_at=at(minute + 1).isoformat(),
                    attempts=1,
                ),
            ],
        )


def make_farm(
    app_client: TestClient, engine: Engine, make_user: UserFactory, mode: str = "enforce"
) -> Farm:
    secret = new_token(AGENT_SECRET_PREFIX)
    with Session(engine) as session:
        site = Site(name="ekibastuz-2", licence_number="KZ-DM-0043")
        session.add(site)
        session.flush()
        assert site.id is not None
        session.add(Agent(id="AGEV", name="ev", site_id=site.id, secret_hash=token_hash(secret)))
        session.flush()
        session.add(Segment(site_id=site.id, cidr="127.77.0.0/24", agent_id="AGEV"))
        session.add(
            PoolSet(
                site_id=site.id,
                version=1,
                name="KZ DMP One",
                urls=DMP,
                account="farm",
                status=PoolSetStatus.APPROVED,
                proposed_by="alice",
                decided_by="bob",
                decided_at=T0 - timedelta(days=1),
            )
        )
        session.add(SitePolicy(site_id=site.id, mode=mode))
        session.commit()
        site_id = site.id
    farm = Farm(app_client, engine, site_id, secret, "", make_user(Role.INSPECTOR))
    farm.post(identities=[{"ip": IP, "mac": MAC, "serial": SERIAL, "observed_at": T0.isoformat()}])
    with Session(engine) as session:
        farm.machine_id = session.exec(select(Machine.machine_id)).one()
    return farm


@pytest.fixture
def farm(app_client: TestClient, engine: Engine, make_user: UserFactory) -> Farm:
    return make_farm(app_client, engine, make_user)


def intervals(timeline: Any) -> list[tuple[str, str, str | None]]:
    return [(i["status"], i["started_at"], i["ended_at"]) for i in timeline["intervals"]]


def iso(value: datetime) -> str:
    """How the API renders a UTC time."""
    return value.isoformat().replace("+00:00", "Z")


# --- through ingest ----------------------------------------------------------------------------


def test_drift_corrected_by_the_agent_is_one_verified_incident(farm: Farm) -> None:
    farm.post(observations=[farm.poll(at(0), farm.good())])
    # The agent saw the drift at minute 9, before the minute-10 poll that reached us.
    farm.post(
        observations=[farm.poll(at(10), farm.evil())],
        events=[
            farm.event(
                "pool_drift",
                at(9),
                detected_at=at(9).isoformat(),
                observed=[PoolReading.model_validate(p) for p in farm.evil()],
                problems=["slot 1"],
            )
        ],
    )
    # Next batch: write at 10:30, verified at 11:00, and the read-back poll at 11:00.
    farm.post(
        observations=[farm.poll(at(11), farm.good())],
        events=[
            farm.event("pool_write", at(10.5), written_at=at(10.5).isoformat(), attempts=1),
            farm.event(
                "pool_verified",
                at(11),
                written_at=at(10.5).isoformat(),
                verified_at=at(11).isoformat(),
                attempts=1,
            ),
        ],
    )
    timeline = farm.timeline()
    assert intervals(timeline) == [
        ("compliant", iso(at(0)), iso(at(9))),
        ("non_compliant", iso(at(9)), iso(at(11))),
        ("compliant", iso(at(11)), None),
    ]
    assert f"slot 1: {EVIL} is not {DMP[0]}" in timeline["intervals"][1]["cause"]
    assert "worker 'thief.rig1'" in timeline["intervals"][1]["cause"]
    [incident] = timeline["incidents"]
    assert incident["detected_at"] == iso(at(9))
    assert (incident["action"], incident["action_at"]) == ("write", iso(at(10.5)))
    assert (incident["verified_at"], incident["outcome"]) == (iso(at(11)), "verified")
    assert incident["attempts"] == 1 and incident["detect_to_verified_s"] == 120
    assert incident["observed"][0]["url"] == EVIL
    assert timeline["current_status"] == "compliant" and timeline["repeat_offender"] is False
    # The events themselves keep the agent's facts.
    with Session(farm.engine) as session:
        stored = session.exec(
            select(RegisterEvent).where(RegisterEvent.kind == "pool_verified")
        ).one()
    assert datetime.fromisoformat(stored.data["verified_at"]) == at(11)
    assert stored.data["origin"] == "agent"


def test_unreachable_poll_opens_an_unknown_interval_with_the_error(farm: Farm) -> None:
    farm.post(observations=[farm.poll(at(0), farm.good()), farm.poll(at(1), None)])
    farm.post(observations=[farm.poll(at(2), None), farm.poll(at(3), farm.good())])
    timeline = farm.timeline()
    assert intervals(timeline) == [
        ("compliant", iso(at(0)), iso(at(1))),
        ("unknown", iso(at(1)), iso(at(3))),
        ("compliant", iso(at(3)), None),
    ]
    assert timeline["intervals"][1]["cause"] == "timeout"
    assert timeline["incidents"] == []


def test_an_older_batch_replayed_late_does_not_rewrite_the_timeline(farm: Farm) -> None:
    farm.post(observations=[farm.poll(at(0), farm.good()), farm.poll(at(5), farm.good())])
    # Older than the newest poll that confirmed the open interval (at 5): it cannot start a
    # state that a newer poll already contradicts, so it is ignored, like one older than the
    # interval's start.
    farm.post(observations=[farm.poll(at(3), farm.evil())])
    farm.post(observations=[farm.poll(at(2), farm.good())])
    farm.post(observations=[farm.poll(at(6), farm.evil())])  # newer: a real change
    timeline = farm.timeline()
    assert intervals(timeline) == [
        ("compliant", iso(at(0)), iso(at(6))),
        ("non_compliant", iso(at(6)), None),
    ]


def test_malware_machine_is_fixed_every_time_and_flagged_once_as_repeat_offender(
    farm: Farm, cli: CliInvoker
) -> None:
    farm.post(observations=[farm.poll(at(0), farm.good())])
    for hour in (1, 5, 9, 13):
        farm.drift_and_fix(hour * 60)
    timeline = farm.timeline()
    assert [(i["outcome"], i["action"]) for i in timeline["incidents"]] == [
        ("verified", "write")
    ] * 4
    assert [i["detect_to_verified_s"] for i in timeline["incidents"]] == [60.0] * 4
    assert timeline["repeat_offender"] is True and timeline["current_status"] == "compliant"
    with Session(farm.engine) as session:
        raised = session.exec(
            select(RegisterEvent).where(RegisterEvent.kind == "repeat_offender")
        ).all()
    assert len(raised) == 1, "raised once per streak, not for every drift after the third"
    assert raised[0].severity == "critical" and farm.machine_id in raised[0].detail

    result = cli("compliance", "status", "--period", "2026-03-02..2026-03-03", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    fleet = report["fleet"]
    assert fleet["repeat_offenders"] == [farm.machine_id]
    assert (fleet["incidents_opened"], fleet["incidents_verified"], fleet["incidents_open"]) == (
        4,
        4,
        0,
    )
    assert fleet["detect_to_verified_p50_s"] == 60 and fleet["detect_to_verified_p95_s"] == 60
    assert [s["site"] for s in report["sites"]] == ["ekibastuz-2"]
    assert any(a["kind"] == "repeat_offender" for a in report["alerts"])


def test_time_shares_over_a_period_are_exact(farm: Farm) -> None:
    farm.post(observations=[farm.poll(at(0), farm.good()), farm.poll(at(30), farm.evil())])
    farm.post(observations=[farm.poll(at(45), None), farm.poll(at(60), farm.good())])
    farm.post(observations=[farm.poll(at(90), farm.good()), farm.poll(at(120), farm.good())])
    with Session(farm.engine) as session:
        report = compliance_status(session, "ekibastuz-2", at(0), at(120), now=at(120))
    s = report.fleet
    assert (s.compliant_pct, s.non_compliant_pct, s.unknown_pct, s.exempt_pct) == (
        75.0,
        12.5,
        12.5,
        0.0,
    )
    assert s.machines_tracked == 1 and s.tracked_hours == 2.0
    # Observe mode is not set here: the agent never reported an action, the incident is open.
    assert (s.incidents_opened, s.incidents_open) == (1, 0)  # closed by the compliant poll
    # A machine silent for longer than the stale limit counts as unknown after it.
    with Session(farm.engine) as session:
        later = compliance_status(session, None, at(120), at(180), now=at(180))
    assert later.fleet.compliant_pct == 25.0 and later.fleet.unknown_pct == 75.0


def test_observe_mode_records_the_incident_with_no_action_and_keeps_it_open(
    app_client: TestClient, engine: Engine, make_user: UserFactory, cli: CliInvoker
) -> None:
    farm = make_farm(app_client, engine, make_user, mode="observe")
    now = datetime.now(UTC).replace(microsecond=0)
    farm.post(observations=[farm.poll(now - timedelta(minutes=5), farm.good())])
    farm.post(
        observations=[farm.poll(now - timedelta(minutes=4), farm.evil())],
        events=[farm.event("pool_drift", now - timedelta(minutes=4), dry_run=True)],
    )
    farm.post(observations=[farm.poll(now - timedelta(minutes=3), farm.evil())])
    timeline = farm.timeline(now - timedelta(hours=1), 2)
    [incident] = timeline["incidents"]
    assert (incident["action"], incident["outcome"], incident["closed_at"]) == (
        "none",
        "open",
        None,
    )
    assert timeline["current_status"] == "non_compliant"
    report = farm.get("/api/v1/compliance/status", site="ekibastuz-2")
    assert report["fleet"]["non_compliant_now"] == [farm.machine_id]
    assert report["fleet"]["incidents_open"] == 1
    assert report["fleet"]["detect_to_verified_p95_s"] is None
    result = cli("compliance", "status", "--since", "1h")
    assert result.exit_code == 0, result.output
    assert "ekibastuz-2" in result.output and farm.machine_id in result.output


def test_a_failed_write_stays_non_compliant_until_seen_compliant(farm: Farm) -> None:
    farm.post(observations=[farm.poll(at(0), farm.good()), farm.poll(at(1), farm.evil())])
    farm.post(
        observations=[farm.poll(at(3), farm.evil())],
        events=[
            farm.event("pool_write", at(2), written_at=at(2).isoformat()),
            farm.event("pool_write_failed", at(3), cause="write_ignored", attempts=3),
        ],
    )
    [incident] = farm.timeline()["incidents"]
    assert (incident["outcome"], incident["cause"], incident["closed_at"]) == (
        "failed",
        "write_ignored",
        None,
    )
    farm.post(observations=[farm.poll(at(30), farm.good())])  # fixed by hand later
    [incident] = farm.timeline()["incidents"]
    assert (incident["outcome"], incident["verified_at"]) == ("failed", iso(at(30)))


def test_alerts_show_a_refused_policy_bundle(farm: Farm, cli: CliInvoker) -> None:
    farm.post(
        events=[
            {
                "kind": "policy_refused",
                "at": at(1).isoformat(),
                "severity": "critical",
                "detail": "bundle v7: signature does not verify",
                "data": {"version": 7},
            },
            {"kind": "disk_full", "at": at(1).isoformat(), "severity": "warning"},
        ]
    )
    alerts = farm.get("/api/v1/alerts")
    assert [(a["kind"], a["severity"], a["site"]) for a in alerts] == [
        ("policy_refused", "critical", "ekibastuz-2")
    ]
    assert alerts[0]["data"]["version"] == 7
    result = cli("alerts", "--json")
    assert result.exit_code == 0, result.output
    assert [a["kind"] for a in json.loads(result.output)] == ["policy_refused"]
    result = cli("alerts")
    assert "signature does not verify" in result.output
    # the table names each alert's id, which resolve-alert takes
    row = next(line for line in result.output.splitlines() if "policy_refused" in line)
    assert row.split("│")[1].strip() == str(alerts[0]["id"])


def test_bad_input_is_a_one_line_error(farm: Farm, cli: CliInvoker) -> None:
    headers = farm.user.headers
    for params, code in (
        ({"start": at(5).isoformat(), "end": at(1).isoformat()}, 422),
        ({"site": "nowhere"}, 404),
        ({"start": "yesterday"}, 422),
    ):
        response = farm.client.get("/api/v1/compliance/status", params=params, headers=headers)
        assert response.status_code == code, (params, response.text)
    missing = farm.client.get("/api/v1/machines/MNOSUCH000/compliance", headers=headers)
    assert missing.status_code == 404 and "no machine" in missing.json()["detail"]
    for args, says in (
        (("compliance", "status", "--since", "forever"), "--since"),
        (("compliance", "status", "--period", "2026-03-05..2026-03-01"), "FROM must be before"),
        (("compliance", "status", "--period", "2026-03-01"), "FROM..TO"),
        (("compliance", "status", "--period", "a..b", "--since", "1h"), "not both"),
    ):
        result = cli(*args)
        assert result.exit_code == 2, (args, result.output)
        assert says in result.output and "Traceback" not in result.output
    result = cli("compliance", "status", "--site", "nowhere")
    assert result.exit_code == 1 and "no site named 'nowhere'" in result.output
    result = cli("compliance", "timeline", farm.machine_id, "--json")
    assert result.exit_code == 0 and json.loads(result.output)["machine_id"] == farm.machine_id


def test_a_site_without_an_approved_pool_set_is_not_tracked(farm: Farm) -> None:
    with Session(farm.engine) as session:
        for pool_set in session.exec(select(PoolSet)):
            pool_set.status = PoolSetStatus.PROPOSED
            session.add(pool_set)
        session.commit()
    farm.post(observations=[farm.poll(at(0), farm.evil())])
    with Session(farm.engine) as session:
        assert session.exec(select(ComplianceInterval)).all() == []
        assert session.exec(select(DriftIncident)).all() == []


def test_an_approved_exemption_makes_drift_exempt_not_an_incident(farm: Farm) -> None:
    with Session(farm.engine) as session:
        pk = session.exec(select(Machine.id)).one()
        session.add(
            Exemption(
                machine_pk=pk,
                reason="vendor test pool during RMA check",
                starts_at=at(5),
                ends_at=at(20),
                requested_by="carol",
                approved_by="dave",
                approved_at=at(4),
            )
        )
        session.commit()
    farm.post(observations=[farm.poll(at(0), farm.good()), farm.poll(at(10), farm.evil())])
    timeline = farm.timeline()
    assert [i["status"] for i in timeline["intervals"]] == ["compliant", "exempt"]
    assert "vendor test pool" in timeline["intervals"][1]["cause"]
    assert timeline["incidents"] == []
    farm.post(observations=[farm.poll(at(25), farm.evil())])  # the exemption has ended
    assert [i["outcome"] for i in farm.timeline()["incidents"]] == ["open"]


# --- the pure decisions ------------------------------------------------------------------------


def verdict(minute: float, status: PoolStatus, cause: str = "") -> Verdict:
    return Verdict(at(minute), status, cause, pool_set_version=1)


def test_plan_ignores_polls_not_newer_than_the_open_interval() -> None:
    interval = IntervalRow(1, "compliant", "", at(10), None, 1, id=7)
    plan = plan_machine(
        1,
        interval,
        None,
        [verdict(5, PoolStatus.NON_COMPLIANT, "x"), verdict(10, PoolStatus.UNKNOWN, "t")],
        [],
        observe=False,
    )
    assert plan.intervals == [] and plan.incidents == []


def test_plan_closes_an_open_incident_at_the_agents_earlier_verification() -> None:
    incident = IncidentRow(1, at(1), action="write", action_at=at(2), id=3)
    interval = IntervalRow(1, "non_compliant", "x", at(1), None, 1, id=8)
    facts = EnforcementFacts(verified_at=at(4))
    plan = plan_machine(
        1,
        interval,
        incident,
        [verdict(5, PoolStatus.COMPLIANT)],
        [Signal(EnforcementEvent.POOL_VERIFIED, at(4), facts)],
        observe=False,
    )
    [closed] = plan.incidents
    assert (closed.outcome, closed.verified_at, closed.closed_at) == ("verified", at(4), at(5))
    assert [(i.status, i.started_at, i.ended_at) for i in plan.intervals] == [
        ("non_compliant", at(1), at(5)),
        ("compliant", at(5), None),
    ]


def test_report_arithmetic() -> None:
    assert percentile([5.0, 1.0, 3.0, 2.0, 4.0], 50) == 3.0
    assert percentile([float(i) for i in range(1, 21)], 95) == 19.0
    assert percentile([], 95) is None
    day = timedelta(hours=24)
    assert is_repeat_offender([at(0), at(600), at(1400)], 3, day)
    assert not is_repeat_offender([at(0), at(600), at(1500)], 3, day)
    assert streak_start([at(0), at(2000), at(3000), at(4000)], day) == at(2000)


def test_metrics_show_compliance_hashrate_and_power_as_the_status_does(farm: Farm) -> None:
    """/metrics reads compliance from the same place as `compliance status`, right now."""
    from tests.controller.test_platform import _sample

    def scrape() -> str:
        response = farm.client.get("/metrics", headers=farm.user.headers)
        assert response.status_code == 200, response.text
        return response.text

    now = datetime.now(UTC)
    hijacked = {**farm.poll(now - timedelta(seconds=5), farm.evil()), "hashrate_ths": 95.5}
    farm.post(observations=[{**hijacked, "power_w": 3250.0}])
    body = scrape()
    assert _sample(body, "asicfleet_pool_compliance_percent", status="non_compliant") == 100
    assert _sample(body, "asicfleet_pool_compliance_percent", status="compliant") == 0
    status = farm.get("/api/v1/compliance/status", since="1h")
    assert status["fleet"]["non_compliant_now"] == [farm.machine_id]
    assert _sample(body, "asicfleet_hashrate_ths") == 95.5
    assert _sample(body, "asicfleet_power_watts") == 3250.0
    assert _sample(body, "asicfleet_reporting_machines") == 1
    fixed = {**farm.poll(now, farm.good()), "hashrate_ths": 96.0, "power_w": 3300.0}
    farm.post(observations=[fixed])
    body = scrape()
    assert _sample(body, "asicfleet_pool_compliance_percent", status="compliant") == 100
    assert _sample(body, "asicfleet_power_watts") == 3300.0
    # an informational event is news, not open work
    with Session(farm.engine) as session:
        session.add(RegisterEvent(kind="moved", severity="info"))
        session.commit()
    assert 'kind="moved"' not in scrape()
