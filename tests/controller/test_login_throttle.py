"""Login throttling per name and per address, with an audited lockout (issue 10, item 10).

Before: 60 wrong passwords in 14 s, then the right one worked. Runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from controller import login_throttle
from controller.app import create_app
from controller.login_throttle import ThrottlePolicy
from controller.models import AuditEntry, LoginFailure, Role, utcnow
from controller.settings import Settings
from tests.controller.conftest import UserFactory

LOGIN = "/api/v1/auth/token"
WRONG = "not the password at all"


@pytest.fixture
def strict(settings: Settings) -> Settings:
    """Three failures per name, five per address, in a minute; locked out for two seconds."""
    return settings.model_copy(
        update={
            "login_max_failures_per_user": 3,
            "login_max_failures_per_address": 5,
            "login_failure_window_s": 60,
            "login_lockout_s": 2,
        }
    )


@pytest.fixture
def client(strict: Settings, engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(strict, engine)) as c:
        yield c


def _login(client: TestClient, name: str, password: str) -> tuple[int, dict[str, str], str]:
    # json.dumps escapes a lone surrogate as \ud800, as a hostile client would send it
    body = json.dumps({"name": name, "password": password})
    response = client.post(LOGIN, content=body, headers={"content-type": "application/json"})
    return response.status_code, dict(response.headers), response.text


def _lockouts(engine: Engine) -> list[AuditEntry]:
    with Session(engine) as session:
        query = select(AuditEntry).where(AuditEntry.action == "auth.lockout")
        return list(session.exec(query.order_by(col(AuditEntry.seq))).all())


def test_wrong_passwords_lock_the_name_out_until_the_lockout_ends(
    client: TestClient, engine: Engine, make_user: UserFactory
) -> None:
    user = make_user(Role.OPERATOR, name="olga")
    codes = [_login(client, "olga", WRONG)[0] for _ in range(3)]
    assert codes == [401, 401, 401]
    # Locked out now: wrong or right, the answer is 429 with a Retry-After, and it is not a 401
    # that would let a guesser go on testing passwords.
    for password in (WRONG, user.password, WRONG, user.password):
        status, headers, text = _login(client, "olga", password)
        assert status == 429, text
        assert 1 <= int(headers["retry-after"]) <= 2
        assert "too many failed logins" in text
    entries = _lockouts(engine)
    assert len(entries) == 1  # audited once, not per refused attempt
    assert (entries[0].entity, entries[0].entity_id, entries[0].actor) == (
        "user",
        "olga",
        "login-throttle",
    )
    assert entries[0].after is not None and entries[0].after["failures"] == 3
    assert WRONG not in str(entries[0].after) and user.password not in str(entries[0].after)
    # Once the lockout ends the right password works (refused attempts did not extend it).
    deadline = time.monotonic() + 15
    while (status := _login(client, "olga", user.password)[0]) == 429:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert status == 200
    assert len(_lockouts(engine)) == 1


def test_a_success_clears_the_names_failures(
    client: TestClient, engine: Engine, make_user: UserFactory
) -> None:
    user = make_user(Role.OPERATOR, name="sam")
    for _ in range(2):
        assert _login(client, "sam", WRONG)[0] == 401
    assert _login(client, "sam", user.password)[0] == 200
    for _ in range(2):
        assert _login(client, "sam", WRONG)[0] == 401
    assert _login(client, "sam", user.password)[0] == 200
    assert _lockouts(engine) == []


def test_one_address_guessing_many_names_is_locked_out(
    client: TestClient, engine: Engine, make_user: UserFactory
) -> None:
    user = make_user(Role.ADMIN, name="root-admin")
    # Five different names (two of them real), one wrong password each, from one address.
    for name in ("alice", "bob", "carol", "root-admin", "dave"):
        assert _login(client, name, WRONG)[0] == 401
    status, headers, _ = _login(client, "root-admin", user.password)
    assert status == 429 and int(headers["retry-after"]) >= 1
    [entry] = _lockouts(engine)
    assert (entry.entity, entry.entity_id) == ("address", "testclient")


def test_the_lockout_holds_across_replicas(
    strict: Settings, engine: Engine, make_user: UserFactory
) -> None:
    user = make_user(Role.OPERATOR, name="rita")
    with (
        TestClient(create_app(strict, engine)) as first,
        TestClient(create_app(strict, engine)) as second,
    ):
        assert _login(first, "rita", WRONG)[0] == 401
        assert _login(second, "rita", WRONG)[0] == 401
        assert _login(first, "rita", WRONG)[0] == 401
        assert _login(second, "rita", user.password)[0] == 429
        assert _login(first, "rita", user.password)[0] == 429
    assert len(_lockouts(engine)) == 1


def test_hostile_names_and_passwords_are_refused_not_a_500(
    client: TestClient, make_user: UserFactory
) -> None:
    make_user(Role.OPERATOR, name="nina")
    # A NUL reached PostgreSQL (which refuses it in text): in JSON it is refused at the door,
    # in a form (%00) it is a wrong name like any other.
    status, _, text = _login(client, "ni\x00na", WRONG)
    assert status == 422 and "NUL" in text, text
    form = client.post(LOGIN, data={"username": "ni\x00na", "password": WRONG})
    assert form.status_code == 401, form.text
    # A lone surrogate cannot be a string anywhere: refused by validation.
    for name, password in (("\ud800", WRONG), ("nina", "pass\ud800word!")):
        status, _, text = _login(client, name, password)
        assert status == 422 and "unicode" in text, text


def test_counting_restarts_after_a_lockout_and_old_failures_expire(
    engine: Engine, make_user: UserFactory
) -> None:
    """The rules with a fixed clock: the window, the lockout's end, the next lockout."""
    make_user(Role.OPERATOR, name="tim")
    policy = ThrottlePolicy(
        max_per_user=2,
        max_per_address=100,
        window=timedelta(minutes=10),
        lockout=timedelta(minutes=5),
    )
    t0 = utcnow()

    def fail(at_minutes: float) -> list[str]:
        with Session(engine) as session:
            locked = login_throttle.record_failure(
                session, policy, "tim", "10.0.0.9", t0 + timedelta(minutes=at_minutes)
            )
            session.commit()
            return locked

    def refused(at_minutes: float) -> bool:
        with Session(engine) as session:
            try:
                login_throttle.check(session, "tim", "10.0.0.9", t0 + timedelta(minutes=at_minutes))
            except login_throttle.LoginThrottled:
                return True
            return False

    assert fail(0) == []
    assert fail(11) == []  # the first one fell out of the window
    assert fail(12) == ["user"]
    assert refused(12) and refused(16.9) and not refused(17)
    assert fail(17.5) == []  # failures before the lockout ended do not count again
    assert fail(18) == ["user"]
    assert refused(18)
    with Session(engine) as session:
        kept = session.exec(select(LoginFailure)).all()
    assert kept and all(f.name_key != "tim" for f in kept)  # only a digest of the name
    assert len(_lockouts(engine)) == 2


def test_parallel_failures_start_one_lockout(engine: Engine) -> None:
    """Requests on several replicas reach the limit together: one lockout, audited once."""
    policy = ThrottlePolicy(max_per_user=3, max_per_address=1000)
    now = utcnow()
    with Session(engine) as session:
        for _ in range(2):
            login_throttle.record_failure(session, policy, "pat", "10.0.0.7", now)
        session.commit()
    start = threading.Barrier(8)

    def fail(_: int) -> list[str]:
        with Session(engine) as session:
            start.wait(timeout=30)
            locked = login_throttle.record_failure(session, policy, "pat", "10.0.0.7", now)
            session.commit()
            return locked

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(fail, range(8)))
    assert sorted(results) == [[]] * 7 + [["user"]]
    [entry] = _lockouts(engine)
    assert entry.entity_id == "pat"
