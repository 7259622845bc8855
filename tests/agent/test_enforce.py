"""Enforcement against a real simulated farm: the simulator's true state is the judge.

A FleetAgent with a PolicyGuard (bundles signed with a test key) polls a small mixed farm;
each poll cycle is followed by the enforcement pass over its observations (in the daemon the
action worker runs it apart from the poll; :func:`cycle` awaits it so the test can judge).
Every test checks what the miners truly run (``shard.miner(ip)``) and what the simulator's
request logs recorded, not what the agent says.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import re
import sqlite3
import stat
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from typer.testing import CliRunner, Result

from agent.actions import Action, ActionKind, Journal
from agent.config import AgentConfig, AgentSecrets
from agent.daemon import CycleReport, Daemon, FleetAgent
from agent.enforce.executor import EnforcerSettings
from agent.enforce.oneshot import enforce_once
from agent.outbox import Outbox
from agent.policy import PolicyGuard
from asicfleet.cli import app
from contract.policy import (
    ApprovedPoolSet,
    EnforcementMode,
    MachinePolicy,
    PolicyBundle,
    PolicyContent,
    RolloutPolicy,
)
from contract.reports import BatchAck, Event, ReportBatch
from controller.signing import SigningKey
from simulator.farm import DEFAULT_POOLS
from simulator.faults import FOREIGN_POOL
from simulator.shard import Shard
from simulator.state import Fault, Mode
from tests.conftest import FarmFactory

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

MIX = "antminer=2,whatsminer=1,avalon=1,vnish=1"
SITE = "kz-test"
NEXT_WRITE = re.compile(r"next write in (\d+) cycle")
FAST = EnforcerSettings(verify_delays_s=(0.05, 0.1), retry_max_cycles=4)


@dataclass
class Site:
    shard: Shard
    agent: FleetAgent
    outbox: Outbox
    key: SigningKey
    machines: dict[str, MachinePolicy] = field(default_factory=dict)
    version: int = 0

    def bundle(self, **changes: Any) -> PolicyBundle:
        self.version += 1
        now = datetime.now(UTC)
        values: dict[str, Any] = {
            "site": SITE,
            "mode": EnforcementMode.ENFORCE,
            "pool_set": ApprovedPoolSet(
                name="DMP Alpha", urls=list(DEFAULT_POOLS), account="kzfarm01"
            ),
            "machines": list(self.machines.values()),
            "rollout": RolloutPolicy(canary_size=3, max_failure_rate=0.2),
        }
        values.update(changes)
        bundle = PolicyBundle(
            version=self.version,
            issued_at=now,
            expires_at=now + timedelta(hours=1),
            content=PolicyContent(**values),
        )
        return self.key.sign_bundle(bundle)

    async def cycle(self) -> CycleReport:
        return await cycle(self.agent)

    async def enforce(self, **changes: Any) -> None:
        assert await self.agent.offer_policy(self.bundle(**changes))

    def events(self, kind: str | None = None, ip: str | None = None) -> list[Event]:
        found = [e for b in self.outbox.peek(100_000) for e in b.events]
        return [
            e for e in found if (kind is None or e.kind == kind) and (ip is None or str(e.ip) == ip)
        ]

    def true_pools(self, ip: str) -> list[tuple[str, str]]:
        return [(p.url, p.user) for p in self.shard.miner(ip).runtime_pools() if p.url]

    def approved(self, ip: str) -> list[tuple[str, str]]:
        return [(url, self.machines[ip].worker) for url in DEFAULT_POOLS]

    async def writes(self, ip: str) -> list[dict[str, Any]]:
        return [r for r in await self.shard.request_log(ip) if r["write"]]

    def ips(self, personality: str | None = None) -> list[str]:
        return sorted(
            (ip for ip, m in self.shard.miners.items() if personality in (None, m.personality)),
            key=ipaddress.IPv4Address,
        )

    async def tamper(self, *ips: str) -> None:
        for ip in ips:
            await self.shard.tamper_pools(ip, [FOREIGN_POOL], "test")
            await self.shard.clear_log(ip)


SiteFactory = Callable[..., Any]


async def cycle(agent: FleetAgent) -> CycleReport:
    """One poll cycle, then the enforcement pass over what it offered."""
    report = await agent.poll_cycle()
    enforced = await agent.enforce_pending()
    report.enforcement = enforced.summary() if enforced is not None else None
    return report


@pytest.fixture
async def site(farm: FarmFactory, tmp_path: Path) -> AsyncIterator[SiteFactory]:
    outboxes: list[Outbox] = []

    async def start(
        miners: int = 20,
        mix: str = MIX,
        settings: EnforcerSettings = FAST,
        actions: dict[str, Any] | None = None,
        polling: dict[str, Any] | None = None,
        **farm_args: Any,
    ) -> Site:
        farm_args.setdefault("restart_seconds", 0.0)
        farm_args.setdefault("reboot_seconds", 1.0)
        shard = await farm(miners=miners, mix=mix, **farm_args)
        first = min(shard.miners, key=ipaddress.IPv4Address)
        net = str(ipaddress.ip_network(f"{first}/24", strict=False))
        config = AgentConfig.model_validate(
            {
                "site": SITE,
                "segments": [net],
                "data_dir": str(tmp_path),
                "controller": {"url": "http://127.0.0.1:9"},
                "polling": {"poll_interval_s": 20.0, "miner_timeout_s": 2.0, **(polling or {})},
                "actions": {"retry_backoff_s": 0.1, "retry_backoff_max_s": 0.2, **(actions or {})},
            }
        )
        key = SigningKey(private=Ed25519PrivateKey.generate(), path=tmp_path / "unused.pem")
        guard = PolicyGuard(key.public_key_b64(), tmp_path / "policy.json", site=SITE)
        outbox = Outbox(config.outbox_path)
        outboxes.append(outbox)
        agent = FleetAgent(config, outbox, policy=guard, enforcer_settings=settings)
        scan = await agent.discover()
        assert scan.identified == miners
        machines = {}
        for n, ip in enumerate(sorted(shard.miners, key=ipaddress.IPv4Address)):
            miner = shard.miner(ip)
            machines[ip] = MachinePolicy(
                machine_id=f"M{n:04d}",
                serial=miner.reported_serial() or None,
                mac=miner.mac,
                worker=miner.pools[0].user,
            )
        return Site(shard, agent, outbox, key, machines)

    yield start
    for outbox in outboxes:
        outbox.close()


async def test_enforce_corrects_foreign_pools_and_verifies_by_reading_back(
    site: SiteFactory,
) -> None:
    s: Site = await site()
    tampered = sorted(
        (ip for kind in ("antminer", "whatsminer", "avalon", "vnish") for ip in s.ips(kind)[:2]),
        key=ipaddress.IPv4Address,
    )
    await s.tamper(*tampered)
    await s.enforce()
    cycle = await s.cycle()
    for ip in s.ips():
        assert s.true_pools(ip) == s.approved(ip), ip  # the simulator's true state
    assert cycle.enforcement is not None
    assert cycle.enforcement["written"] == cycle.enforcement["verified"] == len(tampered)
    assert cycle.enforcement["compliant"] == len(s.ips()) - len(tampered)
    for ip in tampered:
        kinds = [e.kind for e in s.events(ip=ip)]
        assert kinds == ["pool_drift", "pool_write", "pool_verified"], (ip, kinds)
        verified = s.events("pool_verified", ip)[0].data
        assert verified["machine_id"] == s.machines[ip].machine_id
        assert verified["policy_version"] == 1
        assert verified["detected_at"] <= verified["written_at"] <= verified["verified_at"]
        writes = await s.writes(ip)  # one pool write (Avalon's setpool: one request a slot)
        assert writes and {w["op"] for w in writes} == {"pools"}, writes
    for ip in set(s.ips()) - set(tampered):
        assert await s.writes(ip) == [], ip  # nobody compliant was touched
    # the read-back is reported as an observation of its own, on the approved pools
    readbacks = [
        o
        for b in s.outbox.peek(100_000)
        for o in b.observations
        if str(o.ip) == tampered[0] and o.pools and o.pools[0].url == DEFAULT_POOLS[0]
    ]
    assert readbacks
    second = await s.cycle()
    assert second.enforcement is not None and second.enforcement["written"] == 0
    assert second.enforcement["compliant"] == len(s.ips())
    assert len(s.events("pool_drift")) == len(tampered)  # one incident each, not per cycle


async def test_observe_mode_writes_nothing(site: SiteFactory) -> None:
    s: Site = await site()
    tampered = s.ips()[::3]
    await s.tamper(*tampered)
    for ip in s.ips():
        await s.shard.clear_log(ip)
    await s.enforce(mode=EnforcementMode.OBSERVE)
    for _ in range(2):
        cycle = await s.cycle()
        assert cycle.enforcement is not None and cycle.enforcement["drift"] == len(tampered)
    for ip in s.ips():
        assert await s.writes(ip) == [], ip
    for ip in tampered:
        assert s.true_pools(ip) == [(FOREIGN_POOL["url"], FOREIGN_POOL["user"])]
        assert [e.kind for e in s.events(ip=ip)] == ["pool_drift"]  # once, not every cycle


async def test_each_failure_is_reported_with_its_cause(site: SiteFactory) -> None:
    # rebooted miners stay down for the next cycle (a second after this one), whatever the
    # pass's own pace: the loop below sees them back together, a few cycles later
    s: Site = await site(reboot_seconds=2.5)
    antminers = s.ips("antminer")
    ignored, after_reboot = antminers[0], antminers[1]
    wrong_login = s.ips("whatsminer")[0]
    hidden = s.ips("avalon")[0]
    await s.shard.inject_fault(ignored, Fault.WRITE_IGNORED, {})
    await s.shard.inject_fault(after_reboot, Fault.WRITE_AFTER_REBOOT, {})
    await s.shard.inject_fault(wrong_login, Fault.PASSWORD_CHANGED, {"password": "hunter2"})
    await s.shard.inject_fault(hidden, Fault.HIDDEN_POOL, {})
    await s.tamper(ignored, after_reboot, wrong_login)
    await s.enforce(rollout=RolloutPolicy(canary_size=10, max_failure_rate=1.0))
    await s.cycle()

    def causes(ip: str) -> list[str]:
        return [e.data["cause"] for e in s.events("pool_write_failed", ip)]

    assert causes(ignored) == ["pending_reboot"]
    assert causes(after_reboot) == ["pending_reboot"]
    assert causes(wrong_login) == ["auth_failed"]
    assert causes(hidden) == ["hidden_pool"]
    assert not s.events("pool_verified")  # none of them is reported as a success
    assert [r["op"] for r in await s.writes(after_reboot)] == ["pools", "reboot"]

    cycles = 1
    for _ in range(8):  # the rebooted miners come back (polls back off while they are down)
        await asyncio.sleep(1.0)
        await s.cycle()
        cycles += 1
        if causes(ignored)[-1:] == ["write_ignored"] and s.events("pool_verified", after_reboot):
            break
    assert causes(ignored) == ["pending_reboot", "write_ignored"]
    assert s.true_pools(ignored) == [(FOREIGN_POOL["url"], FOREIGN_POOL["user"])]
    verified = s.events("pool_verified", after_reboot)
    assert len(verified) == 1 and verified[0].data["after_reboot"] is True
    assert s.true_pools(after_reboot) == s.approved(after_reboot)
    assert causes(after_reboot) == ["pending_reboot"]
    # backing off, doubling (1, 2, 4 … cycles, at most retry_max_cycles=4): not every cycle
    failures = s.events("pool_write_failed", wrong_login)
    assert {e.data["cause"] for e in failures} == {"auth_failed"}
    waits = [int(m.group(1)) for e in failures if (m := NEXT_WRITE.search(e.detail or ""))]
    assert len(waits) == len(failures) and waits == [1, 2, 4, 4, 4][: len(waits)]
    assert len(failures) == len([c for c in (1, 2, 4, 8, 12) if c <= cycles]) < cycles
    assert len(await s.writes(wrong_login)) == 0  # the miner refused it: nothing changed


async def test_canary_failure_halts_the_rollout(site: SiteFactory) -> None:
    s: Site = await site()
    tampered = s.ips("antminer")[:6]
    for ip in tampered[:3]:  # the canary: the three lowest addresses
        await s.shard.inject_fault(ip, Fault.WRITE_IGNORED, {})
    await s.tamper(*tampered)
    await s.enforce()
    cycle = await s.cycle()
    assert cycle.enforcement is not None and cycle.enforcement["rollout_halted"] is True
    halted = s.events("rollout_halted")
    assert len(halted) == 1 and halted[0].severity == "critical"
    for ip in tampered[3:]:  # never attempted, and said so
        assert await s.writes(ip) == []
        assert [e.data["cause"] for e in s.events("pool_write_failed", ip)] == ["rollout_halted"]
    await s.cycle()
    for ip in tampered[3:]:
        assert await s.writes(ip) == []  # still halted under this version
    await s.enforce()  # a new version: a new canary (the healthy ones now lead)
    for ip in tampered[:3]:
        await s.shard.clear_fault(ip, Fault.WRITE_IGNORED)
    await s.cycle()
    for ip in tampered[3:]:
        assert s.true_pools(ip) == s.approved(ip)


async def test_quarantine_sleeps_an_unregistered_miner_and_wakes_it_when_claimed(
    site: SiteFactory,
) -> None:
    s: Site = await site(miners=8)
    ip = s.ips("whatsminer")[0]
    s.machines[ip] = s.machines[ip].model_copy(update={"registered": False})
    await s.enforce(quarantine_unregistered=True)
    await s.cycle()
    assert s.shard.miner(ip).mode is Mode.SLEEP
    assert [e.kind for e in s.events(ip=ip)] == ["quarantined"]
    await s.cycle()  # asleep: nothing more to do
    assert [e.kind for e in s.events(ip=ip)] == ["quarantined"]
    s.machines[ip] = s.machines[ip].model_copy(update={"registered": True})
    await s.enforce(quarantine_unregistered=True)
    await s.cycle()
    assert s.shard.miner(ip).mode is not Mode.SLEEP
    assert [e.kind for e in s.events(ip=ip)] == ["quarantined", "released"]
    for other in set(s.ips()) - {ip}:
        assert await s.writes(other) == []


async def test_malware_is_corrected_every_time(site: SiteFactory) -> None:
    s: Site = await site(miners=8)
    ip = s.ips("antminer")[0]
    await s.shard.inject_fault(ip, Fault.MALWARE, {"delay": 1.0})
    await s.tamper(ip)
    await s.enforce()
    await s.cycle()
    assert s.true_pools(ip) == s.approved(ip)
    await asyncio.sleep(1.2)  # the malware puts its pool back
    assert s.true_pools(ip) == [(FOREIGN_POOL["url"], FOREIGN_POOL["user"])]
    await s.cycle()
    assert s.true_pools(ip) == s.approved(ip)
    kinds = [e.kind for e in s.events(ip=ip)]
    assert kinds == ["pool_drift", "pool_write", "pool_verified"] * 2  # two incidents


# --- the daemon: policy pulled before each cycle, refusals reach the controller ----------------


class StandInController:
    """The two agent routes of a controller, answering from memory (served in-process)."""

    def __init__(self) -> None:
        self.bundle: PolicyBundle | None = None
        self.batches: list[ReportBatch] = []
        self.app = Starlette(
            routes=[
                Route("/api/v1/agent/policy", self.policy, methods=["GET"]),
                Route("/api/v1/agent/reports", self.reports, methods=["POST"]),
            ]
        )

    async def policy(self, request: Request) -> Response:
        if self.bundle is None:
            return Response(b'{"detail": "no policy"}', status_code=404)
        return Response(self.bundle.model_dump_json(), media_type="application/json")

    async def reports(self, request: Request) -> Response:
        batch = ReportBatch.model_validate_json(await request.body())
        self.batches.append(batch)
        ack = BatchAck(
            batch_id=batch.batch_id, duplicate=False, observations=0, identities=0, events=0
        )
        return Response(ack.model_dump_json(), media_type="application/json")

    def events(self, kind: str | None = None) -> list[Event]:
        return [e for b in self.batches for e in b.events if kind in (None, e.kind)]


async def wait_until(what: str, check: Callable[[], Any], within_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


async def test_daemon_enforces_the_pulled_policy_and_reports_a_refused_one(
    farm: FarmFactory, tmp_path: Path
) -> None:
    shard = await farm(miners=6, mix=MIX, restart_seconds=0.0)
    ips = sorted(shard.miners, key=ipaddress.IPv4Address)
    key = SigningKey(private=Ed25519PrivateKey.generate(), path=tmp_path / "unused.pem")
    config = AgentConfig.model_validate(
        {
            "agent_id": "agt-1",
            "site": SITE,
            "segments": [str(ipaddress.ip_network(f"{ips[0]}/24", strict=False))],
            "data_dir": str(tmp_path),
            "controller": {"url": "http://127.0.0.1:9", "public_key": key.public_key_b64()},
            "polling": {"poll_interval_s": 2.0, "miner_timeout_s": 1.0},
            "uplink": {"timeout_s": 2.0, "backoff_initial_s": 0.2, "backoff_max_s": 1.0},
        }
    )
    machines = [
        MachinePolicy(
            machine_id=f"M{n}",
            serial=shard.miner(ip).reported_serial() or None,
            mac=shard.miner(ip).mac,
            worker=shard.miner(ip).pools[0].user,
        )
        for n, ip in enumerate(ips)
    ]
    now = datetime.now(UTC)
    valid = key.sign_bundle(
        PolicyBundle(
            version=7,
            issued_at=now,
            expires_at=now + timedelta(hours=1),
            content=PolicyContent(
                site=SITE,
                mode=EnforcementMode.ENFORCE,
                pool_set=ApprovedPoolSet(name="DMP", urls=list(DEFAULT_POOLS), account="kzfarm01"),
                machines=machines,
            ),
        )
    )
    controller = StandInController()
    controller.bundle = valid
    await shard.tamper_pools(ips[0], [FOREIGN_POOL], "test")
    daemon = Daemon(
        config,
        AgentSecrets(agent_secret=SecretStr("afa_" + "x" * 40)),
        transport=httpx.ASGITransport(app=controller.app),
        status_interval_s=0.5,
        enforcer_settings=FAST,
    )
    task = asyncio.create_task(daemon.run(install_signals=False))
    try:
        await wait_until("the pool_verified event", lambda: controller.events("pool_verified"))
        assert [(p.url, p.user) for p in shard.miner(ips[0]).pools if p.url] == [
            (url, machines[0].worker) for url in DEFAULT_POOLS
        ]
        # a network attacker swaps the approved pool in transit, and bumps the version
        evil = valid.content.model_copy(
            update={
                "pool_set": ApprovedPoolSet(
                    name="DMP", urls=[FOREIGN_POOL["url"]], account="kzfarm01"
                )
            }
        )
        controller.bundle = valid.model_copy(update={"version": 8, "content": evil})
        await wait_until("the policy_refused alert", lambda: controller.events("policy_refused"))
        cycles = daemon.agent.cycles if daemon.agent else 0
        await wait_until(
            "two more cycles", lambda: daemon.agent and daemon.agent.cycles >= cycles + 2
        )
        [alert] = controller.events("policy_refused")  # once, not every cycle
        assert alert.data["reason"] == "bad_signature" and alert.data["kept_version"] == 7
        status = json.loads((tmp_path / "status.json").read_text())
        assert status["policy"]["version"] == 7 and status["policy"]["mode"] == "enforce"
        assert status["enforcement"]["compliant"] == len(ips)
        for ip in ips:  # the last valid policy stays in force: nobody moved to the foreign pool
            assert FOREIGN_POOL["url"] not in {p.url for p in shard.miner(ip).pools}
    finally:
        daemon.request_stop()
        await asyncio.wait_for(task, 60)


# --- the CLI ------------------------------------------------------------------------------------


def cli(*args: str) -> Result:
    return CliRunner().invoke(app, ["agent", *args])


async def test_cli_policy_show_and_enforce_dry_run_then_for_real(
    farm: FarmFactory, tmp_path: Path
) -> None:
    shard = await farm(miners=6, mix=MIX, restart_seconds=0.0)
    ips = sorted(shard.miners, key=ipaddress.IPv4Address)
    key = SigningKey(private=Ed25519PrivateKey.generate(), path=tmp_path / "unused.pem")
    config = tmp_path / "agent.toml"
    config.write_text(
        f'site = "{SITE}"\nsegments = ["{ipaddress.ip_network(f"{ips[0]}/24", strict=False)}"]\n'
        'data_dir = "data"\n[controller]\nurl = "http://127.0.0.1:9"\n'
        f'public_key = "{key.public_key_b64()}"\n[polling]\npoll_interval_s = 10\n'
        "miner_timeout_s = 2\n"
    )
    missing = await asyncio.to_thread(cli, "enforce", "--config", str(config), "--dry-run")
    assert missing.exit_code == 1 and "no valid policy stored yet" in missing.output
    machines = [
        MachinePolicy(
            machine_id=f"M{n}",
            serial=shard.miner(ip).reported_serial() or None,
            mac=shard.miner(ip).mac,
            worker=shard.miner(ip).pools[0].user,
        )
        for n, ip in enumerate(ips)
    ]
    now = datetime.now(UTC)
    bundle = key.sign_bundle(
        PolicyBundle(
            version=3,
            issued_at=now,
            expires_at=now + timedelta(hours=1),
            content=PolicyContent(
                site=SITE,
                mode=EnforcementMode.ENFORCE,
                pool_set=ApprovedPoolSet(name="DMP", urls=list(DEFAULT_POOLS), account="kzfarm01"),
                machines=machines,
                rollout=RolloutPolicy(canary_size=1),
            ),
        )
    )
    PolicyGuard(key.public_key_b64(), tmp_path / "data" / "policy.json").accept(bundle)
    shown = await asyncio.to_thread(cli, "policy", "show", "--config", str(config))
    assert shown.exit_code == 0, shown.output
    assert "version 3" in shown.output and "enforce" in shown.output
    assert DEFAULT_POOLS[0] in shown.output and "6 (6 registered" in shown.output

    tampered = ips[1:3]
    for ip in tampered:
        await shard.tamper_pools(ip, [FOREIGN_POOL], "test")
    for ip in ips:
        await shard.clear_log(ip)
    dry = await asyncio.to_thread(cli, "enforce", "--config", str(config), "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.stdout)
    by_ip = {m["ip"]: m for m in plan["machines"]}
    assert {ip for ip, m in by_ip.items() if m["action"] == "would write"} == set(tampered)
    assert [ip for ip, m in by_ip.items() if m["canary"]] == tampered[:1]
    assert plan["totals"]["drift"] == 2 and plan["totals"]["compliant"] == 4
    for ip in ips:
        assert [r for r in await shard.request_log(ip) if r["write"]] == [], ip

    done = await asyncio.to_thread(cli, "enforce", "--config", str(config))
    assert done.exit_code == 0, done.output
    assert "2 verified" in done.output
    for n, ip in enumerate(ips):
        truth = [(p.url, p.user) for p in shard.miner(ip).pools if p.url]
        assert truth == [(url, machines[n].worker) for url in DEFAULT_POOLS], ip
    with Outbox(tmp_path / "data" / "outbox.sqlite3") as outbox:
        kinds = [e.kind for b in outbox.peek(100) for e in b.events]
    assert kinds.count("pool_verified") == 2 and kinds.count("pool_drift") == 2


# --- review fixes: waves, restarts, quarantine across restarts ----------------------------------


async def test_a_later_wave_failing_halts_the_rollout(site: SiteFactory) -> None:
    s: Site = await site()
    ips = s.ips()
    # canary 2 (healthy), then a wave of 8 of which 4 ignore writes: 4 of 10 > 30%: halt
    for ip in ips[4:8]:
        await s.shard.inject_fault(ip, Fault.WRITE_IGNORED, {})
    await s.tamper(*ips)
    await s.enforce(rollout=RolloutPolicy(canary_size=2, max_failure_rate=0.3))
    cycle = await s.cycle()
    assert cycle.enforcement is not None and cycle.enforcement["rollout_halted"] is True
    [halted] = s.events("rollout_halted")
    assert halted.severity == "critical"
    assert halted.data["rollout_attempted"] == 10 and halted.data["rollout_failed"] == 4
    for ip in ips[:4] + ips[8:10]:  # the canary and the healthy part of the wave: corrected
        assert s.true_pools(ip) == s.approved(ip), ip
    for ip in ips[10:]:  # the next wave: never written, and told why
        assert await s.writes(ip) == [], ip
        assert [e.data["cause"] for e in s.events("pool_write_failed", ip)] == ["rollout_halted"]
        assert s.true_pools(ip) == [(FOREIGN_POOL["url"], FOREIGN_POOL["user"])]


async def test_healthy_waves_write_everyone_in_one_cycle(site: SiteFactory) -> None:
    s: Site = await site()
    await s.tamper(*s.ips())
    await s.enforce(rollout=RolloutPolicy(canary_size=1, max_failure_rate=0.0))
    cycle = await s.cycle()  # waves of 1, 4, 8, 7
    assert cycle.enforcement is not None and cycle.enforcement["rollout_halted"] is False
    assert cycle.enforcement["verified"] == len(s.ips())
    canary = [e for e in s.events("pool_write") if "(canary)" in (e.detail or "")]
    assert [str(e.ip) for e in canary] == s.ips()[:1]
    for ip in s.ips():
        assert s.true_pools(ip) == s.approved(ip), ip


class GoesDarkAfterWrite:
    """The agent's own drivers, except that one miner's firmware goes dark after a pool write,
    as firmware restarting to apply new pools does. Scripted through the simulator's control
    API: ``after_write`` runs once the write is acknowledged, ``after_read(n)`` after the n-th
    read-back."""

    def __init__(
        self,
        drivers: Any,
        ip: str,
        after_write: Callable[[], Any],
        after_read: Callable[[int], Any],
    ) -> None:
        self.inner, self.ip = drivers, ip
        self.after_write, self.after_read = after_write, after_read
        self.reads = 0

    @property
    def drivers(self) -> Any:
        return self.inner.drivers

    async def driver_for(self, ip: str) -> Any:
        driver = await self.inner.driver_for(ip)
        return _Scripted(driver, self) if ip == self.ip else driver


class _Scripted:
    def __init__(self, driver: Any, script: GoesDarkAfterWrite) -> None:
        self.driver, self.script = driver, script

    def __getattr__(self, name: str) -> Any:
        return getattr(self.driver, name)

    async def set_pools(self, pools: Any) -> None:
        await self.driver.set_pools(pools)
        await self.script.after_write()

    async def poll(self) -> Any:
        snapshot = await self.driver.poll()
        self.script.reads += 1
        await self.script.after_read(self.script.reads)
        return snapshot


async def test_a_miner_dark_for_the_first_read_backs_is_verified_by_a_later_one(
    site: SiteFactory,
) -> None:
    s: Site = await site(miners=8)
    ip = s.ips("whatsminer")[0]
    dark: list[bool] = []

    async def restart() -> None:
        await s.shard.inject_fault(ip, Fault.OFFLINE, {})

    async def back(reads: int) -> None:
        dark.append(not s.shard.miner(ip).is_up(time.time()))
        if reads == 2:  # dark for two read-backs, answers the third
            await s.shard.clear_fault(ip, Fault.OFFLINE)

    s.agent.enforcer.drivers = GoesDarkAfterWrite(s.agent.factory, ip, restart, back)
    await s.tamper(ip)
    await s.enforce(rollout=RolloutPolicy(canary_size=1, max_failure_rate=0.0, verify_attempts=3))
    await s.cycle()
    assert dark == [True, True, False]
    assert s.true_pools(ip) == s.approved(ip)
    [verified] = s.events("pool_verified", ip)
    assert verified.data["attempts"] == 3
    assert s.events("pool_write_failed", ip) == [] and s.events("rollout_halted") == []


async def test_a_miner_restarting_after_a_write_is_not_rebooted_or_called_ignored(
    site: SiteFactory,
) -> None:
    s: Site = await site(miners=8)
    ip = s.ips("antminer")[0]
    await s.shard.inject_fault(ip, Fault.WRITE_AFTER_REBOOT, {})

    async def nothing() -> None:
        return None

    async def reboot_itself(reads: int) -> None:
        if reads == 1:  # answered once, unchanged; then restarts to apply what was saved
            await s.shard.reboot(ip)

    s.agent.enforcer.drivers = GoesDarkAfterWrite(s.agent.factory, ip, nothing, reboot_itself)
    await s.tamper(ip)
    await s.enforce(rollout=RolloutPolicy(canary_size=1, max_failure_rate=1.0, verify_attempts=3))
    await s.cycle()
    failed = s.events("pool_write_failed", ip)
    assert [e.data["cause"] for e in failed] == ["unreachable"]
    assert failed[0].data["attempts"] == 3
    ops = [(r["via"], r["op"]) for r in await s.writes(ip)]
    assert [op for via, op in ops if op == "reboot" and via != "control"] == []  # not by us
    pool_writes = [op for _, op in ops].count("pools")
    assert pool_writes >= 1
    for _ in range(10):  # it comes back on the approved pools: verified, not written again
        await asyncio.sleep(0.5)
        await s.cycle()
        if s.events("pool_verified", ip):
            break
    [verified] = s.events("pool_verified", ip)
    assert verified.data["after_reboot"] is False
    assert s.true_pools(ip) == s.approved(ip)
    assert [r["op"] for r in await s.writes(ip)].count("pools") == pool_writes  # no rewrite
    assert [e.data["cause"] for e in s.events("pool_write_failed", ip)] == ["unreachable"]


async def test_a_miner_quarantined_before_a_restart_is_woken_when_claimed(
    site: SiteFactory, tmp_path: Path
) -> None:
    s: Site = await site(miners=8)
    ip = s.ips("whatsminer")[0]
    s.machines[ip] = s.machines[ip].model_copy(update={"registered": False})
    await s.enforce(quarantine_unregistered=True)
    await s.cycle()
    assert s.shard.miner(ip).mode is Mode.SLEEP
    record = tmp_path / "quarantine.json"
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    [slept] = json.loads(record.read_text())["slept"]
    assert slept["ip"] == ip and slept["machine_id"] == s.machines[ip].machine_id

    # the agent restarts: a new FleetAgent over the same data_dir, with the stored policy
    guard = PolicyGuard(s.key.public_key_b64(), tmp_path / "policy.json", site=SITE)
    restarted = FleetAgent(s.agent.config, s.outbox, policy=guard, enforcer_settings=FAST)
    assert (await restarted.discover()).identified == 8
    s.machines[ip] = s.machines[ip].model_copy(update={"registered": True})
    assert await restarted.offer_policy(s.bundle(quarantine_unregistered=True))
    await cycle(restarted)
    assert s.shard.miner(ip).mode is not Mode.SLEEP  # the simulator's true state
    assert [e.kind for e in s.events(ip=ip)] == ["quarantined", "released"]
    assert json.loads(record.read_text())["slept"] == []
    for other in set(s.ips()) - {ip}:
        assert await s.writes(other) == []


async def test_a_miner_quarantined_by_a_one_shot_run_is_woken_by_the_daemon(
    site: SiteFactory,
) -> None:
    s: Site = await site(miners=8)
    ip = s.ips("antminer")[0]
    s.machines[ip] = s.machines[ip].model_copy(update={"registered": False})
    await s.enforce(quarantine_unregistered=True)  # stored by the agent's guard
    pinned = s.agent.config.controller.model_copy(update={"public_key": s.key.public_key_b64()})
    config = s.agent.config.model_copy(update={"controller": pinned})
    once = await enforce_once(config, {}, dry_run=False, settings=FAST)
    assert once.result.counts["quarantined"] == 1
    assert s.shard.miner(ip).mode is Mode.SLEEP

    s.machines[ip] = s.machines[ip].model_copy(update={"registered": True})
    await s.enforce(quarantine_unregistered=True)
    await s.cycle()  # the daemon never slept it itself, yet wakes it
    assert s.shard.miner(ip).mode is not Mode.SLEEP
    released = [e for e in s.events("released") if str(e.ip) == ip]
    assert len(released) == 1


# --- writes apart from polling: the journal, recovery, the drift check -------------------------


def journal_rows(path: Path, state: str | None = None) -> list[tuple[str, str, str]]:
    """(kind, ip, state) of the journal's actions, read from its SQLite file as an operator
    would (another connection, read-only)."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT kind, ip, state FROM action ORDER BY rowid").fetchall()
    return [(k, ip, st) for k, ip, st in rows if state is None or st == state]


