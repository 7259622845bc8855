"""The FastAPI application factory."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.engine import Engine
from sqlmodel import Session

from controller.api import (
    agents,
    audit,
    auth,
    compliance,
    exports,
    ingest,
    machines,
    metrics,
    pools,
    sites,
    users,
)
from controller.api.limits import RequestBoundsMiddleware, validation_error_handler
from controller.db import engine_for
from controller.errors import Conflict, ControllerError, NotFound, Refused
from controller.settings import Settings

API_PREFIX = "/api/v1"
log = logging.getLogger(__name__)


def sweep_once(engine: Engine, settings: Settings) -> int:
    """Flag registered machines that have not been seen for ``missing_after_minutes``."""
    from controller.ingest import sweep_missing

    with Session(engine, expire_on_commit=False) as session:
        return sweep_missing(
            session,
            now=datetime.now(UTC),
            after=timedelta(minutes=settings.missing_after_minutes),
        )


async def _sweep_forever(engine: Engine, settings: Settings) -> None:
    """Every replica may sweep: flags are idempotent, so no leader election is needed."""
    while True:
        await asyncio.sleep(settings.missing_sweep_interval_s)
        try:
            flagged = await asyncio.to_thread(sweep_once, engine, settings)
        except Exception:  # the sweep must never take the API down with it
            log.exception("missing-machine sweep failed; will retry")
            continue
        if flagged:
            log.info("flagged %d machine(s) missing", flagged)


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """Build the app over ``engine`` (default: from settings). Migrations are run by `serve`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sweeper = asyncio.create_task(_sweep_forever(app.state.engine, settings))
        try:
            yield
        finally:
            sweeper.cancel()
            with suppress(asyncio.CancelledError):
                await sweeper

    app = FastAPI(
        title="asicfleet controller",
        version="0.1.0",
        description="Machine register, agent ingestion, audit log, users and roles.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine if engine is not None else engine_for(settings)

    # Outermost of ours: counts body bytes on the stream, before anything reads or authenticates.
    app.add_middleware(RequestBoundsMiddleware)
    app.add_exception_handler(RequestValidationError, validation_error_handler)

    @app.exception_handler(ControllerError)
    async def _controller_error(_: Request, exc: ControllerError) -> JSONResponse:
        code = 400
        if isinstance(exc, NotFound):
            code = 404
        elif isinstance(exc, Conflict):
            code = 409
        elif isinstance(exc, Refused):
            code = 403
        return JSONResponse({"detail": str(exc)}, status_code=code)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    for module in (auth, users, sites, agents, ingest, machines, audit, pools, compliance, exports):
        app.include_router(module.router, prefix=API_PREFIX)
    app.include_router(metrics.router)
    _document_refusals(app)
    return app


def _document_refusals(app: FastAPI) -> None:
    """Every operation that takes a credential documents the two ways it refuses one: 401 (no,
    unknown, revoked or expired credential) and 403 (a role that may not do this)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for operations in schema.get("paths", {}).values():
                for operation in operations.values():
                    if isinstance(operation, dict) and operation.get("security"):
                        responses = operation.setdefault("responses", {})
                        responses.setdefault("401", {"description": AUTH_401})
                        responses.setdefault("403", {"description": AUTH_403})
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


AUTH_401 = "No credential, or an unknown, revoked or expired one (WWW-Authenticate: Bearer)."
AUTH_403 = "The credential is valid but its role (or kind: user or agent) may not do this."
