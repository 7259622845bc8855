"""API routes: the machine register (read by every user; changed by technicians and operators)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlmodel import Session
from starlette.datastructures import UploadFile

from controller import register
from controller.api.deps import (
    MAX_SQL_INT,
    AnyUserDep,
    Principal,
    SessionDep,
    SettingsDep,
    require_roles,
)
from controller.models import LifecycleState, Role
from controller.register import (
    ClaimRequest,
    ConfirmSerialRequest,
    ImportResult,
    MachineDetail,
    MachinesPublic,
    SerialMismatch,
    StateChangeRequest,
)

router = APIRouter(prefix="/machines", tags=["machines"])

ChangerDep = Annotated[Principal, Depends(require_roles(Role.TECHNICIAN, Role.OPERATOR))]

_MISMATCH: dict[int | str, dict[str, Any]] = {
    409: {"description": "conflict; a serial mismatch names both serials"}
}
_CSV_TYPES = ("text/csv", "text/plain", "application/csv", "application/octet-stream")


def _mismatch(exc: SerialMismatch) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=status.HTTP_409_CONFLICT)


@router.get("", response_model=MachinesPublic)
def list_machines(
    session: SessionDep,
    _: AnyUserDep,
    state: LifecycleState | None = None,
    site: Annotated[str | None, Query(max_length=128, description="site name")] = None,
    skip: Annotated[int, Query(ge=0, le=MAX_SQL_INT)] = 0,
    limit: Annotated[int, Query(ge=1, le=register.MAX_PAGE)] = 100,
) -> MachinesPublic:
    """The register, filtered by lifecycle state and/or site; ``count`` is the total."""
    return register.list_machines(session, state=state, site=site, offset=skip, limit=limit)


@router.post(
    "/import-claims",
    response_model=ImportResult,
    responses={422: {"model": ImportResult, "description": "bad file: nothing imported"}},
    openapi_extra={
        "requestBody": {
            "content": {
                "text/csv": {"schema": {"type": "string"}},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"file": {"type": "string", "format": "binary"}},
                    }
                },
            }
        }
    },
)
async def import_claims(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    principal: ChangerDep,
    dry_run: bool = False,
) -> JSONResponse:
    """Claim many machines from a CSV (a text/csv body or a multipart ``file``), all or none.

    Columns: ``mac`` or ``ip``, site, container, rack, shelf, slot, label_serial and an
    optional override_reason. A file with any bad row imports nothing and answers 422 with
    every row's result.
    """
    raw, name = await _read_csv_body(request, settings.max_batch_bytes)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            detail=f"the file is not UTF-8 text (byte {exc.start})",
        ) from None
    result = await run_in_threadpool(_import, session, principal, text, dry_run, name)
    code = status.HTTP_200_OK if result.ok else status.HTTP_422_UNPROCESSABLE_CONTENT
    return JSONResponse(result.model_dump(mode="json"), status_code=code)


def _import(
    session: Session, principal: Principal, text: str, dry_run: bool, name: str
) -> ImportResult:
    result = register.import_claims(session, principal, text, dry_run=dry_run, source_name=name)
    if result.ok and not dry_run:
        session.commit()
    else:
        session.rollback()
    return result


async def _read_csv_body(request: Request, limit: int) -> tuple[bytes, str]:
    """The uploaded bytes and a file name, from multipart or from a plain CSV body."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    too_big = HTTPException(
        status.HTTP_413_CONTENT_TOO_LARGE, detail=f"the file is larger than {limit} bytes"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + 64 * 1024:  # room for multipart framing
        raise too_big
    if content_type == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=8)
        upload = form.get("file")
        if upload is None:
            upload = next((v for v in form.values() if isinstance(v, UploadFile)), None)
        if not isinstance(upload, UploadFile):
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                detail="multipart upload without a file (send the CSV as field 'file')",
            )
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise too_big
        return data, upload.filename or ""
    if content_type in _CSV_TYPES or not content_type:
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks), ""
    raise HTTPException(
        status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
        detail=f"send the CSV as text/csv or multipart/form-data, not {content_type}",
    )


@router.get("/{machine_id}", response_model=MachineDetail)
def read_machine(session: SessionDep, _: AnyUserDep, machine_id: str) -> MachineDetail:
    """One machine (by machine_id, MAC or IP) with its lifecycle history and latest poll."""
    return register.machine_detail(session, machine_id)


@router.post("/{machine_id}/claim", response_model=MachineDetail, responses=_MISMATCH)
def claim_machine(
    session: SessionDep, principal: ChangerDep, machine_id: str, body: ClaimRequest
) -> Any:
    """Put a discovered machine on the register with its location and label serial."""
    try:
        detail = register.claim(session, principal, machine_id, body)
    except SerialMismatch as exc:
        return _mismatch(exc)
    session.commit()
    return detail


@router.post("/{machine_id}/state", response_model=MachineDetail)
def change_state(
    session: SessionDep, principal: ChangerDep, machine_id: str, body: StateChangeRequest
) -> MachineDetail:
    """Move a machine along its lifecycle (active, maintenance, rma, decommissioned …)."""
    detail = register.change_state(session, principal, machine_id, body)
    session.commit()
    return detail


@router.post("/{machine_id}/confirm-serial", response_model=MachineDetail, responses=_MISMATCH)
def confirm_serial(
    session: SessionDep, principal: ChangerDep, machine_id: str, body: ConfirmSerialRequest
) -> Any:
    """Confirm, from the chassis label, the serial of a machine whose serial was unreadable."""
    try:
        detail = register.confirm_serial(session, principal, machine_id, body)
    except SerialMismatch as exc:
        return _mismatch(exc)
    session.commit()
    return detail