async def test_a_poll_cycle_never_waits_on_a_write(site: SiteFactory, tmp_path: Path) -> None:
    # waves of one write with a long pause: the second write waits out the pause
    s: Site = await site(miners=8, actions={"wave_size": 1, "wave_pause_s": 600})
    tampered = s.ips()[:3]
    await s.tamper(*tampered)
    await s.enforce(rollout=RolloutPolicy(canary_size=3, max_failure_rate=1.0))
    await s.agent.poll_cycle()  # offers the drift to the action worker
    stop = asyncio.Event()
    worker = asyncio.create_task(s.agent.work_actions(stop))
    journal = tmp_path / "actions.sqlite3"
    try:
        await wait_until(
            "one write done and the next waiting for its wave",
            lambda: journal_rows(journal, "done") and journal_rows(journal, "planned"),
        )
        stored = s.outbox.stats().depth
        cycle = await s.agent.poll_cycle()  # returns while a write is still waiting
        assert cycle.ok == 8 and s.outbox.stats().depth > stored  # observations stored
        assert journal_rows(journal, "planned")  # the write is still waiting: not awaited
        assert s.agent.actions.busy(journal_rows(journal, "planned")[0][1])
    finally:
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker
    [(_, first, _)] = journal_rows(journal, "done")
    assert s.true_pools(first) == s.approved(first)
    assert [e.kind for e in s.events(ip=first)] == ["pool_drift", "pool_write", "pool_verified"]


