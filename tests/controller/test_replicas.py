"""Two controller replicas on one PostgreSQL schema, one of them killed mid-batch.

Real ``asicfleet controller serve`` processes; agents post real report batches with their
own credentials, alternating between the replicas and, like the uplink, re-sending a batch
whose delivery failed (same batch id) to the other one. Replica A is killed with SIGKILL
at a moment when PostgreSQL shows it inside a batch transaction (it holds the row lock of
the batch it claimed), so the kill provably lands mid-batch. Afterwards every observation
is stored exactly once, every machine was discovered (and audited) exactly once, and the
audit chain verifies with ``asicfleet controller audit verify``.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, func, make_url, select, text
from sqlalchemy.engine import Engine
from sqlmodel import Session

from controller.models import Agent, AuditEntry, Segment, Site
from controller.security import token_hash
from controller.tables import BATCH, HISTORY, LATEST, MACHINE
from tests.controller.conftest import PG_ADMIN_URL
from tests.farmproc import free_port

AGENTS = 3
MACHINES_PER_AGENT = 120
ROUNDS = 4
BATCH_SIZE = 60
STEP = timedelta(seconds=300)  # one history row per observation at the default resolution
DEADLINE_S = 180.0

pytestmark = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)


def ip_of(agent: int, machine: int) -> str:
    return f"127.203.{agent}.{machine + 1}"


def identity(agent: int, machine: int, at: datetime, round_no: int) -> dict[str, Any]:
    return {
        "ip": ip_of(agent, machine),
        "observed_at": at.isoformat(),
        "mac": f"02:cb:00:00:{agent:02x}:{machine:02x}",
        "serial": f"REPL{agent}X{machine:05d}",
        "make": "AntMiner",
        "model": "S19j Pro",
        "firmware": "stock",
        "firmware_version": f"2026.{round_no + 1}",  # changes every round: one audit each
    }


def observation(agent: int, machine: int, at: datetime) -> dict[str, Any]:
    return {
        "ip": ip_of(agent, machine),
        "observed_at": at.isoformat(),
        "reachable": True,
        "mac": f"02:cb:00:00:{agent:02x}:{machine:02x}",
        "is_mining": True,
        "hashrate_ths": 100.0,
        "pools": [{"url": "stratum+tcp://pool.example.kz:3333", "user": f"farm.m{machine}"}],
    }


def batches_of(agent: int, start: datetime) -> list[dict[str, Any]]:
    out = []
    for round_no in range(ROUNDS):
        at = start + STEP * round_no
        for first in range(0, MACHINES_PER_AGENT, BATCH_SIZE):
            chunk = range(first, min(first + BATCH_SIZE, MACHINES_PER_AGENT))
            out.append(
                {
                    "contract_version": "1.0",
                    "batch_id": str(uuid.uuid4()),
                    "agent_clock": at.isoformat(),
                    "sequence": len(out) + 1,
                    "identities": [identity(agent, m, at, round_no) for m in chunk],
                    "observations": [observation(agent, m, at) for m in chunk],
                }
            )
    return out


def with_query(url: str, **query: str) -> str:
    return make_url(url).update_query_dict(query).render_as_string(hide_password=False)


@contextmanager
def replica(url: str, data_dir: Path, name: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``asicfleet controller serve`` as an operator runs it; its sessions are named ``name``."""
    data_dir.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASICFLEET_")}
    log = (data_dir / "serve.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "asicfleet", "controller", "serve",
            "--data-dir", str(data_dir),
            "--database-url", with_query(url, application_name=name),
            "--bind", f"127.0.0.1:{port}",
        ],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (data_dir / "serve.log").read_text()
            assert time.monotonic() < deadline, "the replica did not come up within 60 s"
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
        log.close()


def setup_agents(engine: Engine) -> list[str]:
    """One site, ``AGENTS`` agents, each with its own /24 of the test's loopback subnet."""
    keys = []
    with Session(engine) as session:
        site = Site(name="replicas", licence_number="KZ-REPL-1")
        session.add(site)
        session.flush()
        assert site.id is not None
        for a in range(AGENTS):
            key = f"afa_{secrets.token_urlsafe(32)}"
            agent = Agent(
                id=f"AGREPL{a}", name=f"r{a}", site_id=site.id, secret_hash=token_hash(key)
            )
            session.add(agent)
            session.flush()
            session.add(Segment(site_id=site.id, cidr=f"127.203.{a}.0/24", agent_id=agent.id))
            keys.append(key)
        session.commit()
    return keys


@dataclass
class Delivery:
    """What the agents saw: acknowledgements by batch id, and deliveries that failed over."""

    acks: dict[str, dict[str, Any]] = field(default_factory=dict)
    failovers: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def deliver(key: str, bodies: list[dict[str, Any]], bases: list[str], out: Delivery) -> None:
    """One agent: in order, alternating replicas; a failed delivery goes to the other one."""
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(headers=headers, timeout=60) as client:
        for index, body in enumerate(bodies):
            target = index % len(bases)
            deadline = time.monotonic() + DEADLINE_S
            while True:
                try:
                    response = client.post(f"{bases[target]}/api/v1/agent/reports", json=body)
                except httpx.TransportError as exc:
                    with out.lock:
                        out.failovers.append(f"{bases[target]}: {type(exc).__name__}")
                    target = (target + 1) % len(bases)
                    if time.monotonic() > deadline:
                        with out.lock:
                            out.errors.append(f"batch {body['batch_id']}: gave up")
                        return
                    continue
                if response.status_code != 200:
                    with out.lock:
                        out.errors.append(f"{response.status_code} {response.text[:300]}")
                    return
                with out.lock:
                    out.acks[body["batch_id"]] = response.json()
                break


