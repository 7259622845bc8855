"""Agents: enrollment tokens (admin/operator), enrollment itself (by one-time token), the list."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, status
from pydantic import BaseModel, Field

from contract.enrollment import EnrollmentRequest, EnrollmentResponse
from controller import enrollment, signing
from controller.api.deps import AnyUserDep, Principal, SessionDep, SettingsDep, require_roles
from controller.api.sites import Cidr
from controller.models import Role

log = logging.getLogger(__name__)
router = APIRouter(tags=["agents"])

WriterDep = Annotated[Principal, Depends(require_roles(Role.OPERATOR))]


class EnrollmentTokenCreate(BaseModel):
    site: str = Field(min_length=1, max_length=128)
    segments: list[Cidr] = Field(
        min_length=1,
        max_length=256,
        description="CIDRs of the site (created on it if they are new)",
        examples=[["10.20.1.0/24"]],
    )
    ttl_s: int | None = Field(
        default=None,
        ge=int(enrollment.MIN_TTL.total_seconds()),
        le=int(enrollment.MAX_TTL.total_seconds()),
        description="lifetime in seconds (default: the controller's enrollment_ttl_s)",
    )


class EnrollmentTokenIssued(BaseModel):
    token: str = Field(description="one-time; shown once, only its hash is stored")
    site: str
    segments: list[str]
    expires_at: datetime


class AgentPublic(BaseModel):
    id: str
    name: str
    site: str
    segments: list[str]
    version: str
    hostname: str
    enrolled_at: datetime
    last_seen_at: datetime | None
    last_address: str | None
    disabled: bool
    clock_skew_s: float | None = Field(
        description="the agent's clock minus the controller's at its last delivery "
        "(positive: the agent runs fast); null until measured"
    )
    clock_checked_at: datetime | None

    @classmethod
    def of(cls, info: enrollment.AgentInfo) -> AgentPublic:
        agent = info.agent
        return cls(
            id=agent.id,
            name=agent.name,
            site=info.site,
            segments=info.segments,
            version=agent.version,
            hostname=agent.hostname,
            enrolled_at=agent.enrolled_at,
            last_seen_at=agent.last_seen_at,
            last_address=agent.last_address,
            disabled=agent.disabled,
            clock_skew_s=agent.clock_skew_s,
            clock_checked_at=agent.clock_checked_at,
        )


class AgentUpdate(BaseModel):
    disabled: bool


@router.post(
    "/agents/enrollment-tokens",
    response_model=EnrollmentTokenIssued,
    status_code=status.HTTP_201_CREATED,
)
def create_enrollment_token(
    body: EnrollmentTokenCreate, principal: WriterDep, session: SessionDep, settings: SettingsDep
) -> EnrollmentTokenIssued:
    ttl = timedelta(seconds=body.ttl_s if body.ttl_s is not None else settings.enrollment_ttl_s)
    issued = enrollment.create_token(
        session, principal, site_name=body.site, cidrs=body.segments, ttl=ttl
    )
    session.commit()
    return EnrollmentTokenIssued(
        token=issued.secret,
        site=issued.site.name,
        segments=issued.segments,
        expires_at=issued.row.expires_at,
    )


@router.post(
    "/agents/enroll",
    response_model=EnrollmentResponse,
    status_code=status.HTTP_201_CREATED,
    responses={
        401: {"description": "unknown enrollment token"},
        410: {"description": "enrollment token already used or expired"},
    },
)
def enroll_agent(
    body: EnrollmentRequest, request: Request, session: SessionDep, settings: SettingsDep
) -> EnrollmentResponse:
    """Authenticated by the one-time token in the body, not by a user."""
    try:
        key = signing.load_or_create(settings.data_dir)
    except signing.SigningKeyError as exc:
        log.error("cannot enroll agents: %s", exc)
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail="the controller's signing key is unusable; see the controller log",
        ) from None
    source = request.client.host if request.client else ""
    try:
        response = enrollment.enroll(
            session, body, source=source, controller_public_key=key.public_key_b64()
        )
    except enrollment.EnrollmentDenied as exc:
        raise HTTPException(exc.status_code, detail=str(exc)) from None
    session.commit()
    return response


@router.get("/agents", response_model=list[AgentPublic])
def list_agents(_: AnyUserDep, session: SessionDep) -> list[AgentPublic]:
    return [AgentPublic.of(info) for info in enrollment.list_agents(session)]


@router.patch("/agents/{agent_id}", response_model=AgentPublic)
def update_agent(
    agent_id: str, body: AgentUpdate, principal: WriterDep, session: SessionDep
) -> AgentPublic:
    """Disable an agent (its secret stops working at once) or enable it again."""
    enrollment.set_agent_disabled(session, principal, agent_id, body.disabled)
    session.commit()
    info = next(i for i in enrollment.list_agents(session) if i.agent.id == agent_id)
    return AgentPublic.of(info)