async def test_an_agent_killed_mid_write_reads_back_and_does_not_write_again(
    site: SiteFactory, tmp_path: Path
) -> None:
    s: Site = await site(miners=8)
    ip = s.ips("antminer")[0]
    dead = asyncio.Event()  # never set: the agent dies before the miner's answer is handled

    async def dies() -> None:
        await dead.wait()

    async def nothing(reads: int) -> None:
        return None

    s.agent.enforcer.drivers = GoesDarkAfterWrite(s.agent.factory, ip, dies, nothing)
    await s.tamper(ip)
    await s.enforce(rollout=RolloutPolicy(canary_size=1, max_failure_rate=1.0))
    await s.agent.poll_cycle()
    journal = tmp_path / "actions.sqlite3"
    doomed = asyncio.create_task(s.agent.enforce_pending())
    await wait_until(
        "the write applied on the miner while the agent still waits on it",
        lambda: s.shard.miner(ip).writes and journal_rows(journal, "dispatched"),
        within_s=10,
    )
    doomed.cancel()  # the agent dies here: the journal says dispatched, nothing says done
    with contextlib.suppress(asyncio.CancelledError):
        await doomed
    assert journal_rows(journal, "dispatched") == [("set_pools", ip, "dispatched")]

    guard = PolicyGuard(s.key.public_key_b64(), tmp_path / "policy.json", site=SITE)
    restarted = FleetAgent(s.agent.config, s.outbox, policy=guard, enforcer_settings=FAST)
    assert (await restarted.discover()).identified == 8
    await cycle(restarted)
    assert journal_rows(journal, "dispatched") == []
    assert [r["op"] for r in await s.writes(ip)] == ["pools"]  # once, never again
    assert s.true_pools(ip) == s.approved(ip)
    [verified] = s.events("pool_verified", ip)
    assert "after an agent restart" in (verified.detail or "")
    assert verified.data["machine_id"] == s.machines[ip].machine_id
    await cycle(restarted)
    assert [r["op"] for r in await s.writes(ip)] == ["pools"]


