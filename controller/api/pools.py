"""Pool policy routes: approved pool sets (four eyes), site enforcement settings, the dry run,
exemptions, and the signed policy bundle agents pull.

Role dependencies let admin through (as everywhere); the rules that admin does *not* bypass
(only a compliance user other than the proposer decides) live in ``controller.pool_policy``
and ``controller.exemptions`` and answer 403 with the reason.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Response, status

from contract.policy import PolicyBundle
from controller import bundles, exemptions, pool_policy, signing
from controller.api.deps import (
    MAX_SQL_INT,
    AgentDep,
    AnyUserDep,
    IdPath,
    Principal,
    SessionDep,
    SettingsDep,
    require_roles,
)
from controller.errors import NotFound
from controller.exemptions import (
    ExemptionPublic,
    ExemptionRequest,
    ExemptionState,
    RevokeRequest,
)
from controller.models import Role, Site, utcnow
from controller.pool_policy import (
    Decision,
    PoolSetProposal,
    PoolSetPublic,
    SitePolicyPublic,
    SitePolicyUpdate,
)
from controller.sites import get_site

log = logging.getLogger(__name__)
router = APIRouter(tags=["policy"])

ProposerDep = Annotated[Principal, Depends(require_roles(Role.OPERATOR, Role.COMPLIANCE))]
DeciderDep = Annotated[Principal, Depends(require_roles(Role.COMPLIANCE))]
PolicyWriterDep = Annotated[Principal, Depends(require_roles(Role.OPERATOR))]
_REFUSED: dict[int | str, dict[str, str]] = {
    403: {"description": "role or four-eyes rule refuses it (the detail says which)"},
    409: {"description": "not in a state that allows it (already decided, pending exists …)"},
}


# --- the agent's bundle -------------------------------------------------------------------------


@router.get(
    "/agent/policy",
    response_model=PolicyBundle,
    responses={304: {"description": "the bundle named in If-None-Match is still current"}},
)
def agent_policy(
    agent: AgentDep,
    session: SessionDep,
    settings: SettingsDep,
    if_none_match: Annotated[str | None, Header(max_length=1024)] = None,
) -> Response:
    """The signed policy bundle of the agent's site (its version changes only with content).

    Answers ``304 Not Modified`` (no body, nothing built) when ``If-None-Match`` carries the
    current ETag; the ETag also changes every half bundle lifetime, so agents get the bundle
    re-signed before it expires."""
    try:
        key = signing.load_or_create(settings.data_dir)
    except signing.SigningKeyError as exc:
        log.error("cannot sign policy bundles: %s", exc)
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail="the controller's signing key is unusable; see the controller log",
        ) from None
    site = session.get(Site, agent.site_id)
    if site is None:
        raise NotFound("the agent's site no longer exists")
    now = utcnow()
    ttl = timedelta(seconds=settings.policy_ttl_s)
    etag = bundles.bundle_etag(session, site, key, ttl, now)
    headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
    if bundles.etag_matches(if_none_match, etag):
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    bundle = bundles.issue_bundle(session, site, key, ttl, now)
    session.commit()
    return Response(
        content=bundle.model_dump_json(), media_type="application/json", headers=headers
    )


# --- pool sets ----------------------------------------------------------------------------------


@router.get("/sites/{name}/pool-sets", response_model=list[PoolSetPublic])
def list_pool_sets(name: str, _: AnyUserDep, session: SessionDep) -> list[PoolSetPublic]:
    """Every revision of the site's pool set, newest first."""
    site = get_site(session, name)
    return [PoolSetPublic.of(row, site.name) for row in pool_policy.list_pool_sets(session, site)]


@router.post(
    "/sites/{name}/pool-sets",
    response_model=PoolSetPublic,
    status_code=status.HTTP_201_CREATED,
    responses=_REFUSED,
)
def propose_pool_set(
    name: str, body: PoolSetProposal, principal: ProposerDep, session: SessionDep
) -> PoolSetPublic:
    """Propose a new approved pool set; it takes effect once a second (compliance) user approves."""
    row = pool_policy.propose(session, principal, name, body)
    session.commit()
    return PoolSetPublic.of(row, name)


