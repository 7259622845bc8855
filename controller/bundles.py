"""The signed policy bundle of a site, its version, and the dry run of a policy change.

``build_bundle`` turns the register and the site's policy into :class:`PolicyContent` with a
constant number of queries (a 20,000-machine site is one machine query and one exemption
query). The version is lazy: the canonical JSON of the content is hashed, and the site's
``policy_revision`` row is bumped (a conditional UPDATE, safe across replicas) only when the
hash differs, so an agent sees a new version exactly when there is something new to enforce.

Pulls of an unchanged bundle are cheap: :func:`bundle_etag` fingerprints the bundle's inputs
with a handful of small queries (an aggregate over the site's machines instead of reading
them) and the pull route answers ``304 Not Modified`` when the agent already holds it. See
:func:`inputs_fingerprint` for why the fingerprint changes whenever the content can.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy import func, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col, select

from contract.compliance import assess_pools
from contract.policy import (
    ApprovedPoolSet,
    EnforcementMode,
    MachinePolicy,
    PolicyBundle,
    PolicyContent,
    RolloutPolicy,
)
from contract.reports import PoolReading
from controller.errors import Conflict
from controller.exemptions import current_exemptions
from controller.models import (
    LatestObservation,
    LifecycleState,
    Machine,
    PolicyRevision,
    PoolSetStatus,
    Site,
    SitePolicy,
)
from controller.pool_policy import (
    active_pool_set,
    get_pool_set,
    policy_settings,
    site_policy,
    to_contract,
)
from controller.signing import SigningKey
from controller.worker_names import render_worker, worker_facts

_MACHINE = Machine.metadata.tables["machine"]
_LATEST = LatestObservation.metadata.tables["observation_latest"]
_MACHINE_COLUMNS = tuple(
    _MACHINE.c[name]
    for name in (
        "id",
        "machine_id",
        "reported_serial",
        "label_serial",
        "mac",
        "container",
        "rack",
        "shelf",
        "slot",
        "lifecycle_state",
    )
)
_IN_SERVICE = _MACHINE.c.lifecycle_state != LifecycleState.DECOMMISSIONED
MAX_SAMPLES = 50


# --- pure parts ---------------------------------------------------------------------------------


def machine_facts(row: Any, site: str, account: str) -> dict[str, str | None]:
    """What a worker template may use, from a machine row (see :func:`worker_facts`)."""
    return worker_facts(
        account=account, site=site, machine_id=row.machine_id,
        reported_serial=row.reported_serial, label_serial=row.label_serial,
        rack=row.rack, container=row.container, shelf=row.shelf, slot=row.slot,
    )  # fmt: skip


def content_hash(content: PolicyContent) -> str:
    """SHA-256 of the canonical JSON of ``content`` (sorted keys, no spaces)."""
    payload = json.dumps(content.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def rollout_of(policy: SitePolicy) -> RolloutPolicy:
    return RolloutPolicy(
        canary_size=policy.canary_size,
        max_failure_rate=policy.max_failure_rate,
        writes_per_segment=policy.writes_per_segment,
    )


# --- building -----------------------------------------------------------------------------------


def _site_machines(session: Session, site_id: int) -> list[Any]:
    """Every machine of the site that is still in service, in a stable order (one query)."""
    query = (
        sa.select(*_MACHINE_COLUMNS)
        .where(_MACHINE.c.site_id == site_id, _IN_SERVICE)
        .order_by(_MACHINE.c.machine_id)
    )
    return list(session.connection().execute(query).all())


def build_bundle(session: Session, site: Site, now: datetime) -> PolicyContent:
    """What the site's agents must enforce at ``now`` (unsigned, unversioned)."""
    assert site.id is not None
    policy = site_policy(session, site.id)
    active = active_pool_set(session, site.id)
    pool_set = to_contract(active) if active is not None else None
    account = pool_set.account if pool_set is not None else site.dmp_account
    exempt = current_exemptions(session, site.id, now)
    machines = []
    for row in _site_machines(session, site.id):
        exemption = exempt.get(row.id)
        machines.append(
            MachinePolicy(
                machine_id=row.machine_id,
                serial=row.reported_serial or row.label_serial,
                mac=row.mac,
                worker=render_worker(
                    policy.worker_template, machine_facts(row, site.name, account)
                ),
                registered=row.lifecycle_state != LifecycleState.DISCOVERED,
                exempt_until=exemption.ends_at if exemption else None,
                exempt_reason=exemption.reason if exemption else "",
            )
        )
    return PolicyContent(
        site=site.name,
        mode=EnforcementMode(policy.mode),
        pool_set=pool_set,
        machines=machines,
        quarantine_unregistered=policy.quarantine_unregistered,
        rollout=rollout_of(policy),
    )