async def test_an_interrupted_reboot_is_reported_and_never_repeated(
    site: SiteFactory, tmp_path: Path
) -> None:
    s: Site = await site(miners=4, mix="antminer=1")
    ip = s.ips()[0]
    action = Action(ActionKind.REBOOT, ip, machine_id=s.machines[ip].machine_id)
    with Journal(tmp_path / "actions.sqlite3") as dead:  # what a killed run left on disk
        dead.plan(action, datetime.now(UTC))
        dead.dispatch(action.id, datetime.now(UTC))
    await s.enforce()
    await s.cycle()
    [failed] = s.events("pool_write_failed", ip)
    assert failed.data["cause"] == "pending_reboot" and "interrupted" in (failed.detail or "")
    assert await s.writes(ip) == []  # not rebooted again
    assert journal_rows(tmp_path / "actions.sqlite3") == [("reboot", ip, "failed")]


async def test_the_pools_check_catches_a_hijack_between_full_polls(site: SiteFactory) -> None:
    s: Site = await site(miners=8)
    await s.enforce()
    await s.cycle()
    ip = s.ips("antminer")[0]
    await s.tamper(ip)
    check = await s.agent.check_pools()
    assert check is not None and check.drifted == 1 and check.checked == 8
    await s.agent.enforce_pending()
    assert s.agent.cycles == 1  # caught without a full poll
    assert s.true_pools(ip) == s.approved(ip)
    # the same incident a full poll's drift opens: drift, write, verified
    assert [e.kind for e in s.events(ip=ip)] == ["pool_drift", "pool_write", "pool_verified"]
    again = await s.agent.check_pools()
    assert again is not None and again.drifted == 0


