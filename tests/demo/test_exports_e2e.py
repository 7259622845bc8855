"""The demo's exports, checked row by row against the simulator's true state.

The demo's own orchestration starts a farm of 60 simulated miners (some moved to a foreign
pool, some with malware that re-injects only after an hour, so that the truth stays put
while we compare), the controller and the agent in enforce mode. One miner reports a serial
that is a spreadsheet formula (the simulator's ``duplicate_serial`` fault), so that hostile
text travels the whole way: miner → pyasic → agent → controller → CSV.

Once the simulator says every writable miner is on the approved pools, the register is
exported ``--as-of now`` with the CLI, as a user would, until the controller has caught up
(the agent reports every 10 s); then every row must show exactly what the miner at its
address runs (``GET /miners`` on the control API): the pools read back with their worker,
"compliant" only next to the approved set with the machine's own worker, and a last check
within a few poll intervals. The compliance report for the demo's run must count no hour
before the machines were first seen nor after the export was made.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from asicfleet.demo.plan import DEMO_POOLS, expected_worker
from asicfleet.demo.run import Demo, DemoOptions, free_port

pytestmark = [pytest.mark.slow]

MINERS = 60
POLL_S = 10.0
HOSTILE_SERIAL = '=HYPERLINK("HTTP://EVIL.EXAMPLE","X")'


class HostileDemo(Demo):
    """The demo, plus one miner whose serial is a formula (set before the agent starts)."""

    hostile_ip = ""

    def _tamper(self) -> None:
        super()._tamper()
        taken = {*self.tampering.foreign, *self.tampering.malware}
        miners = [m for m in self._sim_get("/miners") if m["ip"] not in taken]
        self.hostile_ip = str(miners[0]["ip"])
        response = httpx.post(
            f"{self.sim_url}/miners/{self.hostile_ip}/faults",
            json={"fault": "duplicate_serial", "params": {"serial": HOSTILE_SERIAL}},
            timeout=30,
        )
        response.raise_for_status()


def wait_for(what: str, check: Any, timeout: float, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def export(data_dir: Path, out: Path, *args: str) -> str:
    """Export as the demo's compliance officer (exports are attributed to a named user)."""
    logins = (data_dir.parent / "logins.txt").read_text().splitlines()
    [password] = [
        line.rsplit("password ", 1)[1] for line in logins if line.startswith("compliance-a ")
    ]
    result = subprocess.run(
        [sys.executable, "-m", "asicfleet", "controller", "--data-dir", str(data_dir),
         "export", *args, "--format", "csv", "--out", str(out),
         "--as", "compliance-a", "--password-stdin"],
        input=password, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def read(path: Path) -> list[dict[str, str]]:
    text = path.read_text(encoding="utf-8-sig")
    return list(csv.DictReader(io.StringIO(text, newline="")))


def when(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def pools_text(pools: list[dict[str, Any]]) -> str:
    return "; ".join(f"{p['url']} ({p['user']})" if p["user"] else p["url"] for p in pools)


def mismatches(
    rows: list[dict[str, str]],
    truth: dict[str, Any],
    made: datetime,
    machines: dict[str, dict[str, Any]],
) -> list[str]:
    """Every disagreement between the register rows and the simulator's true state."""
    out = []
    by_ip = {row["IP address"]: row for row in rows}
    for ip, miner in truth.items():
        row = by_ip.get(ip)
        if row is None:
            out.append(f"{ip}: no register row")
            continue
        runs = pools_text(miner["runtime_pools"])
        reads = runs
        if miner["personality"] == "vnish":  # its firmware lists a dev-fee slot after the user's
            reads += "; DevFee (DevFee)"
        shown = row["Configured pools (read back)"].removeprefix("'")
        if shown != reads:
            out.append(
                f"{ip}: register shows {shown!r} ({row['Pool compliance']}, worker "
                f"{row['Worker name']}, serial {row['Reported serial']}), the miner runs {reads!r}"
            )
        worker = row["Worker name"]
        if worker != expected_worker(machines.get(ip)):  # the site's rule, for this machine
            out.append(
                f"{ip}: worker {worker!r}, the rule gives {expected_worker(machines.get(ip))!r}"
            )
        approved = "; ".join(f"{url} ({worker})" for url in DEMO_POOLS)
        status = row["Pool compliance"]
        if (status == "compliant") != (runs == approved):
            out.append(f"{ip}: {status} next to {runs!r} (approved: {approved!r})")
        checked = row["Last pool check (UTC)"]
        if not checked or made - when(checked) > timedelta(seconds=4 * POLL_S):
            out.append(f"{ip}: last pool check {checked!r} at {made.isoformat()}")
    return out


def inconsistent(rows: list[dict[str, str]]) -> list[str]:
    """Rows that contradict themselves, whatever the miners do meanwhile: "compliant" next to
    anything but the approved set with the row's own worker, or "non-compliant" next to it."""
    out = []
    for row in rows:
        worker = row["Worker name"]
        approved = "; ".join(f"{url} ({worker})" for url in DEMO_POOLS)
        shown = row["Configured pools (read back)"].removeprefix("'")
        user_pools = shown.removesuffix("; DevFee (DevFee)")
        status = row["Pool compliance"]
        if status in ("compliant", "non-compliant") and (status == "compliant") != (
            user_pools == approved
        ):
            out.append(f"{row['IP address']}: {status} next to {shown!r} (worker {worker!r})")
    return out


def test_demo_exports_agree_with_the_simulators_true_state(tmp_path: Path) -> None:
    lines: list[str] = []
    options = DemoOptions(
        miners=MINERS, port=free_port(), poll_interval_s=POLL_S, malware_every_s=3600.0
    )
    demo = HostileDemo(options, lines.append)
    started = datetime.now(UTC)
    try:
        demo.start()
        data_dir = demo.root / "controller"
        wait_for(
            "every writable miner on the approved pools (true state)",
            lambda: demo.snapshot()[0].all_compliant,
            timeout=180,
            every=2.0,
        )
        attempt = 0
        problems: list[str] = []
        contradictions: list[str] = []

        def register_agrees() -> bool:
            nonlocal attempt, problems
            attempt += 1
            truth = {str(m["ip"]): m for m in demo._sim_get("/miners")}
            out = tmp_path / f"register-{attempt}"
            export(data_dir, out, "register", "--as-of", "now")
            manifest = json.loads((out / "manifest.json").read_text())
            made = when(manifest["generated_at"])
            rows = read(out / "register.csv")
            after = {str(m["ip"]): m for m in demo._sim_get("/miners")}
            stable = {
                ip: m for ip, m in truth.items() if after[ip]["runtime_pools"] == m["runtime_pools"]
            }
            contradictions.extend(inconsistent(rows))  # never, not even while catching up
            problems = mismatches(rows, stable, made, demo.register_by_ip())
            return not problems and len(rows) == MINERS

        deadline = time.monotonic() + 6 * POLL_S  # the controller catches up within polls
        while not register_agrees() and time.monotonic() < deadline:
            time.sleep(2.0)
        print("\n".join(problems), file=sys.stderr)
        assert not contradictions, contradictions[:20]
        assert not problems, problems[:20]
        rows = read(tmp_path / f"register-{attempt}" / "register.csv")
        hostile = next(r for r in rows if r["IP address"] == demo.hostile_ip)
        assert hostile["Reported serial"] == "'" + HOSTILE_SERIAL  # neutralised, kept

        out = tmp_path / "compliance"
        export(data_dir, out, "compliance", "--period", f"{started:%Y-%m-%d}..now")
        manifest = json.loads((out / "manifest.json").read_text())
        made = when(manifest["generated_at"])
        machines = read(out / "compliance_machines.csv")
        truth_ips = {str(m["ip"]) for m in demo._sim_get("/miners")}
        assert len(machines) == len(truth_ips) == MINERS
        lived = (made - started).total_seconds() / 3600 + 0.01
        for row in machines:
            hours = float(row["Hours in period"])
            assert 0 <= hours <= lived, (row, lived)  # never before first seen nor after now
            shares = sum(
                float(row[k])
                for k in ("Compliant, h", "Non-compliant, h", "Unknown, h", "Exempt, h")
            )
            assert shares == pytest.approx(hours, abs=0.03), row
    finally:
        demo.stop()
