"""End to end: a simulated farm, a real controller and a real enrolled agent, each its own process.

1. Within two poll cycles the controller's register holds every live miner with the serial, MAC,
   make, model and firmware the simulator's control API says it truly has. Avalon keeps its
   chassis serial on the label only (no protocol reports it), so for Avalon the register must
   hold no serial; VNish reports it through its REST API and is compared like the others.
2. The controller is stopped for a while (20 s here, scaled down from the issue's 5 minutes)
   and started again: every observation the agent took meanwhile arrives exactly once, in
   order per machine.
3. The agent is killed with SIGKILL in the middle of a cycle and restarted: nothing is lost
   (the delivered batch sequence numbers have no gap) or doubled (no observation twice).

The controller keeps one history row per machine per ``history_resolution_s`` bucket; it runs
with a 1 s resolution here so that every poll (4 s apart) has its own row and the history is a
complete record of what arrived.

A second test polls a farm of a few hundred miners with 2% blackholed and 2% malformed ones in
process: every cycle completes within the poll interval and the faulty ones are reported with
the reason.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from agent.config import AgentConfig
from agent.daemon import FleetAgent
from agent.drivers.base import normalise_mac
from agent.outbox import Outbox
from asicfleet.cli import app
from simulator.state import Fault
from tests.conftest import FarmFactory
from tests.farmproc import farm_process, free_port

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

MINERS = 500
MIX = "antminer=6,whatsminer=2,avalon=1,vnish=1"
POLL_S = 4.0
FAULTY_FARM = 2_000  # the size: 2% blackholed and 2% malformed among 2,000 miners
OUTAGE_S = 20.0
ADMIN = "admin"
PASSWORD = "e2e correct horse battery staple"


def asicfleet(*args: str) -> list[str]:
    return [sys.executable, "-m", "asicfleet", *args]


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


@dataclass
class Controller:
    data_dir: Path
    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ASICFLEET_")}
        env["ASICFLEET_HISTORY_RESOLUTION_S"] = "1"
        argv = asicfleet("controller", "serve", "--data-dir", str(self.data_dir))
        argv += ["--bind", f"127.0.0.1:{self.port}"]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                argv, cwd=self.data_dir, env=env, stdout=out, stderr=subprocess.STDOUT
            )

        def healthy() -> bool:
            assert self.process is not None and self.process.poll() is None, self.log.read_text()
            try:
                return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for("the controller", healthy, 60)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def cli(self, *args: str, stdin: str | None = None) -> str:
        result = CliRunner().invoke(
            app, ["controller", "--data-dir", str(self.data_dir), *args], input=stdin
        )
        assert result.exit_code == 0, result.output
        return result.stdout

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.data_dir / 'asicfleet.db'}?mode=ro", uri=True)


@dataclass
class Agent:
    config: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                asicfleet("agent", "run", "--config", str(self.config)),
                stdout=out,
                stderr=subprocess.STDOUT,
                env=os.environ | {"PYTHONUNBUFFERED": "1"},
            )

    def status(self) -> dict[str, Any]:
        path = self.config.parent / "data" / "status.json"
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        assert self.process is not None
        assert self.process.poll() is None, self.log.read_text()[-3000:]
        return data if data.get("pid") == self.process.pid else {}

    def pending(self) -> list[dict[str, Any]]:
        """Batches waiting in the outbox, read straight from its SQLite file."""
        path = self.config.parent / "data" / "outbox.sqlite3"
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            rows = conn.execute("SELECT body FROM pending ORDER BY sequence").fetchall()
        return [json.loads(body) for (body,) in rows]

    def cycles(self) -> int:
        return int(self.status().get("cycles", 0))


@contextmanager
def stopped(owner: Controller | Agent) -> Iterator[None]:
    """Kill whatever process ``owner`` has at the end (it may have been restarted meanwhile)."""
    try:
        yield
    finally:
        process = owner.process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()


def register(controller: Controller, token: str) -> dict[str, dict[str, Any]]:
    response = httpx.get(
        f"{controller.url}/api/v1/machines",
        params={"limit": 1000},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return {m["current_ip"]: m for m in response.json()["data"]}


def history(controller: Controller) -> dict[str, list[tuple[int, str]]]:
    """Per machine IP: (row id, observed_at) in arrival order."""
    with controller.db() as conn:
        rows = conn.execute(
            "SELECT m.current_ip, h.id, h.observed_at FROM observation_history h "
            "JOIN machine m ON m.id = h.machine_pk ORDER BY h.id"
        ).fetchall()
    out: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for ip, row_id, observed_at in rows:
        out[ip].append((row_id, _instant(observed_at)))
    return out


def _instant(value: str) -> str:
    """One spelling for a timestamp (the DB and the JSON body format them differently)."""
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed.replace(tzinfo=None).isoformat(timespec="microseconds")


def ingested(controller: Controller) -> list[tuple[str, int, dict[str, Any]]]:
    with controller.db() as conn:
        rows = conn.execute(
            "SELECT batch_id, sequence, ack FROM ingested_batch ORDER BY sequence"
        ).fetchall()
    return [(b, s, json.loads(a)) for b, s, a in rows]


def test_enrolled_agent_fills_the_register_and_loses_nothing(tmp_path: Path) -> None:
    subnet = f"127.{30 + os.getpid() % 30}.0.0/23"  # clear of the farm fixture's subnets
    controller = Controller(tmp_path / "controller", free_port(), tmp_path / "controller.log")
    controller.data_dir.mkdir()
    agent_dir = tmp_path / "agent"
    agent_dir.mkdir()
    farm_args = ["--miners", str(MINERS), "--subnet", subnet, "--mix", MIX]
    with farm_process(*farm_args, "--restart-seconds", "2") as farm:
        truth = {m["ip"]: m for m in farm.api().get("/miners").json()}
        controller.start()
        with stopped(controller):
            controller.cli(
                "user", "add", ADMIN, "--role", "admin", "--password-stdin", stdin=PASSWORD + "\n"
            )
            as_admin = ["--as", ADMIN, "--password-stdin"]
            controller.cli(
                "site", "add", "e2e", "--licence", "KZ-E2E-1", *as_admin, stdin=PASSWORD + "\n"
            )
            token = (
                controller.cli(
                    "agent",
                    "token",
                    "--site",
                    "e2e",
                    "--segment",
                    subnet,
                    *as_admin,
                    stdin=PASSWORD + "\n",
                )
                .strip()
                .splitlines()[-1]
            )
            config = agent_dir / "agent.toml"
            config.write_text(
                f'data_dir = "data"\n[controller]\nurl = "{controller.url}"\n'
                f"[polling]\npoll_interval_s = {POLL_S}\nminer_timeout_s = 2.0\n"
                "identity_interval_s = 600\ndiscovery_interval_s = 3600\n"
                "[uplink]\ntimeout_s = 3.0\nbackoff_initial_s = 0.5\nbackoff_max_s = 2.0\n"
            )
            enrolled = subprocess.run(
                asicfleet(
                    "agent",
                    "enroll",
                    "--controller",
                    controller.url,
                    "--token-stdin",
                    "--config",
                    str(config),
                    "--name",
                    "e2e-agent",
                ),
                input=token + "\n",
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert enrolled.returncode == 0, enrolled.stderr
            loaded = AgentConfig.model_validate(tomllib.loads(config.read_text()))
            assert [str(s) for s in loaded.segments] == [subnet]
            assert (agent_dir / "secrets.toml").stat().st_mode & 0o777 == 0o600
            login = httpx.post(
                f"{controller.url}/api/v1/auth/token",
                json={"name": ADMIN, "password": PASSWORD},
                timeout=30,
            )
            admin = login.json()["access_token"]

            agent = Agent(config, tmp_path / "agent.log")
            agent.start()
            with stopped(agent):
                _register_matches_the_truth(agent, controller, admin, truth)
                _controller_outage_loses_nothing(agent, controller)
                _kill_minus_nine_loses_and_doubles_nothing(agent, controller)
                assert agent.process is not None
                agent.process.send_signal(signal.SIGTERM)
                assert agent.process.wait(timeout=90) == 0, agent.log.read_text()[-3000:]
            log = agent.log.read_text()
            assert "Traceback" not in log, log[-5000:]
            assert (
                json.loads((agent_dir / "data" / "status.json").read_text())["state"] == "stopped"
            )
            assert agent.pending() == []  # SIGTERM flushed everything
            _every_batch_arrived_once(controller)
            status = subprocess.run(
                asicfleet("agent", "status", "--config", str(config)),
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert status.returncode == 0, status.stderr
            assert "not running" in status.stdout and "0 batch(es) waiting" in status.stdout
            controller.stop()


def _register_matches_the_truth(
    agent: Agent, controller: Controller, admin: str, truth: dict[str, dict[str, Any]]
) -> None:
    wait_for("the agent's first two poll cycles", lambda: agent.cycles() >= 2, 150)

    def complete() -> dict[str, dict[str, Any]] | None:
        machines = register(controller, admin)
        return machines if len(machines) >= len(truth) else None

    machines = wait_for("the register to hold every miner", complete, POLL_S * 2)
    assert set(machines) == set(truth)
    for ip, true in truth.items():
        machine = machines[ip]
        assert machine["vendor"] == true["make"], ip
        assert machine["model"] == true["model"], ip
        assert machine["firmware"] == true["firmware"], ip
        assert normalise_mac(machine["mac"]) == normalise_mac(true["mac"]), ip
        if true["personality"] == "avalon":
            assert machine["reported_serial"] is None, ip  # on the label only
        else:
            assert machine["reported_serial"] == true["serial"], ip


def _controller_outage_loses_nothing(agent: Agent, controller: Controller) -> None:
    wait_for("an empty outbox", lambda: not agent.pending(), 30)
    controller.stop()
    cycles_before = agent.cycles()
    time.sleep(OUTAGE_S)
    taken = agent.pending()  # everything polled while the controller was away
    assert agent.cycles() >= cycles_before + OUTAGE_S / POLL_S - 2  # it kept polling
    status = agent.status()
    assert status["uplink"]["healthy"] is False and status["outbox"]["depth"] >= 3
    controller.start()
    wait_for("the outbox to drain", lambda: not agent.pending(), 60)
    observations = Counter(
        (o["ip"], _instant(o["observed_at"])) for batch in taken for o in batch["observations"]
    )
    assert observations and max(observations.values()) == 1
    arrived = history(controller)
    per_machine = Counter((ip, at) for ip, rows in arrived.items() for _, at in rows)
    for key in observations:
        assert per_machine[key] == 1, key  # arrived, exactly once
    for ip, rows in arrived.items():
        times = [at for _, at in rows]
        assert times == sorted(times), ip  # in order: arrival (row id) order = poll order


def _kill_minus_nine_loses_and_doubles_nothing(agent: Agent, controller: Controller) -> None:
    assert agent.process is not None
    status = wait_for("a fresh cycle", lambda: agent.status().get("last_cycle"), 30)
    started = datetime.fromisoformat(status["started_at"]).timestamp()
    # a cycle of a few hundred miners takes a second or two: land in the middle of the next one
    time.sleep(max(0.0, started + POLL_S + 0.4 - time.time()))
    agent.process.send_signal(signal.SIGKILL)
    agent.process.wait()
    stored_before = {b["batch_id"] for b in agent.pending()}
    agent.start()
    wait_for("two cycles after the restart", lambda: agent.cycles() >= 2, 150)
    wait_for("the outbox to drain", lambda: not agent.pending(), 60)
    delivered = {b for b, _, _ in ingested(controller)}
    assert stored_before <= delivered  # what was stored before the kill was delivered


def _every_batch_arrived_once(controller: Controller) -> None:
    batches = ingested(controller)
    sequences = [s for _, s, _ in batches]
    # the outbox numbers every stored batch; a gap would be a batch lost, a repeat a double
    assert sequences == list(range(sequences[0], sequences[0] + len(sequences)))
    assert all(not ack.get("refused") for _, _, ack in batches), [
        ack["refused"][:3] for _, _, ack in batches if ack.get("refused")
    ]
    applied = sum(ack["observations"] for _, _, ack in batches)
    arrived = history(controller)
    rows = [(ip, at) for ip, items in arrived.items() for _, at in items]
    assert len(rows) == len(set(rows))  # no observation twice
    assert applied == len(rows)  # and every applied observation is in the history


# --- faulty miners ------------------------------------------------------------------------------


async def test_faulty_miners_never_stretch_a_cycle_and_are_reported_with_why(
    farm: FarmFactory, tmp_path: Path
) -> None:
    size = FAULTY_FARM
    shard = await farm(miners=size, mix=MIX, faults="blackhole=2%,malformed=2%")
    net = str(
        ipaddress.ip_network(f"{min(shard.miners, key=ipaddress.ip_address)}/21", strict=False)
    )
    # Farm and agent share this test's one event loop (in production they are different
    # machines), so a 2,000-miner cycle takes ~10 s here; 30 s is still half the default.
    poll_s = 30.0
    config = AgentConfig.model_validate(
        {
            "segments": [net],
            "data_dir": str(tmp_path),
            "controller": {"url": "http://127.0.0.1:9"},
            "polling": {"poll_interval_s": poll_s, "miner_timeout_s": 2.0},
        }
    )
    with Outbox(config.outbox_path) as outbox:
        agent = FleetAgent(config, outbox)
        scan = await agent.discover()
        faulty = {ip for ip, m in shard.miners.items() if m.faults}
        assert len(faulty) >= size * 0.04 - 2  # 2% + 2% (one miner may have drawn both)
        assert scan.identified == size - len(faulty) and scan.unidentified == len(faulty)
        # the faulty ones answered the probe and are reported, with why they were not identified
        events = [e for b in outbox.peek(10_000) for e in b.events if e.kind == "identify_failed"]
        assert {str(e.ip) for e in events} == faulty
        blackholed = {ip for ip, m in shard.miners.items() if Fault.BLACKHOLE in m.faults}
        for event in events:
            assert event.detail.startswith("answers on the network but could not be identified: ")
            if str(event.ip) in blackholed:
                assert "timeout" in event.detail

        # now 2% + 2% of the identified miners turn bad as well
        healthy = sorted(set(shard.miners) - faulty)
        share = max(1, size // 50)
        turned = {ip: Fault.BLACKHOLE for ip in healthy[:share]}
        turned |= {ip: Fault.MALFORMED for ip in healthy[share : 2 * share]}
        for ip, fault in turned.items():
            await shard.inject_fault(ip, fault.value, {})
        for _ in range(3):
            cycle = await agent.poll_cycle()
            assert cycle.duration_s < poll_s, cycle  # the faulty ones cost their own timeout
            assert cycle.ok == size - len(faulty) - len(turned)  # everyone else, every cycle
        reasons: dict[str, set[str]] = defaultdict(set)
        for batch in outbox.peek(100_000):
            for obs in batch.observations:
                if obs.error:
                    reasons[str(obs.ip)].add(obs.error)
        assert set(turned) <= set(reasons)
        for ip, fault in turned.items():
            expected = "timeout:" if fault is Fault.BLACKHOLE else "malformed:"
            assert all(r.startswith(expected) for r in reasons[ip]), (ip, reasons[ip])
        assert not set(reasons) - set(turned)  # nobody healthy was reported as failing
