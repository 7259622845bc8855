"""Audit sequence allocation under concurrent writers, on SQLite and PostgreSQL.

Twelve writers appending at once must each get their entry into one gapless, linear chain
(the old read-then-insert on SQLite lost three of twelve parallel exports). A writer with
an open transaction (an ingest batch still running) must not hold up the others: the chain
is locked only while the buffered entries are appended at commit. A rolled-back change
leaves no entry and no gap.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from controller import audit
from controller.audit_verify import verify_chain
from controller.models import AuditEntry, Role
from tests.controller.conftest import UserFactory

WRITERS = 12


def _record(session: Session, name: str) -> None:
    audit.record(
        session,
        actor=name,
        actor_kind="user",
        action="export.create",
        entity="export",
        entity_id="register",
        after={"writer": name},
        source="127.0.0.1",
    )


def _entries(engine: Engine) -> list[AuditEntry]:
    with Session(engine) as session:
        return list(session.exec(select(AuditEntry).order_by(col(AuditEntry.seq))))


def test_parallel_writers_form_one_gapless_chain(engine: Engine) -> None:
    """Twelve writers read the log (as an export does), record and commit at the same moment."""
    start = threading.Barrier(WRITERS, timeout=30)

    def writer(index: int) -> str:
        name = f"writer{index}"
        with Session(engine) as session:
            verify_chain(session)  # an export reads the chain head before it records
            start.wait()
            _record(session, name)
            session.commit()
        return name

    rounds = 3
    with ThreadPoolExecutor(WRITERS) as pool:
        for _ in range(rounds):
            done = list(pool.map(writer, range(WRITERS)))
            assert len(done) == WRITERS
    entries = _entries(engine)
    assert [e.seq for e in entries] == list(range(1, WRITERS * rounds + 1))
    assert sorted(e.actor for e in entries) == sorted(
        f"writer{i}" for i in range(WRITERS) for _ in range(rounds)
    )
    with Session(engine) as session:
        result = verify_chain(session)
    assert result.ok, result.message
    assert result.entries == WRITERS * rounds


def test_rolled_back_change_leaves_no_entry_and_no_gap(engine: Engine) -> None:
    with Session(engine) as session:
        _record(session, "rolled-back")
        session.rollback()
        _record(session, "kept")
        session.commit()
    with Session(engine) as session:
        _record(session, "closed-without-commit")
    entries = _entries(engine)
    assert [(e.seq, e.actor) for e in entries] == [(1, "kept")]


def test_entries_recorded_in_a_transaction_are_readable_in_it(engine: Engine) -> None:
    """A reader in the same transaction (verify, list) sees what it recorded, in order."""
    with Session(engine) as session:
        _record(session, "first")
        _record(session, "second")
        result = verify_chain(session)
        assert result.ok and result.entries == 2
        _record(session, "third")
        session.commit()
    assert [e.actor for e in _entries(engine)] == ["first", "second", "third"]


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_open_ingest_transaction_does_not_hold_the_chain(engine: Engine) -> None:
    """One replica is mid-batch (entry recorded, not committed); another commits meanwhile.

    Before, the first one held the chain's advisory lock until it committed, so the second
    waited for it (here: ``lock_timeout`` turns that wait into an error).
    """
    with Session(engine) as long_batch:
        long_batch.execute(text("SELECT 1"))
        _record(long_batch, "replica-a")
        with Session(engine) as other:
            other.execute(text("SET LOCAL lock_timeout = '5s'"))
            _record(other, "replica-b")
            other.commit()
        long_batch.commit()
    entries = _entries(engine)
    assert [(e.seq, e.actor) for e in entries] == [(1, "replica-b"), (2, "replica-a")]
    with Session(engine) as session:
        assert verify_chain(session).ok


def test_twelve_parallel_exports_all_succeed(
    app_client: TestClient, make_user: UserFactory
) -> None:
    """The report: twelve parallel ``POST /exports`` and three jobs failed on the sequence."""
    carl = make_user(Role.COMPLIANCE, name="carl")
    start = threading.Barrier(WRITERS, timeout=30)

    def export(_: int) -> dict[str, object]:
        start.wait()
        made = app_client.post(
            "/api/v1/exports", json={"kind": "audit", "formats": ["json"]}, headers=carl.headers
        )
        assert made.status_code == 202, made.text
        # The test client runs the background build before answering; the job is finished.
        job: dict[str, object] = app_client.get(
            f"/api/v1/exports/{made.json()['id']}", headers=carl.headers
        ).json()
        return job

    with ThreadPoolExecutor(WRITERS) as pool:
        jobs = list(pool.map(export, range(WRITERS)))
    assert [(j["status"], j["error"]) for j in jobs] == [("done", None)] * WRITERS
    listed = app_client.get(
        "/api/v1/audit", params={"action": "export.create", "limit": 100}, headers=carl.headers
    ).json()["data"]
    assert len(listed) == WRITERS
