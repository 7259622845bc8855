"""Audit log verification: the chain is recomputed and the first tampered entry is named.

Tampering is done the way an insider with database access would: plain SQL UPDATE and
DELETE on ``audit_log``. Each case is checked through the function, the API and the CLI.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import insert, text
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from controller import audit, migrations
from controller.audit import GENESIS, entry_digest
from controller.audit_verify import (
    ChainEntry,
    ChainVerifier,
    ProblemKind,
    VerifyResult,
    verify_chain,
)
from controller.db import make_engine
from controller.models import AuditEntry, Role, utcnow
from tests.controller.conftest import CliInvoker, UserFactory

ENTRIES = 6


@pytest.fixture
def log(engine: Engine) -> list[str]:
    """Six entries made the normal way; returns their hashes (index 0 is seq 1)."""
    with Session(engine) as session:
        for i in range(1, ENTRIES + 1):
            audit.record(
                session,
                actor=f"user{i}",
                actor_kind="user",
                action="machine.state",
                entity="machine",
                entity_id=f"M{i:09d}",
                before={"lifecycle_state": "registered", "n": i, "flags": []},
                after={"lifecycle_state": "active", "watts": 3250.5, "note": "ок ✓"},
                source="127.0.0.1",
                reason=f"step {i}",
            )
            session.commit()
    with Session(engine) as session:
        return [e.hash for e in session.exec(select(AuditEntry).order_by(col(AuditEntry.seq)))]


def run_verify(engine: Engine, **kwargs: object) -> VerifyResult:
    with Session(engine) as session:
        return verify_chain(session, **kwargs)  # type: ignore[arg-type]


def sql(engine: Engine, *statements: str) -> None:
    with engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement))


def swap(engine: Engine, a: int, b: int) -> None:
    """Exchange the positions of two entries (their seq), as a reordering attack would."""
    sql(
        engine,
        f"UPDATE audit_log SET seq = -1 WHERE seq = {a}",
        f"UPDATE audit_log SET seq = {a} WHERE seq = {b}",
        f"UPDATE audit_log SET seq = {b} WHERE seq = -1",
    )


# --- the function ------------------------------------------------------------------------------


def test_intact_log(engine: Engine, log: list[str]) -> None:
    result = run_verify(engine)
    assert result.ok and result.problem is None
    assert (result.entries, result.head) == (ENTRIES, log[-1])
    assert result.message == f"audit log intact: {ENTRIES} entries, head {log[-1]}"
    assert run_verify(engine, chunk=4) == result


def test_empty_log(engine: Engine) -> None:
    result = run_verify(engine)
    assert (result.ok, result.entries, result.head) == (True, 0, GENESIS)


def test_modified_entry(engine: Engine, log: list[str]) -> None:
    sql(engine, "UPDATE audit_log SET actor = 'mallory' WHERE seq = 3")
    result = run_verify(engine)
    assert not result.ok and result.problem is not None
    assert (result.problem.seq, result.problem.kind) == (3, ProblemKind.MODIFIED)
    assert "no longer matches its hash" in result.problem.detail
    assert "by mallory" in result.problem.detail
    assert (result.entries, result.head) == (2, log[1])
    assert result.message.startswith("audit log broken at entry 3: modified: ")


def test_modified_json_and_timestamp(engine: Engine, log: list[str]) -> None:
    sql(engine, """UPDATE audit_log SET "after" = '{"lifecycle_state": "rma"}' WHERE seq = 5""")
    problem = run_verify(engine).problem
    assert problem is not None and (problem.seq, problem.kind) == (5, ProblemKind.MODIFIED)
    with Session(engine) as session:  # a back-dated entry, changed through the ORM
        entry = session.exec(select(AuditEntry).where(AuditEntry.seq == 2)).one()
        entry.at = entry.at - timedelta(hours=1)
        session.add(entry)
        session.commit()
    problem = run_verify(engine).problem
    assert problem is not None and (problem.seq, problem.kind) == (2, ProblemKind.MODIFIED)


def test_modified_prev_hash(engine: Engine, log: list[str]) -> None:
    sql(engine, f"UPDATE audit_log SET prev_hash = '{'f' * 64}' WHERE seq = 4")
    problem = run_verify(engine).problem
    assert problem is not None and (problem.seq, problem.kind) == (4, ProblemKind.MODIFIED)
    assert "prev_hash" in problem.detail


def test_modified_and_rehashed_entry(engine: Engine, log: list[str]) -> None:
    """Rewriting an entry with a freshly computed hash still breaks the next link."""
    with Session(engine) as session:
        e = session.exec(select(AuditEntry).where(AuditEntry.seq == 3)).one()
        forged = entry_digest(
            seq=e.seq,
            at=e.at,
            actor="mallory",
            actor_kind=e.actor_kind,
            action=e.action,
            entity=e.entity,
            entity_id=e.entity_id,
            before=e.before,
            after=e.after,
            source=e.source,
            reason=e.reason,
            prev_hash=e.prev_hash,
        )
    sql(engine, f"UPDATE audit_log SET actor = 'mallory', hash = '{forged}' WHERE seq = 3")
    problem = run_verify(engine).problem
    assert problem is not None and (problem.seq, problem.kind) == (3, ProblemKind.MODIFIED)
    assert "chained to" in problem.detail


@pytest.mark.parametrize("seq", [1, 3])
def test_deleted_entry(engine: Engine, log: list[str], seq: int) -> None:
    sql(engine, f"DELETE FROM audit_log WHERE seq = {seq}")
    result = run_verify(engine)
    assert result.problem is not None
    assert (result.problem.seq, result.problem.kind) == (seq, ProblemKind.DELETED)
    assert f"entry {seq} is missing" in result.problem.detail
    assert result.message.startswith(f"audit log broken at entry {seq}: deleted: ")


def test_deleted_range(engine: Engine, log: list[str]) -> None:
    sql(engine, "DELETE FROM audit_log WHERE seq IN (3, 4)")
    problem = run_verify(engine).problem
    assert problem is not None and (problem.seq, problem.kind) == (3, ProblemKind.DELETED)
    assert "entries 3..4 are missing" in problem.detail


def test_deleted_and_renumbered(engine: Engine, log: list[str]) -> None:
    """Deleting an entry and closing the gap leaves no seq hole, but the links still break."""
    sql(engine, "DELETE FROM audit_log WHERE seq = 3")
    sql(engine, *(f"UPDATE audit_log SET seq = {s - 1} WHERE seq = {s}" for s in range(4, 7)))
    problem = run_verify(engine).problem
    assert problem is not None and (problem.seq, problem.kind) == (3, ProblemKind.DELETED)
    assert "no longer exists" in problem.detail


def test_deleted_tail_needs_an_anchor(engine: Engine, log: list[str]) -> None:
    sql(engine, f"DELETE FROM audit_log WHERE seq = {ENTRIES}")
    assert run_verify(engine).ok  # a bare chain cannot see its end cut off …
    result = run_verify(engine, anchor=log[-1])  # … a head noted earlier can
    assert result.problem is not None and result.problem.kind == ProblemKind.DELETED
    assert result.problem.seq == ENTRIES
    assert run_verify(engine, anchor=log[2]).ok


@pytest.mark.parametrize(("a", "b"), [(3, 4), (2, 5), (1, 2)])
def test_swapped_entries(engine: Engine, log: list[str], a: int, b: int) -> None:
    swap(engine, a, b)
    result = run_verify(engine)
    assert result.problem is not None
    assert (result.problem.seq, result.problem.kind) == (a, ProblemKind.REORDERED)
    # The entry now at ``a`` was chained after one that sits later in the table.
    assert f"links to entry {b - 1 if b - a > 1 else b}, which comes after it" in (
        result.problem.detail
    )


def test_swapped_content_keeping_seq(engine: Engine, log: list[str]) -> None:
    """Moving whole rows' contents (not their seq) is reordering too."""
    cols = "at, actor, actor_kind, action, entity, entity_id, before, after, source, reason"
    both = "prev_hash, hash"
    sql(
        engine,
        "CREATE TABLE tmp_swap AS SELECT * FROM audit_log WHERE seq IN (3, 4)",
        "DELETE FROM audit_log WHERE seq IN (3, 4)",
        f"INSERT INTO audit_log (seq, {cols}, {both}) SELECT 7 - seq, {cols}, {both} FROM tmp_swap",
        "DROP TABLE tmp_swap",
    )
    problem = run_verify(engine).problem
    assert problem is not None and (problem.seq, problem.kind) == (3, ProblemKind.REORDERED)


