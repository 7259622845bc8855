"""Bounds on what a request may send: body size on the stream, NULs, JSON nesting, 422 size.

The body limit is a pure ASGI middleware so it sees every ``http.request`` message, chunked or
not, and stops reading at the limit: FastAPI reads the body before it resolves the
dependencies that authenticate, so an unauthenticated 300 MiB upload used to be buffered whole
before its 401. Starlette's own ``RequestBodyLimitMiddleware`` (and FastAPI's route-level
``max_body_size``) take one number fixed at import time; our limits come from the settings of
the running app, differ per route, and keep the controller's wording.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from contract._base import nesting_problem
from controller.settings import Settings

LOGIN_PATH = "/api/v1/auth/token"
LOGIN_MAX_BYTES = 64 * 1024  # a name and a password, as JSON or a form
MULTIPART_ALLOWANCE = 64 * 1024  # multipart framing around an uploaded CSV
CSV_UPLOAD_PATH = "/api/v1/machines/import-claims"
MAX_JSON_DEPTH = 32  # no request body of this API nests deeper than a handful of levels
MAX_ERRORS_SHOWN = 20  # validation errors listed in one 422
MAX_ERROR_TEXT = 200  # characters of one message or location part in a 422


def body_limit(path: str, settings: Settings) -> int:
    """How many body bytes a request to ``path`` may send."""
    if path == LOGIN_PATH:
        return LOGIN_MAX_BYTES
    if path == CSV_UPLOAD_PATH:
        return settings.max_batch_bytes + MULTIPART_ALLOWANCE
    return settings.max_batch_bytes


def too_large_detail(limit: int) -> str:
    return f"request body larger than {limit} bytes"


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` once the body passes the limit. An HTTPException, so FastAPI's
    body reader passes it on (anything else it would turn into a 400) and the app answers 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=too_large_detail(limit))


class NulInBody(HTTPException):
    """Raised from ``receive`` when a body carries a NUL, which no text column can hold
    (PostgreSQL refuses it: a 500 deep inside whatever stored it)."""

    def __init__(self) -> None:
        super().__init__(status_code=422, detail=NUL_DETAIL)


NUL_DETAIL = "text may not contain NUL characters (\\u0000 or a zero byte)"
# Agents' own routes judge their items one by one (a bad serial refuses that item, not the
# batch): ingestion cleans and records such values itself.
AGENT_ROUTES = ("/api/v1/agent/", "/api/v1/agents/enroll")
_NULS = (b"\\u0000", b"\x00")


def url_problem(scope: Scope) -> str | None:
    """Why the path or query cannot be taken (a NUL), or None."""
    query: bytes = scope.get("query_string", b"")
    if "\x00" in scope["path"] or b"\x00" in query or b"%00" in query:
        return "a URL may not contain NUL characters (%00)"
    return None


class RequestBoundsMiddleware:
    """Count the bytes of ``http.request`` messages and answer 413 past the route's limit;
    refuse NULs in the URL and (but on agents' routes) in the body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings: Settings = scope["app"].state.settings
        limit = body_limit(scope["path"], settings)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _refuse(limit, scope, receive, send)
            return
        if problem := url_problem(scope):
            await JSONResponse({"detail": problem}, status_code=400)(scope, receive, send)
            return
        check_nul = not scope["path"].startswith(AGENT_ROUTES)
        received = 0
        tail = b""  # the end of the previous chunk, for a NUL escape split across two
        started = False

        async def limited_receive() -> Message:
            nonlocal received, tail
            message = await receive()
            if message["type"] == "http.request":
                chunk: bytes = message.get("body", b"")
                received += len(chunk)
                if received > limit:
                    raise BodyTooLarge(limit)
                if check_nul:
                    window = tail + chunk
                    if any(nul in window for nul in _NULS):
                        raise NulInBody()
                    tail = window[-5:]
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except BodyTooLarge:
            if started:
                raise
            await _refuse(limit, scope, receive, send)
        except NulInBody:
            if started:
                raise
            await JSONResponse({"detail": NUL_DETAIL}, status_code=422)(scope, receive, send)


async def _refuse(limit: int, scope: Scope, receive: Receive, send: Send) -> None:
    # Connection: close, as the rest of the body is never read.
    response = JSONResponse(
        {"detail": too_large_detail(limit)}, status_code=413, headers={"Connection": "close"}
    )
    await response(scope, receive, send)


# --- JSON --------------------------------------------------------------------------------------


def parse_json(body: bytes, limit: int = MAX_JSON_DEPTH) -> Any:
    """Parse a request body; ValueError for bad JSON or nesting past ``limit``."""
    try:
        value = json.loads(body)
    except RecursionError:  # nesting deep enough to exhaust the parser's stack
        raise ValueError(f"JSON nested deeper than {limit} levels") from None
    if problem := nesting_problem(value, limit):
        raise ValueError(f"JSON {problem}")
    return value


# --- 422 ---------------------------------------------------------------------------------------


def _short(text: str) -> str:
    return text if len(text) <= MAX_ERROR_TEXT else text[:MAX_ERROR_TEXT] + "…"


def bounded_errors(errors: Any) -> list[dict[str, Any]]:
    """Validation errors as the client sees them: what and where, never the input itself
    (a 300 MB field was echoed back whole), each text cut short and the list capped."""
    shown: list[dict[str, Any]] = []
    for err in list(errors)[:MAX_ERRORS_SHOWN]:
        loc = [part if isinstance(part, int) else _short(str(part)) for part in err.get("loc", ())]
        item: dict[str, Any] = {
            "type": str(err.get("type", "")),
            "loc": loc,
            "msg": _short(str(err.get("msg", ""))),
        }
        ctx = err.get("ctx")
        if isinstance(ctx, dict):
            item["ctx"] = {
                str(k): _short(str(v)) if not isinstance(v, int | float | bool) else v
                for k, v in ctx.items()
            }
        shown.append(jsonable_encoder(item))
    return shown


async def validation_error_handler(_: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422, minus the echoed input."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    content: dict[str, Any] = {"detail": bounded_errors(errors)}
    if len(errors) > MAX_ERRORS_SHOWN:
        content["more_errors"] = len(errors) - MAX_ERRORS_SHOWN
    return JSONResponse(content, status_code=422)
