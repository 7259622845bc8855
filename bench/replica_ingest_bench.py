"""Ingest throughput on PostgreSQL with one and with two controller replicas, in one run.

Run:  .venv/bin/python -m bench.replica_ingest_bench [--machines 2000] [--rounds 3]
          [--batch 250] [--concurrency 4] [--pg postgresql+psycopg://postgres@127.0.0.1/test]

For each of "one replica" and "two replicas", in a fresh PostgreSQL schema:

1. builds the database like ``bench.ingest_bench`` (one site, one agent, ``--machines``
   registered machines);
2. starts that many ``asicfleet controller serve`` processes on the schema;
3. posts ``--rounds`` poll cycles of every machine as batches of ``--batch`` over real HTTP
   from ``--concurrency`` client threads (thread *i* talks to replica *i mod n*). Every
   batch carries, next to its observations, an identity per machine whose firmware
   version changes each round, so every batch changes machines and appends audit entries
   -- the path that used to take one global lock for the whole ingest transaction.

Prints observations per second for each and their ratio. The ratio is bounded by the CPUs
the machine has (the replicas and PostgreSQL share them; see the CPU count printed).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import uuid
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import httpx
from sqlalchemy import create_engine, make_url, text
from sqlalchemy.engine import Engine

from bench.ingest_bench import (
    AGENT_SECRET,
    POLL_SECONDS,
    build_database,
    ip_of,
    mac_of,
    observation,
    start_server,
)

DEFAULT_PG = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def identity(index: int, at: datetime, round_no: int) -> dict[str, Any]:
    return {
        "ip": ip_of(index),
        "observed_at": at.isoformat(),
        "mac": mac_of(index),
        "serial": f"BENCHSN{index:07d}",
        "make": "AntMiner",
        "model": "S19j Pro",
        "firmware_version": f"bench.{round_no}",
    }


def build_batches(machines: int, rounds: int, size: int, start: datetime) -> list[bytes]:
    """Every machine once per round, observation and identity, as ready-to-send bodies."""
    bodies: list[bytes] = []
    for round_no in range(rounds):
        at = start + timedelta(seconds=POLL_SECONDS * round_no)
        for first in range(0, machines, size):
            chunk = range(first, min(first + size, machines))
            batch = {
                "contract_version": "1.0",
                "batch_id": str(uuid.uuid4()),
                "agent_clock": at.isoformat(),
                "sequence": len(bodies) + 1,
                "observations": [observation(i, at) for i in chunk],
                "identities": [identity(i, at, round_no) for i in chunk],
            }
            bodies.append(json.dumps(batch).encode())
    return bodies


@contextmanager
def fresh_schema(admin: Engine, base_url: str) -> Any:
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = make_url(base_url).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


def post_spread(bases: list[str], bodies: list[bytes], concurrency: int) -> tuple[int, float]:
    """Post every body from ``concurrency`` threads, thread i to replica i mod n."""
    headers = {"Authorization": f"Bearer {AGENT_SECRET}", "Content-Type": "application/json"}
    lock = threading.Lock()
    queue = iter(bodies)
    applied = 0
    failures: list[str] = []

    def worker(base: str) -> None:
        nonlocal applied
        with httpx.Client(base_url=base, headers=headers, timeout=120) as client:
            while True:
                with lock:
                    body = next(queue, None)
                if body is None:
                    return
                response = client.post("/api/v1/agent/reports", content=body)
                with lock:
                    if response.status_code != 200 or response.json()["refused"]:
                        failures.append(f"{response.status_code} {response.text[:200]}")
                    else:
                        applied += response.json()["observations"]

    threads = [
        threading.Thread(target=worker, args=(bases[i % len(bases)],)) for i in range(concurrency)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if failures:
        raise SystemExit(f"{len(failures)} batch(es) failed, first: {failures[0]}")
    return applied, wall


def run(admin: Engine, pg: str, replicas: int, args: argparse.Namespace) -> float:
    with fresh_schema(admin, pg) as url, TemporaryDirectory(prefix="asicfleet-repl-") as tmp:
        build_database(url, args.machines)
        start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)
        warm = build_batches(min(args.batch, args.machines), 1, args.batch, start)
        bodies = build_batches(args.machines, args.rounds, args.batch, start + timedelta(minutes=1))
        with ExitStack() as stack:
            bases = []
            for n in range(replicas):
                data_dir = Path(tmp) / f"r{n}"
                data_dir.mkdir()
                proc, base = start_server(url, data_dir)
                stack.callback(proc.wait, 10)
                stack.callback(proc.terminate)
                bases.append(base)
            post_spread(bases, warm, 1)  # imports and first queries, not counted
            applied, wall = post_spread(bases, bodies, args.concurrency)
        rate = applied / wall
        print(
            f"  {replicas} replica(s): {applied:>7} observations in {wall:6.2f} s "
            f"= {rate:>7.0f} obs/s ({len(bodies)} batches, each with {args.batch} identities)",
            flush=True,
        )
        return rate


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--machines", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--concurrency", type=int, default=4, help="client threads in all")
    parser.add_argument("--pg", default=DEFAULT_PG, help="a PostgreSQL database to use")
    args = parser.parse_args()
    print(
        f"replica ingest bench: {args.machines} machines, {args.rounds} rounds, batches of "
        f"{args.batch}, {args.concurrency} client threads, PostgreSQL, {os.cpu_count()} CPUs",
        flush=True,
    )
    admin = create_engine(args.pg, isolation_level="AUTOCOMMIT")
    try:
        one = run(admin, args.pg, 1, args)
        two = run(admin, args.pg, 2, args)
    finally:
        admin.dispose()
    print(f"  two replicas / one: {two / one:.2f}  (load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
