"""Approved pool sets (with four eyes) and each site's enforcement settings.

A pool set is proposed by an operator, compliance user or admin and takes effect only once a
*different* user with the compliance role approves it. Admin does not bypass this: an admin may
propose, but only a compliance user other than the proposer may approve or reject. A proposer
may withdraw their own proposal. A site has at most one pending proposal at a time; a second
one is refused (409) so that what the approver sees is exactly what takes effect.

Services take a :class:`RoledActor` (the API's ``Principal`` fits as it is; the CLI builds a
:class:`CliUser` after checking the person's password), audit every step and leave the commit
to the caller.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, func, select

from contract.policy import MAX_POOL_URLS, ApprovedPoolSet, DevFeePolicy, EnforcementMode
from controller.actors import Actor, record
from controller.errors import Conflict, ControllerError, NotFound, Refused
from controller.models import (
    PolicyRevision,
    PoolSet,
    PoolSetStatus,
    Role,
    Site,
    SitePolicy,
    utcnow,
)
from controller.sites import get_site
from controller.worker_names import WorkerTemplateError, check_template

PROPOSERS = frozenset({Role.OPERATOR, Role.COMPLIANCE, Role.ADMIN})
DECIDERS = frozenset({Role.COMPLIANCE})  # admin deliberately absent: no bypass of four eyes
POLICY_WRITERS = frozenset({Role.OPERATOR, Role.ADMIN})
SCHEMES = ("stratum+tcp", "stratum+ssl", "stratum2+tcp")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_ACCOUNT = re.compile(r"^[^\s]+$")


class RoledActor(Actor, Protocol):
    """An actor whose role the rules need (four eyes is about people, not just names)."""

    @property
    def role(self) -> Role | None: ...


@dataclass(frozen=True)
class CliUser:
    """A user acting at the console after proving who they are (``--as`` plus password)."""

    name: str
    role: Role
    kind: str = "user"
    source: str = "cli"


# --- pure rules ---------------------------------------------------------------------------------


def stratum_url_problem(url: str) -> str | None:
    """Why ``url`` is not a usable stratum URL, or None.

    Accepted: ``stratum+tcp://host:port``, ``stratum+ssl://host:port``,
    ``stratum2+tcp://host[:port]/key`` and a bare ``host:port`` (read as stratum+tcp).
    """
    text = url.strip()
    if not text:
        return "a pool URL may not be empty"
    if any(c.isspace() for c in text):
        return f"{text!r}: a pool URL may not contain spaces"
    scheme = ""
    rest = text
    if "://" in text:
        scheme, _, rest = text.partition("://")
        if scheme.lower() not in SCHEMES:
            return f"{text!r}: scheme must be one of {', '.join(s + '://' for s in SCHEMES)}"
    hostport, _, _path = rest.partition("/")
    host, port = _split_host_port(hostport)
    if not host:
        return f"{text!r}: no host"
    if not _host_ok(host):
        return f"{text!r}: {host!r} is not a host name or IP address"
    if port is None:
        if scheme.lower() != "stratum2+tcp":
            return f"{text!r}: add the port, e.g. {host}:3333"
    elif not port.isdigit() or not 0 < int(port) < 65536:
        return f"{text!r}: port must be 1-65535"
    return None


def _split_host_port(hostport: str) -> tuple[str, str | None]:
    if hostport.startswith("["):  # [IPv6]:port
        host, _, tail = hostport[1:].partition("]")
        return host, (tail[1:] if tail.startswith(":") else None)
    host, sep, port = hostport.rpartition(":")
    return (host, port) if sep else (hostport, None)


def _host_ok(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return bool(_HOSTNAME.match(host))
    return True


def decision_problem(*, proposer: str, decider: str, decider_role: Role | None) -> str | None:
    """Four eyes: why ``decider`` may not approve (or reject) what ``proposer`` proposed."""
    if decider == proposer:
        return f"{decider} proposed this change and cannot decide on it: a second person must"
    if decider_role not in DECIDERS:
        role = decider_role.value if decider_role else "no role"
        return f"deciding needs the compliance role ({decider} has {role}); admin does not bypass"
    return None


class PoolSetProposal(BaseModel):
    """A new approved pool set for a site, as proposed (validated the same for API and CLI)."""

    model_config = ConfigDict(str_strip_whitespace=True, extra="forbid")

    name: str = Field(min_length=1, max_length=128, description="DMP (pool) name")
    accreditation_ref: str = Field(
        min_length=1, max_length=128, description="the DMP's accreditation reference"
    )
    urls: list[str] = Field(
        min_length=1,
        max_length=MAX_POOL_URLS,
        description="stratum URLs in slot order",
        examples=[["stratum+tcp://pool.example.kz:3333"]],
    )
    account: str = Field(min_length=1, max_length=128, description="account or sub-account")
    password: str = Field(default="x", max_length=128, description="stratum password")
    devfee: DevFeePolicy = DevFeePolicy.ALLOW
    reason: str = Field(default="", max_length=1024)

    @field_validator("urls")
    @classmethod
    def _stratum_urls(cls, value: list[str]) -> list[str]:
        cleaned = [u.strip() for u in value]
        for url in cleaned:
            if problem := stratum_url_problem(url):
                raise ValueError(problem)
        if len({u.lower() for u in cleaned}) != len(cleaned):
            raise ValueError("the same URL is given twice")
        return cleaned

    @field_validator("account")
    @classmethod
    def _account(cls, value: str) -> str:
        if not _ACCOUNT.match(value):
            raise ValueError("account may not contain spaces")
        return value


class Decision(BaseModel):
    model_config = ConfigDict(str_strip_whitespace=True, extra="forbid")

    reason: str = Field(default="", max_length=1024)


class PoolSetPublic(BaseModel):
    site: str
    version: int
    status: PoolSetStatus
    name: str
    accreditation_ref: str
    urls: list[str]
    account: str
    password: str
    devfee: str
    proposed_by: str
    proposed_at: datetime
    reason: str
    decided_by: str | None
    decided_at: datetime | None
    decision_reason: str

    @classmethod
    def of(cls, row: PoolSet, site: str) -> PoolSetPublic:
        return cls(
            site=site,
            version=row.version,
            status=PoolSetStatus(row.status),
            name=row.name,
            accreditation_ref=row.accreditation_ref,
            urls=list(row.urls),
            account=row.account,
            password=row.password,
            devfee=row.devfee,
            proposed_by=row.proposed_by,
            proposed_at=row.proposed_at,
            reason=row.reason,
            decided_by=row.decided_by,
            decided_at=row.decided_at,
            decision_reason=row.decision_reason,
        )


def pool_set_ref(site: str, version: int) -> str:
    """The audit ``entity_id`` of a pool set revision."""
    return f"{site}/v{version}"


def to_contract(row: PoolSet) -> ApprovedPoolSet:
    """The wire form the agent enforces (its ``version`` is the pool set revision)."""
    return ApprovedPoolSet(
        name=row.name,
        accreditation_ref=row.accreditation_ref,
        version=row.version,
        urls=list(row.urls),
        account=row.account,
        password=row.password,
        devfee=DevFeePolicy(row.devfee),
    )


def proposal_to_contract(proposal: PoolSetProposal, version: int = 1) -> ApprovedPoolSet:
    """An unsaved proposal as the agent would see it once approved (for a dry run)."""
    return ApprovedPoolSet(
        name=proposal.name,
        accreditation_ref=proposal.accreditation_ref,
        version=version,
        urls=proposal.urls,
        account=proposal.account,
        password=proposal.password,
        devfee=proposal.devfee,
    )


def _view(row: PoolSet, site: str) -> dict[str, Any]:
    return PoolSetPublic.of(row, site).model_dump(mode="json")


def _same_set(row: PoolSet, proposal: PoolSetProposal) -> bool:
    return (
        row.name == proposal.name
        and row.accreditation_ref == proposal.accreditation_ref
        and list(row.urls) == proposal.urls
        and row.account == proposal.account
        and row.password == proposal.password
        and row.devfee == proposal.devfee.value
    )


# --- pool sets ----------------------------------------------------------------------------------


def _require(actor: RoledActor, allowed: frozenset[Role], doing: str) -> None:
    if actor.role not in allowed:
        names = " or ".join(sorted(r.value for r in allowed))
        raise Refused(f"{doing} needs the role {names}")


def active_pool_set(session: Session, site_id: int) -> PoolSet | None:
    """The approved set in force for the site, if any."""
    return session.exec(
        select(PoolSet).where(PoolSet.site_id == site_id, PoolSet.status == PoolSetStatus.APPROVED)
    ).first()


def pending_pool_set(session: Session, site_id: int) -> PoolSet | None:
    return session.exec(
        select(PoolSet).where(PoolSet.site_id == site_id, PoolSet.status == PoolSetStatus.PROPOSED)
    ).first()


def get_pool_set(session: Session, site: Site, version: int) -> PoolSet:
    row = session.exec(
        select(PoolSet).where(PoolSet.site_id == site.id, PoolSet.version == version)
    ).first()
    if row is None:
        raise NotFound(f"site {site.name!r} has no pool set version {version}")
    return row


def list_pool_sets(session: Session, site: Site) -> list[PoolSet]:
    """Every revision of the site's pool set, newest first."""
    return list(
        session.exec(
            select(PoolSet).where(PoolSet.site_id == site.id).order_by(col(PoolSet.version).desc())
        )
    )


