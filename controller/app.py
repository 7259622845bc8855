"""The FastAPI application factory."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.engine import Engine

from controller.api import agents, audit, auth, ingest, machines, metrics, sites, users
from controller.db import engine_for
from controller.errors import Conflict, ControllerError, NotFound, Refused
from controller.settings import Settings

API_PREFIX = "/api/v1"


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    """Build the app over ``engine`` (default: from settings). Migrations are run by `serve`."""
    app = FastAPI(
        title="asicfleet controller",
        version="0.1.0",
        description="Machine register, agent ingestion, audit log, users and roles.",
    )
    app.state.settings = settings
    app.state.engine = engine if engine is not None else engine_for(settings)

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

    for module in (auth, users, sites, agents, ingest, machines, audit):
        app.include_router(module.router, prefix=API_PREFIX)
    app.include_router(metrics.router)
    return app