IN_BATCH = text(
    """
    SELECT count(*) FROM pg_stat_activity a
    JOIN pg_locks l ON l.pid = a.pid
    JOIN pg_class c ON c.oid = l.relation
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE a.application_name = :name AND n.nspname = :schema
      AND c.relname = 'ingested_batch' AND l.mode = 'RowExclusiveLock'
    """
)


def kill_mid_batch(proc: subprocess.Popen[bytes], schema: str, name: str) -> bool:
    """SIGKILL ``proc`` as soon as PostgreSQL shows it holding a claimed batch (mid-batch)."""
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            deadline = time.monotonic() + DEADLINE_S
            while time.monotonic() < deadline and proc.poll() is None:
                if conn.execute(IN_BATCH, {"name": name, "schema": schema}).scalar():
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=30)
                    return True
                time.sleep(0.005)  # a batch transaction lasts far longer than this
        return False
    finally:
        admin.dispose()


def test_two_replicas_ingest_and_survive_a_kill_mid_batch(
    database_url: str, engine: Engine, tmp_path: Path
) -> None:
    keys = setup_agents(engine)
    schema = make_url(database_url).query["options"]
    assert isinstance(schema, str)
    schema = schema.removeprefix("-csearch_path=")
    start = datetime.now(UTC).replace(second=0, microsecond=0) - STEP * ROUNDS
    start -= timedelta(seconds=start.timestamp() % STEP.total_seconds())
    bodies = [batches_of(a, start) for a in range(AGENTS)]
    out = Delivery()

    with ExitStack() as stack:
        proc_a, base_a = stack.enter_context(replica(database_url, tmp_path / "a", "replica-a"))
        _, base_b = stack.enter_context(replica(database_url, tmp_path / "b", "replica-b"))
        killed: list[bool] = []
        killer = threading.Thread(
            target=lambda: killed.append(kill_mid_batch(proc_a, schema, "replica-a"))
        )
        killer.start()
        agents = [
            threading.Thread(target=deliver, args=(keys[a], bodies[a], [base_a, base_b], out))
            for a in range(AGENTS)
        ]
        for t in agents:
            t.start()
        for t in agents:
            t.join(timeout=DEADLINE_S * 2)
        killer.join(timeout=DEADLINE_S)
        assert killed == [True], "replica A was never seen inside a batch transaction"
        assert proc_a.returncode == -signal.SIGKILL

        assert not out.errors, out.errors
        # The kill cut a delivery to A short; that agent re-sent it to B.
        assert any(f.startswith(base_a) for f in out.failovers), out.failovers

        env = {k: v for k, v in os.environ.items() if not k.startswith("ASICFLEET_")}
        verify = subprocess.run(
            [
                sys.executable, "-m", "asicfleet", "controller",
                "--data-dir", str(tmp_path / "b"), "--database-url", database_url,
                "audit", "verify",
            ],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout.startswith("audit log intact: ")

    sent = [b for per_agent in bodies for b in per_agent]
    observations = sum(len(b["observations"]) for b in sent)
    machines = AGENTS * MACHINES_PER_AGENT
    assert sorted(out.acks) == sorted(b["batch_id"] for b in sent)
    assert all(not ack["refused"] for ack in out.acks.values())
    with Session(engine) as session:
        conn = session.connection()
        assert conn.execute(select(func.count()).select_from(BATCH)).scalar() == len(sent)
        assert conn.execute(select(func.count()).select_from(MACHINE)).scalar() == machines
        assert conn.execute(select(func.count()).select_from(LATEST)).scalar() == machines
        history = conn.execute(select(HISTORY.c.machine_pk, HISTORY.c.observed_at)).all()
        assert len(history) == observations, "every observation stored exactly once"
        assert len(set(history)) == observations
        discovered = conn.execute(
            select(AuditEntry.entity_id, func.count())  # type: ignore[call-overload]
            .where(AuditEntry.action == "machine.discover")
            .group_by(AuditEntry.entity_id)
        ).all()
        assert len(discovered) == machines and {n for _, n in discovered} == {1}
        entries = conn.execute(
            select(AuditEntry.entity_id, AuditEntry.after)  # type: ignore[call-overload]
            .where(AuditEntry.action == "machine.reconcile")
            .order_by(AuditEntry.seq)
        ).all()
    firmware: dict[str, list[str]] = {}
    for machine_id, after in entries:
        if "firmware_version" in after:
            firmware.setdefault(machine_id, []).append(after["firmware_version"])
    expected = [f"2026.{r + 1}" for r in range(1, ROUNDS)]
    assert len(firmware) == machines
    assert all(seen == expected for seen in firmware.values()), "each change audited once"