@router.post(
    "/sites/{name}/pool-sets/{version}/approve", response_model=PoolSetPublic, responses=_REFUSED
)
def approve_pool_set(
    name: str,
    version: IdPath,
    principal: DeciderDep,
    session: SessionDep,
    body: Decision | None = None,
) -> PoolSetPublic:
    """Approve a proposal: compliance role, and never the proposer (admin does not bypass)."""
    row = pool_policy.approve(session, principal, name, version, body.reason if body else "")
    session.commit()
    return PoolSetPublic.of(row, name)


@router.post(
    "/sites/{name}/pool-sets/{version}/reject", response_model=PoolSetPublic, responses=_REFUSED
)
def reject_pool_set(
    name: str, version: IdPath, body: Decision, principal: ProposerDep, session: SessionDep
) -> PoolSetPublic:
    """Reject a proposal (a compliance user other than the proposer) or withdraw one's own."""
    row = pool_policy.reject(session, principal, name, version, body.reason)
    session.commit()
    return PoolSetPublic.of(row, name)


# --- site policy --------------------------------------------------------------------------------


@router.get("/sites/{name}/policy", response_model=SitePolicyPublic)
def show_policy(name: str, _: AnyUserDep, session: SessionDep) -> SitePolicyPublic:
    """Mode, worker rule, rollout limits, the set in force, any pending proposal, warnings."""
    return pool_policy.policy_view(session, get_site(session, name))


@router.patch("/sites/{name}/policy", response_model=SitePolicyPublic, responses=_REFUSED)
def update_policy(
    name: str, body: SitePolicyUpdate, principal: PolicyWriterDep, session: SessionDep
) -> SitePolicyPublic:
    """Change the site's mode, worker template, quarantine or rollout limits (audited)."""
    view = pool_policy.update_policy(session, principal, name, body)
    session.commit()
    return view


@router.get("/sites/{name}/policy/preview", response_model=bundles.PolicyPreview)
def preview_policy(
    name: str,
    _: AnyUserDep,
    session: SessionDep,
    version: Annotated[
        int | None,
        Query(ge=1, le=MAX_SQL_INT, description="a stored revision, e.g. the pending proposal"),
    ] = None,
) -> bundles.PolicyPreview:
    """Dry run: how the machines' latest observations stand against the approved set (or
    revision ``version``): compliant, would be written, unknown, exempt."""
    return bundles.preview(session, get_site(session, name), utcnow(), version=version)


# --- exemptions ---------------------------------------------------------------------------------


@router.post(
    "/machines/{machine_id}/exemptions",
    response_model=ExemptionPublic,
    status_code=status.HTTP_201_CREATED,
    responses=_REFUSED,
)
def request_exemption(
    machine_id: str, body: ExemptionRequest, principal: ProposerDep, session: SessionDep
) -> ExemptionPublic:
    """Ask for a time-boxed exemption (at most 30 days); not in force until approved."""
    view = exemptions.request(session, principal, machine_id, body)
    session.commit()
    return view


@router.post(
    "/machines/{machine_id}/exemptions/{exemption_id}/approve",
    response_model=ExemptionPublic,
    responses=_REFUSED,
)
def approve_exemption(
    machine_id: str, exemption_id: IdPath, principal: DeciderDep, session: SessionDep
) -> ExemptionPublic:
    """Approve: a compliance user other than the requester."""
    view = exemptions.approve(session, principal, exemption_id, machine_id)
    session.commit()
    return view


@router.post(
    "/machines/{machine_id}/exemptions/{exemption_id}/revoke",
    response_model=ExemptionPublic,
    responses=_REFUSED,
)
def revoke_exemption(
    machine_id: str,
    exemption_id: IdPath,
    body: RevokeRequest,
    principal: ProposerDep,
    session: SessionDep,
) -> ExemptionPublic:
    """End an exemption now (or cancel a pending one), with a reason."""
    view = exemptions.revoke(session, principal, exemption_id, body.reason, machine_id)
    session.commit()
    return view


@router.get("/exemptions", response_model=list[ExemptionPublic])
def list_exemptions(
    _: AnyUserDep,
    session: SessionDep,
    site: Annotated[str | None, Query(max_length=128)] = None,
    state: ExemptionState | None = None,
) -> list[ExemptionPublic]:
    """Exemptions, newest first, optionally of one site and/or in one state."""
    return exemptions.list_exemptions(session, site=site, state=state)
