"""The action runner and its journal, without a farm: what is journaled, retried, gated.

The ``do`` callables here stand where a driver's write would be: they record when they run and
fail the way drivers fail (the driver errors of :mod:`agent.errors`). The runner, the journal
(a real SQLite file) and the gate are the real ones. Recovery against real simulated miners is
in ``test_enforce.py``.
"""

from __future__ import annotations

import asyncio
import stat
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import pytest

from agent.actions import Action, ActionKind, ActionRunner, ActionSettings, ActionState, Journal
from agent.actions.journal import JournalEntry, JournalError
from agent.actions.runner import backoff_s
from agent.config import AgentConfig
from agent.drivers.base import utcnow
from agent.errors import AuthFailed, Timeout, Unreachable

QUICK = ActionSettings(retries=2, retry_backoff_s=0.01, retry_backoff_max_s=0.02, deadline_s=5.0)


def runner(tmp_path: Path, settings: ActionSettings = QUICK) -> ActionRunner:
    return ActionRunner(Journal(tmp_path / "actions.sqlite3"), settings=settings)


async def test_an_action_is_journaled_planned_dispatched_then_done(tmp_path: Path) -> None:
    r = runner(tmp_path)
    seen: list[str] = []

    async def write() -> None:  # what the journal says while the write is on the wire
        [entry] = r.journal.entries("127.0.0.1")
        seen.append(entry.state)

    action = Action(ActionKind.SET_POOLS, "127.0.0.1", serial="S1", machine_id="M1")
    result = await r.run(action, write)
    assert result.ok and result.attempts == 1
    assert seen == [ActionState.DISPATCHED]  # committed before the write left
    [entry] = r.journal.entries()
    assert entry.state is ActionState.DONE and entry.action == action
    assert stat.S_IMODE((tmp_path / "actions.sqlite3").stat().st_mode) == 0o600


async def test_idempotent_writes_are_retried_with_backoff_a_reboot_never(tmp_path: Path) -> None:
    r = runner(tmp_path)
    calls: dict[str, int] = {}

    def unreachable(name: str) -> Callable[[], Awaitable[None]]:
        async def write() -> None:
            calls[name] = calls.get(name, 0) + 1
            raise Unreachable("connection refused", ip="127.0.0.1")

        return write

    pools = await r.run(Action(ActionKind.SET_POOLS, "127.0.0.1"), unreachable("pools"))
    reboot = await r.run(Action(ActionKind.REBOOT, "127.0.0.2"), unreachable("reboot"))
    assert calls == {"pools": 3, "reboot": 1}  # 1 + 2 retries; the reboot once
    assert (pools.ok, pools.cause, pools.attempts) == (False, "unreachable", 3)
    assert (reboot.ok, reboot.cause, reboot.attempts) == (False, "unreachable", 1)
    states = {e.action.kind: (e.state, e.attempts, e.cause) for e in r.journal.entries()}
    assert states[ActionKind.SET_POOLS] == (ActionState.FAILED, 3, "unreachable")
    assert states[ActionKind.REBOOT] == (ActionState.FAILED, 1, "unreachable")


async def test_a_refused_login_is_not_retried(tmp_path: Path) -> None:
    r = runner(tmp_path)
    calls = 0

    async def write() -> None:
        nonlocal calls
        calls += 1
        raise AuthFailed("wrong password")

    result = await r.run(Action(ActionKind.SET_POWER_LIMIT, "127.0.0.1"), write)
    assert calls == 1 and result.cause == "auth_failed" and "wrong password" in result.detail


async def test_a_write_past_its_deadline_fails_with_that_cause(tmp_path: Path) -> None:
    r = runner(tmp_path)
    never = asyncio.Event()

    async def hangs() -> None:
        await never.wait()

    result = await r.run(Action(ActionKind.WAKE, "127.0.0.1", deadline_s=0.05), hangs)
    assert (result.ok, result.cause) == (False, "deadline")
    assert r.journal.entries()[0].state is ActionState.FAILED
    assert not r.busy("127.0.0.1")


async def test_a_timed_out_write_is_read_back_before_it_is_sent_again(tmp_path: Path) -> None:
    r = runner(tmp_path)
    sent = 0

    async def lands_but_times_out() -> None:
        nonlocal sent
        sent += 1
        raise Timeout("no answer in 5 s")

    async def took() -> bool:
        return sent > 0

    result = await r.run(
        Action(ActionKind.SET_POOLS, "127.0.0.1"), lands_but_times_out, verify=took
    )
    assert result.ok and sent == 1  # read back: it had landed, so it was not written again


