"""Reconciliation of reported identities with the register: pure decisions, no database.

Every rule of ``controller.reconcile`` has a case here, plus combinations, edge cases and
properties (hypothesis): normalisation is canonical, no identity is ever lost or merged,
and reconciling the same batch twice changes nothing the second time.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contract import IdentityRecord, Observation
from controller.models import LifecycleState
from controller.reconcile import (
    FLAG_KINDS,
    Alert,
    CreateMachine,
    Decision,
    FindingKind,
    RegisterView,
    UpdateMachine,
    check_observation,
    find_missing,
    normalize_mac,
    normalize_serial,
    normalize_serials,
    observation_may_matter,
    reconcile,
)

K = FindingKind
S = LifecycleState
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
LONG_AGO = NOW - timedelta(days=2)
MAC1, MAC2, MAC3 = "aa:bb:cc:00:00:01", "aa:bb:cc:00:00:02", "aa:bb:cc:00:00:03"


def ident(ip: str, mac: str | None = None, serial: str | None = None, **kw: Any) -> IdentityRecord:
    kw.setdefault("observed_at", NOW)
    return IdentityRecord(ip=IPv4Address(ip), mac=mac, serial=serial, **kw)


def view(
    pk: int,
    mac: str | None = None,
    serial: str | None = None,
    ip: str | None = None,
    **kw: Any,
) -> RegisterView:
    kw.setdefault("lifecycle_state", S.ACTIVE)
    kw.setdefault("last_seen", LONG_AGO)
    kw.setdefault("site_id", 1)
    kw.setdefault("agent_id", "AG1")
    return RegisterView(
        machine_pk=pk,
        machine_id=f"M{pk:09d}",
        mac=mac,
        reported_serial=serial,
        current_ip=ip,
        **kw,
    )


def run(
    records: Sequence[IdentityRecord],
    views: Iterable[RegisterView] = (),
    counter: Iterator[int] | None = None,
    **kw: Any,
) -> list[Decision]:
    """``reconcile`` with deterministic new machine ids (``N000000001`` …)."""
    counter = counter or itertools.count(1)
    kw.setdefault("received_at", NOW + timedelta(seconds=5))
    kw.setdefault("site_id", 1)
    kw.setdefault("agent_id", "AG1")
    return reconcile(records, list(views), new_id=lambda: f"N{next(counter):09d}", **kw)


def creates(decisions: Iterable[Decision]) -> list[CreateMachine]:
    return [d for d in decisions if isinstance(d, CreateMachine)]


def updates(decisions: Iterable[Decision]) -> dict[str, UpdateMachine]:
    return {d.machine_id: d for d in decisions if isinstance(d, UpdateMachine)}


def alerts(decisions: Iterable[Decision]) -> list[Alert]:
    return [d for d in decisions if isinstance(d, Alert)]


def kinds(decision: CreateMachine | UpdateMachine) -> list[FindingKind]:
    return [f.kind for f in decision.findings]


def all_kinds(decisions: Iterable[Decision]) -> list[FindingKind]:
    out: list[FindingKind] = []
    for d in decisions:
        out.extend([d.finding.kind] if isinstance(d, Alert) else kinds(d))
    return out


# --- normalisation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        "aa:bb:cc:dd:ee:0f",
        "AA:BB:CC:DD:EE:0F",
        "AA-BB-CC-DD-EE-0F",
        "aabb.ccdd.ee0f",
        "AABBCCDDEE0F",
        "  aa:bb:cc:dd:ee:0f\n",
        "aa:bb:cc:dd:ee:f",
    ],
)
def test_mac_spellings_normalise_to_one_form(raw: str) -> None:
    assert normalize_mac(raw) == "aa:bb:cc:dd:ee:0f"


@pytest.mark.parametrize(
    "raw",
    [None, "", "   ", "aa:bb:cc", "zz:bb:cc:dd:ee:ff", "00:00:00:00:00:00", "FF-FF-FF-FF-FF-FF",
     "aa:bb:cc:dd:ee:ff:00", "not a mac"],
)  # fmt: skip
def test_absent_invalid_and_placeholder_macs_are_none(raw: str | None) -> None:
    assert normalize_mac(raw) is None


@pytest.mark.parametrize(
    "raw", [None, "", "   ", "unknown", "Unknown", "N/A", "none", "null", "0", "0000000", "--", "?"]
)
def test_blank_and_placeholder_serials_are_unreadable(raw: str | None) -> None:
    assert normalize_serial(raw) is None


def test_serials_are_trimmed_and_upper_cased() -> None:
    assert normalize_serial("  htm3x10b1234 ") == "HTM3X10B1234"
    assert normalize_serials(["hb1", "", "HB1", "unknown", "hb2"]) == ("HB1", "HB2")


@settings(database=None)
@given(st.integers(min_value=1, max_value=2**48 - 2), st.sampled_from([":", "-", "", "."]))
def test_mac_normalisation_is_canonical_and_idempotent(value: int, sep: str) -> None:
    digits = f"{value:012x}"
    if sep == ".":
        raw = ".".join(digits[i : i + 4] for i in range(0, 12, 4)).upper()
    else:
        raw = sep.join(digits[i : i + 2] for i in range(0, 12, 2)).upper()
    mac = normalize_mac(raw)
    if digits == "ffffffffffff":
        assert mac is None
        return
    assert mac == ":".join(digits[i : i + 2] for i in range(0, 12, 2))
    assert normalize_mac(mac) == mac


# --- new machines --------------------------------------------------------------------------------


def test_unknown_machine_is_created_as_discovered() -> None:
    decisions = run(
        [
            ident(
                "10.0.0.5",
                "AA-BB-CC-00-00-01",
                "htm3x01",
                control_board_serial="cb1",
                hashboard_serials=["hb1", "hb2", "hb3"],
                psu_serial="psu1",
                make="Bitmain",
                model="S19j Pro",
                firmware="stock",
                firmware_version="2024.01",
            )
        ]
    )
    [created] = creates(decisions)
    assert len(decisions) == 1
    fields = created.fields
    assert fields["lifecycle_state"] == S.DISCOVERED
    assert fields["machine_id"] == created.machine_id == "N000000001"
    assert fields["mac"] == MAC1
    assert fields["reported_serial"] == "HTM3X01"
    assert fields["control_board_serial"] == "CB1"
    assert fields["hashboard_serials"] == ["HB1", "HB2", "HB3"]
    assert fields["psu_serial"] == "PSU1"
    assert (fields["vendor"], fields["model"]) == ("Bitmain", "S19j Pro")
    assert (fields["firmware"], fields["firmware_version"]) == ("stock", "2024.01")
    assert fields["current_ip"] == "10.0.0.5"
    assert (fields["site_id"], fields["agent_id"]) == (1, "AG1")
    assert fields["first_seen"] == fields["last_seen"] == NOW
    assert fields["serial_unconfirmed"] is False
    assert fields["flags"] == []
    assert kinds(created) == [K.DISCOVERED]


def test_known_machine_reporting_the_same_identity_changes_only_last_seen() -> None:
    machine = view(1, MAC1, "SN1", "10.0.0.5", control_board_serial="CB1")
    [decision] = run(
        [ident("10.0.0.5", MAC1.upper(), "sn1", control_board_serial="cb1")], [machine]
    )
    assert isinstance(decision, UpdateMachine)
    assert decision.after == {} and decision.before == {}
    assert decision.findings == ()
    assert decision.last_seen == NOW


def test_clock_running_ahead_is_capped_at_reception() -> None:
    future = NOW + timedelta(hours=3)
    [created] = creates(run([ident("10.0.0.5", MAC1, "SN1", observed_at=future)]))
    assert created.fields["last_seen"] == NOW + timedelta(seconds=5)


# --- moves ---------------------------------------------------------------------------------------


def test_ip_change_is_a_move() -> None:
    [decision] = run([ident("10.0.0.9", MAC1, "SN1")], [view(1, MAC1, "SN1", "10.0.0.5")])
    assert isinstance(decision, UpdateMachine)
    assert kinds(decision) == [K.MOVED]
    assert decision.findings[0].data == {"from_ip": "10.0.0.5", "to_ip": "10.0.0.9"}
    assert decision.before == {"current_ip": "10.0.0.5"}
    assert decision.after == {"current_ip": "10.0.0.9"}


def test_machine_taking_over_an_address_releases_it_from_its_old_holder() -> None:
    a = view(1, MAC1, "SN1", "10.0.0.1")
    b = view(2, MAC2, "SN2", "10.0.0.2")
    found = updates(run([ident("10.0.0.2", MAC1, "SN1")], [a, b]))
    assert found["M000000001"].after == {"current_ip": "10.0.0.2"}
    assert found["M000000002"].after == {"current_ip": None}
    assert found["M000000002"].findings == ()


def test_two_machines_swapping_addresses_in_one_batch_both_move() -> None:
    a = view(1, MAC1, "SN1", "10.0.0.1")
    b = view(2, MAC2, "SN2", "10.0.0.2")
    found = updates(run([ident("10.0.0.2", MAC1, "SN1"), ident("10.0.0.1", MAC2, "SN2")], [a, b]))
    assert found["M000000001"].after == {"current_ip": "10.0.0.2"}
    assert found["M000000002"].after == {"current_ip": "10.0.0.1"}
    assert kinds(found["M000000001"]) == kinds(found["M000000002"]) == [K.MOVED]


def test_machine_reported_from_another_site_is_flagged() -> None:
    [decision] = run(
        [ident("10.9.0.5", MAC1, "SN1")], [view(1, MAC1, "SN1", "10.0.0.5")], site_id=2
    )
    assert isinstance(decision, UpdateMachine)
    assert set(kinds(decision)) == {K.SITE_CHANGED, K.MOVED}
    assert decision.after["site_id"] == 2


# --- swaps ---------------------------------------------------------------------------------------


def test_same_serial_with_new_mac_is_a_control_board_swap() -> None:
    old = view(1, MAC1, "SN1", "10.0.0.5", last_seen=NOW - timedelta(hours=2))
    [decision] = run([ident("10.0.0.5", MAC2, "SN1")], [old])
    assert isinstance(decision, UpdateMachine)
    assert kinds(decision) == [K.CONTROL_BOARD_SWAP]
    assert decision.findings[0].data == {"mac": [MAC1, MAC2]}
    assert decision.after == {"mac": MAC2}


def test_same_serial_with_new_control_board_serial_is_a_control_board_swap() -> None:
    old = view(1, MAC1, "SN1", "10.0.0.5", control_board_serial="CB1")
    [decision] = run([ident("10.0.0.5", MAC1, "SN1", control_board_serial="CB2")], [old])
    assert isinstance(decision, UpdateMachine)
    assert kinds(decision) == [K.CONTROL_BOARD_SWAP]
    assert decision.after == {"control_board_serial": "CB2"}


def test_new_mac_and_board_serial_make_one_swap_finding() -> None:
    old = view(1, MAC1, "SN1", "10.0.0.5", control_board_serial="CB1")
    [decision] = run([ident("10.0.0.5", MAC2, "SN1", control_board_serial="CB2")], [old])
    assert isinstance(decision, UpdateMachine)
    assert kinds(decision) == [K.CONTROL_BOARD_SWAP]
    assert decision.findings[0].data == {
        "mac": [MAC1, MAC2],
        "control_board_serial": ["CB1", "CB2"],
    }


def test_first_control_board_serial_is_recorded_without_a_swap() -> None:
    [decision] = run(
        [ident("10.0.0.5", MAC1, "SN1", control_board_serial="CB1")],
        [view(1, MAC1, "SN1", "10.0.0.5")],
    )
    assert isinstance(decision, UpdateMachine)
    assert decision.findings == ()
    assert decision.after == {"control_board_serial": "CB1"}


def test_board_moved_from_a_dead_machine_takes_its_mac_with_it() -> None:
    donor = view(1, MAC2, "SN-DONOR", "10.0.0.7", last_seen=NOW - timedelta(days=1))
    target = view(2, MAC1, "SN1", "10.0.0.5")
    found = updates(run([ident("10.0.0.5", MAC2, "SN1")], [donor, target]))
    assert kinds(found["M000000002"]) == [K.CONTROL_BOARD_SWAP]
    assert found["M000000002"].after == {"mac": MAC2}
    assert kinds(found["M000000001"]) == [K.MAC_REASSIGNED]
    assert found["M000000001"].after == {"mac": None}


def test_changed_hashboard_serials_are_a_hashboard_swap() -> None:
    old = view(1, MAC1, "SN1", "10.0.0.5", hashboard_serials=("HB1", "HB2", "HB3"))
    [decision] = run(
        [ident("10.0.0.5", MAC1, "SN1", hashboard_serials=["HB1", "HB9", "HB3"])], [old]
    )
    assert isinstance(decision, UpdateMachine)
    assert kinds(decision) == [K.HASHBOARD_SWAP]
    assert decision.findings[0].data == {"added": ["HB9"], "removed": ["HB2"]}
    assert decision.after == {"hashboard_serials": ["HB1", "HB9", "HB3"]}


def test_hashboards_in_another_order_or_one_unreadable_are_not_a_swap() -> None:
    old = view(1, MAC1, "SN1", "10.0.0.5", hashboard_serials=("HB1", "HB2", "HB3"))
    for boards in (["hb3", "hb2", "hb1"], ["HB1", "HB3"], ["HB1", "", "HB3"], []):
        [decision] = run([ident("10.0.0.5", MAC1, "SN1", hashboard_serials=boards)], [old])
        assert isinstance(decision, UpdateMachine)
        assert decision.findings == () and decision.after == {}, boards


def test_changed_psu_serial_is_a_psu_swap() -> None:
    old = view(1, MAC1, "SN1", "10.0.0.5", psu_serial="PSU1")
    [decision] = run([ident("10.0.0.5", MAC1, "SN1", psu_serial="PSU2")], [old])
    assert isinstance(decision, UpdateMachine)
    assert kinds(decision) == [K.PSU_SWAP]
    assert decision.after == {"psu_serial": "PSU2"}


def test_same_mac_with_a_new_serial_is_a_flagged_swap() -> None:
    old = view(1, MAC1, "SN1", "10.0.0.5")
    [decision] = run([ident("10.0.0.5", MAC1, "SN2")], [old])
    assert isinstance(decision, UpdateMachine)
    assert kinds(decision) == [K.SERIAL_CHANGED]
    assert decision.findings[0].severity == "warning"
    assert decision.after == {
        "reported_serial": "SN2",
        "serial_unconfirmed": True,
        "flags": [K.SERIAL_CHANGED.value],
    }


def test_serial_changing_again_while_flagged_is_recorded_again() -> None:
    old = view(
        1, MAC1, "SN2", "10.0.0.5", serial_unconfirmed=True, flags=frozenset({"serial_changed"})
    )
    [decision] = run([ident("10.0.0.5", MAC1, "SN3")], [old])
    assert isinstance(decision, UpdateMachine)
    assert kinds(decision) == [K.SERIAL_CHANGED]
    assert decision.after == {"reported_serial": "SN3"}


def test_reported_serial_matching_the_label_confirms_the_machine() -> None:
    old = view(
        1, MAC1, "CB-AS-SN", "10.0.0.5", label_serial="SN1", serial_unconfirmed=True,
        flags=frozenset({"serial_changed"}),
    )  # fmt: skip
    [decision] = run([ident("10.0.0.5", MAC1, "SN1")], [old])
    assert isinstance(decision, UpdateMachine)
    assert kinds(decision) == [K.SERIAL_CHANGED]
    assert decision.findings[0].severity == "info"
    assert decision.after == {"reported_serial": "SN1", "serial_unconfirmed": False, "flags": []}
    assert decision.resolves == {K.SERIAL_CHANGED}


def test_first_serial_read_that_differs_from_the_label_is_flagged() -> None:
    old = view(1, MAC1, None, "10.0.0.5", label_serial="SN-LABEL")
    [decision] = run([ident("10.0.0.5", MAC1, "SN-OTHER")], [old])
    assert isinstance(decision, UpdateMachine)
    assert kinds(decision) == [K.SERIAL_CHANGED]
    assert decision.after["serial_unconfirmed"] is True


def test_machine_matched_by_label_serial() -> None:
    old = view(
        1, None, None, None, label_serial="SN1", lifecycle_state=S.REGISTERED, last_seen=None
    )
    [decision] = run([ident("10.0.0.5", MAC1, "sn1")], [old])
    assert isinstance(decision, UpdateMachine)
    assert decision.machine_id == "M000000001"
    assert decision.after == {"mac": MAC1, "reported_serial": "SN1", "current_ip": "10.0.0.5"}
    assert decision.findings == ()


# --- duplicates ----------------------------------------------------------------------------------


def test_serial_on_two_macs_in_the_register_is_a_duplicate_and_not_merged() -> None:
    a = view(1, MAC1, "SN1", "10.0.0.1")
    b = view(2, MAC2, "SN1", "10.0.0.2")
    found = updates(run([ident("10.0.0.2", MAC2, "SN1")], [a, b]))
    assert set(found) == {"M000000001", "M000000002"}
    for decision in found.values():
        assert kinds(decision) == [K.DUPLICATE_SERIAL]
        assert decision.after == {"flags": ["duplicate_serial"]}
    assert found["M000000001"].findings[0].severity == "critical"


def test_serial_on_two_macs_in_one_batch_creates_two_flagged_machines() -> None:
    decisions = run([ident("10.0.0.1", MAC1, "SN1"), ident("10.0.0.2", MAC2, "SN1")])
    made = creates(decisions)
    assert [c.fields["mac"] for c in made] == [MAC1, MAC2]
    for c in made:
        assert kinds(c) == [K.DISCOVERED, K.DUPLICATE_SERIAL]
        assert c.fields["flags"] == ["duplicate_serial"]
        assert c.fields["reported_serial"] == "SN1"


def test_serial_on_a_new_mac_while_the_old_one_is_live_elsewhere_is_a_duplicate() -> None:
    live = view(1, MAC1, "SN1", "10.0.0.1", last_seen=NOW - timedelta(minutes=2))
    decisions = run([ident("10.0.0.2", MAC2, "SN1")], [live])
    [made] = creates(decisions)
    assert made.fields["mac"] == MAC2
    assert kinds(made) == [K.DISCOVERED, K.DUPLICATE_SERIAL]
    old = updates(decisions)["M000000001"]
    assert kinds(old) == [K.DUPLICATE_SERIAL]
    assert old.after == {"flags": ["duplicate_serial"]}  # its MAC and IP are untouched


def test_known_duplicate_is_not_alerted_again() -> None:
    a = view(1, MAC1, "SN1", "10.0.0.1", flags=frozenset({"duplicate_serial"}))
    b = view(2, MAC2, "SN1", "10.0.0.2", flags=frozenset({"duplicate_serial"}))
    decisions = run([ident("10.0.0.1", MAC1, "SN1"), ident("10.0.0.2", MAC2, "SN1")], [a, b])
    assert all_kinds(decisions) == []
    assert not creates(decisions)


def test_mac_on_two_serials_in_one_batch_is_a_cloned_mac() -> None:
    decisions = run([ident("10.0.0.1", MAC1, "SN1"), ident("10.0.0.2", MAC1, "SN2")])
    made = creates(decisions)
    assert [c.fields["reported_serial"] for c in made] == ["SN1", "SN2"]
    for c in made:
        assert K.DUPLICATE_MAC in kinds(c)
        assert c.fields["mac"] == MAC1


def test_new_serial_behind_a_mac_live_elsewhere_is_a_cloned_mac() -> None:
    live = view(1, MAC1, "SN1", "10.0.0.1", last_seen=NOW - timedelta(minutes=1))
    decisions = run([ident("10.0.0.2", MAC1, "SN2")], [live])
    [made] = creates(decisions)
    assert made.fields["reported_serial"] == "SN2"
    assert kinds(updates(decisions)["M000000001"]) == [K.DUPLICATE_MAC]


def test_same_batch_reporting_one_mac_twice_collapses_into_one_machine() -> None:
    decisions = run(
        [
            ident("10.0.0.2", MAC1, "SN1", observed_at=NOW),
            ident("10.0.0.1", "aa-bb-cc-00-00-01", "sn1", observed_at=NOW - timedelta(minutes=5)),
        ]
    )
    [made] = creates(decisions)
    assert len(decisions) == 1
    assert made.fields["current_ip"] == "10.0.0.2"  # the later reading wins
    assert made.fields["first_seen"] == NOW - timedelta(minutes=5)
    assert kinds(made) == [K.DISCOVERED]


def test_same_batch_moving_a_known_machine_twice_gives_one_move() -> None:
    records = [
        ident("10.0.0.2", MAC1, "SN1", observed_at=NOW - timedelta(minutes=2)),
        ident("10.0.0.3", MAC1, "SN1", observed_at=NOW),
    ]
    [decision] = run(records, [view(1, MAC1, "SN1", "10.0.0.1")])
    assert isinstance(decision, UpdateMachine)
    assert kinds(decision) == [K.MOVED]
    assert decision.findings[0].data == {"from_ip": "10.0.0.1", "to_ip": "10.0.0.3"}


def test_identical_duplicate_records_change_nothing_twice() -> None:
    record = ident("10.0.0.5", MAC1, "SN1")
    [decision] = run([record, record], [view(1, MAC1, "SN1", "10.0.0.5")])
    assert isinstance(decision, UpdateMachine)
    assert decision.after == {} and decision.findings == ()


# --- unreadable serials ------------------------------------------------------------------------


@pytest.mark.parametrize("unreadable", [None, "", "   ", "unknown", "0000000000"])
def test_unreadable_serial_matches_by_mac_and_is_flagged(unreadable: str | None) -> None:
    old = view(1, MAC1, "SN1", "10.0.0.5")
    [decision] = run([ident("10.0.0.5", MAC1, unreadable)], [old])
    assert isinstance(decision, UpdateMachine)
    assert kinds(decision) == [K.SERIAL_UNREADABLE]
    assert decision.after == {"serial_unconfirmed": True, "flags": ["serial_unreadable"]}
    assert "reported_serial" not in decision.after  # the known serial is kept


def test_unreadable_serial_is_not_alerted_again_nor_unconfirmed_after_a_technician() -> None:
    # A technician confirmed it (serial_unconfirmed cleared); the agent still cannot read it.
    old = view(
        1, MAC1, "SN1", "10.0.0.5", label_serial="SN1", flags=frozenset({"serial_unreadable"})
    )
    [decision] = run([ident("10.0.0.5", MAC1, "")], [old])
    assert isinstance(decision, UpdateMachine)
    assert decision.findings == () and decision.after == {}


def test_unreadable_serial_of_an_unknown_mac_creates_an_unconfirmed_machine() -> None:
    [made] = creates(run([ident("10.0.0.5", MAC1, "")]))
    assert made.fields["reported_serial"] is None
    assert made.fields["serial_unconfirmed"] is True
    assert kinds(made) == [K.DISCOVERED, K.SERIAL_UNREADABLE]


def test_serial_readable_again_resolves_the_alert_but_stays_unconfirmed() -> None:
    old = view(
        1, MAC1, "SN1", "10.0.0.5", serial_unconfirmed=True, flags=frozenset({"serial_unreadable"})
    )
    [decision] = run([ident("10.0.0.5", MAC1, "SN1")], [old])
    assert isinstance(decision, UpdateMachine)
    assert decision.resolves == {K.SERIAL_UNREADABLE}
    assert decision.after == {"flags": []}  # a technician still has to confirm


def test_first_readable_serial_fills_in_a_machine_known_by_mac() -> None:
    old = view(
        1, MAC1, None, "10.0.0.5", serial_unconfirmed=True, flags=frozenset({"serial_unreadable"})
    )
    [decision] = run([ident("10.0.0.5", MAC1, "SN1")], [old])
    assert isinstance(decision, UpdateMachine)
    assert decision.after == {"reported_serial": "SN1", "flags": []}
    assert decision.findings == ()


def test_record_with_neither_serial_nor_mac_is_an_alert_only() -> None:
    decisions = run([ident("10.0.0.5", "00:00:00:00:00:00", "unknown"), ident("10.0.0.5")])
    [alert] = decisions
    assert isinstance(alert, Alert)
    assert alert.finding.kind == K.IDENTITY_UNUSABLE
    assert alert.finding.ip == "10.0.0.5"


def test_identity_by_ip_alone_never_matches() -> None:
    decisions = run([ident("10.0.0.5", None, None)], [view(1, MAC1, "SN1", "10.0.0.5")])
    assert [type(d) for d in decisions] == [Alert]


# --- lifecycle -----------------------------------------------------------------------------------


def test_decommissioned_machine_reappearing_is_flagged_once() -> None:
    old = view(1, MAC1, "SN1", "10.0.0.5", lifecycle_state=S.DECOMMISSIONED)
    [decision] = run([ident("10.0.0.8", MAC1, "SN1")], [old])
    assert isinstance(decision, UpdateMachine)
    assert set(kinds(decision)) == {K.DECOMMISSIONED_REAPPEARED, K.MOVED}
    assert "lifecycle_state" not in decision.after  # only a person changes the lifecycle
    again = replace(old, current_ip="10.0.0.8", flags=frozenset({"decommissioned_reappeared"}))
    [decision] = run([ident("10.0.0.8", MAC1, "SN1")], [again])
    assert isinstance(decision, UpdateMachine)
    assert decision.findings == ()


def test_decommissioned_duplicate_loses_to_the_machine_in_service() -> None:
    retired = view(
        1,
        MAC1,
        "SN-OLD",
        "10.0.0.7",
        lifecycle_state=S.DECOMMISSIONED,
        last_seen=NOW - timedelta(minutes=1),
        flags=frozenset({"duplicate_mac"}),
    )
    live = view(2, MAC1, "SN1", "10.0.0.8", flags=frozenset({"duplicate_mac"}))
    [decision] = run([ident("10.0.0.9", MAC1, "")], [retired, live])
    assert isinstance(decision, UpdateMachine)
    assert decision.machine_id == "M000000002"


def test_missing_machine_seen_again_returns() -> None:
    old = view(1, MAC1, "SN1", "10.0.0.5", flags=frozenset({"machine_missing"}))
    [decision] = run([ident("10.0.0.5", MAC1, "SN1")], [old])
    assert isinstance(decision, UpdateMachine)
    assert kinds(decision) == [K.RETURNED]
    assert decision.resolves == {K.MISSING}
    assert decision.after == {"flags": []}


def test_firmware_change_is_recorded() -> None:
    old = view(1, MAC1, "SN1", "10.0.0.5", firmware="stock", firmware_version="1.0")
    [decision] = run(
        [ident("10.0.0.5", MAC1, "SN1", firmware="vnish", firmware_version="1.2")], [old]
    )
    assert isinstance(decision, UpdateMachine)
    assert kinds(decision) == [K.FIRMWARE_CHANGED]
    assert decision.after == {"firmware": "vnish", "firmware_version": "1.2"}


def test_records_are_taken_in_observation_order() -> None:
    records = [
        ident("10.0.0.3", MAC1, "SN1", observed_at=NOW),
        ident("10.0.0.2", MAC1, "SN1", observed_at=NOW - timedelta(minutes=1)),
    ]
    [decision] = run(records, [view(1, MAC1, "SN1", "10.0.0.1")])
    assert isinstance(decision, UpdateMachine)
    assert decision.after == {"current_ip": "10.0.0.3"}


# --- missing -------------------------------------------------------------------------------------


def test_registered_machines_unseen_for_the_threshold_go_missing() -> None:
    after = timedelta(minutes=15)
    register = [
        view(1, last_seen=NOW - timedelta(minutes=16), lifecycle_state=S.ACTIVE),
        view(2, last_seen=NOW - timedelta(minutes=15), lifecycle_state=S.REGISTERED),
        view(3, last_seen=NOW - timedelta(minutes=14, seconds=59), lifecycle_state=S.ACTIVE),
        view(4, last_seen=None, lifecycle_state=S.REGISTERED),
        view(5, last_seen=LONG_AGO, lifecycle_state=S.DISCOVERED),
        view(6, last_seen=LONG_AGO, lifecycle_state=S.MAINTENANCE),
        view(7, last_seen=LONG_AGO, lifecycle_state=S.RMA),
        view(8, last_seen=LONG_AGO, lifecycle_state=S.DECOMMISSIONED),
        view(9, last_seen=LONG_AGO, flags=frozenset({"machine_missing"})),
    ]
    missing = find_missing(register, now=NOW, after=after)
    assert [d.machine_id for d in missing] == ["M000000001", "M000000002", "M000000004"]
    for d in missing:
        assert kinds(d) == [K.MISSING]
        assert d.after == {"flags": ["machine_missing"]}


def test_missing_keeps_other_flags() -> None:
    register = [view(1, last_seen=LONG_AGO, flags=frozenset({"serial_mismatch"}))]
    [d] = find_missing(register, now=NOW, after=timedelta(minutes=15))
    assert d.after == {"flags": ["machine_missing", "serial_mismatch"]}


# --- observations --------------------------------------------------------------------------------


def obs(ip: str = "10.0.0.5", **kw: Any) -> Observation:
    kw.setdefault("observed_at", NOW)
    kw.setdefault("reachable", True)
    return Observation(ip=IPv4Address(ip), **kw)


def test_hashing_but_unregistered_is_alerted_once() -> None:
    discovered = view(1, MAC1, "SN1", "10.0.0.5", lifecycle_state=S.DISCOVERED)
    decision = check_observation(discovered, obs(is_mining=True, hashrate_ths=95.0))
    assert decision is not None
    assert kinds(decision) == [K.UNREGISTERED_HASHING]
    assert decision.findings[0].severity == "critical"
    assert decision.after == {"flags": ["unregistered_hashing"]}
    flagged = replace(discovered, flags=frozenset({"unregistered_hashing"}))
    assert check_observation(flagged, obs(is_mining=True)) is None


def test_unregistered_hashing_resolves_when_claimed_or_stopped() -> None:
    flagged = view(1, lifecycle_state=S.REGISTERED, flags=frozenset({"unregistered_hashing"}))
    decision = check_observation(flagged, obs(is_mining=True))
    assert decision is not None and decision.resolves == {K.UNREGISTERED_HASHING}
    stopped = replace(flagged, lifecycle_state=S.DISCOVERED)
    decision = check_observation(stopped, obs(is_mining=False))
    assert decision is not None and decision.resolves == {K.UNREGISTERED_HASHING}
    assert check_observation(stopped, obs(is_mining=None)) is None  # unknown: no change


def test_registered_machine_hashing_is_normal() -> None:
    assert check_observation(view(1), obs(is_mining=True)) is None


def test_decommissioned_machine_hashing_is_flagged() -> None:
    retired = view(1, lifecycle_state=S.DECOMMISSIONED)
    decision = check_observation(retired, obs(is_mining=True))
    assert decision is not None and kinds(decision) == [K.DECOMMISSIONED_REAPPEARED]


def test_missing_machine_answering_a_poll_returns() -> None:
    missing = view(1, flags=frozenset({"machine_missing"}))
    decision = check_observation(missing, obs())
    assert decision is not None
    assert kinds(decision) == [K.RETURNED] and decision.resolves == {K.MISSING}
    assert check_observation(missing, obs(reachable=False)) is None


@settings(database=None)
@given(
    st.sampled_from(list(LifecycleState)),
    st.frozensets(st.sampled_from([k.value for k in FLAG_KINDS] + ["serial_mismatch"])),
    st.booleans(),
    st.sampled_from([True, False, None]),
)
def test_observation_pre_test_never_hides_a_decision(
    state: LifecycleState, flags: frozenset[str], reachable: bool, mining: bool | None
) -> None:
    decision = check_observation(
        view(1, lifecycle_state=state, flags=flags), obs(reachable=reachable, is_mining=mining)
    )
    if not observation_may_matter(state, flags):
        assert decision is None


# --- properties ----------------------------------------------------------------------------------

SERIALS = ["SN1", "sn1 ", "SN2", "SN3", "", "unknown", None]
MACS = [MAC1, MAC1.upper().replace(":", "-"), MAC2, MAC3, None]
IPS = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]

records = st.builds(
    lambda ip, mac, serial, minutes, boards: ident(
        ip, mac, serial, observed_at=NOW - timedelta(minutes=minutes), hashboard_serials=boards
    ),
    st.sampled_from(IPS),
    st.sampled_from(MACS),
    st.sampled_from(SERIALS),
    st.integers(min_value=0, max_value=40),
    st.lists(st.sampled_from(["HB1", "HB2", "HB3"]), max_size=3),
)


def applied(register: list[RegisterView], decisions: Sequence[Decision]) -> list[RegisterView]:
    """The register after ``decisions``, as the ingestion service would leave it."""
    by_pk = {v.machine_pk: v for v in register}
    next_pk = max(by_pk, default=0) + 1
    for d in decisions:
        if isinstance(d, CreateMachine):
            f = d.fields
            by_pk[next_pk] = RegisterView(
                machine_pk=next_pk,
                machine_id=d.machine_id,
                lifecycle_state=LifecycleState.DISCOVERED,
                **{
                    k: f[k]
                    for k in (
                        "reported_serial",
                        "mac",
                        "control_board_serial",
                        "psu_serial",
                        "current_ip",
                        "site_id",
                        "agent_id",
                        "last_seen",
                        "serial_unconfirmed",
                        "vendor",
                        "model",
                        "firmware",
                        "firmware_version",
                        "hostname",
                    )
                },
                hashboard_serials=tuple(f["hashboard_serials"]),
                flags=frozenset(f["flags"]),
            )
            next_pk += 1
        elif isinstance(d, UpdateMachine):
            changes: dict[str, Any] = dict(d.after)
            if "hashboard_serials" in changes:
                changes["hashboard_serials"] = tuple(changes["hashboard_serials"])
            if "flags" in changes:
                changes["flags"] = frozenset(changes["flags"])
            if d.last_seen is not None:
                changes["last_seen"] = d.last_seen
            by_pk[d.machine_pk] = replace(by_pk[d.machine_pk], **changes)
    return list(by_pk.values())


def check_invariants(
    register: list[RegisterView], batch: list[IdentityRecord], decisions: list[Decision]
) -> None:
    touched = [d.machine_pk for d in decisions if isinstance(d, UpdateMachine)]
    assert len(touched) == len(set(touched)), "one decision per existing machine"
    ids = [v.machine_id for v in register] + [c.machine_id for c in creates(decisions)]
    assert len(ids) == len(set(ids)), "machine ids are unique"
    after = applied(register, decisions)
    macs = {v.mac for v in after}
    serials = {v.reported_serial for v in after} | {v.label_serial for v in after}
    for record in batch:
        mac, serial = normalize_mac(record.mac), normalize_serial(record.serial)
        if mac is None and serial is None:
            continue
        # Every placeable identity ends up on the register; nothing reported is dropped.
        assert mac in macs or serial in serials


@settings(max_examples=300, deadline=None, database=None)
@given(st.lists(st.lists(records, max_size=6), min_size=1, max_size=3))
def test_any_batches_keep_the_register_consistent(batches: list[list[IdentityRecord]]) -> None:
    """Even chaotic input (cloned MACs and serials, flapping reads, shared addresses)."""
    register: list[RegisterView] = []
    counter = itertools.count(1)
    for batch in batches:
        decisions = run(batch, register, counter)
        check_invariants(register, batch, decisions)
        register = applied(register, decisions)


# A fleet as it really reports: each device has its own serial and MAC; reads sometimes fail,
# spellings vary, devices move, swap boards or chassis between batches, and share addresses.
DEVICE_SERIALS = ["SN1", "SN2", "SN3", "SN4"]
DEVICE_MACS = [MAC1, MAC2, MAC3, "aa:bb:cc:00:00:04"]
SPELLINGS: list[Callable[[str], str]] = [
    str.lower,
    str.upper,
    lambda m: m.upper().replace(":", "-"),
    lambda m: m.replace(":", ""),
]


@st.composite
def fleet_batch(draw: st.DrawFn, devices: list[tuple[str, str]]) -> list[IdentityRecord]:
    batch = []
    for _ in range(draw(st.integers(min_value=1, max_value=6))):
        serial, mac = draw(st.sampled_from(devices))
        read_serial = draw(
            st.sampled_from([serial, serial.lower(), f" {serial} ", serial, "", None])
        )
        read_mac = draw(st.sampled_from([*(f(mac) for f in SPELLINGS), None]))
        batch.append(
            ident(
                draw(st.sampled_from(IPS)),
                read_mac,
                read_serial,
                observed_at=NOW - timedelta(minutes=draw(st.integers(min_value=0, max_value=40))),
                hashboard_serials=draw(
                    st.lists(st.sampled_from(["HB1", "HB2", "HB3"]), max_size=3)
                ),
                firmware=draw(st.sampled_from([None, "stock", "vnish"])),
            )
        )
    return batch


@st.composite
def fleet_history(draw: st.DrawFn) -> tuple[list[IdentityRecord], list[IdentityRecord]]:
    count = draw(st.integers(min_value=1, max_value=3))
    devices = list(zip(DEVICE_SERIALS[:count], DEVICE_MACS[:count], strict=True))
    first = draw(fleet_batch(devices))
    change = draw(st.sampled_from(["none", "board", "chassis"]))
    if change == "board":  # the first device gets a new control board (new MAC)
        devices[0] = (devices[0][0], DEVICE_MACS[count])
    elif change == "chassis":  # the first device's MAC now sits in another chassis
        devices[0] = (DEVICE_SERIALS[count], devices[0][1])
    return first, draw(fleet_batch(devices))


@settings(max_examples=400, deadline=None, database=None)
@given(fleet_history())
def test_reconciling_a_batch_again_changes_nothing(
    history: tuple[list[IdentityRecord], list[IdentityRecord]],
) -> None:
    first, second = history
    register: list[RegisterView] = []
    counter = itertools.count(1)
    for batch in (first, second):
        decisions = run(batch, register, counter)
        check_invariants(register, batch, decisions)
        register = applied(register, decisions)
    again = run(second, register, counter)
    for d in again:
        if isinstance(d, Alert):
            continue  # unplaceable identities are alerted on every report
        assert isinstance(d, UpdateMachine), d
        assert d.after == {} and d.findings == () and d.resolves == frozenset(), d


@settings(max_examples=200, deadline=None, database=None)
@given(st.lists(records, max_size=8, unique_by=lambda r: r.observed_at), st.randoms())
def test_reconcile_is_deterministic_and_independent_of_record_order(
    batch: list[IdentityRecord], rnd: Any
) -> None:
    shuffled = list(batch)
    rnd.shuffle(shuffled)
    assert run(batch) == run(shuffled)
