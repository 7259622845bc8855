# ruff: noqa: E501  (generated rows stay one per line)
"""Compliance export scale: time and peak memory per format, for a large register with history.

Run:  .venv/bin/python -m bench.export_bench [--machines 100000] [--pdf-machines 10000]
                                             [--days 30] [--history-step 300] [--keep DIR]

1. Builds a SQLite controller database (migrated like ``serve`` does) in a temporary folder:
   4 sites with approved pool sets; ``--machines`` machines, each with a register history
   over ``--days`` days (discovered, claimed, active; 10 % moved to another address, 5 %
   with a control-board swap, 2 % decommissioned), compliance intervals covering the days
   (5 % of machines drifting once, 1 % twice with a failed remediation, each drift with its
   incident), and observation history every ``--history-step`` seconds (default 300, the
   controller's default ``history_resolution_s``; hashrate, power, pools). The hour, day
   and week sums (``observation_sum``) cover every day; raw history rows are written for the first and
   the last day only, because those are all a register export reads raw (the last pool
   check, and what is left of an hour at a period edge): 30 days of raw rows at 300 s would be 864
   million rows, which the export never reads. A second database holds the first
   ``--pdf-machines`` machines for the PDF. With ``--keep DIR`` the databases are built
   in DIR and reused by later runs with the same sizes (the exports add audit entries).
2. Runs each export in its own process, as ``asicfleet controller export register`` would
   (as of the end of the history, measured averages over the whole period): CSV and XLSX
   at full size, PDF at ``--pdf-machines``; the CSV again for a period given in local
   time (+05:00, so both edges fall inside a day and read raw polls); and the compliance
   report as CSV. Prints wall time and the child's peak RSS for each, and checks every
   export with verify-export.

Targets from the issue: CSV within 10 s, XLSX within 90 s, peak memory under 1 GB.
"""

from __future__ import annotations

import argparse
import json
import os
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
            for offset in range(0, len(rows), 20_000):
                conn.execute(insert(table), rows[offset : offset + 20_000])
    del m_rows, v_rows, i_rows, d_rows
    # Observation history at ``step``: raw rows for the first and the last day (the only raw
    # rows a register export reads: the last pool check, and what is left of an hour at a
    # period's edge), and the hour, day and week sums of every day, as ingest keeps them.
    sql = (
        "INSERT INTO observation_history (machine_pk, bucket, observed_at, reachable, error, "
        "is_mining, hashrate_ths, power_w, temperature_c, pools) VALUES (?,?,?,?,?,?,?,?,?,?)"
    )
    sum_sql = (
        "INSERT INTO observation_sum (machine_pk, span_s, start_s, polls, mining, hashrate_sum, "
        "hashrate_n, power_sum, power_n) VALUES (?,?,?,?,?,?,?,?,?)"
    )
    origin = int(start.timestamp())
    stamps = [
        start + timedelta(days=d, seconds=s)
        for d in sorted({0, days - 1})
        for s in range(0, 86400, step)
    ]
    end = origin + days * 86400
    spans = [  # (span, its start, polls of the history inside it)
        (span, at, (min(at + span, end) - max(at, origin)) // step)
        for span in (3600, 86400, 7 * 86400)
        for at in range(origin - origin % span, end, span)
    ]
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        for first in range(0, machines, 1000):
            polls: list[tuple[Any, ...]] = []
            sums: list[tuple[Any, ...]] = []
            for n in range(first, min(machines, first + 1000)):
                name = SITES[n % len(SITES)]
                pools = json.dumps([{"url": f"stratum+tcp://{name}.dmp.kz:3333",
                                     "user": f"{name}acct.M{n:09d}", "status": "Alive"}])  # fmt: skip
                hashrate, power = 200.0 + (n % 7), 3500.0 - (n % 11)
                for stamp in stamps:
                    polls.append((n + 1, int(stamp.timestamp()) // step, sqlite_time(stamp), 1, None,
                                  1, hashrate, power, 65.0, pools))  # fmt: skip
                for span, begin, k in spans:  # every poll reachable and mining
                    sums.append((n + 1, span, begin, k, k, hashrate * k, k, power * k, k))
            cur.executemany(sql, polls)
            cur.executemany(sum_sql, sums)
        raw.commit()
    finally:
        raw.close()
    _check_sums(engine, machines)
    engine.dispose()


def _check_sums(engine: Engine, machines: int) -> None:
    """The sums written above equal what ``history_rollup`` computes from the raw rows."""
    from sqlalchemy import select

    from controller import history_rollup as hr

    h, sums = hr.HISTORY, hr.SUM
    with engine.connect() as conn:
        for span in (hr.HOUR, hr.DAY):  # the raw rows cover whole days, not whole weeks
            at = hr.history_seconds(conn)
            begin = at - at % span
            computed = conn.execute(
                select(h.c.machine_pk, begin, *hr.sum_columns())
                .where(h.c.machine_pk <= 50)
                .group_by(h.c.machine_pk, begin)
            ).all()
            for pk, start_s, *expected in computed:
                stored = conn.execute(
                    select(*(sums.c[name] for name in hr.SUMS)).where(
                        sums.c.span_s == span, sums.c.machine_pk == pk, sums.c.start_s == start_s
                    )
                ).one()
                if [round(float(v), 6) for v in stored] != [round(float(v), 6) for v in expected]:
                    raise SystemExit(f"sums differ: machine {pk}, span {span}, start {start_s}")


# Runs the real CLI and reports its own peak RSS on the way out (atexit runs on SystemExit).
WRAPPER = (
    "import atexit, resource, sys\n"
    "atexit.register(lambda: sys.stderr.write("
    "f'\\nPEAK_KB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}\\n'))\n"
    "sys.argv = ['asicfleet', *sys.argv[1:]]\n"
    "from asicfleet.cli import main\n"
    "main()\n"
)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WRAPPER, *args],
        capture_output=True,
        text=True,
        check=False,
        env=None if env is None else os.environ | env,
    )


