"""Agent enrollment: one-time, expiring tokens bound to a site and segments, traded for credentials.

An operator makes a token (only its hash is stored) for a site and some of its segments; the
agent presents it once to ``/api/v1/agents/enroll`` and gets its own secret (hash stored), the
segments it may report from, and the controller's public key to pin. Callers commit.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import update
from sqlmodel import Session, col, select

from contract.enrollment import EnrollmentRequest, EnrollmentResponse
from controller.actors import Actor, record
from controller.errors import Conflict, ControllerError, NotFound
from controller.models import CROCKFORD, Agent, EnrollmentToken, Segment, Site, utcnow
from controller.security import (
    AGENT_SECRET_PREFIX,
    ENROLLMENT_TOKEN_PREFIX,
    new_token,
    token_hash,
)
from controller.sites import ensure_segments, get_site, site_names

MIN_TTL = timedelta(minutes=1)
MAX_TTL = timedelta(days=7)


class EnrollmentDenied(ControllerError):
    """The enrollment token cannot be used; ``status_code`` says how the API answers."""

    status_code = 401


class UnknownToken(EnrollmentDenied):
    status_code = 401


class SpentToken(EnrollmentDenied):
    """Already used or expired: it existed, but it is gone for good (HTTP 410)."""

    status_code = 410


class TokenState(StrEnum):
    VALID = "valid"
    USED = "used"
    EXPIRED = "expired"


@dataclass(frozen=True)
class IssuedEnrollment:
    """A fresh enrollment token: the secret is shown once and never stored."""

    secret: str
    row: EnrollmentToken
    site: Site
    segments: list[str]


@dataclass(frozen=True)
class AgentInfo:
    agent: Agent
    site: str
    segments: list[str]


@dataclass(frozen=True)
class _AgentActor:
    name: str
    source: str
    kind: str = "agent"


# --- pure rules ---------------------------------------------------------------------------------


def ttl_problem(ttl: timedelta) -> str | None:
    if ttl < MIN_TTL or ttl > MAX_TTL:
        return f"ttl must be between {MIN_TTL} and {MAX_TTL.days} days, got {ttl}"
    return None


def token_state(row: EnrollmentToken, now: datetime) -> TokenState:
    if row.used_at is not None:
        return TokenState.USED
    if row.expires_at <= now:
        return TokenState.EXPIRED
    return TokenState.VALID


def new_agent_id() -> str:
    """``A`` + 12 Crockford characters: short, unambiguous, not guessable."""
    return "A" + "".join(secrets.choice(CROCKFORD) for _ in range(12))


def agent_view(agent: Agent, site: str, segments: Sequence[str]) -> dict[str, Any]:
    return {
        "id": agent.id,
        "name": agent.name,
        "site": site,
        "segments": list(segments),
        "version": agent.version,
        "hostname": agent.hostname,
        "disabled": agent.disabled,
    }


# --- tokens -------------------------------------------------------------------------------------


def create_token(
    session: Session, actor: Actor, *, site_name: str, cidrs: Sequence[str], ttl: timedelta
) -> IssuedEnrollment:
    """A one-time token for ``site_name``; segments not on the site yet are created on it."""
    if problem := ttl_problem(ttl):
        raise ControllerError(problem)
    if not cidrs:
        raise ControllerError("an enrollment token needs at least one segment")
    site = get_site(session, site_name)
    segments = [s.cidr for s in ensure_segments(session, actor, site, cidrs)]
    secret = new_token(ENROLLMENT_TOKEN_PREFIX)
    assert site.id is not None
    row = EnrollmentToken(
        token_hash=token_hash(secret),
        site_id=site.id,
        segments=segments,
        created_by=actor.name,
        expires_at=utcnow() + ttl,
    )
    session.add(row)
    session.flush()
    record(
        session,
        actor,
        action="enrollment_token.create",
        entity="enrollment_token",
        entity_id=str(row.id),
        after={"site": site.name, "segments": segments, "expires_at": row.expires_at},
    )
    return IssuedEnrollment(secret=secret, row=row, site=site, segments=segments)


def enroll(
    session: Session, request: EnrollmentRequest, *, source: str, controller_public_key: str
) -> EnrollmentResponse:
    """Trade a valid token for agent credentials; the token can never be used again."""
    now = utcnow()
    row = session.exec(
        select(EnrollmentToken).where(EnrollmentToken.token_hash == token_hash(request.token))
    ).first()
    if row is None:
        raise UnknownToken("unknown enrollment token")
    state = token_state(row, now)
    if state is TokenState.USED:
        raise SpentToken("enrollment token was already used; ask an operator for a new one")
    if state is TokenState.EXPIRED:
        raise SpentToken(
            f"enrollment token expired at {row.expires_at:%Y-%m-%d %H:%M:%S} UTC; "
            "ask an operator for a new one"
        )
    agent_id = new_agent_id()
    # Consume atomically: of two concurrent enrollments with one token, exactly one wins.
    consumed = session.exec(
        update(EnrollmentToken)
        .where(col(EnrollmentToken.id) == row.id, col(EnrollmentToken.used_at).is_(None))
        .values(used_at=now, agent_id=agent_id)
    )
    if consumed.rowcount != 1:
        raise SpentToken("enrollment token was already used; ask an operator for a new one")

    site = session.get(Site, row.site_id)
    if site is None:  # the foreign key makes this unreachable; be explicit anyway
        raise Conflict("the token's site no longer exists")
    secret = new_token(AGENT_SECRET_PREFIX)
    agent = Agent(
        id=agent_id,
        name=request.agent_name,
        site_id=row.site_id,
        secret_hash=token_hash(secret),
        version=request.agent_version,
        hostname=request.hostname,
        enrolled_at=now,
        last_seen_at=now,
        last_address=source or None,
    )
    session.add(agent)
    session.flush()
    actor = _AgentActor(name=f"agent:{agent.name}", source=source)
    segments = _assign_segments(session, actor, agent, row.segments)
    record(
        session,
        actor,
        action="agent.enroll",
        entity="agent",
        entity_id=agent.id,
        after={**agent_view(agent, site.name, segments), "enrollment_token": row.id},
    )
    return EnrollmentResponse(
        agent_id=agent.id,
        agent_secret=secret,
        site=site.name,
        segments=segments,
        controller_public_key=controller_public_key,
    )


def _assign_segments(
    session: Session, actor: Actor, agent: Agent, cidrs: Sequence[str]
) -> list[str]:
    """Hand the token's segments to ``agent``; taking one over from another agent is audited."""
    assigned: list[str] = []
    for cidr in cidrs:
        segment = session.exec(select(Segment).where(Segment.cidr == cidr)).first()
        if segment is None or segment.site_id != agent.site_id:
            raise Conflict(f"segment {cidr} is no longer part of the token's site")
        previous = segment.agent_id
        segment.agent_id = agent.id
        session.add(segment)
        if previous is not None:
            record(
                session,
                actor,
                action="segment.reassign",
                entity="segment",
                entity_id=cidr,
                before={"agent_id": previous},
                after={"agent_id": agent.id},
                reason="agent enrolled for a segment another agent held",
            )
        assigned.append(cidr)
    session.flush()
    return assigned


# --- agents -------------------------------------------------------------------------------------


def list_agents(session: Session) -> list[AgentInfo]:
    names = site_names(session)
    by_agent: dict[str, list[str]] = {}
    for segment in session.exec(select(Segment).order_by(col(Segment.cidr))).all():
        if segment.agent_id is not None:
            by_agent.setdefault(segment.agent_id, []).append(segment.cidr)
    agents = session.exec(select(Agent).order_by(col(Agent.name), col(Agent.id))).all()
    return [
        AgentInfo(agent=a, site=names.get(a.site_id, ""), segments=by_agent.get(a.id, []))
        for a in agents
    ]


def set_agent_disabled(session: Session, actor: Actor, agent_id: str, disabled: bool) -> Agent:
    """Cut an agent off (its secret stops working at once) or let it back in."""
    agent = session.get(Agent, agent_id)
    if agent is None:
        raise NotFound(f"no agent {agent_id!r}")
    if agent.disabled == disabled:
        return agent
    before = {"disabled": agent.disabled}
    agent.disabled = disabled
    session.add(agent)
    record(
        session,
        actor,
        action="agent.disable" if disabled else "agent.enable",
        entity="agent",
        entity_id=agent.id,
        before=before,
        after={"disabled": disabled},
    )
    return agent
