"""Logging in: name and password (JSON or an OAuth2 password form) for a bearer token."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError

from controller import accounts, login_throttle
from controller.api.deps import SessionDep, SettingsDep
from controller.api.limits import parse_json

router = APIRouter(tags=["auth"])


class LoginRequest(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=accounts.MAX_PASSWORD_LENGTH)


class TokenResponse(BaseModel):
    access_token: str
    token_type: str = "bearer"
    expires_at: datetime | None
    user: str
    role: str


_FORM = "application/x-www-form-urlencoded"
_MULTIPART = "multipart/form-data"


async def login_body(request: Request) -> LoginRequest:
    """Accept ``{"name", "password"}`` as JSON, or ``username``/``password`` as an OAuth2 form;
    either body may call the user ``name`` or ``username`` (one spelling may not be given two
    different values)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    raw: Any
    if content_type in (_FORM, _MULTIPART):
        form = await request.form()
        raw = {k: form.get(k) for k in ("name", "username", "password") if k in form}
    elif content_type in ("application/json", ""):
        body = await request.body()
        try:
            raw = parse_json(body) if body else None
        except ValueError as exc:
            raise _invalid("body", f"body is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise _invalid("body", 'expected a JSON object {"name": ..., "password": ...}')
    else:
        raise _invalid("body", f"expected application/json or {_FORM}, got {content_type}")
    if "username" in raw:
        username = raw.pop("username")
        if raw.setdefault("name", username) != username:
            raise _invalid("body", "name and username name different users: give one")
    try:
        return LoginRequest.model_validate(raw)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in exc.errors(include_context=False)]
        ) from None


def _invalid(where: str, message: str) -> RequestValidationError:
    return RequestValidationError([{"type": "value_error", "loc": (where,), "msg": message}])


_LOGIN_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": LoginRequest.model_json_schema()},
            _FORM: {
                "schema": {
                    "type": "object",
                    "required": ["username", "password"],
                    "properties": {
                        "username": {"type": "string"},
                        "password": {"type": "string", "format": "password"},
                        "grant_type": {"type": "string", "enum": ["password"]},
                    },
                }
            },
        },
    }
}


@router.post(
    "/auth/token",
    response_model=TokenResponse,
    openapi_extra=_LOGIN_SCHEMA,
    responses={
        401: {"description": "invalid name or password"},
        429: {"description": "too many failed logins for this name or address; see Retry-After"},
    },
)
def issue_token(
    credentials: Annotated[LoginRequest, Depends(login_body)],
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
) -> TokenResponse:
    """A session token (expires after 12 h). A wrong name or password gets the same answer;
    too many of them lock the name, or the address, out for a while (429)."""
    source = request.client.host if request.client else ""
    try:
        issued = login_throttle.login(
            session,
            login_throttle.ThrottlePolicy.of(settings),
            name=credentials.name,
            password=credentials.password,
            source=source,
        )
    except login_throttle.LoginThrottled as exc:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail=str(exc),
            headers={"Retry-After": str(exc.retry_after_s)},
        ) from None
    except accounts.LoginFailed as exc:
        session.commit()  # the failure counts towards a lockout
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, detail=str(exc), headers={"WWW-Authenticate": "Bearer"}
        ) from None
    user = accounts.get_user(session, credentials.name)
    session.commit()
    return TokenResponse(
        access_token=issued.secret,
        expires_at=issued.row.expires_at,
        user=user.name,
        role=user.role,
    )