def test_chunks_and_long_logs(engine: Engine) -> None:
    """Thousands of entries stream through in small chunks; tampering deep inside is found."""
    rows = []
    prev = GENESIS
    at = utcnow()
    for seq in range(1, 3001):
        content = {
            "seq": seq,
            "at": at + timedelta(microseconds=seq),
            "actor": "agent:a1",
            "actor_kind": "agent",
            "action": "machine.seen",
            "entity": "machine",
            "entity_id": f"M{seq:09d}",
            "before": None,
            "after": {"ip": f"10.0.{seq // 250}.{seq % 250}"},
            "source": "10.0.0.1",
            "reason": "",
        }
        digest = entry_digest(**content, prev_hash=prev)  # type: ignore[arg-type]
        rows.append(content | {"prev_hash": prev, "hash": digest})
        prev = digest
    with engine.begin() as conn:
        conn.execute(insert(AuditEntry.metadata.tables["audit_log"]), rows)
    result = run_verify(engine, chunk=250)
    assert (result.ok, result.entries, result.head) == (True, 3000, prev)
    swap(engine, 2500, 2501)  # across a chunk boundary
    problem = run_verify(engine, chunk=500).problem
    assert problem is not None and (problem.seq, problem.kind) == (2500, ProblemKind.REORDERED)