async def test_the_daemon_checks_pools_on_its_own_cadence(
    farm: FarmFactory, tmp_path: Path
) -> None:
    shard = await farm(miners=6, mix=MIX, restart_seconds=0.0)
    ips = sorted(shard.miners, key=ipaddress.IPv4Address)
    key = SigningKey(private=Ed25519PrivateKey.generate(), path=tmp_path / "unused.pem")
    config = AgentConfig.model_validate(
        {
            "agent_id": "agt-1",
            "site": SITE,
            "segments": [str(ipaddress.ip_network(f"{ips[0]}/24", strict=False))],
            "data_dir": str(tmp_path),
            "controller": {"url": "http://127.0.0.1:9", "public_key": key.public_key_b64()},
            # a full poll an hour apart: only the pools check can see the hijack
            "polling": {
                "poll_interval_s": 3600.0,
                "identity_interval_s": 3600.0,
                "miner_timeout_s": 1.0,
                "pools_check_interval_s": 1.0,
            },
            "uplink": {"timeout_s": 2.0, "backoff_initial_s": 0.2, "backoff_max_s": 1.0},
        }
    )
    machines = [
        MachinePolicy(
            machine_id=f"M{n}",
            serial=shard.miner(ip).reported_serial() or None,
            mac=shard.miner(ip).mac,
            worker=shard.miner(ip).pools[0].user,
        )
        for n, ip in enumerate(ips)
    ]
    now = datetime.now(UTC)
    controller = StandInController()
    controller.bundle = key.sign_bundle(
        PolicyBundle(
            version=1,
            issued_at=now,
            expires_at=now + timedelta(hours=1),
            content=PolicyContent(
                site=SITE,
                mode=EnforcementMode.ENFORCE,
                pool_set=ApprovedPoolSet(name="DMP", urls=list(DEFAULT_POOLS), account="kzfarm01"),
                machines=machines,
            ),
        )
    )
    daemon = Daemon(
        config,
        AgentSecrets(agent_secret=SecretStr("afa_" + "x" * 40)),
        transport=httpx.ASGITransport(app=controller.app),
        status_interval_s=0.5,
        enforcer_settings=FAST,
    )
    task = asyncio.create_task(daemon.run(install_signals=False))
    try:
        await wait_until("the first cycle", lambda: daemon.agent and daemon.agent.cycles == 1)
        await wait_until(
            "a pools check", lambda: daemon.agent and daemon.agent.last_pools_check is not None
        )
        await shard.tamper_pools(ips[2], [FOREIGN_POOL], "malware")
        await wait_until("the pool_verified event", lambda: controller.events("pool_verified"))
        assert daemon.agent is not None and daemon.agent.cycles == 1  # no full poll since
        assert [e.kind for e in controller.events() if str(e.ip) == ips[2]] == [
            "pool_drift",
            "pool_write",
            "pool_verified",
        ]
        assert [(p.url, p.user) for p in shard.miner(ips[2]).pools if p.url] == [
            (url, machines[2].worker) for url in DEFAULT_POOLS
        ]

        def status() -> dict[str, Any]:
            data: dict[str, Any] = json.loads((tmp_path / "status.json").read_text())
            return data

        await wait_until(  # the one pool write
            "the journal in the status file", lambda: status()["actions"]["journal"] == {"done": 1}
        )
        assert status()["last_pools_check"]["checked"] == len(ips)
    finally:
        daemon.request_stop()
        await asyncio.wait_for(task, 60)


