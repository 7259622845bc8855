"""decide(policy, view, now): every branch, no network."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.drivers.base import PoolTarget
from agent.enforce.decide import (
    CannotEnforce,
    Compliant,
    Exempt,
    MachineIndex,
    MinerView,
    Quarantine,
    Quarantined,
    Release,
    Unknown,
    WritePools,
    decide,
)
from agent.enforce.executor import retry_in_cycles, wave_sizes, waves_of
from agent.enforce.quarantine import QuarantineRecord
from contract.policy import (
    ApprovedPoolSet,
    DevFeePolicy,
    EnforcementMode,
    MachinePolicy,
    PolicyContent,
)
from contract.reports import PoolReading

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
URLS = ["stratum+tcp://btc.dmp.example:3333", "stratum+tcp://btc-backup.dmp.example:3333"]
FOREIGN = "stratum+tcp://pool.hijack.example:3333"
WORKER = "kzfarm01.M0001"
SERIAL = "SN-0001"
MAC = "B4:A2:EB:13:2C:DE"


def pool_set(**changes: Any) -> ApprovedPoolSet:
    values: dict[str, Any] = {"name": "DMP Alpha", "urls": URLS, "account": "kzfarm01"}
    values.update(changes)
    return ApprovedPoolSet(**values)


def machine(**changes: Any) -> MachinePolicy:
    values: dict[str, Any] = {"machine_id": "M0001", "serial": SERIAL, "mac": MAC}
    values.update(worker=WORKER)
    values.update(changes)
    return MachinePolicy(**values)


def policy(*machines: MachinePolicy, **changes: Any) -> PolicyContent:
    values: dict[str, Any] = {
        "site": "kz-1",
        "mode": EnforcementMode.ENFORCE,
        "pool_set": pool_set(),
        "machines": list(machines) or [machine()],
    }
    values.update(changes)
    return PolicyContent(**values)


def readings(*pairs: tuple[str, str], devfee: bool = False) -> tuple[PoolReading, ...]:
    out = [PoolReading(url=url, user=user, kind="user") for url, user in pairs]
    if devfee:
        out.append(PoolReading(url="DevFee", user="DevFee", kind="devfee"))
    return tuple(out)


GOOD = readings((URLS[0], WORKER), (URLS[1], WORKER))


def view(**changes: Any) -> MinerView:
    values: dict[str, Any] = {
        "ip": "127.0.0.10",
        "serial": SERIAL,
        "mac": MAC,
        "family": "antminer_stock",
        "pools": GOOD,
        "is_mining": True,
        "pool_slots": 3,
    }
    values.update(changes)
    return MinerView(**values)


def test_compliant() -> None:
    decision = decide(policy(), view(), NOW)
    assert isinstance(decision, Compliant) and decision.machine.machine_id == "M0001"


def test_foreign_pool_is_written_with_exact_targets_in_slot_order() -> None:
    decision = decide(policy(), view(pools=readings((FOREIGN, "thief.1"))), NOW)
    assert isinstance(decision, WritePools)
    assert decision.targets == (PoolTarget(URLS[0], WORKER, "x"), PoolTarget(URLS[1], WORKER, "x"))
    assert decision.worker == WORKER
    assert any(FOREIGN in p for p in decision.problems)


def test_slot_order_matters() -> None:
    swapped = readings((URLS[1], WORKER), (URLS[0], WORKER))
    decision = decide(policy(), view(pools=swapped), NOW)
    assert isinstance(decision, WritePools)
    assert [t.url for t in decision.targets] == URLS


def test_wrong_worker_only() -> None:
    decision = decide(policy(), view(pools=readings((URLS[0], "x.1"), (URLS[1], "x.1"))), NOW)
    assert isinstance(decision, WritePools)
    assert all("worker" in p for p in decision.problems)


def test_hidden_extra_pool_is_a_violation() -> None:
    hidden = (*GOOD, PoolReading(url=FOREIGN, user="thief.1", kind="user"))
    decision = decide(policy(), view(pools=hidden), NOW)
    assert isinstance(decision, WritePools)
    assert decision.problems == (f"slot 3: unapproved pool {FOREIGN}",)


def test_url_spelling_is_canonical() -> None:
    spelled = readings(("BTC.DMP.example:3333/", WORKER), (URLS[1], WORKER))
    assert isinstance(decide(policy(), view(pools=spelled), NOW), Compliant)


def test_devfee_allowed_is_compliant_and_classified() -> None:
    decision = decide(policy(), view(family="vnish", pools=readings(*_good(), devfee=True)), NOW)
    assert isinstance(decision, Compliant) and decision.devfee_pools == ("DevFee",)


def test_devfee_forbidden_cannot_be_enforced_by_a_write() -> None:
    strict = policy(pool_set=pool_set(devfee=DevFeePolicy.FORBID))
    decision = decide(strict, view(family="vnish", pools=readings(*_good(), devfee=True)), NOW)
    assert isinstance(decision, CannotEnforce)
    assert decision.capability == "remove_devfee" and "fee pool" in decision.reason


def test_devfee_forbidden_but_user_pools_wrong_is_still_written() -> None:
    strict = policy(pool_set=pool_set(devfee=DevFeePolicy.FORBID))
    wrong = readings((FOREIGN, "thief"), devfee=True)
    assert isinstance(decide(strict, view(family="vnish", pools=wrong), NOW), WritePools)


def test_firmware_without_pool_writes_names_the_capability() -> None:
    decision = decide(
        policy(),
        view(pools=readings((FOREIGN, "t")), can_set_pools=False, family="braiins"),
        NOW,
    )
    assert isinstance(decision, CannotEnforce) and decision.capability == "can_set_pools"
    assert "braiins" in decision.reason


def test_too_few_pool_slots() -> None:
    decision = decide(policy(), view(pools=readings((FOREIGN, "t")), pool_slots=1), NOW)
    assert isinstance(decision, CannotEnforce) and decision.capability == "pool_slots"


def test_exemption_and_its_expiry() -> None:
    exempt = policy(machine(exempt_until=NOW + timedelta(hours=1), exempt_reason="repair"))
    bad = view(pools=readings((FOREIGN, "t")))
    decision = decide(exempt, bad, NOW)
    assert isinstance(decision, Exempt) and decision.reason == "repair"
    assert isinstance(decide(exempt, bad, NOW + timedelta(hours=1)), WritePools)  # expired


def test_missing_pool_set_is_unknown() -> None:
    decision = decide(policy(pool_set=None), view(pools=readings((FOREIGN, "t"))), NOW)
    assert isinstance(decision, Unknown) and "pool set" in decision.reason


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"reachable": False, "pools": None}, "unreachable"),
        ({"pools": None}, "pools could not be read"),
        ({"serial": "SN-OTHER", "mac": "00:11:22:33:44:55"}, "not in the policy"),
    ],
)
def test_unknown(changes: dict[str, Any], reason: str) -> None:
    decision = decide(policy(), view(**changes), NOW)
    assert isinstance(decision, Unknown) and reason in decision.reason


def test_no_policy_is_unknown() -> None:
    assert isinstance(decide(None, view(), NOW), Unknown)


def test_found_by_mac_when_no_serial() -> None:
    avalon = policy(machine(serial=None, mac="b4-a2-eb-13-2c-de"))
    decision = decide(avalon, view(serial=None), NOW)
    assert isinstance(decision, Compliant)


def test_empty_pools_read_are_written() -> None:
    decision = decide(policy(), view(pools=()), NOW)
    assert isinstance(decision, WritePools) and "no pool configured" in decision.problems


def test_quarantine_unregistered_hashing() -> None:
    site = policy(machine(registered=False), quarantine_unregistered=True)
    assert isinstance(decide(site, view(), NOW), Quarantine)
    assert isinstance(decide(site, view(is_mining=False, quarantined=True), NOW), Quarantined)
    no_sleep = decide(site, view(can_sleep=False), NOW)
    assert isinstance(no_sleep, CannotEnforce) and no_sleep.capability == "can_sleep"


def test_unregistered_without_quarantine_is_judged_on_pools() -> None:
    site = policy(machine(registered=False), quarantine_unregistered=False)
    assert isinstance(decide(site, view(), NOW), Compliant)


def test_release_when_registered_or_quarantine_off() -> None:
    assert isinstance(decide(policy(), view(is_mining=False, quarantined=True), NOW), Release)
    off = policy(machine(registered=False), quarantine_unregistered=False)
    assert isinstance(decide(off, view(is_mining=False, quarantined=True), NOW), Release)


def test_observe_mode_decides_the_same() -> None:
    observe = policy(mode=EnforcementMode.OBSERVE)
    assert isinstance(decide(observe, view(pools=readings((FOREIGN, "t"))), NOW), WritePools)


def test_index_is_equivalent() -> None:
    site = policy(machine(), machine(machine_id="M0002", serial="SN-0002", mac=None))
    index = MachineIndex.of(site.machines)
    decision = decide(site, view(serial="sn-0002", mac=None), NOW, index=index)
    assert isinstance(decision, Compliant) and decision.machine.machine_id == "M0002"


def _good() -> list[tuple[str, str]]:
    return [(URLS[0], WORKER), (URLS[1], WORKER)]


# --- the pure schedules of the executor: backoff and rollout waves -----------------------------


def test_retry_backoff_doubles_from_one_cycle_up_to_the_cap() -> None:
    assert [retry_in_cycles(n, 64) for n in range(1, 10)] == [1, 2, 4, 8, 16, 32, 64, 64, 64]
    assert [retry_in_cycles(n, 5) for n in range(1, 6)] == [1, 2, 4, 5, 5]
    assert retry_in_cycles(0, 64) == 1 and retry_in_cycles(1, 0) == 1  # never "now"
    assert retry_in_cycles(10_000, 64) == 64  # no overflow however long it keeps failing


@pytest.mark.parametrize(
    ("total", "canary", "sizes"),
    [
        (0, 10, []),
        (7, 10, [7]),
        (10, 10, [10]),
        (11, 10, [10, 1]),
        (20, 2, [2, 8, 10]),
        (20, 1, [1, 4, 8, 7]),
        (1000, 10, [10, 40, 80, 160, 320, 390]),
    ],
)
def test_rollout_waves_grow_after_the_canary(total: int, canary: int, sizes: list[int]) -> None:
    assert wave_sizes(total, canary) == sizes
    items = list(range(total))
    assert [list(w) for w in waves_of(items, canary)] == [
        items[sum(sizes[:n]) : sum(sizes[: n + 1])] for n in range(len(sizes))
    ]


# --- the quarantine record ----------------------------------------------------------------------


def test_quarantine_record_survives_and_knows_the_machine_not_the_address(
    tmp_path: Path,
) -> None:
    path = tmp_path / "quarantine.json"
    record = QuarantineRecord(path)
    record.add("127.0.0.5", "SN-0001", "AA:BB:CC:00:00:01", "M0001", NOW)
    record.add("127.0.0.6", None, "aa-bb-cc-00-00-02", "M0002", NOW)  # Avalon: MAC only
    record.save()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    again = QuarantineRecord(path)  # a restart
    assert again.holds("127.0.0.5", "sn-0001", None)
    assert again.holds("127.0.0.99", "SN-0001", "AA:BB:CC:00:00:01")  # moved address
    assert not again.holds("127.0.0.5", "SN-9999", "AA:BB:CC:00:00:09")  # another miner there
    assert again.holds("127.0.0.6", None, "AA:BB:CC:00:00:02")
    again.remove("127.0.0.99", "SN-0001", None)
    again.save()
    record.reload()  # another process (a one-shot run) changed it: seen on the next pass
    assert not record.holds("127.0.0.5", "SN-0001", None) and len(record) == 1


def test_a_damaged_quarantine_record_is_logged_not_fatal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "quarantine.json"
    path.write_text("{not json")
    assert len(QuarantineRecord(path)) == 0
    assert "not a quarantine record" in caplog.text
