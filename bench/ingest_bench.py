"""Controller ingestion throughput: observations per second through HTTP, against a bulk insert.

Run:  .venv/bin/python -m bench.ingest_bench [--machines 5000] [--rounds 6] [--batch 500]
                                              [--concurrency 1]

1. Builds a SQLite controller database in a temporary directory (migrated like ``serve``
   does): one site, ``machines / 250`` segments of 250 machines assigned to one agent, and
   ``--machines`` registered machines with IP, MAC and serial, last seen before the run.
2. Starts ``asicfleet controller serve`` (the real server, one uvicorn process) on a free
   127.0.0.1 port and posts ``--rounds`` poll cycles of every machine as batches of
   ``--batch`` observations (each with two pools, hashrate, power, temperature, fans) over
   real HTTP with httpx. One client thread is how an agent's uplink delivers (in order);
   ``--concurrency N`` posts from N threads, like several agents. Bodies are serialised
   before the clock starts, so the client's JSON work is not counted. A poll cycle is 60 s
   of observed time, so with the default 300 s resolution every fifth cycle writes history.
3. In the same run, inserts the same observation rows with a plain SQLAlchemy bulk insert
   (``conn.execute(insert(observation_history), rows)``, one transaction per batch) into a
   fresh database of the same schema, and prints both rates and their ratio, plus the
   controller's CPU time per batch (less sensitive to other load on the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psutil
from sqlalchemy import insert
from sqlmodel import Session

AGENT_SECRET = "afa_bench-agent-secret-not-for-production-0000000000"
POLL_SECONDS = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def ip_of(index: int) -> str:
    """Machine ``index`` lives at 10.60.<segment>.<1..250>."""
    return f"10.60.{index // 250}.{index % 250 + 1}"


def mac_of(index: int) -> str:
    return "02:ab:" + ":".join(f"{(index >> s) & 0xFF:02x}" for s in (24, 16, 8, 0))


def build_database(url: str, machines: int) -> None:
    """Schema (migrations), a site, segments for one agent and ``machines`` registered rows."""
    from controller import migrations
    from controller.db import make_engine
    from controller.ingest import MACHINE
    from controller.models import Agent, LifecycleState, Segment, Site, new_machine_id
    from controller.security import token_hash

    engine = make_engine(url)
    migrations.upgrade(engine)
    now = datetime.now(UTC)
    with Session(engine) as session:
        site = Site(name="bench", licence_number="KZ-BENCH-1")
        session.add(site)
        session.flush()
        assert site.id is not None
        agent = Agent(
            id="AGBENCH", name="bench", site_id=site.id, secret_hash=token_hash(AGENT_SECRET)
        )
        session.add(agent)
        session.flush()
        for segment in range((machines + 249) // 250):
            session.add(Segment(site_id=site.id, cidr=f"10.60.{segment}.0/24", agent_id=agent.id))
        session.commit()
        rows = [
            {
                "machine_id": new_machine_id(),
                "label_serial": f"BENCHSN{i:07d}",
                "reported_serial": f"BENCHSN{i:07d}",
                "mac": mac_of(i),
                "hashboard_serials": [],
                "site_id": site.id,
                "lifecycle_state": LifecycleState.ACTIVE,
                "state_since": now,
                "first_seen": now - timedelta(days=30),
                "last_seen": now - timedelta(hours=2),  # before the polls: each one updates it
                "current_ip": ip_of(i),
                "agent_id": agent.id,
                "serial_unconfirmed": False,
                "flags": [],
                "record_version": 1,
                "updated_at": now,
            }
            for i in range(machines)
        ]
        session.connection().execute(insert(MACHINE), rows)
        session.commit()
    engine.dispose()


def observation(index: int, at: datetime) -> dict[str, Any]:
    return {
        "ip": ip_of(index),
        "observed_at": at.isoformat(),
        "reachable": True,
        "mac": mac_of(index),
        "is_mining": True,
        "hashrate_ths": 95.0 + (index % 10) * 0.5,
        "power_w": 3250.0 + index % 50,
        "temperature_c": 61.5,
        "fan_rpm": [5400, 5460, 5380, 5420],
        "pools": [
            {
                "url": "stratum+tcp://dmp.example.kz:3333",
                "user": f"licensee.M{index:07d}",
                "status": "alive",
                "active": True,
            },
            {"url": "stratum+tcp://dmp-backup.example.kz:3333", "user": f"licensee.M{index:07d}"},
        ],
    }


def build_batches(machines: int, rounds: int, size: int, start: datetime) -> list[bytes]:
    """Every machine once per round, in batches of ``size``, as ready-to-send JSON bodies."""
    bodies: list[bytes] = []
    sequence = 0
    for round_no in range(rounds):
        at = start + timedelta(seconds=POLL_SECONDS * round_no)
        for first in range(0, machines, size):
            sequence += 1
            batch = {
                "contract_version": "1.0",
                "batch_id": str(uuid.uuid4()),
                "agent_clock": at.isoformat(),
                "sequence": sequence,
                "observations": [
                    observation(i, at) for i in range(first, min(first + size, machines))
                ],
            }
            bodies.append(json.dumps(batch).encode())
    return bodies


def start_server(url: str, data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``asicfleet controller serve`` exactly as an operator runs it, on a free port."""
    port = free_port()
    log = (data_dir / "serve.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "asicfleet",
            "controller",
            "serve",
            "--data-dir",
            str(data_dir),
            "--database-url",
            url,
            "--bind",
            f"127.0.0.1:{port}",
        ],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the controller exited: {(data_dir / 'serve.log').read_text()}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the controller did not come up within 60 s")


