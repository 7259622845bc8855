# ruff: noqa: E501  (generated rows stay one per line)
"""Compliance export scale: time and peak memory per format, for a large register with history.

Run:  .venv/bin/python -m bench.export_bench [--machines 100000] [--pdf-machines 10000]
                                             [--days 30] [--history-step 21600]

1. Builds a SQLite controller database (migrated like ``serve`` does) in a temporary folder:
   4 sites with approved pool sets; ``--machines`` machines, each with a register history
   over ``--days`` days (discovered, claimed, active; 10 % moved to another address, 5 %
   with a control-board swap, 2 % decommissioned), compliance intervals covering the days
   (5 % of machines drifting once, 1 % twice with a failed remediation, each drift with its
   incident), and observation history every ``--history-step`` seconds (hashrate, power,
   pools). A second database holds the first ``--pdf-machines`` machines for the PDF.
2. Runs each export in its own process, as ``asicfleet controller export register`` would
   (as of the end of the history, measured averages over the whole period): CSV and XLSX
   at full size, PDF at ``--pdf-machines``; and the compliance report as CSV. Prints wall
   time and the child's peak RSS for each, and checks every export with verify-export.

Targets from the issue: CSV within 10 s, XLSX within 90 s, peak memory under 1 GB.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import insert
from sqlalchemy.engine import Engine

END = datetime(2026, 11, 1, tzinfo=UTC)
SITES = ("north", "south", "east", "west")


def sqlite_time(value: datetime) -> str:
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


def build(path: Path, machines: int, days: int, step: int, seed: int = 7) -> None:
    """Fill a fresh database at ``path`` (raw bulk statements: this is setup, not measured)."""
    from controller import migrations
    from controller.db import make_engine
    from controller.models import (
        ComplianceInterval,
        DriftIncident,
        Machine,
        MachineVersion,
        PoolSet,
        Site,
    )

    engine: Engine = make_engine(f"sqlite:///{path}")
    migrations.upgrade(engine)
    rng = random.Random(seed)
    start = END - timedelta(days=days)
    with engine.begin() as conn:
        for i, name in enumerate(SITES, start=1):
            conn.execute(
                insert(Site.__table__),  # type: ignore[attr-defined]
                {"id": i, "name": name, "licence_number": f"KZ-DM-{i:04d}",
                 "owner_name": f"ТОО «{name.title()} Mining»", "dmp_account": f"{name}acct",
                 "created_at": start},
            )  # fmt: skip
            conn.execute(
                insert(PoolSet.__table__),  # type: ignore[attr-defined]
                {"site_id": i, "version": 1, "name": "DMP-KZ", "status": "APPROVED",
                 "urls": [f"stratum+tcp://{name}.dmp.kz:3333", f"stratum+tcp://{name}2.dmp.kz:3333"],
                 "account": f"{name}acct", "password": "x", "devfee": "allow",
                 "proposed_by": "c1", "proposed_at": start, "reason": "", "decided_by": "c2",
                 "decided_at": start, "decision_reason": ""},
            )  # fmt: skip
    m_rows: list[dict[str, Any]] = []
    v_rows: list[dict[str, Any]] = []
    i_rows: list[dict[str, Any]] = []
    d_rows: list[dict[str, Any]] = []
    for n in range(machines):
        pk = n + 1
        site = n % len(SITES) + 1
        found = start + timedelta(minutes=rng.randrange(0, 600))
        claimed = found + timedelta(hours=6)
        active = claimed + timedelta(hours=2)
        ip = f"127.{16 + n // 65536}.{n // 256 % 256}.{n % 256}"
        base = {
            "machine_id": f"M{n:09d}", "label_serial": f"SN{n:010d}",
            "reported_serial": f"SN{n:010d}", "control_board_serial": f"CB{n:08d}",
            "mac": f"02:00:{n >> 24 & 255:02x}:{n >> 16 & 255:02x}:{n >> 8 & 255:02x}:{n & 255:02x}",
            "vendor": "Bitmain", "model": "Antminer S21" if n % 3 else "Antminer S19 XP",
            "firmware": "stock", "firmware_version": "2024.06",
            "hashboard_serials": [f"HB{n}a", f"HB{n}b", f"HB{n}c"], "psu_serial": f"PSU{n}",
            "site_id": site, "container": f"C{n // 300 % 40 + 1}", "rack": f"R{n // 30 % 10 + 1}",
            "shelf": f"S{n // 6 % 5 + 1}", "slot": str(n % 6 + 1), "nominal_ths": 200.0,
            "nominal_w": 3500.0, "current_ip": ip, "serial_unconfirmed": False, "flags": [],
            "commissioned_at": claimed, "decommissioned_at": None,
        }  # fmt: skip
        versions = [
            base | {"lifecycle_state": "DISCOVERED", "state_since": found, "container": None,
                    "rack": None, "shelf": None, "slot": None, "commissioned_at": None,
                    "label_serial": None, "_at": found},
            base | {"lifecycle_state": "REGISTERED", "state_since": claimed, "_at": claimed},
            base | {"lifecycle_state": "ACTIVE", "state_since": active, "_at": active},
        ]  # fmt: skip
        roll = rng.random()
        if roll < 0.10:
            at = start + timedelta(days=rng.uniform(2, days - 1))
            versions.append(
                versions[-1] | {"current_ip": f"127.99.{n // 256 % 256}.{n % 256}", "_at": at}
            )
        elif roll < 0.15:
            at = start + timedelta(days=rng.uniform(2, days - 1))
            versions.append(versions[-1] | {"control_board_serial": f"CB{n:08d}-2", "_at": at})
        elif roll < 0.17:
            at = start + timedelta(days=rng.uniform(2, days - 1))
            versions.append(versions[-1] | {"lifecycle_state": "DECOMMISSIONED", "state_since": at,
                                            "decommissioned_at": at, "_at": at})  # fmt: skip
        last = versions[-1]
        m_rows.append({k: v for k, v in last.items() if k != "_at"} | {
            "id": pk, "first_seen": found, "last_seen": END, "record_version": len(versions),
            "updated_at": last["_at"], "agent_id": None})  # fmt: skip
        for number, v in enumerate(versions, start=1):
            row = {k: val for k, val in v.items() if k not in ("_at", "commissioned_at_")}
            row.update(machine_pk=pk, record_version=number, valid_from=v["_at"])
            v_rows.append(row)
        drifts = 2 if rng.random() < 0.01 else (1 if rng.random() < 0.05 else 0)
        cursor = active
        for k in range(drifts):
            t0 = start + timedelta(days=rng.uniform(3 + k * 10, 12 + k * 10))
            t1 = t0 + timedelta(minutes=rng.randrange(1, 90))
            i_rows.append(
                {
                    "machine_pk": pk,
                    "status": "compliant",
                    "cause": "",
                    "started_at": cursor,
                    "ended_at": t0,
                }
            )
            i_rows.append(
                {
                    "machine_pk": pk,
                    "status": "non_compliant",
                    "cause": "wrong pool",
                    "started_at": t0,
                    "ended_at": t1,
                }
            )
            failed = k == 1
            d_rows.append({"machine_pk": pk, "site_id": site, "detected_at": t0, "observed": [],
                           "problems": ["wrong_pool"], "action": "write", "action_at": t0 + timedelta(seconds=40),
                           "verified_at": None if failed else t1, "outcome": "failed" if failed else "verified",
                           "cause": "write not applied" if failed else "pool changed on the miner",
                           "attempts": 3 if failed else 1, "after_reboot": False, "agent_id": None,
                           "closed_at": None if failed else t1})  # fmt: skip
            cursor = t1
        i_rows.append({"machine_pk": pk, "status": "compliant", "cause": "", "started_at": cursor,
                       "ended_at": last["decommissioned_at"]})  # fmt: skip
    with engine.begin() as conn:
        for table, rows in (
            (Machine.__table__, m_rows),  # type: ignore[attr-defined]
            (MachineVersion.__table__, v_rows),  # type: ignore[attr-defined]
            (ComplianceInterval.__table__, i_rows),  # type: ignore[attr-defined]
            (DriftIncident.__table__, d_rows),  # type: ignore[attr-defined]
        ):
            for at in range(0, len(rows), 20_000):
                conn.execute(insert(table), rows[at : at + 20_000])
    del m_rows, v_rows, i_rows, d_rows
    # observation history: raw executemany (SQLite form of times, pools as JSON text)
    sql = (
        "INSERT INTO observation_history (machine_pk, bucket, observed_at, reachable, error, "
        "is_mining, hashrate_ths, power_w, temperature_c, pools) VALUES (?,?,?,?,?,?,?,?,?,?)"
    )
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        stamps = [start + timedelta(seconds=s) for s in range(0, days * 86400, step)]
        for first in range(0, machines, 2000):
            rows = []
            for n in range(first, min(machines, first + 2000)):
                name = SITES[n % len(SITES)]
                pools = json.dumps([{"url": f"stratum+tcp://{name}.dmp.kz:3333",
                                     "user": f"{name}acct.M{n:09d}", "status": "Alive"}])  # fmt: skip
                for stamp in stamps:
                    rows.append((n + 1, int(stamp.timestamp()) // 300, sqlite_time(stamp), 1, None,
                                 1, 200.0 + (n % 7), 3500.0 - (n % 11), 65.0, pools))  # fmt: skip
            cur.executemany(sql, rows)
        raw.commit()
    finally:
        raw.close()
    engine.dispose()


# Runs the real CLI and reports its own peak RSS on the way out (atexit runs on SystemExit).
WRAPPER = (
    "import atexit, resource, sys\n"
    "atexit.register(lambda: sys.stderr.write("
    "f'\\nPEAK_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}\\n'))\n"
    "sys.argv = ['asicfleet', *sys.argv[1:]]\n"
    "from asicfleet.cli import main\n"
    "main()\n"
)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WRAPPER, *args], capture_output=True, text=True, check=False
    )


def run_child(db: Path, data_dir: Path, out: Path, args: list[str]) -> tuple[float, float]:
    """One export in its own process: (seconds, peak RSS in MiB of that process)."""
    started = time.perf_counter()
    done = cli("controller", "--data-dir", str(data_dir), "--database-url", f"sqlite:///{db}",
               "export", *args, "--out", str(out))  # fmt: skip
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"export failed: {' '.join(args)}\n{done.stderr}")
    peak_kb = int(done.stderr.rsplit("PEAK_KB", 1)[1].split()[0])
    verify = cli("verify-export", str(out))
    if verify.returncode != 0:
        raise SystemExit(f"verify-export failed for {out}:\n{verify.stderr}")
    return elapsed, peak_kb / 1024.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--machines", type=int, default=100_000)
    parser.add_argument("--pdf-machines", type=int, default=10_000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument(
        "--history-step", type=int, default=21_600, help="seconds between history rows"
    )
    opts = parser.parse_args()
    pdf_machines = min(opts.pdf_machines, opts.machines)
    with tempfile.TemporaryDirectory(prefix="export-bench-") as tmp:
        root = Path(tmp)
        data = root / "data"
        data.mkdir()
        print(f"building {opts.machines} machines x {opts.days} days "
              f"(history every {opts.history_step} s) ...", flush=True)  # fmt: skip
        started = time.perf_counter()
        # Built in child processes: a child inherits its parent's peak RSS on Linux, so the
        # parent must stay small for the exports' peaks to be their own.
        for name, count in (("big.db", opts.machines), ("pdf.db", pdf_machines)):
            subprocess.run(
                [sys.executable, "-c", "import sys; from pathlib import Path; "
                 "from bench.export_bench import build; "
                 "build(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))",
                 str(root / name), str(count), str(opts.days), str(opts.history_step)],
                check=True,
            )  # fmt: skip
        print(f"built in {time.perf_counter() - started:.0f} s\n", flush=True)
        as_of = "2026-11-01T00:00Z"
        period = f"{(END - timedelta(days=opts.days)).date()}..{END.date()}"
        runs = [
            ("register csv", "big.db", opts.machines, ["register", "--as-of", as_of, "--period", period, "--format", "csv"]),
            ("register xlsx", "big.db", opts.machines, ["register", "--as-of", as_of, "--period", period, "--format", "xlsx"]),
            ("register pdf", "pdf.db", pdf_machines, ["register", "--as-of", as_of, "--period", period, "--format", "pdf"]),
            ("compliance csv", "big.db", opts.machines, ["compliance", "--period", period, "--format", "csv"]),
        ]  # fmt: skip
        print(f"{'export':<16} {'machines':>9} {'seconds':>8} {'peak MiB':>9}")
        for index, (name, db, count, args) in enumerate(runs):
            seconds, peak = run_child(root / db, data, root / f"out{index}", args)
            print(f"{name:<16} {count:>9} {seconds:>8.1f} {peak:>9.0f}", flush=True)


if __name__ == "__main__":
    main()
