"""Users (admin only) and each user's own API tokens."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Query, status
from pydantic import BaseModel, Field

from controller import accounts
from controller.api.deps import AnyUserDep, IdPath, Principal, SessionDep, require_roles
from controller.models import ApiToken, Role, User
from controller.security import MIN_PASSWORD_LENGTH

router = APIRouter(tags=["users"])

AdminDep = Annotated[Principal, Depends(require_roles(Role.ADMIN))]


class UserPublic(BaseModel):
    name: str
    role: Role
    disabled: bool
    created_at: datetime

    @classmethod
    def of(cls, user: User) -> UserPublic:
        return cls(
            name=user.name, role=user.role, disabled=user.disabled, created_at=user.created_at
        )


class UserCreate(BaseModel):
    name: str = Field(pattern=accounts.USER_NAME_PATTERN, examples=["alice"])
    role: Role
    password: str = Field(min_length=MIN_PASSWORD_LENGTH, max_length=accounts.MAX_PASSWORD_LENGTH)


class UserUpdate(BaseModel):
    role: Role | None = None
    disabled: bool | None = None
    password: str | None = Field(
        default=None, min_length=MIN_PASSWORD_LENGTH, max_length=accounts.MAX_PASSWORD_LENGTH
    )


class TokenCreate(BaseModel):
    name: str = Field(min_length=1, max_length=128, examples=["nightly-export"])
    expires_in_days: int | None = Field(
        default=365, ge=1, le=3650, description="null: never expires"
    )


class TokenPublic(BaseModel):
    id: int
    name: str
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked: bool

    @classmethod
    def of(cls, row: ApiToken) -> TokenPublic:
        assert row.id is not None
        return cls(
            id=row.id,
            name=row.name,
            created_at=row.created_at,
            expires_at=row.expires_at,
            last_used_at=row.last_used_at,
            revoked=row.revoked,
        )


class TokenIssued(TokenPublic):
    token: str = Field(description="shown once; only its hash is stored")


def _user_id(principal: Principal) -> int:
    assert principal.user_id is not None
    return principal.user_id


# --- the caller ---------------------------------------------------------------------------------


@router.get("/users/me", response_model=UserPublic)
def who_am_i(principal: AnyUserDep, session: SessionDep) -> UserPublic:
    return UserPublic.of(accounts.get_user(session, principal.name))


@router.get("/users/me/tokens", response_model=list[TokenPublic])
def my_tokens(
    principal: AnyUserDep,
    session: SessionDep,
    include_inactive: Annotated[bool, Query(description="also revoked and expired")] = False,
) -> list[TokenPublic]:
    rows = accounts.list_api_tokens(session, _user_id(principal), include_inactive=include_inactive)
    return [TokenPublic.of(row) for row in rows]


@router.post("/users/me/tokens", response_model=TokenIssued, status_code=status.HTTP_201_CREATED)
def create_my_token(body: TokenCreate, principal: AnyUserDep, session: SessionDep) -> TokenIssued:
    """A named token for scripts, acting as the caller."""
    expires_in = None if body.expires_in_days is None else timedelta(days=body.expires_in_days)
    issued = accounts.create_api_token(
        session, principal, _user_id(principal), name=body.name, expires_in=expires_in
    )
    session.commit()
    return TokenIssued(**TokenPublic.of(issued.row).model_dump(), token=issued.secret)


@router.delete("/users/me/tokens/{token_id}", response_model=TokenPublic)
def revoke_my_token(token_id: IdPath, principal: AnyUserDep, session: SessionDep) -> TokenPublic:
    row = accounts.revoke_api_token(session, principal, _user_id(principal), token_id)
    session.commit()
    return TokenPublic.of(row)


# --- administration -----------------------------------------------------------------------------


@router.get("/users", response_model=list[UserPublic])
def list_users(_: AdminDep, session: SessionDep) -> list[UserPublic]:
    return [UserPublic.of(user) for user in accounts.list_users(session)]


@router.post("/users", response_model=UserPublic, status_code=status.HTTP_201_CREATED)
def create_user(body: UserCreate, principal: AdminDep, session: SessionDep) -> UserPublic:
    user = accounts.create_user(
        session, principal, name=body.name, role=body.role, password=body.password
    )
    session.commit()
    return UserPublic.of(user)


@router.patch("/users/{name}", response_model=UserPublic)
def update_user(
    name: str, body: UserUpdate, principal: AdminDep, session: SessionDep
) -> UserPublic:
    """Change a user's role, disable or re-enable them (disabling revokes their tokens),
    or reset their password."""
    user = accounts.update_user(
        session,
        principal,
        name,
        role=body.role,
        disabled=body.disabled,
        password=body.password,
    )
    session.commit()
    return UserPublic.of(user)
