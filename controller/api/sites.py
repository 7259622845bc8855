"""Sites and their LAN segments: admins and operators write, every user reads."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, status
from pydantic import AfterValidator, BaseModel, Field

from controller import sites
from controller.api.deps import AnyUserDep, Principal, SessionDep, require_roles
from controller.models import Role, Segment, Site

router = APIRouter(tags=["sites"])

WriterDep = Annotated[Principal, Depends(require_roles(Role.OPERATOR))]


def _cidr(value: str) -> str:
    return str(sites.parse_cidr(value))


Cidr = Annotated[str, AfterValidator(_cidr)]


class SiteCreate(BaseModel):
    name: str = Field(pattern=sites.SITE_NAME_PATTERN, examples=["ekibastuz-1"])
    licence_number: str = Field(min_length=1, max_length=128)
    dmp_account: str = Field(default="", max_length=128)
    owner_name: str = Field(default="", max_length=256)


class SitePublic(BaseModel):
    name: str
    licence_number: str
    dmp_account: str
    owner_name: str
    created_at: datetime

    @classmethod
    def of(cls, site: Site) -> SitePublic:
        return cls(
            name=site.name,
            licence_number=site.licence_number,
            dmp_account=site.dmp_account,
            owner_name=site.owner_name,
            created_at=site.created_at,
        )


class SegmentCreate(BaseModel):
    cidr: Cidr = Field(examples=["10.20.1.0/24"])


class SegmentPublic(BaseModel):
    cidr: str
    site: str
    agent_id: str | None

    @classmethod
    def of(cls, segment: Segment, site: Site) -> SegmentPublic:
        return cls(cidr=segment.cidr, site=site.name, agent_id=segment.agent_id)


@router.get("/sites", response_model=list[SitePublic])
def list_sites(_: AnyUserDep, session: SessionDep) -> list[SitePublic]:
    return [SitePublic.of(site) for site in sites.list_sites(session)]


@router.post("/sites", response_model=SitePublic, status_code=status.HTTP_201_CREATED)
def create_site(body: SiteCreate, principal: WriterDep, session: SessionDep) -> SitePublic:
    site = sites.create_site(
        session,
        principal,
        name=body.name,
        licence_number=body.licence_number,
        dmp_account=body.dmp_account,
        owner_name=body.owner_name,
    )
    session.commit()
    return SitePublic.of(site)


@router.get("/sites/{name}", response_model=SitePublic)
def show_site(name: str, _: AnyUserDep, session: SessionDep) -> SitePublic:
    return SitePublic.of(sites.get_site(session, name))


@router.get("/sites/{name}/segments", response_model=list[SegmentPublic])
def list_segments(name: str, _: AnyUserDep, session: SessionDep) -> list[SegmentPublic]:
    site = sites.get_site(session, name)
    return [SegmentPublic.of(segment, site) for segment in sites.list_segments(session, site)]


@router.post(
    "/sites/{name}/segments",
    response_model=SegmentPublic,
    status_code=status.HTTP_201_CREATED,
    responses={409: {"description": "the CIDR overlaps an existing segment"}},
)
def add_segment(
    name: str, body: SegmentCreate, principal: WriterDep, session: SessionDep
) -> SegmentPublic:
    site = sites.get_site(session, name)
    segment = sites.add_segment(session, principal, site, body.cidr)
    session.commit()
    return SegmentPublic.of(segment, site)
