"""API route: agents push report batches here (observations, identities, events).

The body is validated as a whole before anything is written, so a malformed batch gets a
422 naming the offending field (an unsupported ``contract_version`` says so) and nothing
of it is applied. A valid batch is applied in one transaction by
:func:`controller.ingest.ingest_batch`; delivering it again returns the same
acknowledgement with ``duplicate: true``.
"""

from __future__ import annotations

from fastapi import APIRouter

from contract import BatchAck, ReportBatch
from controller.api.deps import AgentDep, SessionDep, SettingsDep
from controller.ingest import ingest_batch

router = APIRouter(tags=["ingest"])


@router.post(
    "/agent/reports",
    response_model=BatchAck,
    summary="Push a report batch (idempotent by batch_id)",
    responses={
        403: {"description": "not an agent credential"},
        409: {"description": "batch_id already used by another agent"},
        422: {"description": "malformed batch; nothing applied"},
    },
)
def post_reports(
    batch: ReportBatch, agent: AgentDep, session: SessionDep, settings: SettingsDep
) -> BatchAck:
    """Apply a batch from the calling agent; items outside its segments are refused."""
    return ingest_batch(session, agent, batch, settings)