def propose(
    session: Session, actor: RoledActor, site_name: str, proposal: PoolSetProposal
) -> PoolSet:
    """Store a proposal (version = the site's next number); it is not in force until approved."""
    _require(actor, PROPOSERS, "proposing a pool set")
    site = get_site(session, site_name)
    assert site.id is not None
    pending = pending_pool_set(session, site.id)
    if pending is not None:
        raise Conflict(
            f"site {site.name!r} already has pool set v{pending.version} waiting for approval "
            f"(proposed by {pending.proposed_by}); approve, reject or withdraw it first"
        )
    current = active_pool_set(session, site.id)
    if current is not None and _same_set(current, proposal):
        raise Conflict(f"the proposal is identical to the approved set v{current.version}")
    latest = session.exec(select(func.max(PoolSet.version)).where(PoolSet.site_id == site.id)).one()
    row = PoolSet(
        site_id=site.id,
        version=(latest or 0) + 1,
        name=proposal.name,
        accreditation_ref=proposal.accreditation_ref,
        urls=list(proposal.urls),
        account=proposal.account,
        password=proposal.password,
        devfee=proposal.devfee.value,
        status=PoolSetStatus.PROPOSED,
        proposed_by=actor.name,
        proposed_at=utcnow(),
        reason=proposal.reason,
    )
    session.add(row)
    try:
        session.flush()
    except IntegrityError:
        raise Conflict(
            f"another pool set for site {site.name!r} was proposed at the same moment; "
            "list the pool sets and try again"
        ) from None
    record(
        session,
        actor,
        action="pool_set.propose",
        entity="pool_set",
        entity_id=pool_set_ref(site.name, row.version),
        after=_view(row, site.name),
        reason=proposal.reason,
    )
    return row


