"""API routes: the audit log, for compliance staff and inspectors (read-only)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query

from controller.api.deps import CursorQuery, Principal, SessionDep, require_roles
from controller.audit_verify import AuditPage, VerifyResult, list_entries, verify_chain
from controller.models import Role

router = APIRouter(prefix="/audit", tags=["audit"])

AuditorDep = Annotated[Principal, Depends(require_roles(Role.COMPLIANCE, Role.INSPECTOR))]


@router.get("", response_model=AuditPage)
def read_entries(
    session: SessionDep,
    _: AuditorDep,
    cursor: CursorQuery = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    order: Literal["asc", "desc"] = "asc",
    actor: Annotated[str | None, Query(max_length=128)] = None,
    action: Annotated[str | None, Query(max_length=64)] = None,
    entity: Annotated[str | None, Query(max_length=64)] = None,
    entity_id: Annotated[str | None, Query(max_length=128)] = None,
) -> AuditPage:
    """Entries oldest first (or newest first with ``order=desc``), keyset-paginated."""
    return list_entries(
        session,
        cursor=cursor,
        limit=limit,
        order=order,
        actor=actor,
        action=action,
        entity=entity,
        entity_id=entity_id,
    )


@router.get("/verify", response_model=VerifyResult)
def verify(
    session: SessionDep,
    _: AuditorDep,
    anchor: Annotated[
        str | None,
        Query(
            min_length=64,
            max_length=64,
            pattern="^[0-9a-f]{64}$",
            description="a head hash noted earlier; the chain must still contain it",
        ),
    ] = None,
) -> VerifyResult:
    """Recompute the hash chain; ``problem`` names the first modified, deleted or moved entry."""
    return verify_chain(session, anchor=anchor)
