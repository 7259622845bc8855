"""The controller's tables (SQLModel). One module so Alembic sees every table at once.

Conventions: timestamps are timezone-aware UTC (``utcnow``); JSON columns hold lists and
dicts that are only ever read whole; every table a person or agent changes is covered by
the audit log (``controller.audit``), not by columns here.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, DateTime, Index, UniqueConstraint
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator
from sqlmodel import Field, SQLModel

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_machine_id() -> str:
    """A short, stable, unambiguous id (also usable in pool worker names): ``M`` + 9 chars."""
    return "M" + "".join(secrets.choice(CROCKFORD) for _ in range(9))


class UTCDateTime(TypeDecorator[datetime]):
    """Always UTC and timezone-aware in Python, on SQLite (which keeps no zone) and PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _ts(**kwargs: Any) -> Any:
    """A timezone-aware UTC timestamp column."""
    return Field(sa_column=Column(UTCDateTime(), **kwargs))


def _json(default: Any) -> Any:
    return Field(default_factory=default, sa_column=Column(JSON, nullable=False))


class Role(StrEnum):
    ADMIN = "admin"
    OPERATOR = "operator"
    TECHNICIAN = "technician"
    COMPLIANCE = "compliance"
    INSPECTOR = "inspector"


class LifecycleState(StrEnum):
    DISCOVERED = "discovered"
    REGISTERED = "registered"
    ACTIVE = "active"
    MAINTENANCE = "maintenance"
    RMA = "rma"
    DECOMMISSIONED = "decommissioned"


# --- the farm ----------------------------------------------------------------------------------


class Site(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, index=True, max_length=128)
    licence_number: str = Field(max_length=128)
    dmp_account: str = Field(default="", max_length=128)
    owner_name: str = Field(default="", max_length=256)
    created_at: datetime = _ts(nullable=False, default=utcnow)


class Segment(SQLModel, table=True):
    """A LAN segment (CIDR) of a site, reported on by at most one agent."""

    id: int | None = Field(default=None, primary_key=True)
    site_id: int = Field(foreign_key="site.id", index=True)
    cidr: str = Field(unique=True, max_length=64)
    agent_id: str | None = Field(default=None, foreign_key="agent.id", index=True)


class Agent(SQLModel, table=True):
    id: str = Field(primary_key=True, max_length=64)
    name: str = Field(max_length=128)
    site_id: int = Field(foreign_key="site.id", index=True)
    secret_hash: str = Field(max_length=256)
    version: str = Field(default="", max_length=64)
    hostname: str = Field(default="", max_length=255)
    enrolled_at: datetime = _ts(nullable=False, default=utcnow)
    last_seen_at: datetime | None = _ts(nullable=True)
    last_address: str | None = Field(default=None, max_length=64)
    disabled: bool = False
    # The agent's clock minus ours, measured on its last delivery that said when it was sent.
    clock_skew_s: float | None = None
    clock_checked_at: datetime | None = _ts(nullable=True)


class EnrollmentToken(SQLModel, table=True):
    """A one-time, expiring token bound to a site and its segments."""

    __tablename__ = "enrollment_token"

    id: int | None = Field(default=None, primary_key=True)
    token_hash: str = Field(unique=True, max_length=128)
    site_id: int = Field(foreign_key="site.id")
    segments: list[str] = _json(list)
    created_by: str = Field(max_length=128)
    created_at: datetime = _ts(nullable=False, default=utcnow)
    expires_at: datetime = _ts(nullable=False)
    used_at: datetime | None = _ts(nullable=True)
    agent_id: str | None = Field(default=None, max_length=64)


# --- the register ------------------------------------------------------------------------------