def _decide(session: Session, row: PoolSet, *, status: PoolSetStatus, by: str, reason: str) -> None:
    """Move a proposal to its decision exactly once, even with concurrent deciders."""
    now = utcnow()
    result = session.exec(
        update(PoolSet)
        .where(col(PoolSet.id) == row.id, col(PoolSet.status) == PoolSetStatus.PROPOSED)
        .values(status=status, decided_by=by, decided_at=now, decision_reason=reason)
    )
    if result.rowcount != 1:
        raise Conflict(f"pool set v{row.version} was decided by someone else meanwhile")
    session.refresh(row)


def _proposed(session: Session, site_name: str, version: int, doing: str) -> tuple[Site, PoolSet]:
    site = get_site(session, site_name)
    row = get_pool_set(session, site, version)
    if row.status != PoolSetStatus.PROPOSED:
        raise Conflict(
            f"pool set {pool_set_ref(site.name, version)} is {PoolSetStatus(row.status).value}; "
            f"only a proposed set can be {doing}"
        )
    return site, row


def approve(
    session: Session, actor: RoledActor, site_name: str, version: int, reason: str = ""
) -> PoolSet:
    """Put a proposal in force (second person, compliance role); the old set is superseded."""
    site, row = _proposed(session, site_name, version, "approved")
    if problem := decision_problem(
        proposer=row.proposed_by, decider=actor.name, decider_role=actor.role
    ):
        raise Refused(problem)
    before = _view(row, site.name)
    previous = active_pool_set(session, row.site_id)
    if previous is not None:
        session.exec(
            update(PoolSet)
            .where(col(PoolSet.id) == previous.id, col(PoolSet.status) == PoolSetStatus.APPROVED)
            .values(status=PoolSetStatus.SUPERSEDED)
        )
    _decide(session, row, status=PoolSetStatus.APPROVED, by=actor.name, reason=reason)
    after = _view(row, site.name)
    if previous is not None:
        after["supersedes"] = pool_set_ref(site.name, previous.version)
    record(
        session,
        actor,
        action="pool_set.approve",
        entity="pool_set",
        entity_id=pool_set_ref(site.name, row.version),
        before=before,
        after=after,
        reason=reason,
    )
    return row


def reject(
    session: Session, actor: RoledActor, site_name: str, version: int, reason: str
) -> PoolSet:
    """Refuse a proposal (second person, compliance role), or withdraw one's own proposal."""
    site, row = _proposed(session, site_name, version, "rejected")
    withdraw = actor.name == row.proposed_by
    if not withdraw and (
        problem := decision_problem(
            proposer=row.proposed_by, decider=actor.name, decider_role=actor.role
        )
    ):
        raise Refused(problem)
    if not reason.strip():
        raise ControllerError("give a reason for rejecting or withdrawing a pool set")
    before = _view(row, site.name)
    _decide(session, row, status=PoolSetStatus.REJECTED, by=actor.name, reason=reason)
    record(
        session,
        actor,
        action="pool_set.withdraw" if withdraw else "pool_set.reject",
        entity="pool_set",
        entity_id=pool_set_ref(site.name, row.version),
        before=before,
        after=_view(row, site.name),
        reason=reason,
    )
    return row