def _insert_first_revision(session: Session, site_id: int, digest: str, now: datetime) -> bool:
    """Create the site's revision row unless another replica just did (no error either way)."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = (
        insert(PolicyRevision)
        .values(site_id=site_id, version=1, content_hash=digest, changed_at=now)
        .on_conflict_do_nothing(index_elements=["site_id"])
    )
    return bool(session.exec(statement).rowcount == 1)


def policy_version(session: Session, site_id: int, digest: str, now: datetime) -> int:
    """The bundle version for content with hash ``digest``: the stored one if the content is
    unchanged, else the stored one + 1 (first writer wins; a loser re-reads)."""
    for _ in range(10):
        current = session.exec(
            select(PolicyRevision.version, PolicyRevision.content_hash).where(
                PolicyRevision.site_id == site_id
            )
        ).first()
        if current is None:
            if _insert_first_revision(session, site_id, digest, now):
                return 1
            continue
        version, stored = current
        if stored == digest:
            return int(version)
        bumped = session.exec(
            update(PolicyRevision)
            .where(col(PolicyRevision.site_id) == site_id, col(PolicyRevision.version) == version)
            .values(version=version + 1, content_hash=digest, changed_at=now)
        )
        if bumped.rowcount == 1:
            return int(version) + 1
    raise Conflict("the site's policy kept changing while the bundle was built; try again")


def issue_bundle(
    session: Session, site: Site, key: SigningKey, ttl: timedelta, now: datetime
) -> PolicyBundle:
    """The site's current bundle, versioned and signed (the caller commits the version)."""
    assert site.id is not None
    content = build_bundle(session, site, now)
    version = policy_version(session, site.id, content_hash(content), now)
    bundle = PolicyBundle(version=version, issued_at=now, expires_at=now + ttl, content=content)
    return key.sign_bundle(bundle)


# --- cheap pulls: the ETag ---------------------------------------------------------------------

BUNDLE_FORMAT = 1
"""Bump when :func:`build_bundle` gives other content for the same inputs (a code change)."""


