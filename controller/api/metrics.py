"""Prometheus ``/metrics``: the fleet as the database sees it, for any authenticated user.

The numbers are read from the database at scrape time (not kept in process memory), so
every replica behind a load balancer reports the same fleet, and a restart loses nothing.
Reading (``read_snapshot``) is kept apart from turning a snapshot into metric families
(``fleet_metrics``), which is pure and tested without a server.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from fastapi import APIRouter, Depends, Response
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from sqlalchemy import func
from sqlmodel import Session, col, select

from controller.api.deps import SessionDep, SettingsDep, require_any_user
from controller.evidence import Rules
from controller.evidence_report import compliance_status
from controller.models import (
    Agent,
    IngestedBatch,
    LatestObservation,
    LifecycleState,
    Machine,
    RegisterEvent,
    utcnow,
)

router = APIRouter()

RATE_WINDOW = timedelta(minutes=1)
# Upper bounds (seconds) of the agents' last-seen age buckets, in order; older is "stale".
AGE_BUCKETS: tuple[tuple[str, float], ...] = (
    ("1m", 60),
    ("5m", 300),
    ("15m", 900),
    ("1h", 3600),
)
STALE = "stale"
NEVER = "never"
INFO = "info"  # the severity of events that only inform (never "open" work)
COMPLIANCE_STATUSES = ("compliant", "non_compliant", "unknown", "exempt")


@dataclass
class FleetSnapshot:
    """What one scrape reports, read in one go."""

    machines_by_state: dict[str, int] = field(default_factory=dict)
    agent_last_seen: list[datetime | None] = field(default_factory=list)
    agents_disabled: int = 0
    batches_in_window: int = 0
    observations_in_window: int = 0
    open_events: dict[tuple[str, str], int] = field(default_factory=dict)
    compliance_pct: dict[str, float] = field(default_factory=dict)
    hashrate_ths: float = 0.0
    power_w: float = 0.0
    reporting_machines: int = 0
    now: datetime = field(default_factory=utcnow)


def age_bucket(last_seen: datetime | None, now: datetime) -> str:
    """The bucket label for an agent last seen at ``last_seen`` (``never`` if not yet)."""
    if last_seen is None:
        return NEVER
    age = (now - last_seen).total_seconds()
    for label, limit in AGE_BUCKETS:
        if age <= limit:
            return label
    return STALE


def fleet_metrics(snap: FleetSnapshot) -> Iterator[Metric]:
    """Metric families for a snapshot. Every state and bucket is present, zeros included,
    so dashboards and alerts never see a series vanish."""
    machines = GaugeMetricFamily(
        "asicfleet_machines", "Machines in the register by lifecycle state.", labels=["state"]
    )
    for state in LifecycleState:
        machines.add_metric([state.value], snap.machines_by_state.get(state.value, 0))
    yield machines

    buckets = {label: 0 for label, _ in AGE_BUCKETS} | {STALE: 0, NEVER: 0}
    for seen in snap.agent_last_seen:
        buckets[age_bucket(seen, snap.now)] += 1
    agents = GaugeMetricFamily(
        "asicfleet_agents",
        "Enabled agents by time since last seen: within 1m, 5m, 15m, 1h; stale (older); never.",
        labels=["last_seen"],
    )
    for label, count in buckets.items():
        agents.add_metric([label], count)
    yield agents
    yield GaugeMetricFamily(
        "asicfleet_agents_disabled", "Agents whose credentials are disabled.", snap.agents_disabled
    )

    window = RATE_WINDOW.total_seconds()
    yield GaugeMetricFamily(
        "asicfleet_ingested_batches_last_minute",
        "Report batches accepted in the last 60 s (all replicas).",
        snap.batches_in_window,
    )
    yield GaugeMetricFamily(
        "asicfleet_ingested_observations_last_minute",
        "Machine observations accepted in the last 60 s (all replicas).",
        snap.observations_in_window,
    )
    yield GaugeMetricFamily(
        "asicfleet_ingestion_observations_per_second",
        "Machine observations accepted per second, averaged over the last 60 s.",
        snap.observations_in_window / window,
    )

    compliance = GaugeMetricFamily(
        "asicfleet_pool_compliance_percent",
        "Share of tracked machines by pool compliance right now, as `compliance status` "
        "reports it (compliant, non_compliant, unknown, exempt).",
        labels=["status"],
    )
    for status in COMPLIANCE_STATUSES:
        compliance.add_metric([status], snap.compliance_pct.get(status, 0.0))
    yield compliance
    yield GaugeMetricFamily(
        "asicfleet_hashrate_ths",
        "Sum of the latest reported hashrate (TH/s) of machines heard from within the stale "
        "window (missing_after_minutes).",
        snap.hashrate_ths,
    )
    yield GaugeMetricFamily(
        "asicfleet_power_watts",
        "Sum of the latest firmware-reported power (W) of the same machines (an estimate: "
        "firmware figures are off by 5-20 %).",
        snap.power_w,
    )
    yield GaugeMetricFamily(
        "asicfleet_reporting_machines",
        "Machines whose latest poll, within the stale window, reached them.",
        snap.reporting_machines,
    )

    events = GaugeMetricFamily(
        "asicfleet_open_events",
        "Unresolved register events that need someone (duplicate serial, missing, swaps …); "
        "informational events are not counted.",
        labels=["kind", "severity"],
    )
    for (kind, severity), count in sorted(snap.open_events.items()):
        events.add_metric([kind, severity], count)
    yield events


def read_snapshot(
    session: Session, now: datetime | None = None, rules: Rules | None = None
) -> FleetSnapshot:
    """Aggregate the register, agents, recent ingestion receipts, open events, compliance and
    the latest hashrate and power."""
    now = now or utcnow()
    rules = rules or Rules()
    snap = FleetSnapshot(now=now)
    state_rows = session.exec(
        select(Machine.lifecycle_state, func.count()).group_by(col(Machine.lifecycle_state))
    ).all()
    snap.machines_by_state = {LifecycleState(state).value: n for state, n in state_rows}
    for last_seen, disabled in session.exec(select(Agent.last_seen_at, Agent.disabled)).all():
        if disabled:
            snap.agents_disabled += 1
        else:
            snap.agent_last_seen.append(last_seen)
    acks = session.exec(
        select(IngestedBatch.ack).where(col(IngestedBatch.received_at) >= now - RATE_WINDOW)
    ).all()
    snap.batches_in_window = len(acks)
    snap.observations_in_window = sum(_observations(ack) for ack in acks)
    event_rows = session.exec(
        select(RegisterEvent.kind, RegisterEvent.severity, func.count())
        .where(col(RegisterEvent.resolved_at).is_(None))
        .where(col(RegisterEvent.severity) != INFO)
        .group_by(col(RegisterEvent.kind), col(RegisterEvent.severity))
    ).all()
    snap.open_events = {(kind, severity): n for kind, severity, n in event_rows}
    # The same reading as `compliance status`, over the last millisecond (the state now):
    # one fact, one source.
    fleet = compliance_status(
        session, None, now - timedelta(milliseconds=1), now, rules=rules, now=now
    ).fleet
    if fleet.machines_tracked:
        snap.compliance_pct = {
            "compliant": fleet.compliant_pct,
            "non_compliant": fleet.non_compliant_pct,
            "unknown": fleet.unknown_pct,
            "exempt": fleet.exempt_pct,
        }
    fresh = session.exec(
        select(
            func.count(),
            func.coalesce(func.sum(LatestObservation.hashrate_ths), 0.0),
            func.coalesce(func.sum(LatestObservation.power_w), 0.0),
        ).where(
            col(LatestObservation.reachable).is_(True),
            col(LatestObservation.observed_at) >= now - rules.stale_after,
        )
    ).one()
    snap.reporting_machines, snap.hashrate_ths, snap.power_w = (
        int(fresh[0]),
        float(fresh[1] or 0.0),
        float(fresh[2] or 0.0),
    )
    return snap


def _observations(ack: object) -> int:
    """Observations a stored acknowledgement counted (0 for a duplicate or odd record)."""
    if not isinstance(ack, dict) or ack.get("duplicate"):
        return 0
    value = ack.get("observations", 0)
    return value if isinstance(value, int) else 0


class FleetCollector:
    """A prometheus_client collector over one snapshot."""

    def __init__(self, snapshot: FleetSnapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        return list(fleet_metrics(self.snapshot))


@router.get("/metrics", dependencies=[Depends(require_any_user)], include_in_schema=False)
def metrics(session: SessionDep, settings: SettingsDep) -> Response:
    """The Prometheus text exposition; scrape it with a user's API token (any role)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(read_snapshot(session, rules=Rules.of(settings))))
    ProcessCollector(registry=registry)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
