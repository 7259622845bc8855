"""An agent's pull of an unchanged policy bundle: full rebuild against a 304, in one run.

Run:  .venv/bin/python -m bench.policy_pull_bench [--machines 20000] [--pulls 10]
                                                  [--database-url postgresql+psycopg://…]

1. Builds a controller database (SQLite in a temporary directory unless ``--database-url``
   names an empty PostgreSQL database or schema): one site with an approved pool set and
   ``--machines`` registered machines (``bench.ingest_bench.build_database``).
2. Starts ``asicfleet controller serve`` (the real server) and pulls
   ``GET /api/v1/agent/policy`` with the agent's credential over real HTTP:
   - *before*: ``--pulls`` pulls without ``If-None-Match`` -- what every pull cost before
     ETags (build, version check, sign, serialise 20,000 machines);
   - *after*: ``--pulls`` pulls of the same, unchanged bundle with ``If-None-Match`` set to
     the ETag the first answer carried -- ``304 Not Modified``.
3. Prints, for each, the controller's CPU time per pull (psutil, user + system of the
   server process: less sensitive to other load than wall time), the bytes per answer
   (body as sent) and the client's wall time per pull.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil
from sqlmodel import Session, select

from bench.ingest_bench import AGENT_SECRET, build_database, start_server

PATH = "/api/v1/agent/policy"


def add_pool_set(url: str) -> None:
    """An approved pool set for the bench site, so the bundle is what a real one carries."""
    from controller.db import make_engine
    from controller.models import PoolSet, PoolSetStatus, Site

    engine = make_engine(url)
    with Session(engine) as session:
        site = session.exec(select(Site)).one()
        now = datetime.now(UTC)
        session.add(
            PoolSet(
                site_id=site.id,
                version=1,
                name="Bench DMP",
                urls=["stratum+tcp://dmp.example.kz:3333", "stratum+tcp://dmp2.example.kz:3333"],
                account="licensee",
                status=PoolSetStatus.APPROVED,
                proposed_by="bench",
                proposed_at=now,
                decided_by="bench2",
                decided_at=now,
            )
        )
        session.commit()
    engine.dispose()


@dataclass
class PullResult:
    status: int
    cpu_s: float
    wall_s: float
    body_bytes: list[int]

    def line(self, label: str, pulls: int) -> str:
        return (
            f"  {label}: HTTP {self.status}, controller CPU {self.cpu_s / pulls * 1000:7.1f} ms "
            f"per pull, {statistics.mean(self.body_bytes):>10,.0f} bytes per answer, "
            f"wall {self.wall_s / pulls * 1000:7.1f} ms per pull"
        )


def pulls(client: httpx.Client, server: psutil.Process, count: int, etag: str | None) -> PullResult:
    headers = {"If-None-Match": etag} if etag else {}
    statuses: set[int] = set()
    sizes: list[int] = []
    cpu = sum(server.cpu_times()[:2])
    started = time.perf_counter()
    for _ in range(count):
        response = client.get(PATH, headers=headers)
        statuses.add(response.status_code)
        sizes.append(len(response.content))
    wall = time.perf_counter() - started
    cpu = sum(server.cpu_times()[:2]) - cpu
    if len(statuses) != 1:
        raise SystemExit(f"mixed answers: {sorted(statuses)}")
    return PullResult(statuses.pop(), cpu, wall, sizes)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--machines", type=int, default=20_000)
    parser.add_argument("--pulls", type=int, default=10, help="pulls of each kind")
    parser.add_argument("--database-url", help="an empty PostgreSQL database (default: SQLite)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="asicfleet-pull-bench-") as tmp:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'controller.db'}"
        backend = "PostgreSQL" if url.startswith("postgresql") else "SQLite (WAL)"
        print(
            f"policy pull bench: {args.machines} machines, {args.pulls} pulls of each kind, "
            f"{backend}, {os.cpu_count()} CPUs",
            flush=True,
        )
        build_database(url, args.machines)
        add_pool_set(url)
        proc, base = start_server(url, Path(tmp))
        try:
            auth = {"Authorization": f"Bearer {AGENT_SECRET}"}
            with httpx.Client(base_url=base, headers=auth, timeout=120) as client:
                first = client.get(PATH)  # warm-up: imports, first version row
                first.raise_for_status()
                etag = first.headers["ETag"]
                server = psutil.Process(proc.pid)
                before = pulls(client, server, args.pulls, None)
                after = pulls(client, server, args.pulls, etag)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    if before.status != 200 or after.status != 304:
        raise SystemExit(f"expected 200 then 304, got {before.status} and {after.status}")
    print(before.line("before (full rebuild)", args.pulls))
    print(after.line("after  (304)         ", args.pulls))
    print(
        f"  ratio: {before.cpu_s / max(after.cpu_s, 1e-9):.0f}x less controller CPU, "
        f"{statistics.mean(before.body_bytes):,.0f} -> {statistics.mean(after.body_bytes):,.0f} "
        f"body bytes (load average {os.getloadavg()[0]:.1f})"
    )


if __name__ == "__main__":
    main()