def reissue_epoch(now: datetime, ttl: timedelta) -> int:
    """Which half-lifetime ``now`` falls in: the ETag changes every ``ttl / 2``, so a bundle
    is re-signed (new ``expires_at``) before it expires however long nothing changes."""
    half = max(1.0, ttl.total_seconds() / 2)
    return int(now.timestamp() // half)


def inputs_fingerprint(session: Session, site: Site, now: datetime) -> dict[str, Any]:
    """Everything :func:`build_bundle` reads, cheaply: equal fingerprints, equal content.

    - the site's name and DMP account, its policy settings, the approved pool set in force;
    - the exemptions in force at ``now`` (time decides which: they are listed, not counted);
    - the site's machines in service as an aggregate: every change to a machine's register
      columns bumps its ``record_version`` (the register's history relies on it, see
      ``controller.machine_versions``), so count, id sums and version sums move with any
      change, arrival or departure; ``last_seen`` alone (not a bundle input) moves nothing.
    """
    assert site.id is not None
    policy = site_policy(session, site.id)
    active = active_pool_set(session, site.id)
    exempt = current_exemptions(session, site.id, now)
    m = _MACHINE.c
    count, ids, versions, mixed, newest = (
        session.connection()
        .execute(
            sa.select(
                func.count(),
                func.coalesce(func.sum(m.id), 0),
                func.coalesce(func.sum(m.record_version), 0),
                func.coalesce(func.sum(m.id * m.record_version), 0),
                func.max(m.updated_at),
            ).where(m.site_id == site.id, _IN_SERVICE)
        )
        .one()
    )
    return {
        "format": BUNDLE_FORMAT,
        "site": [site.id, site.name, site.dmp_account],
        "policy": policy_settings(policy),
        "pool_set": to_contract(active).model_dump(mode="json") if active is not None else None,
        "exemptions": sorted([pk, e.ends_at.isoformat(), e.reason] for pk, e in exempt.items()),
        "machines": [int(count), int(ids), int(versions), int(mixed), str(newest)],
    }


def bundle_etag(
    session: Session, site: Site, key: SigningKey, ttl: timedelta, now: datetime
) -> str:
    """The strong ETag of the bundle a pull at ``now`` gets: inputs, signing key, re-issue
    epoch. Compute it *before* building, so a change racing the build can only cost one more
    rebuild, never pin an agent to stale content."""
    parts = {
        "inputs": inputs_fingerprint(session, site, now),
        "key": key.public_key_b64(),
        "epoch": reissue_epoch(now, ttl),
    }
    canonical = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return '"' + hashlib.sha256(canonical.encode()).hexdigest()[:40] + '"'


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an ``If-None-Match`` header names ``etag`` (weak comparison, RFC 9110 13.1.2)."""
    if not if_none_match:
        return False
    tags = [t.strip() for t in if_none_match.split(",")]
    return any(t == "*" or t.removeprefix("W/") == etag for t in tags)


# --- dry run ------------------------------------------------------------------------------------


class PreviewMachine(BaseModel):
    machine_id: str
    outcome: str
    problems: list[str]


class PolicyPreview(BaseModel):
    """How the site's machines stand against a pool set: the dry run of a policy change."""

    site: str
    mode: EnforcementMode
    pool_set_version: int | None
    pool_set_status: str = Field(description="approved, proposed … or 'draft' (not stored)")
    machines: int
    compliant: int
    would_write: int = Field(
        description="not exempt, not compliant: written in enforce mode (as the agent decides)"
    )
    would_quarantine: int = Field(
        description="only discovered, and the site quarantines unregistered machines: slept if "
        "hashing, not written"
    )
    unknown: int = Field(description="no observation, unreachable, or pools unreadable")
    exempt: int
    duplicate_workers: int = Field(description="machines sharing a worker name with another")
    samples: list[PreviewMachine] = Field(description=f"up to {MAX_SAMPLES} machines to write")


def _readings(pools: Any) -> list[PoolReading] | None:
    try:
        return [PoolReading.model_validate(p) for p in pools]
    except (ValidationError, TypeError):
        return None


def classify(
    pool_set: ApprovedPoolSet,
    worker: str,
    *,
    registered: bool,
    quarantine_unregistered: bool = False,
    exempt: bool,
    reachable: bool | None,
    pools: Any,
) -> tuple[str, list[str]]:
    """One machine's outcome under ``pool_set`` (pure; the agent's ``decide()`` in the same
    order): would_quarantine, exempt, unknown, compliant or would_write, with the problems."""
    if quarantine_unregistered and not registered:
        return "would_quarantine", []
    if exempt:
        return "exempt", []
    readings = _readings(pools) if reachable else None
    if readings is None:
        return "unknown", []
    verdict = assess_pools(pool_set, worker, readings)
    if verdict.compliant:
        return "compliant", []
    return "would_write", list(verdict.problems)


def preview(
    session: Session,
    site: Site,
    now: datetime,
    *,
    version: int | None = None,
    draft: ApprovedPoolSet | None = None,
) -> PolicyPreview:
    """Assess every machine's latest observation against the approved set, a stored revision
    (``version``, typically the pending proposal) or an unsaved ``draft``."""
    assert site.id is not None
    policy = site_policy(session, site.id)
    if draft is not None:
        pool_set, status = draft, "draft"
    elif version is not None:
        stored = get_pool_set(session, site, version)
        pool_set, status = to_contract(stored), PoolSetStatus(stored.status).value
    else:
        active = active_pool_set(session, site.id)
        if active is None:
            raise Conflict(
                f"site {site.name!r} has no approved pool set; preview a proposal with its version"
            )
        pool_set, status = to_contract(active), PoolSetStatus.APPROVED.value
    exempt = current_exemptions(session, site.id, now)
    query = (
        sa.select(*_MACHINE_COLUMNS, _LATEST.c.reachable, _LATEST.c.pools)
        .select_from(_MACHINE.outerjoin(_LATEST, _LATEST.c.machine_pk == _MACHINE.c.id))
        .where(_MACHINE.c.site_id == site.id, _IN_SERVICE)
        .order_by(_MACHINE.c.machine_id)
    )
    counts: Counter[str] = Counter()
    workers: Counter[str] = Counter()
    samples: list[PreviewMachine] = []
    for row in session.connection().execute(query).all():
        worker = render_worker(
            policy.worker_template, machine_facts(row, site.name, pool_set.account)
        )
        workers[worker] += 1
        outcome, problems = classify(
            pool_set,
            worker,
            registered=row.lifecycle_state != LifecycleState.DISCOVERED,
            quarantine_unregistered=policy.quarantine_unregistered,
            exempt=row.id in exempt,
            reachable=row.reachable,
            pools=row.pools,
        )
        counts[outcome] += 1
        if outcome == "would_write" and len(samples) < MAX_SAMPLES:
            samples.append(
                PreviewMachine(machine_id=row.machine_id, outcome=outcome, problems=problems)
            )
    return PolicyPreview(
        site=site.name,
        mode=EnforcementMode(policy.mode),
        pool_set_version=pool_set.version if draft is None else None,
        pool_set_status=status,
        machines=sum(counts.values()),
        compliant=counts["compliant"],
        would_write=counts["would_write"],
        would_quarantine=counts["would_quarantine"],
        unknown=counts["unknown"],
        exempt=counts["exempt"],
        duplicate_workers=sum(n for n in workers.values() if n > 1),
        samples=samples,
    )