class Machine(SQLModel, table=True):
    """One physical machine, known by its chassis serial (plus MAC and board serials)."""

    __table_args__ = (Index("ix_machine_site_state", "site_id", "lifecycle_state"),)

    id: int | None = Field(default=None, primary_key=True)
    machine_id: str = Field(default_factory=new_machine_id, unique=True, max_length=16)
    label_serial: str | None = Field(default=None, index=True, max_length=128)
    reported_serial: str | None = Field(default=None, index=True, max_length=128)
    control_board_serial: str | None = Field(default=None, max_length=128)
    mac: str | None = Field(default=None, index=True, max_length=32)
    vendor: str | None = Field(default=None, max_length=64)
    model: str | None = Field(default=None, max_length=128)
    firmware: str | None = Field(default=None, max_length=64)
    firmware_version: str | None = Field(default=None, max_length=128)
    hostname: str | None = Field(default=None, max_length=255)
    hashboard_serials: list[str] = _json(list)
    psu_serial: str | None = Field(default=None, max_length=128)
    site_id: int | None = Field(default=None, foreign_key="site.id", index=True)
    container: str | None = Field(default=None, max_length=64)
    rack: str | None = Field(default=None, max_length=64)
    shelf: str | None = Field(default=None, max_length=64)
    slot: str | None = Field(default=None, max_length=64)
    lifecycle_state: LifecycleState = Field(default=LifecycleState.DISCOVERED, max_length=32)
    state_since: datetime = _ts(nullable=False, default=utcnow)
    nominal_ths: float | None = None
    nominal_w: float | None = None
    first_seen: datetime = _ts(nullable=False, default=utcnow)
    last_seen: datetime | None = _ts(nullable=True)
    current_ip: str | None = Field(default=None, index=True, max_length=64)
    agent_id: str | None = Field(default=None, max_length=64)
    serial_unconfirmed: bool = Field(
        default=False, description="serial could not be read; kept by MAC until confirmed"
    )
    flags: list[str] = _json(list)
    commissioned_at: datetime | None = _ts(nullable=True)
    decommissioned_at: datetime | None = _ts(nullable=True)
    record_version: int = 1
    updated_at: datetime = _ts(nullable=False, default=utcnow)


class MachineStateChange(SQLModel, table=True):
    """Lifecycle history: every transition with who and why."""

    __tablename__ = "machine_state_change"

    id: int | None = Field(default=None, primary_key=True)
    machine_pk: int = Field(foreign_key="machine.id", index=True)
    from_state: str | None = Field(default=None, max_length=32)
    to_state: str = Field(max_length=32)
    at: datetime = _ts(nullable=False, default=utcnow)
    actor: str = Field(max_length=128)
    reason: str = Field(default="", max_length=1024)


class MachineVersion(SQLModel, table=True):
    """Append-only history of the register: a copy of a machine's register fields each time
    its row is created or its ``record_version`` bumped, so the register can be reconstructed
    as it stood at any moment (``controller.machine_versions``; read by the exports)."""

    __tablename__ = "machine_version"
    __table_args__ = (Index("ix_machine_version_machine_valid", "machine_pk", "valid_from"),)

    id: int | None = Field(default=None, primary_key=True)
    machine_pk: int = Field(foreign_key="machine.id")
    record_version: int
    valid_from: datetime = _ts(nullable=False)
    machine_id: str = Field(max_length=16)
    label_serial: str | None = Field(default=None, max_length=128)
    reported_serial: str | None = Field(default=None, max_length=128)
    control_board_serial: str | None = Field(default=None, max_length=128)
    mac: str | None = Field(default=None, max_length=32)
    vendor: str | None = Field(default=None, max_length=64)
    model: str | None = Field(default=None, max_length=128)
    firmware: str | None = Field(default=None, max_length=64)
    firmware_version: str | None = Field(default=None, max_length=128)
    hashboard_serials: list[str] = _json(list)
    psu_serial: str | None = Field(default=None, max_length=128)
    site_id: int | None = Field(default=None)
    container: str | None = Field(default=None, max_length=64)
    rack: str | None = Field(default=None, max_length=64)
    shelf: str | None = Field(default=None, max_length=64)
    slot: str | None = Field(default=None, max_length=64)
    lifecycle_state: str = Field(max_length=32, description="the state's name, e.g. ACTIVE")
    state_since: datetime = _ts(nullable=False)
    nominal_ths: float | None = None
    nominal_w: float | None = None
    current_ip: str | None = Field(default=None, max_length=64)
    serial_unconfirmed: bool = False
    flags: list[str] = _json(list)
    commissioned_at: datetime | None = _ts(nullable=True)
    decommissioned_at: datetime | None = _ts(nullable=True)


