"""API routes: compliance exports as background jobs, for compliance staff and inspectors.

``POST /exports`` validates the request, answers 202 with a job, and builds the export after
the response (progress in ``GET /exports/{id}``); when it is done, ``download_url`` serves the
signed export as a zip. Jobs live under ``<data_dir>/exports/<id>/`` (``job.json``, the export
folder and its zip), so any replica sharing the data directory can answer for them.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, BackgroundTasks, Depends, HTTPException, status
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from controller import timefmt
from controller.api.deps import Principal, SettingsDep, get_engine, require_roles
from controller.db import session_scope
from controller.errors import ControllerError
from controller.exports.compliance_report import DEFAULT_REPEAT_THRESHOLD
from controller.exports.i18n import Lang
from controller.exports.service import ExportKind, ExportRequest, run_export, zip_folder
from controller.models import LifecycleState, Role, Site, utcnow
from controller.settings import Settings
from controller.signing import load_or_create

log = logging.getLogger(__name__)
router = APIRouter(prefix="/exports", tags=["exports"])

AuditorDep = Annotated[
    Principal, Depends(require_roles(Role.COMPLIANCE, Role.INSPECTOR, admin_passes=False))
]
EngineDep = Annotated[Engine, Depends(get_engine)]
JOB_ID = r"^[0-9a-f]{24}$"


class ExportBody(BaseModel):
    """What to export; ``as_of`` and ``period`` follow docs/controller.md, "Times and periods"
    (an ISO 8601 time with a zone, a date or ``now``; the period ``FROM..TO`` without TO)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    kind: ExportKind
    formats: list[Literal["csv", "xlsx", "pdf", "json"]] = Field(min_length=1, max_length=4)
    lang: Lang = "en"
    as_of: str | None = Field(default=None, max_length=64, examples=["2026-11-01T00:00Z"])
    period: str | None = Field(default=None, max_length=130, examples=["2026-10-01..2026-11-01"])
    site: str | None = Field(default=None, max_length=128)
    state: LifecycleState | None = None
    model: str | None = Field(default=None, max_length=128)
    repeat_threshold: int = Field(default=DEFAULT_REPEAT_THRESHOLD, ge=1, le=1000)


class ExportJob(BaseModel):
    id: str
    status: Literal["queued", "running", "done", "failed"]
    progress: float
    stage: str
    request: dict[str, Any]
    requested_by: str
    created_at: datetime
    finished_at: datetime | None = None
    error: str | None = None
    rows: dict[str, int] | None = None
    manifest_sha256: str | None = None
    download_url: str | None = None


def _root(settings: Settings) -> Path:
    return settings.data_dir / "exports"


def _save(settings: Settings, job: ExportJob) -> None:
    folder = _root(settings) / job.id
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".job.{secrets.token_hex(4)}.tmp"
    tmp.write_text(job.model_dump_json(indent=2))
    os.replace(tmp, folder / "job.json")


def _load(settings: Settings, job_id: str) -> ExportJob:
    path = _root(settings) / job_id / "job.json"
    try:
        return ExportJob.model_validate(json.loads(path.read_text()))
    except FileNotFoundError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no export job {job_id}") from None


def _to_request(body: ExportBody) -> ExportRequest:
    now = datetime.now(UTC)
    try:
        return ExportRequest(
            kind=body.kind,
            formats=tuple(dict.fromkeys(body.formats)),
            lang=body.lang,
            as_of=timefmt.parse_instant(body.as_of, "as_of", now=now) if body.as_of else None,
            period=timefmt.parse_period(body.period, "period", now=now) if body.period else None,
            site=body.site,
            state=body.state,
            model=body.model,
            repeat_threshold=body.repeat_threshold,
        )
    except ValueError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail=str(exc)) from None


def _build(
    engine: Engine, settings: Settings, job: ExportJob, request: ExportRequest, who: Principal
) -> None:
    """The background part: write, sign, zip; every outcome ends up in ``job.json``."""
    folder = _root(settings) / job.id

    def progress(fraction: float, stage: str) -> None:
        job.progress, job.stage = round(fraction, 2), stage
        _save(settings, job)

    job.status = "running"
    progress(0.01, "starting")
    try:
        key = load_or_create(settings.data_dir)
        with session_scope(engine) as session:
            result = run_export(
                session,
                request,
                folder / "export",
                key,
                who,
                resolution_s=settings.history_resolution_s,
                progress=progress,
                stale_after=timedelta(minutes=settings.missing_after_minutes),
            )
        zip_folder(result.folder, folder / "export.zip")
    except ControllerError as exc:
        job.status, job.error = "failed", str(exc)
    except Exception as exc:  # the job must say it failed rather than stay "running"
        log.exception("export job %s failed", job.id)
        job.status, job.error = "failed", f"internal error: {type(exc).__name__}"
    else:
        job.status = "done"
        job.rows = result.rows
        job.manifest_sha256 = result.manifest_sha256
        job.download_url = f"/api/v1/exports/{job.id}/download"
    job.finished_at = utcnow()
    job.progress = 1.0 if job.status == "done" else job.progress
    job.stage = job.status
    _save(settings, job)


@router.post("", response_model=ExportJob, status_code=status.HTTP_202_ACCEPTED)
def create_export(
    body: ExportBody,
    background: BackgroundTasks,
    who: AuditorDep,
    settings: SettingsDep,
    engine: EngineDep,
) -> ExportJob:
    """Start an export; poll the job for progress, then fetch ``download_url``."""
    request = _to_request(body)
    problems = request.problems()
    if problems:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail="; ".join(problems))
    if request.site is not None:
        with Session(engine) as session:
            if session.exec(select(Site.id).where(Site.name == request.site)).first() is None:
                raise HTTPException(
                    status.HTTP_422_UNPROCESSABLE_CONTENT, detail=f"no site {request.site!r}"
                )
    job = ExportJob(
        id=secrets.token_hex(12),
        status="queued",
        progress=0.0,
        stage="queued",
        request=request.described(),
        requested_by=who.name,
        created_at=utcnow(),
    )
    _save(settings, job)
    background.add_task(_build, engine, settings, job, request, who)
    return job


@router.get("", response_model=list[ExportJob])
def list_exports(_: AuditorDep, settings: SettingsDep) -> list[ExportJob]:
    """Export jobs, newest first."""
    root = _root(settings)
    jobs = []
    if root.is_dir():
        for path in root.glob("*/job.json"):
            try:
                jobs.append(ExportJob.model_validate(json.loads(path.read_text())))
            except (OSError, ValueError):
                continue
    return sorted(jobs, key=lambda j: j.created_at, reverse=True)


@router.get("/{job_id}", response_model=ExportJob)
def read_export(job_id: str, _: AuditorDep, settings: SettingsDep) -> ExportJob:
    """One job: status, progress and, when done, the download link."""
    return _load(settings, _checked(job_id))


@router.get("/{job_id}/download", response_class=FileResponse)
def download_export(job_id: str, _: AuditorDep, settings: SettingsDep) -> FileResponse:
    """The signed export as a zip (check it with ``asicfleet verify-export``)."""
    job = _load(settings, _checked(job_id))
    if job.status != "done":
        raise HTTPException(status.HTTP_409_CONFLICT, detail=f"export job {job_id} is {job.status}")
    path = _root(settings) / job.id / "export.zip"
    name = f"asicfleet-{job.request.get('kind', 'export')}-{job.id}.zip"
    return FileResponse(path, media_type="application/zip", filename=name)


def _checked(job_id: str) -> str:
    import re

    if not re.fullmatch(JOB_ID, job_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no export job {job_id}")
    return job_id
