"""Issue 11 acceptance: writes apart from polling, at 2,000 miners, and a kill -9 mid-wave.

A simulated farm of 2,000 miners (its own process, a 30 s restart after every pool write) and a
real agent (``asicfleet agent run``, its own process) enforcing a signed policy stored on disk
(the controller is unreachable: every report stays in the outbox, where the test reads it).
Malware has moved one whole /24 segment to a foreign pool, so the agent rewrites the segment,
in waves (``[actions]`` wave size and pause) that span several poll cycles.

1. While the segment is being rewritten, every stored poll cycle holds an observation of every
   miner (no gap in any miner's sequence) and every cycle finishes within the poll interval.
2. The agent is killed with SIGKILL while the journal shows writes dispatched, i.e. in the
   middle of a wave (proved after the kill: actions are left unfinished in the journal), and
   started again. In the end every hijacked miner is on its approved pools, the simulator's
   per-miner request log shows exactly one complete pool write by the agent to each of them
   (none twice, none to any other miner, no reboot; a write the kill cut between two of its
   requests — Avalon writes a slot per request — is read back, found incomplete and completed
   by one whole write), the journal has no unfinished action, and every action
   has its outcome reported (an event for every hijacked miner; the ones cut off by the kill
   reported after the restart).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.policy import PolicyGuard
from contract.policy import (
    ApprovedPoolSet,
    EnforcementMode,
    MachinePolicy,
    PolicyBundle,
    PolicyContent,
    RolloutPolicy,
)
from controller.signing import SigningKey
from simulator.farm import DEFAULT_POOLS
from simulator.faults import FOREIGN_POOL
from tests.farmproc import FarmProcess, farm_process

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

MINERS = 2_000
MIX = "antminer=6,whatsminer=2,avalon=1,vnish=1"
SITE = "kz-acceptance"
POLL_S = 30.0
RESTART_S = 30
ATTACKER = "attacker"
CYCLE_LINE = re.compile(r"cycle (\d+): .* stored in ([\d.]+) s")


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)


class AgentProcess:
    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.data = config.parent / "data"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "asicfleet", "agent", "run", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=os.environ | {"PYTHONUNBUFFERED": "1"},
            )

    def alive(self) -> None:
        assert self.process is not None
        assert self.process.poll() is None, self.log.read_text()[-5000:]

    def status(self) -> dict[str, Any]:
        self.alive()
        try:
            data: dict[str, Any] = json.loads((self.data / "status.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}
        assert self.process is not None
        return data if data.get("pid") == self.process.pid else {}

    def journal(self) -> Counter[str]:
        """Actions by state, read from the journal file (empty before it exists)."""
        path = self.data / "actions.sqlite3"
        if not path.exists():
            return Counter()
        try:
            with read_only(path) as conn:
                rows = conn.execute("SELECT state, COUNT(*) FROM action GROUP BY state").fetchall()
        except sqlite3.OperationalError:  # created, schema not there yet
            return Counter()
        return Counter({state: n for state, n in rows})

    def journal_rows(self) -> list[tuple[str, str, str, str | None]]:
        """(kind, ip, state, cause) of every action in the journal."""
        with read_only(self.data / "actions.sqlite3") as conn:
            rows = conn.execute(
                "SELECT kind, ip, state, cause FROM action ORDER BY rowid"
            ).fetchall()
        return [(k, ip, s, c) for k, ip, s, c in rows]

    def batches(self) -> list[dict[str, Any]]:
        with read_only(self.data / "outbox.sqlite3") as conn:
            rows = conn.execute("SELECT body FROM pending ORDER BY sequence").fetchall()
        return [json.loads(body) for (body,) in rows]

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def write_agent(tmp_path: Path, segments: list[str], key: SigningKey) -> Path:
    config = tmp_path / "agent.toml"
    quoted = ", ".join(f'"{s}"' for s in segments)
    config.write_text(
        f'agent_id = "agt-acceptance"\nsite = "{SITE}"\nsegments = [{quoted}]\n'
        'data_dir = "data"\n'
        f'[controller]\nurl = "http://127.0.0.1:9"\npublic_key = "{key.public_key_b64()}"\n'
        f"[polling]\npoll_interval_s = {POLL_S}\nminer_timeout_s = 5.0\n"
        "identity_interval_s = 3600\ndiscovery_interval_s = 120\npools_check_interval_s = 10\n"
        "concurrency_per_segment = 32\n"
        "[uplink]\ntimeout_s = 2.0\nbackoff_initial_s = 1.0\nbackoff_max_s = 5.0\n"
        # waves of 12 writes per segment, 6 s apart: the segment's rewrite spans a few cycles
        "[actions]\nconcurrency_per_segment = 8\nwave_size = 12\nwave_pause_s = 6.0\n"
    )
    secrets = tmp_path / "secrets.toml"
    secrets.write_text(f'agent_secret = "afa_{"x" * 40}"\n')
    secrets.chmod(0o600)
    return config


def store_policy(data: Path, key: SigningKey, truth: list[dict[str, Any]]) -> None:
    machines = [
        MachinePolicy(
            machine_id=f"M{n:05d}",
            serial=m["reported_serial"] or None,
            mac=m["mac"],
            worker=m["pools"][0]["user"],
        )
        for n, m in enumerate(truth)
    ]
    now = datetime.now(UTC)
    bundle = key.sign_bundle(
        PolicyBundle(
            version=1,
            issued_at=now,
            expires_at=now + timedelta(hours=2),
            content=PolicyContent(
                site=SITE,
                mode=EnforcementMode.ENFORCE,
                pool_set=ApprovedPoolSet(name="DMP", urls=list(DEFAULT_POOLS), account="kzfarm01"),
                machines=machines,
                rollout=RolloutPolicy(canary_size=4, max_failure_rate=0.5),
            ),
        )
    )
    data.mkdir(parents=True, exist_ok=True)
    PolicyGuard(key.public_key_b64(), data / "policy.json", site=SITE).accept(bundle)


def agent_writes(api: httpx.Client, ip: str) -> list[str]:
    """The writes the simulator logged for ``ip`` that the attacker did not make."""
    log = api.get(f"/miners/{ip}/log").json()
    return [r["op"] for r in log if r["write"] and r["via"] != ATTACKER]


def done_cycles(agent: AgentProcess) -> int:
    """The number of the last poll cycle the agent finished (0: none yet)."""
    last = agent.status().get("last_cycle") or {}
    return int(last.get("cycle", 0))


def instant(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def cycle_groups(batches: list[dict[str, Any]], floor: int) -> list[tuple[str, Counter[str]]]:
    """Per stored poll cycle (the batches one store sealed share ``agent_clock``): its time and
    how many observations it holds per miner. Enforcement stores hold a few read-backs each;
    a cycle holds (at least) ``floor``."""
    groups: dict[str, Counter[str]] = defaultdict(Counter)
    for batch in batches:
        for observation in batch["observations"]:
            groups[batch["agent_clock"]][observation["ip"]] += 1
    return sorted((at, seen) for at, seen in groups.items() if len(seen) >= floor)


@pytest.mark.timeout(1800)
def test_a_segment_rewrite_never_stalls_polling_and_a_kill_repeats_no_write(
    tmp_path: Path,
) -> None:
    octet = 250 + os.getpid() % 5  # clear of the farm fixture's and the other tests' subnets
    subnet = ipaddress.ip_network(f"127.{octet}.8.0/21")
    segments = [str(s) for s in subnet.subnets(new_prefix=24)]
    farm_args = ["--miners", str(MINERS), "--subnet", str(subnet), "--mix", MIX]
    farm_args += ["--restart-seconds", str(RESTART_S), "--reboot-seconds", str(RESTART_S)]
    with farm_process(*farm_args) as farm:
        _run(tmp_path, farm, segments)


def _run(tmp_path: Path, farm: FarmProcess, segments: list[str]) -> None:
    api = farm.api()
    truth = sorted(api.get("/miners").json(), key=lambda m: ipaddress.IPv4Address(m["ip"]))
    assert len(truth) == MINERS
    # the farm fills its /21 consecutively; the agent's /24 segments leave out their network
    # and broadcast addresses, so the miners there are not the agent's to find
    hosts = {str(h) for s in segments for h in ipaddress.ip_network(s).hosts()}
    everyone = {m["ip"] for m in truth} & hosts
    assert len(everyone) >= MINERS - 16
    hijacked = sorted(
        (
            m["ip"]
            for m in truth
            if m["ip"] in everyone
            and ipaddress.IPv4Address(m["ip"]) in ipaddress.ip_network(segments[0])
        ),
        key=ipaddress.IPv4Address,
    )
    assert len(hijacked) >= 200  # a whole segment
    key = SigningKey(private=Ed25519PrivateKey.generate(), path=tmp_path / "unused.pem")
    config = write_agent(tmp_path, segments, key)
    store_policy(tmp_path / "data", key, truth)
    for ip in hijacked:
        response = api.put(f"/miners/{ip}/pools", json={"pools": [FOREIGN_POOL], "actor": ATTACKER})
        assert response.status_code == 200, response.text

    agent = AgentProcess(config, tmp_path / "agent.log")
    agent.start()
    try:
        wait_for(
            "the agent to know every miner",
            lambda: agent.status().get("miners", {}).get("known") == len(everyone),
            400,
        )
        known_at = datetime.now(UTC)
        # --- 1. the rewrite runs over several cycles; polling never waits for it -------------
        wait_for("the first write", lambda: agent.journal()["done"] >= 1, 300)
        first_cycle = max(1, done_cycles(agent))
        wait_for(
            "two more cycles during the rewrite",
            lambda: done_cycles(agent) >= first_cycle + 2,
            4 * POLL_S,
        )
        # --- 2. SIGKILL in the middle of a wave: the moment the journal shows writes out -----
        wait_for("writes on the wire", lambda: agent.journal()["dispatched"] >= 1, 120, 0.01)
        agent.kill()
        left = agent.journal()
        assert left["planned"] + left["dispatched"] >= 1, left  # the rollout was cut mid-way
        assert left["done"] + left["failed"] < len(hijacked), left
        cut_off = {
            ip for _, ip, state, _ in agent.journal_rows() if state in ("planned", "dispatched")
        }
        before_kill = agent.batches()
        log_before = agent.log.read_text()

        durations = [float(d) for _, d in CYCLE_LINE.findall(log_before)]
        assert len(durations) >= 3, log_before[-3000:]
        assert max(durations) < POLL_S, durations  # every cycle within the interval
        cycles = [
            (at, seen)
            for at, seen in cycle_groups(before_kill, floor=MINERS // 2)
            if instant(at) >= known_at
        ]
        assert len(cycles) >= 2, [at for at, _ in cycles]
        for at, seen in cycles:  # every miner, once, in every stored cycle: no gap
            assert set(seen) == everyone, (at, len(everyone - set(seen)))
            assert max(seen.values()) == 1, at
        first_write = min(
            instant(e["at"]) for b in before_kill for e in b["events"] if e["kind"] == "pool_write"
        )
        during = [at for at, _ in cycles if instant(at) >= first_write]
        assert len(during) >= 2, (first_write, [at for at, _ in cycles])

        # --- the restart: every action resolved, nothing written twice ------------------------
        agent.start()

        def all_approved() -> bool:
            miners = {m["ip"]: m for m in api.get("/miners").json()}
            return all(
                [p["url"] for p in miners[ip]["pools"] if p["url"]] == list(DEFAULT_POOLS)
                for ip in hijacked
            )

        wait_for("every hijacked miner on its approved pools", all_approved, 600, 2.0)
        wait_for(
            "no unfinished action in the journal",
            lambda: not (agent.journal()["planned"] or agent.journal()["dispatched"]),
            120,
        )
        agent.alive()
    finally:
        agent.stop()

    personality = {m["ip"]: m["personality"] for m in truth}
    journal = agent.journal_rows()
    # the writes the kill cut in the middle and the restarted agent read back as not applied
    completed = {ip for _, ip, _, cause in journal if cause == "not_applied"}
    assert completed <= cut_off
    for ip in hijacked:  # one complete pool write each, across the kill
        # Avalon's setpool takes one request per slot: one write is a request per pool; a kill
        # between two of them leaves the miner half-written, which the restarted agent reads
        # back and completes with one whole write (never a second whole one on top)
        once = len(DEFAULT_POOLS) if personality[ip] == "avalon" else 1
        writes = agent_writes(api, ip)
        assert set(writes) == {"pools"}, (ip, writes)
        if ip in completed:
            assert once <= len(writes) < 2 * once, (ip, personality[ip], writes)
        else:
            assert len(writes) == once, (ip, personality[ip], writes)
    for ip in sorted(everyone - set(hijacked))[::10]:  # a sample of the others: untouched
        assert agent_writes(api, ip) == [], ip
    outcomes: dict[str, list[str]] = defaultdict(list)
    for batch in agent.batches():
        for event in batch["events"]:
            if event["kind"] in ("pool_verified", "pool_write_failed"):
                outcomes[event["ip"]].append(event["detail"])
    assert set(outcomes) >= set(hijacked), sorted(set(hijacked) - set(outcomes))[:5]
    for ip in cut_off:  # the actions the kill cut off: reported by the restarted agent
        assert any("agent restart" in detail for detail in outcomes[ip]), (ip, outcomes[ip])
    assert {state for _, _, state, _ in journal} <= {"done", "failed"}
    assert {kind for kind, _, _, _ in journal} == {"set_pools"}
    log = agent.log.read_text()
    assert "Traceback" not in log, log[-5000:]