async def test_waves_start_only_when_the_last_one_has_ended(tmp_path: Path) -> None:
    settings = ActionSettings(concurrency_per_segment=2, wave_size=3, wave_pause_s=0.01)
    r = runner(tmp_path, settings)
    running: set[str] = set()
    starts: list[frozenset[str]] = []  # who else was running when each write started
    started: asyncio.Queue[str] = asyncio.Queue()
    release = {f"127.0.0.{n}": asyncio.Event() for n in range(1, 8)}

    def write(ip: str) -> Callable[[], Awaitable[None]]:
        async def go() -> None:
            starts.append(frozenset(running))
            running.add(ip)
            started.put_nowait(ip)
            await release[ip].wait()
            running.discard(ip)

        return go

    tasks = [asyncio.create_task(r.run(Action(ActionKind.SLEEP, ip), write(ip))) for ip in release]
    for _ in release:  # end them one by one, in the order they started
        ip = await asyncio.wait_for(started.get(), 10)
        assert len(running) <= 2  # the segment's concurrency
        release[ip].set()
    results = await asyncio.gather(*tasks)
    assert all(result.ok for result in results) and len(starts) == 7
    # the first write of each new wave started with nothing running: the wave before had ended
    assert starts[3] == frozenset() and starts[6] == frozenset()
    assert r.gate("127.0.0.1").waves == 2


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [backoff_s(n, 1.0, 5.0) for n in (1, 2, 3, 4, 5)] == [1.0, 2.0, 4.0, 5.0, 5.0]


async def test_recovery_reports_what_a_dead_run_left_unfinished(tmp_path: Path) -> None:
    path = tmp_path / "actions.sqlite3"
    before = utcnow() - timedelta(seconds=1)
    planned = Action(ActionKind.SET_POOLS, "127.0.0.1")
    reboot = Action(ActionKind.REBOOT, "127.0.0.2")
    landed = Action(ActionKind.SET_POOLS, "127.0.0.3")
    dark = Action(ActionKind.SET_POOLS, "127.0.0.4")
    with Journal(path) as dead:  # what a run killed mid-wave leaves on disk
        for action in (planned, reboot, landed, dark):
            dead.plan(action, before)
        for action in (reboot, landed, dark):
            dead.dispatch(action.id, before)
    r = runner(tmp_path)
    read: list[str] = []

    async def verify(entry: JournalEntry) -> bool | None:
        ip = entry.action.ip
        read.append(ip)
        return None if ip == "127.0.0.4" else True

    resolved = await r.recover({ActionKind.SET_POOLS: verify})
    outcome = {res.action.ip: (res.ok, res.cause) for res in resolved}
    assert outcome == {
        "127.0.0.1": (False, "interrupted"),  # never sent: nothing to read back
        "127.0.0.2": (False, "interrupted"),  # a reboot is not read back, nor repeated
        "127.0.0.3": (True, None),
    }
    assert sorted(read) == ["127.0.0.3", "127.0.0.4"]
    assert r.busy("127.0.0.4") and not r.busy("127.0.0.3")  # in doubt: left alone
    later = await r.recover({ActionKind.SET_POOLS: verify}, now=utcnow() + timedelta(hours=1))
    assert [(res.action.ip, res.cause) for res in later] == [("127.0.0.4", "unreachable")]
    assert not r.busy("127.0.0.4") and r.journal.unfinished() == []


def test_the_journal_lives_beside_the_outbox(tmp_path: Path) -> None:
    config = AgentConfig.model_validate(
        {"data_dir": str(tmp_path), "controller": {"url": "http://127.0.0.1:9"}}
    )
    assert config.journal_path == tmp_path / "actions.sqlite3"
    assert config.journal_path.parent == config.outbox_path.parent
    assert config.polling.pools_check_interval_s == 10.0


def test_bad_action_settings_are_refused_with_the_field_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="retry_backoff_max_s"):
        AgentConfig.model_validate(
            {
                "controller": {"url": "http://127.0.0.1:9"},
                "actions": {"retry_backoff_s": 10, "retry_backoff_max_s": 1},
            }
        )
    with pytest.raises(ValueError, match="wave_size"):
        AgentConfig.model_validate(
            {"controller": {"url": "http://127.0.0.1:9"}, "actions": {"wave_size": -1}}
        )


def test_a_corrupt_journal_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "actions.sqlite3"
    path.write_bytes(b"not a database" * 100)
    with pytest.raises(JournalError, match="cannot open the action journal"):
        Journal(path)
    assert path.read_bytes().startswith(b"not a database")


def test_pruning_forgets_old_finished_actions_never_unfinished_ones(tmp_path: Path) -> None:
    old = utcnow() - timedelta(days=30)
    done, open_ = Action(ActionKind.SET_POOLS, "127.0.0.1"), Action(ActionKind.REBOOT, "127.0.0.2")
    with Journal(tmp_path / "actions.sqlite3") as journal:
        for action in (done, open_):
            journal.plan(action, old)
            journal.dispatch(action.id, old)
        journal.finish(done.id, True, None, "", old)
        assert journal.prune(utcnow() - timedelta(days=7)) == 1
        assert [e.action.id for e in journal.entries()] == [open_.id]