def exporter_token(db: Path) -> str:
    """A personal token of a compliance user: exports are made by a named user (issue 10)."""
    from sqlmodel import Session, select

    from controller.db import make_engine
    from controller.models import ApiToken, Role, User
    from controller.security import USER_TOKEN_PREFIX, hash_password, new_token, token_hash

    engine = make_engine(f"sqlite:///{db}")
    try:
        with Session(engine) as session:
            user = session.exec(select(User).where(User.name == "bench-compliance")).first()
            if user is None:
                user = User(
                    name="bench-compliance",
                    role=Role.COMPLIANCE,
                    password_hash=hash_password(new_token("")),
                )
                session.add(user)
                session.flush()
            assert user.id is not None
            token = new_token(USER_TOKEN_PREFIX)
            session.add(ApiToken(user_id=user.id, name="bench", token_hash=token_hash(token)))
            session.commit()
    finally:
        engine.dispose()
    return token


def run_child(db: Path, data_dir: Path, out: Path, args: list[str]) -> tuple[float, float]:
    """One export in its own process: (seconds, peak RSS in MiB of that process)."""
    env = {"ASICFLEET_TOKEN": exporter_token(db)}
    started = time.perf_counter()
    done = cli("controller", "--data-dir", str(data_dir), "--database-url", f"sqlite:///{db}",
               "export", *args, "--out", str(out), env=env)  # fmt: skip
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
        "--history-step", type=int, default=300, help="seconds between history rows"
    )
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="build the databases in DIR and reuse them on later runs with the same sizes",
    )
    opts = parser.parse_args()
    if opts.history_step <= 0 or 86400 % opts.history_step:
        parser.error("--history-step must divide a day (86400 s)")
    pdf_machines = min(opts.pdf_machines, opts.machines)
    with tempfile.TemporaryDirectory(prefix="export-bench-") as tmp:
        root = Path(tmp)
        data = root / "data"
        data.mkdir()
        store = opts.keep or root
        store.mkdir(parents=True, exist_ok=True)
        dbs: dict[str, Path] = {}
        started = time.perf_counter()
        for key, count in (("big", opts.machines), ("pdf", pdf_machines)):
            db = dbs[key] = store / f"m{count}-d{opts.days}-s{opts.history_step}.db"
            done = db.with_suffix(".built")
            if done.exists():
                print(f"reusing {db}", flush=True)
                continue
            for stale in store.glob(f"{db.name}*"):
                stale.unlink()
            print(f"building {count} machines x {opts.days} days "
                  f"(history every {opts.history_step} s) ...", flush=True)  # fmt: skip
            # In a child process: a child inherits its parent's peak RSS on Linux, so the
            # parent must stay small for the exports' peaks to be their own.
            subprocess.run(
                [sys.executable, "-c", "import sys; from pathlib import Path; "
                 "from bench.export_bench import build; "
                 "build(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))",
                 str(db), str(count), str(opts.days), str(opts.history_step)],
                check=True,
            )  # fmt: skip
            done.touch()
        print(f"ready in {time.perf_counter() - started:.0f} s\n", flush=True)
        as_of = "2026-11-01T00:00Z"
        period = f"{(END - timedelta(days=opts.days)).date()}..{END.date()}"
        # whole local days in Kazakhstan (+05:00): both edges at 19:00 UTC, inside a day
        local = (f"{(END - timedelta(days=opts.days - 1)).date()}T00:00+05:00.."
                 f"{END.date()}T00:00+05:00")  # fmt: skip
        runs = [
            ("register csv", "big", opts.machines, ["register", "--as-of", as_of, "--period", period, "--format", "csv"]),
            ("register xlsx", "big", opts.machines, ["register", "--as-of", as_of, "--period", period, "--format", "xlsx"]),
            ("register pdf", "pdf", pdf_machines, ["register", "--as-of", as_of, "--period", period, "--format", "pdf"]),
            ("register csv+05", "big", opts.machines, ["register", "--as-of", as_of, "--period", local, "--format", "csv"]),
            ("compliance csv", "big", opts.machines, ["compliance", "--period", period, "--format", "csv"]),
        ]  # fmt: skip
        print(f"{'export':<16} {'machines':>9} {'seconds':>8} {'peak MiB':>9}")
        for index, (name, db, count, args) in enumerate(runs):
            seconds, peak = run_child(dbs[db], data, root / f"out{index}", args)
            print(f"{name:<16} {count:>9} {seconds:>8.1f} {peak:>9.0f}", flush=True)


if __name__ == "__main__":
    main()