@dataclass
class HttpResult:
    observations: int
    wall_s: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.observations / self.wall_s


def post_all(base: str, bodies: list[bytes], concurrency: int) -> HttpResult:
    """Post every body from ``concurrency`` threads (each with its own connection)."""
    headers = {"Authorization": f"Bearer {AGENT_SECRET}", "Content-Type": "application/json"}
    latencies: list[float] = []
    applied = 0
    failures: list[str] = []
    lock = threading.Lock()
    queue: Iterator[bytes] = iter(bodies)

    def worker() -> None:
        nonlocal applied
        with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
            while True:
                with lock:
                    body = next(queue, None)
                if body is None:
                    return
                started = time.perf_counter()
                response = client.post("/api/v1/agent/reports", content=body)
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    if response.status_code != 200:
                        failures.append(f"{response.status_code} {response.text[:200]}")
                        continue
                    ack = response.json()
                    applied += ack["observations"]
                    if ack["refused"]:
                        failures.append(f"refused: {ack['refused'][:3]}")

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if failures:
        raise SystemExit(f"{len(failures)} batch(es) failed, first: {failures[0]}")
    return HttpResult(observations=applied, wall_s=wall, latencies=latencies)


def plain_bulk_insert(url: str, bodies: list[bytes]) -> tuple[int, float]:
    """The same observations as history rows, bulk-inserted with SQLAlchemy (no HTTP, no logic)."""
    from controller import migrations
    from controller.db import make_engine
    from controller.ingest import HISTORY, MACHINE
    from controller.models import LifecycleState

    engine = make_engine(url)
    migrations.upgrade(engine)
    now = datetime.now(UTC)
    batches = [json.loads(body)["observations"] for body in bodies]
    machines = len({o["ip"] for batch in batches for o in batch})
    with engine.begin() as conn:
        conn.execute(
            insert(MACHINE),
            [
                {
                    "machine_id": f"M{i:09d}",
                    "hashboard_serials": [],
                    "lifecycle_state": LifecycleState.ACTIVE,
                    "state_since": now,
                    "first_seen": now,
                    "serial_unconfirmed": False,
                    "flags": [],
                    "record_version": 1,
                    "updated_at": now,
                }
                for i in range(machines)
            ],
        )
    pk_of = {ip_of(i): i + 1 for i in range(machines)}
    # Rows are built outside the clock, like the HTTP bodies: only the insert is timed.
    prepared = [
        [
            {
                "machine_pk": pk_of[o["ip"]],
                "bucket": n * len(batches) + j,
                "observed_at": datetime.fromisoformat(o["observed_at"]),
                "reachable": o["reachable"],
                "error": None,
                "is_mining": o["is_mining"],
                "hashrate_ths": o["hashrate_ths"],
                "power_w": o["power_w"],
                "temperature_c": o["temperature_c"],
                "pools": o["pools"],
            }
            for j, o in enumerate(batch)
        ]
        for n, batch in enumerate(batches)
    ]
    total = 0
    started = time.perf_counter()
    for rows in prepared:
        with engine.begin() as conn:
            conn.execute(insert(HISTORY), rows)
        total += len(rows)
    wall = time.perf_counter() - started
    engine.dispose()
    return total, wall


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--machines", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=6, help="poll cycles of every machine")
    parser.add_argument("--batch", type=int, default=500, help="observations per batch")
    parser.add_argument("--concurrency", type=int, default=1, help="client threads")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="asicfleet-ingest-bench-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'controller.db'}"
        print(
            f"ingest bench: {args.machines} machines, {args.rounds} poll cycles, "
            f"batches of {args.batch}, {args.concurrency} client thread(s), SQLite (WAL), "
            f"{os.cpu_count()} CPUs",
            flush=True,
        )
        started = time.perf_counter()
        build_database(url, args.machines)
        print(
            f"  database with {args.machines} registered machines: "
            f"{time.perf_counter() - started:.1f} s"
        )
        start = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
        bodies = build_batches(args.machines, args.rounds, args.batch, start)
        size_kb = statistics.mean(len(b) for b in bodies) / 1024
        print(f"  {len(bodies)} batches prepared ({size_kb:.0f} KiB each)")

        proc, base = start_server(url, Path(tmp))
        try:
            # One warm-up batch (imports, first queries), not counted, then the real run.
            warm = build_batches(
                min(args.batch, args.machines), 1, args.batch, start - timedelta(hours=1)
            )
            post_all(base, warm, 1)
            server = psutil.Process(proc.pid)
            cpu_before = sum(server.cpu_times()[:2])
            http = post_all(base, bodies, args.concurrency)
            server_cpu = sum(server.cpu_times()[:2]) - cpu_before
        finally:
            proc.terminate()
            proc.wait(timeout=10)

        bulk_rows, bulk_wall = plain_bulk_insert(f"sqlite:///{Path(tmp) / 'plain.db'}", bodies)
        bulk_rate = bulk_rows / bulk_wall
        latencies = sorted(http.latencies)
        p50 = latencies[len(latencies) // 2] * 1000
        p95 = latencies[int(len(latencies) * 0.95) - 1] * 1000
        print(
            f"  HTTP ingest  : {http.observations:>7} observations in {http.wall_s:6.2f} s "
            f"= {http.rate:>8.0f} obs/s  (batch latency p50 {p50:.0f} ms, p95 {p95:.0f} ms)"
        )
        print(
            f"  controller CPU: {server_cpu / len(bodies) * 1000:.0f} ms per batch "
            f"(= {http.observations / server_cpu:.0f} obs per CPU-second; "
            f"load average {os.getloadavg()[0]:.1f})"
        )
        print(
            f"  plain insert : {bulk_rows:>7} rows         in {bulk_wall:6.2f} s "
            f"= {bulk_rate:>8.0f} rows/s (SQLAlchemy core executemany, one txn per {args.batch})"
        )
        print(f"  ratio HTTP ingest / plain bulk insert: {http.rate / bulk_rate:.2f}")
        target = 5000
        verdict = "meets" if http.rate >= target else "MISSES"
        print(f"  target {target} obs/s through HTTP: {verdict}")


if __name__ == "__main__":
    main()