# --- site policy --------------------------------------------------------------------------------


class SitePolicyUpdate(BaseModel):
    """The settings to change; omitted ones stay as they are."""

    model_config = ConfigDict(str_strip_whitespace=True, extra="forbid")

    mode: EnforcementMode | None = None
    worker_template: str | None = Field(default=None, min_length=1, max_length=200)
    quarantine_unregistered: bool | None = None
    canary_size: int | None = Field(default=None, ge=1, le=10_000)
    max_failure_rate: float | None = Field(default=None, ge=0.0, le=1.0)
    writes_per_segment: int | None = Field(default=None, ge=1, le=256)

    @field_validator("worker_template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return check_template(value)
        except WorkerTemplateError as exc:
            raise ValueError(str(exc)) from None


class SitePolicyPublic(BaseModel):
    site: str
    mode: EnforcementMode
    worker_template: str
    quarantine_unregistered: bool
    canary_size: int
    max_failure_rate: float
    writes_per_segment: int
    updated_by: str
    updated_at: datetime | None
    pool_set: PoolSetPublic | None = Field(description="the approved set in force")
    pending: PoolSetPublic | None = Field(description="a proposal waiting for approval")
    bundle_version: int | None = Field(description="version of the last bundle issued")
    warnings: list[str]


POLICY_FIELDS = (
    "mode",
    "worker_template",
    "quarantine_unregistered",
    "canary_size",
    "max_failure_rate",
    "writes_per_segment",
)


def site_policy(session: Session, site_id: int) -> SitePolicy:
    """The site's settings row, or the defaults (not stored) when none was ever set."""
    row = session.get(SitePolicy, site_id)
    return row if row is not None else SitePolicy(site_id=site_id, updated_at=utcnow())


def policy_settings(row: SitePolicy) -> dict[str, Any]:
    return {name: getattr(row, name) for name in POLICY_FIELDS}


def policy_warnings(row: SitePolicy, active: PoolSet | None) -> list[str]:
    """What an operator should know: enforce mode with nothing to enforce, for one."""
    warnings = []
    if row.mode == EnforcementMode.ENFORCE.value and active is None:
        warnings.append(
            "mode is enforce but the site has no approved pool set: nothing is enforced"
        )
    return warnings


def policy_view(session: Session, site: Site) -> SitePolicyPublic:
    assert site.id is not None
    row = site_policy(session, site.id)
    active = active_pool_set(session, site.id)
    pending = pending_pool_set(session, site.id)
    revision = session.get(PolicyRevision, site.id)
    stored = session.get(SitePolicy, site.id) is not None
    return SitePolicyPublic(
        site=site.name,
        mode=EnforcementMode(row.mode),
        worker_template=row.worker_template,
        quarantine_unregistered=row.quarantine_unregistered,
        canary_size=row.canary_size,
        max_failure_rate=row.max_failure_rate,
        writes_per_segment=row.writes_per_segment,
        updated_by=row.updated_by,
        updated_at=row.updated_at if stored else None,
        pool_set=PoolSetPublic.of(active, site.name) if active else None,
        pending=PoolSetPublic.of(pending, site.name) if pending else None,
        bundle_version=revision.version if revision else None,
        warnings=policy_warnings(row, active),
    )


def update_policy(
    session: Session, actor: RoledActor, site_name: str, changes: SitePolicyUpdate
) -> SitePolicyPublic:
    """Change a site's enforcement settings (operators, admin); audited with before and after.

    Enforce mode without an approved pool set is allowed (set the mode up before approval);
    the policy view and the CLI say that nothing is enforced until a set is approved.
    """
    _require(actor, POLICY_WRITERS, "changing a site's policy")
    site = get_site(session, site_name)
    assert site.id is not None
    existing = session.get(SitePolicy, site.id)
    row = existing if existing is not None else SitePolicy(site_id=site.id)
    before = policy_settings(row)
    wanted = changes.model_dump(exclude_none=True, mode="json")
    if all(before[k] == v for k, v in wanted.items()) and existing is not None:
        return policy_view(session, site)
    for name, value in wanted.items():
        setattr(row, name, value)
    row.updated_by = actor.name
    row.updated_at = utcnow()
    session.add(row)
    session.flush()
    record(
        session,
        actor,
        action="site_policy.update",
        entity="site_policy",
        entity_id=site.name,
        before=before if existing is not None else None,
        after=policy_settings(row),
    )
    return policy_view(session, site)
