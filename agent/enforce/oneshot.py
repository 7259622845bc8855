"""One enforcement pass outside the daemon (``asicfleet agent enforce [--dry-run]``).

Scans the configured segments, polls every identified miner once, and runs the same decision
and executor the daemon runs, under the policy stored by the daemon (verified again). With
``dry_run`` nothing is written to any miner and nothing is stored; otherwise the pass's events
and read-backs go into the outbox like a cycle's, for the daemon (or the next start) to deliver.
Writes go through the daemon's action journal (``data_dir/actions.sqlite3``) under the
``[actions]`` settings. The quarantine record (``data_dir/quarantine.json``) is shared with the
daemon: a machine this
pass puts to sleep is woken by the daemon once it is claimed, and the other way round.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime

from agent.actions import ActionRunner, ActionSettings, Journal
from agent.config import AgentConfig
from agent.coordinator import Report, pack
from agent.discovery import Discovery
from agent.drivers import DriverOptions
from agent.drivers.base import MinerLogin, PollSnapshot, utcnow
from agent.drivers.factory import DriverFactory
from agent.enforce.executor import EnforcementResult, Enforcer, EnforcerSettings
from agent.errors import AgentError, DriverError
from agent.outbox import Outbox
from agent.policy import PolicyGuard, policy_path
from contract.policy import PolicyBundle
from contract.reports import Observation


@dataclass
class PassReport:
    bundle: PolicyBundle
    expired: bool
    probed: int
    identified: int
    unidentified: int
    result: EnforcementResult
    stored: int = 0


def stored_policy(config: AgentConfig) -> PolicyGuard:
    """The guard over the policy the daemon stored; errors say what to do."""
    if config.controller.public_key is None:
        raise AgentError("not enrolled: no controller key to verify a policy with")
    path = policy_path(config.data_dir)
    guard = PolicyGuard(config.controller.public_key, path, site=config.site)
    if guard.current is None:
        if guard.stored_refusal is not None:
            raise AgentError(f"no valid policy stored: {guard.stored_refusal}")
        raise AgentError(
            f"{path}: no valid policy stored yet (the running agent stores the controller's "
            "bundle after verifying it)"
        )
    return guard


async def enforce_once(
    config: AgentConfig,
    credentials: dict[str, MinerLogin],
    *,
    dry_run: bool,
    settings: EnforcerSettings | None = None,
    now: datetime | None = None,
) -> PassReport:
    guard = stored_policy(config)
    bundle = guard.current
    assert bundle is not None
    polling = config.polling
    factory = DriverFactory(
        credentials=credentials,
        options=DriverOptions(timeout=polling.miner_timeout_s),
        identify_timeout=max(3.0, 2 * polling.miner_timeout_s),
    )
    segments = list(config.segments)
    discovery = Discovery(factory, segments, concurrency=polling.concurrency_per_segment)
    scan = await discovery.scan(segments)
    limit = asyncio.Semaphore(polling.concurrency_per_segment)

    async def poll(ip: str) -> Observation:
        async with limit:
            try:
                snapshot = await (await factory.driver_for(ip)).poll()
            except DriverError as exc:
                snapshot = PollSnapshot.failed(ip, exc)
        return snapshot.to_observation(scan.found[ip])

    observations = list(await asyncio.gather(*(poll(ip) for ip in scan.found)))
    with Journal(config.journal_path) as journal:  # the daemon's journal: one record of writes
        actions = ActionRunner(journal, segments, ActionSettings.from_config(config.actions))
        enforcer = Enforcer(factory, segments, settings, data_dir=config.data_dir, actions=actions)
        result = await enforcer.run(bundle, observations, now=now, dry_run=dry_run)
    report = PassReport(
        bundle=bundle,
        expired=guard.expired(now),
        probed=scan.probed,
        identified=len(scan.found),
        unidentified=len(scan.failed),
        result=result,
    )
    if not dry_run and len(result.report):
        at = utcnow()
        out = Report(
            identities=[identity.to_record(at) for identity in scan.found.values()],
            events=result.report.events,
            observations=result.report.observations,
        )
        with Outbox.from_config(config) as outbox:
            for batch in pack(out, config.outbox.batch_size, at):
                await asyncio.to_thread(outbox.put, batch)
                report.stored += 1
    return report