def test_verifier_is_pure() -> None:
    """The decision part needs no database: entries in, first problem out."""
    at = utcnow()

    def entry(seq: int, prev: str, actor: str = "a") -> ChainEntry:
        fields = dict(
            seq=seq,
            at=at,
            actor=actor,
            actor_kind="user",
            action="x",
            entity="e",
            entity_id="",
            before=None,
            after=None,
            source="",
            reason="",
        )
        digest = entry_digest(**fields, prev_hash=prev)  # type: ignore[arg-type]
        return ChainEntry(**fields, prev_hash=prev, hash=digest)  # type: ignore[arg-type]

    e1 = entry(1, GENESIS)
    e2 = entry(2, e1.hash)
    verifier = ChainVerifier()
    assert verifier.feed(e1) is None and verifier.feed(e2) is None
    assert (verifier.entries, verifier.head) == (2, e2.hash)
    gap = ChainVerifier()
    gap.feed(e1)
    problem = gap.feed(entry(3, e2.hash))
    assert problem is not None and (problem.seq, problem.kind) == (2, ProblemKind.DELETED)
    assert gap.feed(e2) == problem  # sticks to the first problem


# --- the API -----------------------------------------------------------------------------------


def test_api_verify_and_roles(
    app_client: TestClient, engine: Engine, log: list[str], make_user: UserFactory
) -> None:
    for role in Role:
        user = make_user(role)
        resp = app_client.get("/api/v1/audit/verify", headers=user.headers)
        listing = app_client.get("/api/v1/audit", headers=user.headers)
        if role in (Role.ADMIN, Role.COMPLIANCE, Role.INSPECTOR):
            assert resp.status_code == 200 and listing.status_code == 200
            assert resp.json() == {
                "ok": True,
                "entries": ENTRIES,
                "head": log[-1],
                "problem": None,
            }
        else:
            assert resp.status_code == 403 and listing.status_code == 403
    assert app_client.get("/api/v1/audit/verify").status_code == 401
    assert app_client.get("/api/v1/audit").status_code == 401

    inspector = make_user(Role.INSPECTOR)
    swap(engine, 4, 5)
    body = app_client.get("/api/v1/audit/verify", headers=inspector.headers).json()
    assert body["ok"] is False
    assert body["problem"]["seq"] == 4 and body["problem"]["kind"] == "reordered"
    swap(engine, 4, 5)
    anchored = app_client.get(
        "/api/v1/audit/verify", params={"anchor": log[2]}, headers=inspector.headers
    )
    assert anchored.json()["ok"] is True
    bad_anchor = app_client.get(
        "/api/v1/audit/verify", params={"anchor": "nothex"}, headers=inspector.headers
    )
    assert bad_anchor.status_code == 422


