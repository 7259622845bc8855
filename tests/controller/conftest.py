"""Shared controller fixtures: a real database (SQLite file or a private PostgreSQL schema),
a migrated engine, the FastAPI app under a TestClient, users with API tokens, and the CLI.

Every test that takes ``database_url`` (directly or through ``engine``/``app_client``) runs
twice: once on a fresh SQLite file and once in a fresh PostgreSQL schema on 127.0.0.1:5432
(database ``test``), dropped afterwards. The schema is selected through ``search_path`` in
the URL itself, so anything given the URL — an engine, ``Settings``, a ``serve`` subprocess —
lands in the same schema. Set ``ASICFLEET_TEST_PG_URL`` to use another server.
"""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.engine import Engine
from sqlmodel import Session
from typer.testing import CliRunner, Result

from controller import migrations
from controller.app import create_app
from controller.db import make_engine
from controller.models import ApiToken, Role, User
from controller.security import USER_TOKEN_PREFIX, hash_password, new_token, token_hash
from controller.settings import Settings

PG_ADMIN_URL = os.environ.get(
    "ASICFLEET_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
DEFAULT_PASSWORD = "correct horse battery staple"
BACKENDS = ["sqlite", "postgresql"]


def pg_schema_url(schema: str, base: str = PG_ADMIN_URL) -> str:
    """``base`` with ``search_path`` pinned to ``schema`` (libpq ``options``), as a string."""
    url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    return url.render_as_string(hide_password=False)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """``"sqlite"`` or ``"postgresql"``; tests using it run once per backend."""
    name: str = request.param
    return name


@pytest.fixture
def database_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A URL to an empty database: a tmp SQLite file, or a fresh PostgreSQL schema."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'controller.db'}"
        return
    schema = f"test_{uuid.uuid4().hex[:16]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        yield pg_schema_url(schema)
    finally:
        with admin.connect() as conn:
            # Leftover sessions of a crashed subprocess must not make teardown hang.
            conn.execute(text("SET lock_timeout = '10s'"))
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def settings(database_url: str, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings for this test's database; a developer's ASICFLEET_CONFIG file is ignored."""
    monkeypatch.delenv("ASICFLEET_CONFIG", raising=False)
    return Settings(data_dir=data_dir, database_url=database_url)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """An engine over the test database, migrated to the latest revision."""
    eng = make_engine(database_url)
    migrations.upgrade(eng)
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture
def app_client(settings: Settings, engine: Engine) -> Iterator[TestClient]:
    """The whole API (``create_app``) over the migrated test database."""
    with TestClient(create_app(settings, engine)) as client:
        yield client


# --- people ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TestUser:
    """A user that exists in the database, with a working API token."""

    __test__ = False  # not a test class, despite the name

    id: int
    name: str
    role: Role
    password: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


_password_hashes: dict[str, str] = {}


def create_user(
    engine: Engine,
    role: Role | str = Role.ADMIN,
    name: str | None = None,
    password: str = DEFAULT_PASSWORD,
) -> TestUser:
    """Insert a User and an ApiToken directly (no API, no audit entry) and return the token.

    Argon2 is slow on purpose, so each distinct password is hashed once per test session.
    """
    role = Role(role)
    name = name or f"{role.value}-{secrets.token_hex(4)}"
    if password not in _password_hashes:
        _password_hashes[password] = hash_password(password)
    token = new_token(USER_TOKEN_PREFIX)
    with Session(engine, expire_on_commit=False) as session:
        user = User(name=name, password_hash=_password_hashes[password], role=role)
        session.add(user)
        session.flush()
        assert user.id is not None
        session.add(ApiToken(user_id=user.id, name="test", token_hash=token_hash(token)))
        session.commit()
        return TestUser(id=user.id, name=name, role=role, password=password, token=token)


UserFactory = Callable[..., TestUser]


@pytest.fixture
def make_user(engine: Engine) -> UserFactory:
    """``make_user(Role.OPERATOR)`` (or ``make_user("operator", name=…, password=…)``)."""

    def make(role: Role | str = Role.ADMIN, **kwargs: Any) -> TestUser:
        return create_user(engine, role, **kwargs)

    return make


@pytest.fixture
def admin(make_user: UserFactory) -> TestUser:
    return make_user(Role.ADMIN, name="admin")


# --- the CLI -----------------------------------------------------------------------------------

CliInvoker = Callable[..., Result]


@pytest.fixture
def cli(
    database_url: str, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[CliInvoker]:
    """``cli("machines", "list", "--json", input=...)`` runs ``asicfleet controller …`` in-process
    against the test database (``--data-dir``/``--database-url`` are filled in).

    ``cli(..., as_user=someone)`` acts as that :class:`TestUser` through ``ASICFLEET_TOKEN``; a
    developer's own stored login (config dir) and token are never seen."""
    from asicfleet.cli import app

    monkeypatch.delenv("ASICFLEET_CONFIG", raising=False)
    monkeypatch.delenv("ASICFLEET_TOKEN", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    runner = CliRunner()

    def invoke(*args: str, input: str | None = None, as_user: TestUser | None = None) -> Result:
        argv = [
            "controller",
            "--data-dir",
            str(data_dir),
            "--database-url",
            database_url,
            *args,
        ]
        env = {"ASICFLEET_TOKEN": as_user.token} if as_user is not None else None
        return runner.invoke(app, argv, input=input, env=env)

    yield invoke
