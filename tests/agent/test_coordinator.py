"""The poll coordinator's decisions, with no network and no clock: who is polled, who backs
off (and is still reported), whose identity is re-read, what a scan changes, how reports are
cut into batches."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv4Network

import pytest

from agent.coordinator import (
    CoordinatorSettings,
    Outcome,
    PollCoordinator,
    Report,
    Task,
    backoff_cycles,
    identity_changes,
    pack,
    segment_of,
)
from agent.drivers.base import Identity
from contract.reports import Event, Observation

T0 = datetime(2026, 1, 1, tzinfo=UTC)
NET = IPv4Network("127.5.0.0/24")


def ident(ip: str, **changes: str | None) -> Identity:
    base = Identity(
        ip=ip,
        make="AntMiner",
        model="Antminer S21",
        firmware="stock",
        firmware_version="2024",
        mac="02:00:00:00:00:01",
        serial="SN" + ip.rsplit(".", 1)[1],
        serial_source="web",
        family="antminer_stock",
    )
    return replace(base, **changes)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def coordinator(**settings: float) -> PollCoordinator:
    return PollCoordinator(CoordinatorSettings(**settings))  # type: ignore[arg-type]


def ok(ip: str, identity: Identity | None = None, **hints: str) -> Outcome:
    return Outcome(ip=ip, polled=True, reachable=True, identity=identity, **hints)  # type: ignore[arg-type]


def bad(ip: str, error: str = "timeout: no complete reply within 5 s") -> Outcome:
    return Outcome(ip=ip, polled=False, reachable=False, error=error)


def kinds(events: list[Event]) -> list[str]:
    return [e.kind for e in events]


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff_cycles(n, 8) for n in range(0, 7)] == [1, 1, 2, 4, 8, 8, 8]
    assert backoff_cycles(10_000, 5) == 5


def test_every_known_miner_is_polled_each_cycle_in_address_order() -> None:
    c = coordinator()
    for ip in ("127.5.0.10", "127.5.0.9", "127.5.0.100"):
        c.add(ip, ident(ip), T0)
    plan = c.plan(1, at(1))
    assert [t.ip for t in plan.tasks] == ["127.5.0.9", "127.5.0.10", "127.5.0.100"]
    assert all(t == Task(t.ip) for t in plan.tasks)
    assert plan.skipped == ()


def test_a_failing_miner_backs_off_exponentially_but_is_reported_every_cycle() -> None:
    c = coordinator(max_backoff_cycles=4, reidentify_after_failures=99)
    ip = "127.5.0.7"
    c.add(ip, ident(ip), T0)
    polled_in = []
    for cycle in range(1, 20):
        plan = c.plan(cycle, at(cycle))
        if plan.tasks:
            polled_in.append(cycle)
            c.record(bad(ip), cycle, at(cycle))
        else:
            (skip,) = plan.skipped
            obs = skip.observation
            assert obs is not None and obs.reachable is False and obs.serial == "SN7"
            assert obs.error is not None
            assert obs.error.startswith("timeout: no complete reply within 5 s (backing off")
    # attempts after 1, 2, 4, then every 4 cycles (the cap)
    assert polled_in == [1, 2, 4, 8, 12, 16]


def test_unavailable_and_recovered_are_announced_once_and_recovery_rereads_identity() -> None:
    c = coordinator()
    ip = "127.5.0.8"
    c.add(ip, ident(ip), T0)
    first = c.record(bad(ip), 1, at(1))
    assert kinds(first) == ["miner_unavailable"]
    assert first[0].ip == IPv4Address(ip) and "timeout" in first[0].detail
    assert c.record(bad(ip), 2, at(2)) == []  # same kind of failure: no new event
    assert kinds(c.record(bad(ip, "malformed: garbage"), 4, at(4))) == ["miner_unavailable"]
    back = c.record(ok(ip), 8, at(8))
    assert kinds(back) == ["miner_recovered"]
    assert "3 failed attempts" in back[0].detail
    (task,) = c.plan(9, at(9)).tasks
    assert task.read_identity  # it may have been swapped while it was away
    assert c.record(ok(ip, ident(ip)), 9, at(9)) == []
    assert c.plan(10, at(10)).tasks == (Task(ip),)


def test_repeated_failures_rebuild_the_driver_from_scratch() -> None:
    c = coordinator(reidentify_after_failures=3, max_backoff_cycles=1)
    ip = "127.5.0.9"
    c.add(ip, ident(ip), T0)
    for cycle in (1, 2):
        c.record(bad(ip), cycle, at(cycle))
        assert not c.plan(cycle + 1, at(cycle + 1)).tasks[0].rebuild
    c.record(bad(ip), 3, at(3))
    assert c.plan(4, at(4)).tasks == (Task(ip, rebuild=True),)
    c.record(ok(ip, ident(ip)), 4, at(4))
    assert c.plan(5, at(5)).tasks == (Task(ip),)


def test_unidentified_miners_are_retried_by_identification_with_backoff() -> None:
    c = coordinator()
    ip = "127.5.0.11"
    decision = c.apply_scan([NET], {ip}, {}, {ip: "timeout: not identified within 4 s"}, T0)
    assert decision.unidentified == (ip,)
    assert kinds(list(decision.events)) == ["identify_failed"]
    assert c.plan(1, at(1)).tasks == (Task(ip, rebuild=True),)
    failed = Outcome(ip=ip, polled=None, error="timeout: not identified within 4 s")
    assert c.record(failed, 1, at(1)) == []  # already announced by the scan
    plan = c.plan(2, at(2))
    assert plan.tasks == () and plan.skipped[0].observation is None  # nothing to place it by
    assert c.plan(3, at(3)).tasks == (Task(ip, rebuild=True),)
    assert c.record(ok(ip, ident(ip)), 3, at(3)) == []
    record = c.record_of(ip)
    assert record is not None and record.identified and record.failures == 0


def test_identity_is_reread_on_the_slow_cadence_spread_over_cycles() -> None:
    c = coordinator(poll_interval_s=60, identity_interval_s=600, min_identity_reads_per_cycle=4)
    ips = [f"127.5.0.{n}" for n in range(1, 21)]
    for ip in ips:
        c.add(ip, ident(ip), T0)
    assert not any(t.read_identity for t in c.plan(1, at(60)).tasks)
    assert c.identity_reads_per_cycle() == 4  # 2 x 20 miners / 10 cycles
    reread: list[str] = []
    for cycle in range(2, 8):
        now = at(600 + 60 * cycle)
        plan = c.plan(cycle, now)
        due = [t.ip for t in plan.tasks if t.read_identity]
        assert len(due) <= 4
        for ip in due:
            c.record(ok(ip, ident(ip)), cycle, now)
        reread += due
    assert sorted(reread, key=IPv4Address) == ips  # everyone, once, within five cycles


def test_a_changed_mac_or_model_is_noticed() -> None:
    c = coordinator()
    ip = "127.5.0.12"
    c.add(ip, ident(ip), T0)
    swapped = ident(ip, mac="02:00:00:00:00:99")
    events = c.record(ok(ip, swapped), 1, at(1))
    assert kinds(events) == ["identity_changed"]
    assert "mac 02:00:00:00:00:01 -> 02:00:00:00:00:99" in events[0].detail
    assert c.plan(2, at(2)).tasks == (Task(ip),)  # same model: the kept driver still fits
    reflashed = ident(ip, mac="02:00:00:00:00:99", firmware="vnish")
    assert kinds(c.record(ok(ip, reflashed), 2, at(2))) == ["identity_changed"]
    assert c.plan(3, at(3)).tasks == (Task(ip, rebuild=True),)
    # a MAC seen in a hot reply that differs from the record: re-read identity next cycle
    c.record(ok(ip, reflashed), 3, at(3))
    c.record(ok(ip, mac_hint="02-00-00-00-00-42"), 4, at(4))
    assert c.plan(5, at(5)).tasks == (Task(ip, read_identity=True),)
    c.record(ok(ip, reflashed), 5, at(5))
    c.record(ok(ip, mac_hint="02:00:00:00:00:99"), 6, at(6))  # same MAC, other spelling
    assert c.plan(7, at(7)).tasks == (Task(ip),)


def test_identity_changes_ignore_unreadable_values_and_mac_spelling() -> None:
    a = ident("127.5.0.1")
    assert identity_changes(None, a) == ()
    assert identity_changes(a, replace(a, serial=None)) == ()
    assert identity_changes(a, replace(a, mac="02-00-00-00-00-01")) == ()
    assert identity_changes(a, replace(a, model="Antminer S19", serial="X")) == ("model", "serial")


def test_an_unreadable_identity_is_said_once_and_retried_later_not_every_cycle() -> None:
    c = coordinator(poll_interval_s=10, identity_interval_s=100, max_backoff_cycles=3)
    ip = "127.5.0.13"
    c.add(ip, ident(ip), T0)
    c.record(Outcome(ip=ip, polled=True, reachable=True), 1, at(10))
    assert c.plan(2, at(100)).tasks == (Task(ip, read_identity=True),)
    refused = Outcome(ip=ip, polled=True, reachable=True, identity_error="auth_failed: 401")
    assert kinds(c.record(refused, 2, at(100))) == ["identity_unreadable"]
    assert c.plan(3, at(110)).tasks == (Task(ip),)
    assert c.plan(4, at(130)).tasks == (Task(ip, read_identity=True),)  # 3 cycles later
    assert c.record(refused, 4, at(130)) == []  # same reason: not said again


def test_a_scan_adds_new_miners_and_notices_vanished_ones() -> None:
    c = coordinator(gone_after_missed_scans=2)
    a, b, outside = "127.5.0.1", "127.5.0.2", "127.6.0.1"
    decision = c.apply_scan([NET], {a, b}, {a: ident(a), b: ident(b)}, {}, T0)
    assert decision.added == (a, b) and decision.events == ()
    c.add(outside, ident(outside), T0)
    gone = c.apply_scan([NET], {a}, {}, {}, at(60))
    assert gone.gone == (b,) and gone.dropped == ()
    assert kinds(list(gone.events)) == ["miner_gone"]
    assert c.ips == {a, b, outside}  # still polled: it may be rebooting
    again = c.apply_scan([NET], {a}, {}, {}, at(120))
    assert again.dropped == (b,) and kinds(list(again.events)) == ["miner_dropped"]
    assert c.ips == {a, outside}  # a miner outside the scanned networks is not judged
    back = c.apply_scan([NET], {a, b}, {b: ident(b)}, {}, at(180))
    assert back.added == (b,)


def test_a_miner_that_answers_again_before_the_second_scan_is_kept() -> None:
    c = coordinator(gone_after_missed_scans=2)
    a = "127.5.0.1"
    c.apply_scan([NET], {a}, {a: ident(a)}, {}, T0)
    c.apply_scan([NET], set(), {}, {}, at(60))
    c.apply_scan([NET], {a}, {}, {}, at(120))
    assert c.apply_scan([NET], set(), {}, {}, at(180)).gone == (a,)
    assert a in c.ips


def test_outcomes_of_dropped_miners_are_ignored() -> None:
    c = coordinator()
    assert c.record(bad("127.5.0.99"), 1, T0) == []


def test_segment_of() -> None:
    segments = [IPv4Network("127.5.0.0/24"), IPv4Network("127.5.1.0/24")]
    assert segment_of("127.5.1.7", segments) == segments[1]
    assert segment_of("127.9.0.1", segments) is None


def _obs(n: int) -> Observation:
    return Observation(
        ip=IPv4Address(f"127.5.{n // 250}.{n % 250 + 1}"), observed_at=T0, reachable=True
    )


@pytest.mark.parametrize("size", [1, 7, 1000])
def test_pack_keeps_every_item_in_order_and_identities_first(size: int) -> None:
    report = Report(
        identities=[ident(f"127.5.0.{n}").to_record(T0) for n in range(1, 6)],
        observations=[_obs(n) for n in range(23)],
        events=[Event(kind="miner_gone", at=T0, ip=IPv4Address("127.5.0.1"))],
    )
    batches = pack(report, size, T0)
    assert all(len(b.identities) + len(b.observations) + len(b.events) <= size for b in batches)
    assert len({b.batch_id for b in batches}) == len(batches)
    flat = [x for b in batches for x in (*b.identities, *b.observations, *b.events)]
    assert flat == [*report.identities, *report.observations, *report.events]
    assert pack(Report(), size, T0) == []
