"""Input bounds of the controller's HTTP API (issue 10, item 6): each attack first, then the
safe refusal. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from contract.text import MAX_DATA_DEPTH
from controller.api.limits import LOGIN_MAX_BYTES, MAX_JSON_DEPTH, NUL_DETAIL
from tests.controller import test_platform
from tests.controller.conftest import TestUser, UserFactory

API = "/api/v1"
MiB = 1024 * 1024
Served = tuple[subprocess.Popen[bytes], str, Path]
served = test_platform.served  # `asicfleet controller serve` in a subprocess


def _chunks(total: int, proc: psutil.Process, peak: list[int]) -> Iterator[bytes]:
    """``total`` bytes in 1 MiB chunks (so httpx sends them chunked), noting the server's
    resident memory as it goes."""
    block = b"[" + b" " * (MiB - 1)
    for _ in range(total // MiB):
        peak[0] = max(peak[0], proc.memory_info().rss)
        yield block


def _upload(base: str, path: str, total: int, proc: psutil.Process) -> tuple[httpx.Response, int]:
    """Stream ``total`` bytes without a Content-Length; the reply (httpx reads it even when
    the server stops reading and hangs up) and the server's peak RSS during the upload."""
    peak = [proc.memory_info().rss]
    response = httpx.post(
        base + path,
        content=_chunks(total, proc, peak),
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert response.request.headers["transfer-encoding"] == "chunked"
    return response, peak[0]


def test_a_chunked_upload_is_cut_at_the_limit_before_authentication(served: Served) -> None:
    proc, base, _ = served
    server = psutil.Process(proc.pid)
    before = server.memory_info().rss
    # 300 MiB without a token to the agents' endpoint: it used to be read whole before the 401
    # (the controller grew from 140 to 757 MB); now reading stops at the 16 MiB limit.
    response, peak = _upload(base, f"{API}/agent/reports", 300 * MiB, server)
    assert response.status_code == 413
    assert response.json() == {"detail": f"request body larger than {16 * MiB} bytes"}
    assert peak - before < 100 * MiB, (before, peak)
    # The login takes far less: a name and a password.
    response, peak = _upload(base, f"{API}/auth/token", 300 * MiB, server)
    assert response.status_code == 413
    assert response.json() == {"detail": f"request body larger than {LOGIN_MAX_BYTES} bytes"}
    assert peak - before < 100 * MiB, (before, peak)
    assert httpx.get(f"{base}/healthz").status_code == 200
    assert proc.poll() is None


def test_a_small_chunked_body_still_gets_through(app_client: TestClient, admin: TestUser) -> None:
    body = json.dumps({"name": "admin", "password": admin.password}).encode()
    response = app_client.post(
        f"{API}/auth/token",
        content=iter([body[:5], body[5:]]),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 200, response.text
    too_big = app_client.post(
        f"{API}/auth/token",
        content=iter([b" " * 1024] * (LOGIN_MAX_BYTES // 1024 + 1)),
        headers={"content-type": "application/json"},
    )
    assert too_big.status_code == 413
    assert too_big.json() == {"detail": f"request body larger than {LOGIN_MAX_BYTES} bytes"}


def test_validation_errors_do_not_echo_the_input(app_client: TestClient, admin: TestUser) -> None:
    # A 60 KiB password (within the login's body limit) used to come back whole in the 422.
    secret = "s3cr3t" * 10_000
    response = app_client.post(f"{API}/auth/token", json={"name": "admin", "password": secret})
    assert response.status_code == 422
    assert "s3cr3t" not in response.text
    assert len(response.content) < 1024
    assert response.json()["detail"] == [
        {
            "type": "string_too_long",
            "loc": ["body", "password"],
            "msg": "String should have at most 1024 characters",
        }
    ]
    # The same for FastAPI's own body validation, on a route that takes a model.
    big = app_client.post(
        f"{API}/sites", json={"name": "x" * 100_000, "licence_number": 7}, headers=admin.headers
    )
    assert big.status_code == 422
    assert "xxxx" not in big.text and len(big.content) < 2048
    assert {tuple(e["loc"]) for e in big.json()["detail"]} == {
        ("body", "name"),
        ("body", "licence_number"),
    }


def test_many_errors_are_capped(app_client: TestClient, admin: TestUser) -> None:
    body = {"name": "a", "segments": ["not a cidr"] * 256, "site": "x"}
    response = app_client.post(f"{API}/agents/enrollment-tokens", json=body, headers=admin.headers)
    assert response.status_code == 422
    payload = response.json()
    assert len(payload["detail"]) == 20
    assert payload["more_errors"] > 0


@pytest.mark.parametrize(
    "method,path",
    [
        ("POST", "/alerts/{n}/resolve"),
        ("DELETE", "/users/me/tokens/{n}"),
        ("GET", "/audit?cursor={n}"),
        ("GET", "/machines?skip={n}"),
        ("GET", "/sites/s/policy/preview?version={n}"),
        ("POST", "/sites/s/pool-sets/{n}/approve"),
        ("POST", "/machines/m/exemptions/{n}/approve"),
    ],
)
def test_integers_past_the_columns_range_are_a_422(
    app_client: TestClient, make_user: UserFactory, method: str, path: str
) -> None:
    user = make_user("admin")
    for n in (2**31, 2**63, 10**30):
        response = app_client.request(
            method, API + path.format(n=n), headers=user.headers, json={"reason": "enough text"}
        )
        assert response.status_code == 422, response.text
        assert "less than or equal to 2147483647" in response.text
    # The largest 32-bit integer (what an INTEGER column holds) is a fine number naming nothing.
    ok = app_client.request(
        method, API + path.format(n=2**31 - 1), headers=user.headers, json={"reason": "enough"}
    )
    assert ok.status_code in (200, 403, 404, 409), ok.text


def test_deeply_nested_json_is_refused(app_client: TestClient, admin: TestUser) -> None:
    deep_object = b'{"a":' * 5000 + b"1" + b"}" * 5000
    for body in (b"[" * 60_000, b"[" * 20_000 + b"]" * 20_000, deep_object):
        login = app_client.post(
            f"{API}/auth/token", content=body, headers={"content-type": "application/json"}
        )
        assert login.status_code == 422, login.text
        assert f"nested deeper than {MAX_JSON_DEPTH} levels" in login.text
        for path in ("/sites", "/agent/reports", "/agents/enrollment-tokens"):
            response = app_client.post(
                API + path,
                content=body,
                headers={"content-type": "application/json", **admin.headers},
            )
            assert 400 <= response.status_code < 500, (path, response.status_code)


@pytest.mark.parametrize(
    "query",
    [
        "start=0001-01-01T00:00Z&end=9999-12-31T00:00Z",
        "start=0001-01-01T00:00Z",
        "end=9999-12-31T23:59Z",
        "end=0001-01-01T01:00Z",
        "start=0001-01-01T00:00%2B05:00&end=2026-01-01T00:00Z",
        "start=2026-01-01T00:00Z&end=9999-12-31T23:59-05:00",
    ],
)
def test_far_apart_period_ends_are_a_422(
    app_client: TestClient, admin: TestUser, query: str
) -> None:
    for path in ("/compliance/status", "/machines/nothing/compliance"):
        response = app_client.get(f"{API}{path}?{query}", headers=admin.headers)
        assert response.status_code == 422, response.text
        assert "2000-01-01 and 3000-01-01" in response.text or "out of range" in response.text


def test_nul_characters_are_refused_at_the_door(app_client: TestClient, admin: TestUser) -> None:
    # On PostgreSQL these reached a text column or a comparison with one: a 500.
    query = app_client.get(f"{API}/audit?actor=ad%00min", headers=admin.headers)
    assert query.status_code == 400
    assert query.json() == {"detail": "a URL may not contain NUL characters (%00)"}
    path = app_client.get(f"{API}/machines/M%00X", headers=admin.headers)
    assert path.status_code == 400
    site = {"name": "nul-site", "licence_number": "KZ\u00001"}
    body = app_client.post(f"{API}/sites", json=site, headers=admin.headers)
    assert body.status_code == 422
    assert body.json() == {"detail": NUL_DETAIL}
    # Split across two chunks of a chunked body, the escape is still seen.
    split = app_client.post(
        f"{API}/sites",
        content=iter([b'{"name": "nul-site", "licence_number": "KZ\\u00', b'001"}']),
        headers={"content-type": "application/json", **admin.headers},
    )
    assert split.status_code == 422 and split.json() == {"detail": NUL_DETAIL}
    assert app_client.get(f"{API}/sites/nul-site", headers=admin.headers).status_code == 404
    # A plain site is still welcome.
    site["licence_number"] = "KZ-1"
    assert app_client.post(f"{API}/sites", json=site, headers=admin.headers).status_code == 201


def test_an_agent_cannot_store_deeply_nested_event_data(
    app_client: TestClient, engine: Engine, admin: TestUser
) -> None:
    # 500 levels of event data were accepted, and then every GET /alerts was a 500.
    secret = test_platform._populate(engine)
    now = datetime.now(UTC).isoformat()

    def batch(depth: int) -> dict[str, Any]:
        data: dict[str, Any] = {"leaf": 1}
        for _ in range(depth - 1):
            data = {"a": data}
        event = {"kind": "x", "at": now, "severity": "critical", "data": data}
        return {"batch_id": str(uuid.uuid4()), "agent_clock": now, "sequence": depth,
                "events": [event]}  # fmt: skip

    agent = {"Authorization": f"Bearer {secret}"}
    deep = app_client.post(f"{API}/agent/reports", json=batch(500), headers=agent)
    # Stored, cut to the contract's depth, and the cut said in the acknowledgement: one
    # agent's odd event neither fails its batch nor breaks the readers.
    assert deep.status_code == 200, deep.text
    assert f"nested deeper than {MAX_DATA_DEPTH} levels, dropped" in deep.text
    assert app_client.get(f"{API}/alerts", headers=admin.headers).status_code == 200
    ok = app_client.post(f"{API}/agent/reports", json=batch(4), headers=agent)
    assert ok.status_code == 200, ok.text
    assert "nested deeper" not in ok.text
    alerts = app_client.get(f"{API}/alerts", headers=admin.headers)
    assert alerts.status_code == 200 and any(a["kind"] == "x" for a in alerts.json())


def test_a_batch_sequence_past_the_column_is_a_422(app_client: TestClient, engine: Engine) -> None:
    # 2**31 was a 500 on PostgreSQL (INTEGER column), 2**63 on SQLite too.
    secret = test_platform._populate(engine)
    agent = {"Authorization": f"Bearer {secret}"}
    now = datetime.now(UTC).isoformat()
    for sequence in (2**31, 2**63, 2**70):
        batch = {"batch_id": str(uuid.uuid4()), "agent_clock": now, "sequence": sequence}
        response = app_client.post(f"{API}/agent/reports", json=batch, headers=agent)
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["body", "sequence"]
    batch = {"batch_id": str(uuid.uuid4()), "agent_clock": now, "sequence": 2**31 - 1}
    assert app_client.post(f"{API}/agent/reports", json=batch, headers=agent).status_code == 200


def test_the_openapi_document_says_how_to_authenticate_and_how_refusals_look(
    app_client: TestClient,
) -> None:
    """Clients generated from the document know the bearer scheme and the 401/403 answers."""
    schema = app_client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schema["components"]["securitySchemes"]["bearer"]["description"],
    }
    guarded = [
        (path, method, op)
        for path, ops in schema["paths"].items()
        for method, op in ops.items()
        if op.get("security")
    ]
    assert len(guarded) >= 40  # every route but the login itself
    for path, method, op in guarded:
        assert {"401", "403"} <= set(op["responses"]), (method, path)
    login = schema["paths"]["/api/v1/auth/token"]["post"]
    assert "security" not in login