class LatestObservation(SQLModel, table=True):
    """The newest poll of each machine (one row per machine, upserted)."""

    __tablename__ = "observation_latest"

    machine_pk: int = Field(foreign_key="machine.id", primary_key=True)
    observed_at: datetime = _ts(nullable=False)
    reachable: bool
    error: str | None = Field(default=None, max_length=1024)
    is_mining: bool | None = None
    hashrate_ths: float | None = None
    power_w: float | None = None
    temperature_c: float | None = None
    pools: list[dict[str, Any]] = _json(list)
    ip: str | None = Field(default=None, max_length=64)


class ObservationHistory(SQLModel, table=True):
    """Observations kept at the configured resolution (one per machine per bucket)."""

    __tablename__ = "observation_history"
    __table_args__ = (
        UniqueConstraint("machine_pk", "bucket", name="uq_history_bucket"),
        # one machine's polls in time order: the register's "last pool check as of" seeks here
        Index("ix_observation_history_machine_observed", "machine_pk", "observed_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    machine_pk: int = Field(foreign_key="machine.id")
    bucket: int = Field(description="observed_at // resolution, for de-duplication")
    observed_at: datetime = _ts(nullable=False)
    reachable: bool
    error: str | None = Field(default=None, max_length=1024)
    is_mining: bool | None = None
    hashrate_ths: float | None = None
    power_w: float | None = None
    temperature_c: float | None = None
    pools: list[dict[str, Any]] = _json(list)


class ObservationSum(SQLModel, table=True):
    """Sums over one machine's ``observation_history`` rows per UTC hour, day and week, kept
    at ingest (``controller.history_rollup``): period averages read a few rows per machine
    instead of every kept poll, 288 a day at the default resolution."""

    __tablename__ = "observation_sum"
    # SQLite: rows clustered by the key, so a machine's weeks (days, hours) are one run
    __table_args__ = {"sqlite_with_rowid": False}

    machine_pk: int = Field(foreign_key="machine.id", primary_key=True)
    span_s: int = Field(primary_key=True, description="3600, 86400 or 604800 (hour, day, week)")
    start_s: int = Field(
        sa_type=BigInteger, primary_key=True, description="the span's start, Unix seconds (UTC)"
    )
    polls: int = Field(default=0, description="history rows")
    mining: int = Field(default=0, description="rows reachable and mining")
    hashrate_sum: float = Field(default=0.0, description="over reachable rows with a hashrate")
    hashrate_n: int = 0
    power_sum: float = Field(default=0.0, description="over reachable rows with a power")
    power_n: int = 0


class RegisterEvent(SQLModel, table=True):
    """Something that happened to the fleet: a move, a swap, a duplicate serial, a missing one."""

    __tablename__ = "event"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = _ts(nullable=False, default=utcnow, index=True)
    kind: str = Field(max_length=64, index=True)
    severity: str = Field(default="info", max_length=16)
    machine_pk: int | None = Field(default=None, foreign_key="machine.id", index=True)
    agent_id: str | None = Field(default=None, max_length=64)
    ip: str | None = Field(default=None, max_length=64)
    detail: str = Field(default="", max_length=4096)
    data: dict[str, Any] = _json(dict)
    resolved_at: datetime | None = _ts(nullable=True)


class IngestedBatch(SQLModel, table=True):
    """Idempotency: the acknowledgement of every batch already applied."""

    __tablename__ = "ingested_batch"

    batch_id: str = Field(primary_key=True, max_length=36)
    agent_id: str = Field(max_length=64, index=True)
    sequence: int
    received_at: datetime = _ts(nullable=False, default=utcnow)
    ack: dict[str, Any] = _json(dict)


# --- people and the audit log -----------------------------------------------------------------


class User(SQLModel, table=True):
    __tablename__ = "app_user"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, index=True, max_length=64)
    password_hash: str = Field(max_length=256)
    role: Role = Field(max_length=32)
    created_at: datetime = _ts(nullable=False, default=utcnow)
    disabled: bool = False


class ApiToken(SQLModel, table=True):
    """A token for scripts, acting as its user; only its hash is stored."""

    __tablename__ = "api_token"

    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="app_user.id", index=True)
    name: str = Field(max_length=128)
    token_hash: str = Field(unique=True, max_length=128)
    created_at: datetime = _ts(nullable=False, default=utcnow)
    expires_at: datetime | None = _ts(nullable=True)
    last_used_at: datetime | None = _ts(nullable=True)
    revoked: bool = False


