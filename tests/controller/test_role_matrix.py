"""The role matrix: every route of ``create_app``, called as nobody, as each role and as an agent.

Routes are enumerated from the app itself, so a route someone adds is covered automatically; a
route missing from ``controller.api.policy.ROUTE_ACCESS`` fails here, which forces every new
endpoint to declare who may call it. "Allowed" means the request got past authentication and
authorisation (anything but 401/403: with dummy ids and no body it is usually 404 or 422);
"denied" means 401 for nobody and 403 for everyone else.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.routing import BaseRoute, Mount, WebSocketRoute

from controller.api.policy import AGENT, ANONYMOUS, ROUTE_ACCESS
from controller.app import create_app
from controller.models import Role
from controller.settings import Settings
from tests.controller.conftest import UserFactory

SKIPPED_METHODS = {"HEAD", "OPTIONS"}
# Path parameters get a value that names nothing, so an allowed call cannot change real data.
DUMMY = "999999999"
_PARAM = re.compile(r"\{[^}]+\}")


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str

    @property
    def url(self) -> str:
        return _PARAM.sub(DUMMY, self.path)

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


def _flat_routes(app: FastAPI) -> Iterator[BaseRoute]:
    """Every route with its full path (FastAPI >= 0.130 keeps included routers nested)."""
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI copies included routes into app.routes
        yield from app.routes
        return
    # A RouteContext is not a BaseRoute, but proxies path, methods and original_route.
    yield from iter_route_contexts(app.routes)  # type: ignore[misc]


def endpoints(app: FastAPI) -> list[Endpoint]:
    found: list[Endpoint] = []
    for route in _flat_routes(app):
        path = getattr(route, "path", None)
        methods = getattr(route, "methods", None)
        original = getattr(route, "original_route", route)
        if isinstance(original, Mount) or (path is not None and methods is None):
            found.append(Endpoint("*", str(path)))
        elif isinstance(original, WebSocketRoute):
            found.append(Endpoint("WEBSOCKET", str(path)))
        elif path is not None and methods:
            found.extend(Endpoint(m, path) for m in sorted(methods - SKIPPED_METHODS))
        else:
            raise AssertionError(f"cannot tell what {original!r} serves; extend this test")
    return found


@pytest.fixture(scope="module")
def declared_app(tmp_path_factory: pytest.TempPathFactory) -> FastAPI:
    """The app, only for listing its routes (no database is touched)."""
    data_dir = tmp_path_factory.mktemp("routes")
    return create_app(Settings(data_dir=data_dir, database_url=f"sqlite:///{data_dir}/x.db"))


def test_every_route_declares_who_may_call_it(declared_app: FastAPI) -> None:
    undeclared = [str(e) for e in endpoints(declared_app) if (e.method, e.path) not in ROUTE_ACCESS]
    assert not undeclared, (
        "routes missing from controller.api.policy.ROUTE_ACCESS (declare who may call "
        f"each): {undeclared}"
    )


def test_the_policy_table_names_only_routes_that_exist(declared_app: FastAPI) -> None:
    present = {(e.method, e.path) for e in endpoints(declared_app)}
    stale = sorted(f"{m} {p}" for m, p in ROUTE_ACCESS if (m, p) not in present)
    assert not stale, f"ROUTE_ACCESS names routes the app does not have (renamed?): {stale}"


def test_the_role_matrix_holds(app_client: TestClient, make_user: UserFactory) -> None:
    """Nobody, the five roles and an agent against every declared route of the app."""
    callers: dict[str, dict[str, str]] = {ANONYMOUS: {}}
    for role in Role:
        callers[role.value] = make_user(role, name=f"matrix-{role.value}").headers
    callers[AGENT] = {"Authorization": f"Bearer {_enrolled_agent(app_client, callers)}"}

    assert isinstance(app_client.app, FastAPI)
    wrong: list[str] = []
    checked = 0
    for endpoint in endpoints(app_client.app):
        if endpoint.method in ("*", "WEBSOCKET"):
            continue  # a mount or socket is checked by its own tests; it must still be declared
        access = ROUTE_ACCESS.get((endpoint.method, endpoint.path))
        if access is None:
            continue  # reported by test_every_route_declares_who_may_call_it
        for caller, headers in callers.items():
            code = app_client.request(endpoint.method, endpoint.url, headers=headers).status_code
            checked += 1
            if caller in access:
                if code in (401, 403):
                    wrong.append(f"{endpoint} as {caller}: {code}, expected to be let through")
            else:
                expected = 401 if caller == ANONYMOUS else 403
                if code != expected:
                    wrong.append(f"{endpoint} as {caller}: {code}, expected {expected}")
    assert checked > 0
    assert not wrong, "\n".join(wrong)


def _enrolled_agent(client: TestClient, callers: dict[str, dict[str, str]]) -> str:
    """An agent credential obtained the real way: site, token, enrollment."""
    admin = callers[Role.ADMIN.value]
    site = {"name": "matrix", "licence_number": "L-1"}
    assert client.post("/api/v1/sites", json=site, headers=admin).status_code == 201
    token = client.post(
        "/api/v1/agents/enrollment-tokens",
        json={"site": "matrix", "segments": ["10.99.0.0/24"]},
        headers=admin,
    ).json()["token"]
    enrolled = client.post(
        "/api/v1/agents/enroll",
        json={"token": token, "agent_name": "matrix-agent", "agent_version": "0.1.0"},
    )
    assert enrolled.status_code == 201, enrolled.text
    secret: str = enrolled.json()["agent_secret"]
    return secret


def test_a_route_missing_from_the_table_is_caught(declared_app: FastAPI) -> None:
    """The guard itself works: an extra, undeclared route shows up as undeclared."""
    app = FastAPI()
    app.router.routes.extend(declared_app.router.routes)

    @app.get("/api/v1/secret-new-thing")
    def _new() -> dict[str, str]:
        return {}

    listed = {(e.method, e.path) for e in endpoints(app)}
    assert ("GET", "/api/v1/secret-new-thing") in listed
    assert ("GET", "/api/v1/secret-new-thing") not in ROUTE_ACCESS
    assert ("POST", "/api/v1/agents/enroll") in listed  # nested routers are seen too