async def test_every_drift_write_and_failure_is_one_log_line_naming_the_miner(
    site: SiteFactory, caplog: pytest.LogCaptureFixture
) -> None:
    s: Site = await site(miners=8)
    hijacked, dark = s.ips("antminer")[0], s.ips("whatsminer")[0]
    await s.enforce()
    await s.cycle()
    await s.tamper(hijacked)
    await s.shard.inject_fault(dark, Fault.OFFLINE, {})
    caplog.clear()
    caplog.set_level("INFO")
    await s.cycle()

    def lines(ip: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if f"ip={ip} " in r.getMessage()]

    def names(ip: str) -> str:
        serial = s.shard.miner(ip).reported_serial()
        return f"ip={ip}" + (f" serial={serial}" if serial else "")

    machine = s.machines[hijacked].machine_id
    said = lines(hijacked)
    assert any(
        line.startswith(f"pool drift on {names(hijacked)} machine={machine}:") for line in said
    )
    assert any(
        line.startswith(f"write set_pools to {names(hijacked)} machine={machine}") for line in said
    )
    assert any(
        line.startswith(f"pool_verified on {names(hijacked)} machine={machine}") for line in said
    )
    [unavailable] = [line for line in lines(dark) if line.startswith("miner_unavailable")]
    assert unavailable.startswith(
        f"miner_unavailable on {names(dark)} machine={s.machines[dark].machine_id}: "
    )
    assert all("\n" not in line for line in said)
