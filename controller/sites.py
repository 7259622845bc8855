"""Sites and their LAN segments: the rules, shared by the API and the CLI.

Segment CIDRs are unique and may not overlap across the whole controller (the ``segment``
table has a unique CIDR and machines are matched to segments by address), so an overlap
with any site's segment is a :class:`Conflict`. Callers commit.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from controller.actors import Actor, record
from controller.errors import Conflict, ControllerError, NotFound
from controller.models import Segment, Site

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

SITE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_SITE_NAME = re.compile(SITE_NAME_PATTERN)
# Wider segments are almost always a typo (and far too large for an agent to scan).
MIN_PREFIX = {4: 16, 6: 48}


# --- pure rules ---------------------------------------------------------------------------------


def parse_cidr(text: str) -> Network:
    """A network from ``10.1.2.0/24``-style text, or ValueError saying exactly what is wrong."""
    text = text.strip()
    if "/" not in text:
        raise ValueError(f"{text!r} is not a CIDR: add a prefix length, e.g. 10.0.0.0/24")
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        if "host bits set" in str(exc):
            loose = ipaddress.ip_network(text, strict=False)
            raise ValueError(f"{text} has host bits set; did you mean {loose}?") from None
        raise ValueError(f"{text!r} is not a valid IPv4 or IPv6 CIDR") from None
    floor = MIN_PREFIX[network.version]
    if network.prefixlen < floor:
        raise ValueError(
            f"{network} is wider than /{floor}; split it into segments of /{floor} or narrower"
        )
    return network


def find_overlap(new: Network, existing: Iterable[str]) -> str | None:
    """The first of ``existing`` CIDRs that overlaps ``new`` (IPv4 never overlaps IPv6)."""
    for cidr in existing:
        other = ipaddress.ip_network(cidr)
        if other.version == new.version and other.overlaps(new):
            return cidr
    return None


def site_problem(name: str, licence_number: str) -> str | None:
    if not _SITE_NAME.match(name):
        return (
            "site name must be 1-128 characters: letters, digits and . _ -, "
            "starting with a letter or digit"
        )
    if not licence_number.strip():
        return "licence number must not be empty"
    return None


def site_view(site: Site) -> dict[str, Any]:
    return {
        "name": site.name,
        "licence_number": site.licence_number,
        "dmp_account": site.dmp_account,
        "owner_name": site.owner_name,
    }


def segment_view(segment: Segment, site_name: str) -> dict[str, Any]:
    return {"cidr": segment.cidr, "site": site_name, "agent_id": segment.agent_id}


# --- sites --------------------------------------------------------------------------------------


def get_site(session: Session, name: str) -> Site:
    site = session.exec(select(Site).where(Site.name == name)).first()
    if site is None:
        raise NotFound(f"no site named {name!r}")
    return site


def list_sites(session: Session) -> list[Site]:
    return list(session.exec(select(Site).order_by(col(Site.name))).all())


def site_names(session: Session) -> dict[int, str]:
    return {site.id: site.name for site in list_sites(session) if site.id is not None}


def create_site(
    session: Session,
    actor: Actor,
    *,
    name: str,
    licence_number: str,
    dmp_account: str = "",
    owner_name: str = "",
) -> Site:
    """Add a site; a duplicate name is a :class:`Conflict`."""
    if problem := site_problem(name, licence_number):
        raise ControllerError(problem)
    if session.exec(select(Site.id).where(Site.name == name)).first() is not None:
        raise Conflict(f"site {name!r} already exists")
    site = Site(
        name=name,
        licence_number=licence_number.strip(),
        dmp_account=dmp_account.strip(),
        owner_name=owner_name.strip(),
    )
    session.add(site)
    try:
        session.flush()
    except IntegrityError:
        raise Conflict(f"site {name!r} already exists") from None
    record(
        session, actor, action="site.create", entity="site", entity_id=name, after=site_view(site)
    )
    return site


# --- segments -----------------------------------------------------------------------------------


def list_segments(session: Session, site: Site) -> list[Segment]:
    return list(
        session.exec(
            select(Segment).where(Segment.site_id == site.id).order_by(col(Segment.cidr))
        ).all()
    )


def add_segment(session: Session, actor: Actor, site: Site, cidr: str) -> Segment:
    """Add a CIDR to ``site``; refuses any overlap with an existing segment of any site."""
    try:
        network = parse_cidr(cidr)
    except ValueError as exc:
        raise ControllerError(str(exc)) from None
    rows = session.exec(select(Segment.cidr, Segment.site_id)).all()
    owners = {row[0]: row[1] for row in rows}
    clash = find_overlap(network, owners)
    if clash is not None:
        where = "this site" if owners[clash] == site.id else _site_name(session, owners[clash])
        raise Conflict(f"{network} overlaps segment {clash} of {where}")
    assert site.id is not None
    segment = Segment(site_id=site.id, cidr=str(network))
    session.add(segment)
    try:
        session.flush()
    except IntegrityError:
        raise Conflict(f"segment {network} already exists") from None
    record(
        session,
        actor,
        action="segment.create",
        entity="segment",
        entity_id=str(network),
        after=segment_view(segment, site.name),
    )
    return segment


def ensure_segments(
    session: Session, actor: Actor, site: Site, cidrs: Iterable[str]
) -> list[Segment]:
    """The segments named by ``cidrs`` on ``site``, creating those that do not exist yet.

    A CIDR that is (or overlaps) another site's segment, or overlaps a different segment of
    this site, is refused.
    """
    result: list[Segment] = []
    for cidr in cidrs:
        try:
            network = parse_cidr(cidr)
        except ValueError as exc:
            raise ControllerError(str(exc)) from None
        existing = session.exec(select(Segment).where(Segment.cidr == str(network))).first()
        if existing is None:
            result.append(add_segment(session, actor, site, str(network)))
        elif existing.site_id != site.id:
            other = _site_name(session, existing.site_id)
            raise Conflict(f"segment {network} belongs to {other}, not site {site.name!r}")
        elif existing not in result:
            result.append(existing)
    return result


def _site_name(session: Session, site_id: int) -> str:
    site = session.get(Site, site_id)
    return f"site {site.name!r}" if site is not None else f"site #{site_id}"