def test_api_lists_entries_in_pages(
    app_client: TestClient, log: list[str], make_user: UserFactory
) -> None:
    compliance = make_user(Role.COMPLIANCE)
    url = "/api/v1/audit"
    first = app_client.get(url, params={"limit": 4}, headers=compliance.headers).json()
    assert [e["seq"] for e in first["data"]] == [1, 2, 3, 4]
    assert first["next_cursor"] == 4
    assert first["data"][0]["hash"] == log[0] and first["data"][0]["prev_hash"] == GENESIS
    assert first["data"][0]["after"]["note"] == "ок ✓"
    rest = app_client.get(
        url, params={"limit": 4, "cursor": first["next_cursor"]}, headers=compliance.headers
    ).json()
    assert [e["seq"] for e in rest["data"]] == [5, 6] and rest["next_cursor"] is None
    newest = app_client.get(
        url, params={"order": "desc", "limit": 2}, headers=compliance.headers
    ).json()
    assert [e["seq"] for e in newest["data"]] == [6, 5] and newest["next_cursor"] == 5
    older = app_client.get(
        url, params={"order": "desc", "limit": 2, "cursor": 5}, headers=compliance.headers
    ).json()
    assert [e["seq"] for e in older["data"]] == [4, 3]
    by_actor = app_client.get(url, params={"actor": "user2"}, headers=compliance.headers).json()
    assert [e["seq"] for e in by_actor["data"]] == [2]
    by_id = app_client.get(
        url, params={"entity_id": "M000000005"}, headers=compliance.headers
    ).json()
    assert [e["seq"] for e in by_id["data"]] == [5]
    assert app_client.get(url, params={"limit": 0}, headers=compliance.headers).status_code == 422
    bad_order = app_client.get(url, params={"order": "up"}, headers=compliance.headers)
    assert bad_order.status_code == 422


# --- the CLI -----------------------------------------------------------------------------------


def test_cli_verify_exit_codes(cli: CliInvoker, engine: Engine, log: list[str]) -> None:
    ok = cli("audit", "verify")
    assert ok.exit_code == 0
    assert ok.stdout.strip() == f"audit log intact: {ENTRIES} entries, head {log[-1]}"

    sql(engine, "UPDATE audit_log SET reason = 'nothing to see' WHERE seq = 2")
    modified = cli("audit", "verify")
    assert modified.exit_code == 1
    assert "audit log broken at entry 2: modified" in modified.stderr
    sql(engine, "UPDATE audit_log SET reason = 'step 2' WHERE seq = 2")
    assert cli("audit", "verify").exit_code == 0

    swap(engine, 5, 6)
    swapped = cli("audit", "verify")
    assert swapped.exit_code == 1
    assert "audit log broken at entry 5: reordered" in swapped.stderr
    swap(engine, 5, 6)

    sql(engine, "DELETE FROM audit_log WHERE seq = 4")
    deleted = cli("audit", "verify", "--json")
    assert deleted.exit_code == 1
    assert '"kind": "deleted"' in deleted.stdout and '"seq": 4' in deleted.stdout
    assert "Traceback" not in deleted.output

    assert cli("audit", "verify", "--anchor", "xyz").exit_code == 2
    listed = cli("audit", "list", "--limit", "2", "--json")
    assert listed.exit_code == 0 and '"seq": 6' in listed.stdout


def test_cli_verify_subprocess(tmp_path: Path) -> None:
    """The real entry point in its own process, as cron or an inspector's script runs it.

    (Once, on SQLite: starting the interpreter is the slow part; the in-process CLI tests
    above cover both backends.)
    """
    url = f"sqlite:///{tmp_path / 'sub.db'}"
    engine = make_engine(url)
    migrations.upgrade(engine)
    with Session(engine) as session:
        for i in range(3):
            audit.record(session, actor=f"u{i}", actor_kind="user", action="a", entity="e")
        session.commit()
    swap(engine, 2, 3)
    engine.dispose()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASICFLEET_")}
    argv = [sys.executable, "-m", "asicfleet", "controller", "--data-dir", str(tmp_path)]
    broken = subprocess.run(
        [*argv, "--database-url", url, "audit", "verify"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert broken.stderr.startswith("audit log broken at entry 2: reordered: ")