class LoginFailure(SQLModel, table=True):
    """A failed login, kept for the throttle's window (``controller.login_throttle``). The name
    tried is kept only as a digest: people type passwords into the name field."""

    __tablename__ = "login_failure"

    id: int | None = Field(default=None, primary_key=True)
    name_key: str = Field(max_length=64, index=True, description="sha256 of the name tried")
    source: str = Field(max_length=128, index=True, description="client address")
    at: datetime = _ts(nullable=False, index=True)


class LoginLockout(SQLModel, table=True):
    """A user name or a client address refused logins until ``until`` (one row per key, reused
    by the next lockout, so replicas agree on who started one)."""

    __tablename__ = "login_lockout"
    __table_args__ = (UniqueConstraint("kind", "key"),)

    id: int | None = Field(default=None, primary_key=True)
    kind: str = Field(max_length=16, description="user or address")
    key: str = Field(max_length=128, description="name digest or client address")
    started_at: datetime = _ts(nullable=False)
    until: datetime = _ts(nullable=False)


class AuditEntry(SQLModel, table=True):
    """One link of the hash-chained, append-only audit log."""

    __tablename__ = "audit_log"

    seq: int = Field(primary_key=True, description="1, 2, 3 … with no gaps")
    at: datetime = _ts(nullable=False)
    actor: str = Field(max_length=128)
    actor_kind: str = Field(max_length=16, description="user, agent or system")
    action: str = Field(max_length=64)
    entity: str = Field(max_length=64)
    entity_id: str = Field(default="", max_length=128)
    before: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    after: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    source: str = Field(default="", max_length=128, description="client address or 'cli'")
    reason: str = Field(default="", max_length=1024)
    prev_hash: str = Field(max_length=64)
    hash: str = Field(max_length=64, unique=True)


# --- pool policy -------------------------------------------------------------------------------


class PoolSetStatus(StrEnum):
    PROPOSED = "proposed"  # waiting for a second compliance user
    APPROVED = "approved"  # in force for its site (the newest approved one)
    REJECTED = "rejected"
    SUPERSEDED = "superseded"  # a newer approved set replaced it


class PoolSet(SQLModel, table=True):
    """One revision of a site's approved pool set; it takes effect only once approved by a
    second compliance user (four eyes). Rows are never edited after a decision: a change is a
    new proposal with ``version`` + 1."""

    __tablename__ = "pool_set"
    __table_args__ = (UniqueConstraint("site_id", "version", name="uq_pool_set_version"),)

    id: int | None = Field(default=None, primary_key=True)
    site_id: int = Field(foreign_key="site.id", index=True)
    version: int = Field(ge=1)
    name: str = Field(max_length=128, description="DMP name")
    accreditation_ref: str = Field(default="", max_length=128)
    urls: list[str] = _json(list)
    account: str = Field(max_length=128)
    password: str = Field(default="x", max_length=128)
    devfee: str = Field(default="allow", max_length=16)
    status: PoolSetStatus = Field(default=PoolSetStatus.PROPOSED, max_length=16)
    proposed_by: str = Field(max_length=128)
    proposed_at: datetime = _ts(nullable=False, default=utcnow)
    reason: str = Field(default="", max_length=1024)
    decided_by: str | None = Field(default=None, max_length=128)
    decided_at: datetime | None = _ts(nullable=True)
    decision_reason: str = Field(default="", max_length=1024)


