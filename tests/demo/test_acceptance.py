"""Issue 5's acceptance, end to end, with every component in its own process.

The farm, the controller and the agent are started by the demo's own orchestration (so the
demo is tested too): 1,000 simulated miners, 10% moved to a foreign pool, 2% with persistent
malware, an approved pool set proposed and approved by two people, enforce mode.

Time is compressed so that the suite stays short: the agent polls every 20 s and the malware
re-injects its pool 30 s after every correction (the issue's figures are 60 s and 2 minutes;
the mechanism does not depend on them). Checked:

- within two poll intervals after the agent's first cycle, every writable machine is on the
  approved pools by the simulator's *true* state;
- every malware machine is corrected again after each re-injection and is flagged as a repeat
  offender by the controller;
- the evidence holds every drift with its detect and verify times, and the p95 of
  detect-to-verified is at most one poll interval plus the firmware's restart delay.

A second test runs ``asicfleet demo --miners 200 --exit-when-compliant`` exactly as the README
says and expects exit 0 within 3 minutes.
"""

from __future__ import annotations

import sqlite3
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest

from asicfleet.demo.run import Demo, DemoOptions, free_port

pytestmark = [pytest.mark.slow]

MINERS = 1000
POLL_S = 20.0
MALWARE_S = 30.0
RESTART_S = 10.0


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace(" ", "T"))


def test_a_thousand_miners_are_brought_onto_the_approved_pools_and_kept_there() -> None:
    lines: list[str] = []
    options = DemoOptions(
        miners=MINERS,
        port=free_port(),
        poll_interval_s=POLL_S,
        malware_every_s=MALWARE_S,
        restart_seconds=RESTART_S,
    )
    demo = Demo(options, lines.append)
    try:
        demo.start()
        wait_for("the agent's first cycle", lambda: demo.agent_status().get("cycles", 0) >= 1, 240)
        # From the end of the agent's first poll cycle, at most two poll intervals:
        truth = wait_for(
            "every writable machine on the approved pools",
            lambda: (t := demo.snapshot()[0]).all_compliant and t,
            timeout=2 * POLL_S,
            every=2.0,
        )
        assert truth.writable == MINERS and truth.registered == MINERS

        # Let the malware strike twice more; each strike must be detected and corrected.
        time.sleep(2 * (MALWARE_S + POLL_S) + POLL_S)
        plan = demo.tampering
        db = sqlite3.connect(f"file:{demo.root / 'controller' / 'asicfleet.db'}?mode=ro", uri=True)
        db.row_factory = sqlite3.Row
        rows = db.execute(
            "SELECT m.current_ip AS ip, m.machine_id, d.detected_at, d.verified_at, d.outcome, "
            "d.action FROM drift_incident d JOIN machine m ON m.id = d.machine_pk"
        ).fetchall()
        [[ended]] = db.execute("SELECT max(observed_at) FROM observation_latest").fetchall()
        flagged = {
            r["machine_id"]
            for r in db.execute("SELECT m.machine_id FROM event e JOIN machine m ON m.id = "
                                "e.machine_pk WHERE e.kind = 'repeat_offender'")
        }  # fmt: skip
    finally:
        demo.stop()

    by_ip: dict[str, list[sqlite3.Row]] = defaultdict(list)
    for row in rows:
        by_ip[row["ip"]].append(row)
    assert len(plan.foreign) == 100 and len(plan.malware) == 20
    for ip in plan.foreign:
        assert by_ip[ip], f"{ip} started on a foreign pool but has no drift incident"
    for ip in plan.malware:
        verified = [r for r in by_ip[ip] if r["outcome"] == "verified"]
        assert len(verified) >= 3, f"malware machine {ip}: {len(verified)} verified corrections"
        assert {r["machine_id"] for r in by_ip[ip]} <= flagged, f"{ip} not flagged"
    # Every drift is in the evidence as detected -> written -> verified; the only incidents
    # still open are malware re-injections detected in the last moments before the stop.
    closed = [r for r in rows if r["verified_at"] is not None]
    still_open = [r for r in rows if r["verified_at"] is None]
    assert all(r["outcome"] == "verified" and r["action"] == "write" for r in closed), [
        dict(r) for r in closed if r["outcome"] != "verified" or r["action"] != "write"
    ]
    for row in still_open:
        assert row["ip"] in plan.malware, f"incident of {row['ip']} never verified: {dict(row)}"
        age = (_time(ended) - _time(row["detected_at"])).total_seconds()
        assert age <= POLL_S + RESTART_S, f"{row['ip']}: open for {age:.0f} s"
    spans = sorted(
        (_time(r["verified_at"]) - _time(r["detected_at"])).total_seconds() for r in closed
    )
    p95 = spans[max(0, round(0.95 * len(spans)) - 1)]
    median = statistics.median(spans)
    assert p95 <= POLL_S + RESTART_S, f"p95 detect-to-verified {p95:.1f} s (median {median:.1f})"


def test_demo_command_exits_when_compliant() -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "asicfleet", "demo", "--miners", "200", "--exit-when-compliant",
         "--port", str(free_port())],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert "all 200 writable machines are on the approved pools" in result.stdout, last
    assert "controller listening on http://127.0.0.1:" in result.stdout
    assert elapsed < 180, f"took {elapsed:.0f} s"