class SitePolicy(SQLModel, table=True):
    """How a site enforces its pool set (one row per site; defaults when absent)."""

    __tablename__ = "site_policy"

    site_id: int = Field(foreign_key="site.id", primary_key=True)
    mode: str = Field(default="observe", max_length=16)
    worker_template: str = Field(default="{account}.{machine_id}", max_length=255)
    quarantine_unregistered: bool = False
    canary_size: int = 10
    max_failure_rate: float = 0.2
    writes_per_segment: int = 8
    updated_by: str = Field(default="", max_length=128)
    updated_at: datetime = _ts(nullable=False, default=utcnow)


class PolicyRevision(SQLModel, table=True):
    """The bundle version of each site: bumped exactly when the bundle's content changes."""

    __tablename__ = "policy_revision"

    site_id: int = Field(foreign_key="site.id", primary_key=True)
    version: int = 1
    content_hash: str = Field(max_length=64)
    changed_at: datetime = _ts(nullable=False, default=utcnow)


class Exemption(SQLModel, table=True):
    """A time-boxed exemption of one machine from pool enforcement, with a reason; in force
    only once a compliance user approved it."""

    id: int | None = Field(default=None, primary_key=True)
    machine_pk: int = Field(foreign_key="machine.id", index=True)
    reason: str = Field(max_length=1024)
    starts_at: datetime = _ts(nullable=False, default=utcnow)
    ends_at: datetime = _ts(nullable=False)
    requested_by: str = Field(max_length=128)
    requested_at: datetime = _ts(nullable=False, default=utcnow)
    approved_by: str | None = Field(default=None, max_length=128)
    approved_at: datetime | None = _ts(nullable=True)
    revoked_by: str | None = Field(default=None, max_length=128)
    revoked_at: datetime | None = _ts(nullable=True)


# --- compliance evidence -----------------------------------------------------------------------


class ComplianceInterval(SQLModel, table=True):
    """A stretch of time a machine spent compliant / non_compliant / unknown / exempt.

    Intervals of one machine do not overlap; the open one has ``ended_at`` NULL.
    """

    __tablename__ = "compliance_interval"
    __table_args__ = (
        Index("ix_compliance_machine_start", "machine_pk", "started_at"),
        Index("ix_compliance_machine_open", "machine_pk", "ended_at"),  # the open one, on ingest
    )

    id: int | None = Field(default=None, primary_key=True)
    machine_pk: int = Field(foreign_key="machine.id")
    status: str = Field(max_length=16)
    cause: str = Field(default="", max_length=1024)
    started_at: datetime = _ts(nullable=False)
    ended_at: datetime | None = _ts(nullable=True)
    pool_set_version: int | None = None
    # What the judgement saw, so that every export row shows the record its status came from
    # (NULL on intervals recorded before 0003): the pools the agent read back (url, user and
    # kind per slot, in slot order), the worker the machine was expected to use, and the
    # newest poll that confirmed this interval.
    pools: list[dict[str, Any]] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    worker: str | None = Field(default=None, max_length=512)
    checked_at: datetime | None = _ts(nullable=True)


class DriftIncident(SQLModel, table=True):
    """One drift of one machine: detected → action → verified (or failed, with the cause)."""

    __tablename__ = "drift_incident"
    __table_args__ = (
        Index("ix_drift_machine_detected", "machine_pk", "detected_at"),
        Index("ix_drift_machine_open", "machine_pk", "closed_at"),  # the open one, on ingest
    )

    id: int | None = Field(default=None, primary_key=True)
    machine_pk: int = Field(foreign_key="machine.id")
    site_id: int | None = Field(default=None, foreign_key="site.id", index=True)
    detected_at: datetime = _ts(nullable=False)
    observed: list[dict[str, Any]] = _json(list)
    problems: list[str] = _json(list)
    action: str = Field(default="", max_length=32, description="write, reboot, none (observe)")
    action_at: datetime | None = _ts(nullable=True)
    verified_at: datetime | None = _ts(nullable=True)
    outcome: str = Field(default="open", max_length=16, description="open, verified, failed")
    cause: str = Field(default="", max_length=1024)
    attempts: int = 0
    after_reboot: bool = False
    agent_id: str | None = Field(default=None, max_length=64)
    closed_at: datetime | None = _ts(nullable=True)
