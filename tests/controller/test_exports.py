# ruff: noqa: E501  (tables of expected values stay one row per line)
"""Compliance exports against a known history: the register as of two dates and the compliance
report for a period, checked column by column in the CSV, the XLSX (read back with openpyxl)
and the PDF (text extracted with pypdf); then tampering with any file fails verification.

The history goes through the real paths where they exist: machines are discovered, moved and
have their control board swapped through batch ingestion (``ingest_batch``), and are claimed
and moved along their lifecycle through ``controller.register`` (its clock set per step).
The enforcement evidence (pool sets, compliance intervals, drift incidents) and observation
history are inserted directly, as the enforcement helpers would leave them.
"""

from __future__ import annotations

import csv
import io
import json
import uuid
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import openpyxl
import pytest
from pypdf import PdfReader
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from contract import IdentityRecord, ReportBatch
from controller import history_rollup, register
from controller.actors import ConsoleActor
from controller.api.deps import Principal
from controller.exports import pdf_writer
from controller.exports.compliance_report import is_unremediated, summarise_machine
from controller.exports.i18n import missing
from controller.exports.table import utc_text
from controller.ingest import ingest_batch
from controller.models import (
    Agent,
    ComplianceInterval,
    DriftIncident,
    LifecycleState,
    Machine,
    ObservationHistory,
    ObservationSum,
    PoolSet,
    PoolSetStatus,
    Role,
    Segment,
    Site,
    SitePolicy,
)
from controller.register import ClaimRequest, StateChangeRequest
from controller.settings import Settings
from tests.controller.conftest import CliInvoker, TestUser, UserFactory


def t(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


AS_OF_1 = "2026-10-12T00:00Z"
AS_OF_2 = "2026-11-01T00:00Z"
PERIOD = "2026-10-01..2026-11-01"
V1_URLS = ["stratum+tcp://dmp.example.kz:3333", "stratum+tcp://dmp2.example.kz:3333"]
V2_URLS = ["stratum+tcp://pool.dmp.kz:3333"]
S_URLS = ["stratum+tcp://s.dmp.kz:3333"]
EVIL = "stratum+tcp://evil.example.com:3333"
OWNER_N = "ТОО «Север Майнинг»"
TECH = ConsoleActor(name="tech:anna")


# --- the known history -------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = t("2026-10-01T00:00:00")

    def __call__(self) -> datetime:
        return self.now


def identity(ip: str, serial: str, mac: str, board: str, **extra: Any) -> IdentityRecord:
    return IdentityRecord(
        ip=ip,  # type: ignore[arg-type]
        observed_at=extra.pop("at"),
        mac=mac,
        serial=serial,
        serial_source="api",
        control_board_serial=board,
        hashboard_serials=extra.pop("boards", []),
        psu_serial=extra.pop("psu", None),
        make="Bitmain",
        model="Antminer S19 Pro",
        firmware="stock",
        firmware_version="2024.01",
    )


def ingest(
    engine: Engine, settings: Settings, agent: Principal, seq: int, *records: IdentityRecord
) -> None:
    now = records[0].observed_at
    with Session(engine) as session:
        batch = ReportBatch(
            batch_id=uuid.uuid4(), agent_clock=now, sequence=seq, identities=list(records)
        )
        ack = ingest_batch(session, agent, batch, settings, now=now)
        assert not ack.refused, ack.refused


def machine_id(engine: Engine, serial: str) -> str:
    with Session(engine) as session:
        m = session.exec(
            select(Machine).where(
                (col(Machine.reported_serial) == serial) | (col(Machine.label_serial) == serial)
            )
        ).one()
        return m.machine_id


@pytest.fixture
def history(engine: Engine, settings: Settings, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Builds the history; returns machine ids by letter (A, B, C, D)."""
    clock = Clock()
    monkeypatch.setattr(register, "utcnow", clock)
    with Session(engine) as session:
        north = Site(name="north", licence_number="KZ-DM-0042", owner_name=OWNER_N)
        south = Site(name="south", licence_number="KZ-DM-0077", owner_name="South LLP")
        session.add_all([north, south])
        session.flush()
        assert north.id is not None and south.id is not None
        session.add(Agent(id="AGNORTH", name="north", site_id=north.id, secret_hash="x"))
        session.flush()
        session.add(Segment(site_id=north.id, cidr="127.0.10.0/24", agent_id="AGNORTH"))
        common = {"proposed_by": "c1", "decided_by": "c2", "password": "x"}
        session.add_all(
            [
                PoolSet(site_id=north.id, version=1, name="DMP-KZ", urls=V1_URLS,
                        account="northacct", status=PoolSetStatus.SUPERSEDED,
                        decided_at=t("2026-10-01T00:00"), **common),
                PoolSet(site_id=north.id, version=2, name="DMP-KZ", urls=V2_URLS,
                        account="northacct", status=PoolSetStatus.APPROVED,
                        decided_at=t("2026-10-20T00:00"), **common),
                PoolSet(site_id=south.id, version=1, name="DMP-S", urls=S_URLS,
                        account="southacct", status=PoolSetStatus.APPROVED,
                        decided_at=t("2026-10-01T00:00"), **common),
                SitePolicy(site_id=south.id, worker_template="{account}.{serial}"),
            ]
        )  # fmt: skip
        session.commit()
        north_id, south_id = north.id, south.id
    agent = Principal(
        kind="agent", name="agent:north", agent_id="AGNORTH", site_id=north_id, source="test"
    )

    # discovered by the agent
    at = t("2026-10-01T01:00")
    ingest(
        engine,
        settings,
        agent,
        1,
        identity("127.0.10.11", "SA-0001", "aa:00:00:00:00:01", "CBA1", at=at,
                 boards=["HA1", "HA2", "HA3"], psu="PSA"),
        identity("127.0.10.12", "SB-0002", "aa:00:00:00:00:02", "CBB1", at=at),
        identity("127.0.10.13", "SC-0003", "aa:00:00:00:00:03", "CBC1", at=at),
    )  # fmt: skip
    ids = {
        k: machine_id(engine, s) for k, s in (("A", "SA-0001"), ("B", "SB-0002"), ("C", "SC-0003"))
    }
    # D: a Whatsminer in the south hall, recorded by another means (no agent there)
    from controller import machine_versions

    with Session(engine) as session:
        d = Machine(
            reported_serial="SD-1", mac="bb:00:00:00:00:04", vendor="MicroBT",
            model="Whatsminer M50", firmware="stock", firmware_version="20240101",
            site_id=south_id, current_ip="127.0.20.5", nominal_ths=118.0, nominal_w=3276.0,
            state_since=t("2026-10-01T02:00"), first_seen=t("2026-10-01T02:00"),
            updated_at=t("2026-10-01T02:00"),
        )  # fmt: skip
        session.add(d)
        session.flush()
        assert d.id is not None
        machine_versions.snapshot(session.connection(), [d.id])
        session.commit()
        ids["D"] = d.machine_id

    def claim(
        letter: str, site: str, loc: tuple[str, str, str, str], label: str, **kw: Any
    ) -> None:
        with Session(engine) as session:
            req = ClaimRequest(site=site, container=loc[0], rack=loc[1], shelf=loc[2],
                               slot=loc[3], label_serial=label, **kw)  # fmt: skip
            register.claim(session, TECH, ids[letter], req)
            session.commit()

    def state(letter: str, target: LifecycleState, reason: str = "") -> None:
        with Session(engine) as session:
            register.change_state(
                session, TECH, ids[letter], StateChangeRequest(state=target, reason=reason)
            )
            session.commit()

    clock.now = t("2026-10-02T09:00")
    claim("A", "north", ("C1", "R1", "S1", "1"), "SA-0001")
    claim("B", "north", ("C1", "R1", "S1", "2"), "SB-0002")
    claim(
        "C",
        "north",
        ("C1", "R1", "S1", "3"),
        "SC-LABEL-3",
        override_reason="label differs, checked",
    )
    claim("D", "south", ("C7", "R2", "S4", "10"), "SD-1")
    clock.now = t("2026-10-03T08:00")
    for letter in "ABCD":
        state(letter, LifecycleState.ACTIVE)
    # B moved to another address; A's control board swapped (new MAC and board serial)
    ingest(engine, settings, agent, 2,
           identity("127.0.10.22", "SB-0002", "aa:00:00:00:00:02", "CBB1", at=t("2026-10-10T12:00")))  # fmt: skip
    ingest(engine, settings, agent, 3,
           identity("127.0.10.11", "SA-0001", "aa:00:00:00:00:a1", "CBA2", at=t("2026-10-15T12:00"),
                    boards=["HA1", "HA2", "HA3"], psu="PSA"))  # fmt: skip
    clock.now = t("2026-10-20T10:00")
    state("D", LifecycleState.DECOMMISSIONED, "end of life, sold for parts")

    with Session(engine) as session:
        pk = {
            k: session.exec(select(Machine.id).where(Machine.machine_id == v)).one()
            for k, v in ids.items()
        }

        def obs(letter: str, at: str, **kw: Any) -> ObservationHistory:
            stamp = t(at)
            return ObservationHistory(machine_pk=pk[letter], bucket=int(stamp.timestamp()) // 300,
                                      observed_at=stamp, **kw)  # fmt: skip

        pools_a = [{"url": V1_URLS[0], "user": f"northacct.{ids['A']}", "status": "Alive"}]
        session.add_all(
            [
                obs("A", "2026-10-11T00:00", reachable=True, is_mining=True, hashrate_ths=100.0,
                    power_w=3000.0, pools=pools_a),
                obs("A", "2026-10-11T00:05", reachable=True, is_mining=True, hashrate_ths=110.0,
                    power_w=3100.0, pools=pools_a),
                obs("A", "2026-10-20T00:00", reachable=True, is_mining=False, hashrate_ths=0.0,
                    power_w=200.0, pools=pools_a),
                obs("B", "2026-10-11T00:00", reachable=False, error="timeout", pools=[]),
                obs("C", "2026-10-05T12:00", reachable=True, is_mining=True, hashrate_ths=95.5,
                    power_w=3250.0, pools=[{"url": EVIL, "user": "thief.1"}]),
            ]
        )  # fmt: skip

        def iv(
            letter: str,
            status: str,
            start: str,
            end: str | None,
            checked: str,
            pools: list[dict[str, str]],
            worker: str | None = None,
        ) -> ComplianceInterval:
            # as the evidence leaves it: what was judged (read-back, expected worker) and
            # the newest poll that confirmed it
            return ComplianceInterval(machine_pk=pk[letter], status=status, started_at=t(start),
                                      ended_at=t(end) if end else None, checked_at=t(checked),
                                      pools=pools,
                                      worker=worker or f"northacct.{ids[letter]}")  # fmt: skip

        def good(letter: str) -> list[dict[str, str]]:
            return [{"url": V1_URLS[0], "user": f"northacct.{ids[letter]}"}]

        d_pools = [{"url": S_URLS[0], "user": "southacct.SD-1"}]
        session.add_all(
            [
                iv("A", "compliant", "2026-10-03T08:00", "2026-10-08T00:00", "2026-10-07T23:55", good("A")),
                iv("A", "exempt", "2026-10-08T00:00", "2026-10-09T00:00", "2026-10-08T23:55", good("A")),
                iv("A", "compliant", "2026-10-09T00:00", None, "2026-10-31T23:50", good("A")),
                iv("B", "compliant", "2026-10-03T08:00", "2026-10-11T00:00", "2026-10-10T23:55", good("B")),
                iv("B", "unknown", "2026-10-11T00:00", "2026-10-11T06:00", "2026-10-11T05:55", []),
                iv("B", "compliant", "2026-10-11T06:00", None, "2026-10-31T23:50", good("B")),
                iv("C", "compliant", "2026-10-03T08:00", "2026-10-05T12:00", "2026-10-05T11:55", good("C")),
                iv("C", "non_compliant", "2026-10-05T12:00", "2026-10-05T14:00", "2026-10-05T12:00",
                   [{"url": EVIL, "user": "thief.1"}]),
                iv("C", "compliant", "2026-10-05T14:00", "2026-10-25T00:00", "2026-10-24T23:55", good("C")),
                iv("C", "non_compliant", "2026-10-25T00:00", None, "2026-10-31T23:50",
                   [{"url": EVIL, "user": "thief.1"}]),
                iv("D", "compliant", "2026-10-03T08:00", "2026-10-20T10:00", "2026-10-20T09:55", d_pools,
                   "southacct.SD-1"),
                DriftIncident(machine_pk=pk["C"], site_id=north_id, detected_at=t("2026-10-05T12:00"),
                              problems=["wrong_pool"], action="write", action_at=t("2026-10-05T12:01"),
                              verified_at=t("2026-10-05T14:00"), outcome="verified",
                              cause="pool changed on the miner", attempts=1),
                DriftIncident(machine_pk=pk["C"], site_id=north_id, detected_at=t("2026-10-25T00:00"),
                              problems=["wrong_pool"], action="write", action_at=t("2026-10-25T00:01"),
                              outcome="failed", cause="write not applied by the firmware", attempts=3),
            ]
        )  # fmt: skip
        session.commit()
    with engine.begin() as conn:  # the day sums, as ingest would have kept them
        history_rollup.rebuild(conn)
    return ids


# --- expected (the known truth) ----------------------------------------------------------------

REGISTER_KEYS = [
    "machine_id", "vendor", "model", "label_serial", "reported_serial", "serial_mismatch",
    "control_board_serial", "hashboard_serials", "psu_serial", "mac", "firmware",
    "firmware_version", "owner", "licence_number", "site", "container", "rack", "shelf", "slot",
    "ip", "nominal_ths", "nominal_w", "avg_hashrate_ths", "avg_power_w", "operating_hours",
    "approved_pool_set", "configured_pools", "worker_name", "pool_compliance", "last_pool_check",
    "lifecycle_state", "state_since", "commissioned_at", "decommissioned_at", "record_version",
]  # fmt: skip


def expected_register(ids: dict[str, str], as_of: str) -> list[dict[str, str]]:
    late = as_of == AS_OF_2
    v1 = "DMP-KZ v1: " + "; ".join(V1_URLS)
    v2 = "DMP-KZ v2: " + "; ".join(V2_URLS)
    north_set = v2 if late else v1
    base_n = {
        "vendor": "Bitmain", "model": "Antminer S19 Pro", "firmware": "stock",
        "firmware_version": "2024.01", "owner": OWNER_N, "licence_number": "KZ-DM-0042",
        "site": "north", "container": "C1", "rack": "R1", "shelf": "S1", "nominal_ths": "",
        "nominal_w": "", "approved_pool_set": north_set, "lifecycle_state": "active",
        "state_since": "2026-10-03T08:00:00Z", "commissioned_at": "2026-10-02T09:00:00Z",
        "decommissioned_at": "", "psu_serial": "", "hashboard_serials": "",
        "serial_mismatch": "no", "pool_compliance": "compliant",
    }  # fmt: skip
    a = base_n | {
        "machine_id": ids["A"], "label_serial": "SA-0001", "reported_serial": "SA-0001",
        "control_board_serial": "CBA2" if late else "CBA1",
        "hashboard_serials": "HA1; HA2; HA3", "psu_serial": "PSA",
        "mac": "aa:00:00:00:00:a1" if late else "aa:00:00:00:00:01", "slot": "1",
        "ip": "127.0.10.11", "avg_hashrate_ths": "70.00", "avg_power_w": "2100",
        "operating_hours": "0.17",
        "configured_pools": f"{V1_URLS[0]} (northacct.{ids['A']})",
        "worker_name": f"northacct.{ids['A']}",
        "last_pool_check": "2026-10-31T23:50:00Z" if late else "2026-10-11T00:05:00Z",
        "record_version": "4" if late else "3",
    }  # fmt: skip
    b = base_n | {
        "machine_id": ids["B"], "label_serial": "SB-0002", "reported_serial": "SB-0002",
        "control_board_serial": "CBB1", "mac": "aa:00:00:00:00:02", "slot": "2",
        "ip": "127.0.10.22", "avg_hashrate_ths": "", "avg_power_w": "",
        "operating_hours": "0.00", "configured_pools": f"{V1_URLS[0]} (northacct.{ids['B']})",
        "worker_name": f"northacct.{ids['B']}",
        "last_pool_check": "2026-10-31T23:50:00Z" if late else "2026-10-11T06:00:00Z",
        "record_version": "4",
    }  # fmt: skip
    c = base_n | {
        "machine_id": ids["C"], "label_serial": "SC-LABEL-3", "reported_serial": "SC-0003",
        "serial_mismatch": "yes", "control_board_serial": "CBC1", "mac": "aa:00:00:00:00:03",
        "slot": "3", "ip": "127.0.10.13", "avg_hashrate_ths": "95.50", "avg_power_w": "3250",
        "operating_hours": "0.08",
        # the read-back the status was judged on, never a poll of another judgement
        "configured_pools": f"{EVIL} (thief.1)" if late else f"{V1_URLS[0]} (northacct.{ids['C']})",
        "worker_name": f"northacct.{ids['C']}",
        "pool_compliance": "non-compliant" if late else "compliant",
        "last_pool_check": "2026-10-31T23:50:00Z" if late else "2026-10-05T14:00:00Z",
        "record_version": "3",
    }  # fmt: skip
    d = {
        "machine_id": ids["D"], "vendor": "MicroBT", "model": "Whatsminer M50",
        "label_serial": "SD-1", "reported_serial": "SD-1", "serial_mismatch": "no",
        "control_board_serial": "", "hashboard_serials": "", "psu_serial": "",
        "mac": "bb:00:00:00:00:04", "firmware": "stock", "firmware_version": "20240101",
        "owner": "South LLP", "licence_number": "KZ-DM-0077", "site": "south",
        "container": "C7", "rack": "R2", "shelf": "S4", "slot": "10", "ip": "127.0.20.5",
        "nominal_ths": "118.00", "nominal_w": "3276", "avg_hashrate_ths": "",
        "avg_power_w": "", "operating_hours": "0.00",
        "approved_pool_set": "DMP-S v1: " + S_URLS[0],
        # decommissioned: nothing judged covers the later date, so nothing is shown for it
        "configured_pools": "" if late else f"{S_URLS[0]} (southacct.SD-1)",
        "worker_name": "" if late else "southacct.SD-1",
        "pool_compliance": "unknown" if late else "compliant",
        "last_pool_check": "" if late else "2026-10-03T08:00:00Z",
        "lifecycle_state": "decommissioned" if late else "active",
        "state_since": "2026-10-20T10:00:00Z" if late else "2026-10-03T08:00:00Z",
        "commissioned_at": "2026-10-02T09:00:00Z",
        "decommissioned_at": "2026-10-20T10:00:00Z" if late else "",
        "record_version": "4" if late else "3",
    }  # fmt: skip
    return [a, b, c, d]


MACHINE_KEYS = [
    "machine_id", "site", "model", "lifecycle_state", "observed_h", "compliant_pct",
    "compliant_h", "non_compliant_h", "unknown_h", "exempt_h", "incidents", "unremediated",
    "repeat_offender",
]  # fmt: skip


def expected_compliance(
    ids: dict[str, str],
) -> tuple[list[list[str]], list[list[str]], list[list[str]]]:
    s19, m50 = "Antminer S19 Pro", "Whatsminer M50"
    machines = [
        [ids["A"], "north", s19, "active", "743.00", "92.35", "664.00", "0.00", "55.00", "24.00", "0", "0", "no"],
        [ids["B"], "north", s19, "active", "743.00", "91.79", "682.00", "0.00", "61.00", "0.00", "0", "0", "no"],
        [ids["C"], "north", s19, "active", "743.00", "69.72", "518.00", "170.00", "55.00", "0.00", "2", "1", "yes"],
        [ids["D"], "south", m50, "decommissioned", "464.00", "88.36", "410.00", "0.00", "54.00", "0.00", "0", "0", "no"],
    ]  # fmt: skip
    machines.sort(key=lambda r: (r[1], r[0]))  # the report's order: site, then machine id
    incidents = [
        [ids["C"], "north", "2026-10-05T12:00:00Z", "write", "2026-10-05T12:01:00Z",
         "2026-10-05T14:00:00Z", "remediated", "pool changed on the miner", "wrong_pool", "no"],
        [ids["C"], "north", "2026-10-25T00:00:00Z", "write", "2026-10-25T00:01:00Z", "",
         "failed", "write not applied by the firmware", "wrong_pool", "no"],
    ]  # fmt: skip
    sites = [
        ["north", "3", "2229.00", "84.54", "1864.00", "170.00", "171.00", "24.00", "2", "1", "1"],
        ["south", "1", "464.00", "88.36", "410.00", "0.00", "54.00", "0.00", "0", "0", "0"],
        ["Fleet total", "4", "2693.00", "85.20", "2274.00", "170.00", "225.00", "24.00", "2", "1", "1"],
    ]  # fmt: skip
    return machines, incidents, sites


# --- reading the files back --------------------------------------------------------------------


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    raw = path.read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf"), "UTF-8 with BOM"
    assert b"\r\n" in raw
    rows = list(csv.reader(io.StringIO(raw.decode("utf-8-sig"), newline="")))
    return rows[0], rows[1:]


def xlsx_text(value: Any, decimals: int | None) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return utc_text(value.replace(tzinfo=UTC))
    if isinstance(value, float | int) and decimals is not None:
        return f"{float(value):.{decimals}f}"
    if isinstance(value, float | int):
        return str(int(value))
    return str(value)


def read_xlsx(
    path: Path, sheet: str, decimals: dict[int, int]
) -> tuple[list[str], list[list[str]]]:
    workbook = openpyxl.load_workbook(path, read_only=False)
    ws = workbook[sheet]
    assert ws.freeze_panes == "A2"
    assert ws.auto_filter.ref is not None and ws.auto_filter.ref.startswith("A1:")
    rows = [list(r) for r in ws.iter_rows(values_only=True)]
    header = [str(v) for v in rows[0]]
    body = [[xlsx_text(v, decimals.get(i)) for i, v in enumerate(r)] for r in rows[1:]]
    return header, body


def pdf_text(path: Path) -> tuple[int, str]:
    reader = PdfReader(str(path))
    return len(reader.pages), "\n".join(page.extract_text() for page in reader.pages)


def squeeze(text: str) -> str:
    return "".join(text.split())


def assert_in_pdf(text: str, rows: list[list[str]], widths_of: Any = None) -> None:
    """Every cell of every row is in the PDF text (wrapped cells: every wrapped line)."""
    flat = squeeze(text)
    for row in rows:
        for cell in row:
            for line in pdf_writer._wrap(cell, 10_000, pdf_writer.FONT, pdf_writer.SIZE):
                assert squeeze(line) in flat, f"{line!r} not in the PDF"


@pytest.fixture
def officer(cli: CliInvoker, make_user: UserFactory, monkeypatch: pytest.MonkeyPatch) -> TestUser:
    """A compliance officer whose personal token (ASICFLEET_TOKEN) the export commands act as."""
    user = make_user(Role.COMPLIANCE, name="carla")
    monkeypatch.setenv("ASICFLEET_TOKEN", user.token)
    return user


def export(cli: CliInvoker, *args: str) -> None:
    result = cli("export", *args)
    assert result.exit_code == 0, result.output


# --- the tests ---------------------------------------------------------------------------------


@pytest.mark.usefixtures("officer")
def test_register_as_of_two_dates(cli: CliInvoker, history: dict[str, str], tmp_path: Path) -> None:
    decimals = {20: 2, 21: 0, 22: 2, 23: 0, 24: 2}
    for as_of in (AS_OF_1, AS_OF_2):
        out = tmp_path / f"register-{as_of[:10]}"
        export(cli, "register", "--as-of", as_of, "--period", PERIOD, "--out", str(out))
        expected = [[row[k] for k in REGISTER_KEYS] for row in expected_register(history, as_of)]

        header, rows = read_csv(out / "register.csv")
        assert header[0] == "Machine ID" and len(header) == len(REGISTER_KEYS)
        assert rows == expected

        xheader, xrows = read_xlsx(out / "register.xlsx", "Register", decimals)
        assert xheader == header
        assert xrows == expected
        summary = openpyxl.load_workbook(out / "register.xlsx")["Summary"]
        assert summary["A1"].value == "Machine register"

        pages, text = pdf_text(out / "register.pdf")
        assert f"Page 1 of {pages}" in text and f"Page {pages} of {pages}" in text
        assert "As of (UTC)" in text and as_of[:10] in text
        assert_in_pdf(text, expected)

        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["request"]["as_of"] == as_of.replace("Z", ":00Z")
        assert manifest["rows"] == {"register": 4}
        assert {f["name"] for f in manifest["files"]} == {
            "register.csv",
            "register.xlsx",
            "register.pdf",
        }
        assert len(manifest["audit_chain_head"]["hash"]) == 64
        ok = cli_verify(out)
        assert ok.exit_code == 0, ok.output
        assert "export intact" in ok.output


@pytest.mark.usefixtures("officer")
def test_register_filters_and_russian(
    cli: CliInvoker, history: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "south"
    export(
        cli, "register", "--as-of", AS_OF_2, "--site", "south", "--format", "csv", "--out", str(out)
    )
    _, rows = read_csv(out / "register.csv")
    assert [r[0] for r in rows] == [history["D"]]
    out = tmp_path / "decom"
    export(
        cli,
        "register",
        "--as-of",
        AS_OF_2,
        "--state",
        "decommissioned",
        "--format",
        "csv",
        "--out",
        str(out),
    )
    assert [r[0] for r in read_csv(out / "register.csv")[1]] == [history["D"]]
    out = tmp_path / "model"
    export(
        cli,
        "register",
        "--as-of",
        AS_OF_1,
        "--model",
        "Antminer S19 Pro",
        "--format",
        "csv",
        "--out",
        str(out),
    )
    assert [r[0] for r in read_csv(out / "register.csv")[1]] == [history[k] for k in "ABC"]

    out = tmp_path / "ru"
    export(cli, "register", "--as-of", AS_OF_2, "--lang", "ru", "--out", str(out))
    header, rows = read_csv(out / "register.csv")
    assert header[0] == "ID машины" and "Состояние" in header
    by_id = {r[0]: dict(zip(header, r, strict=True)) for r in rows}
    assert by_id[history["D"]]["Состояние"] == "выведена из эксплуатации"
    assert by_id[history["C"]]["Расхождение серийных номеров"] == "да"
    assert by_id[history["A"]]["Владелец"] == OWNER_N
    _, text = pdf_text(out / "register.pdf")
    assert "Реестр оборудования" in text and "Страница 1 из" in text
    assert squeeze(OWNER_N) in squeeze(text)
    assert openpyxl.load_workbook(out / "register.xlsx").sheetnames == ["Сводка", "Реестр"]


MEASURED = ["avg_hashrate_ths", "avg_power_w", "operating_hours"]


@pytest.mark.parametrize(
    ("period", "measured"),
    [
        # edges inside an hour: raw polls at both ends, hour sums, day sums between
        (
            "2026-10-11T00:03Z..2026-10-20T00:00:30Z",
            {"A": ["55.00", "1650", "0.08"], "B": ["", "", "0.00"], "C": ["", "", "0.00"]},
        ),
        # local days (+05:00): whole hours at the start, a raw quarter-hour at the end
        (
            "2026-10-05T17:00+05:00..2026-10-11T05:04+05:00",
            {
                "A": ["100.00", "3000", "0.08"],
                "B": ["", "", "0.00"],
                "C": ["95.50", "3250", "0.08"],
            },
        ),
    ],
)
@pytest.mark.usefixtures("officer")
def test_register_averages_for_periods_not_on_day_boundaries(
    cli: CliInvoker,
    history: dict[str, str],
    tmp_path: Path,
    period: str,
    measured: dict[str, list[str]],
) -> None:
    """A period edge inside a day is read from hour sums and raw polls, to the poll."""
    out = tmp_path / "register"
    export(cli, "register", "--as-of", AS_OF_2, "--period", period, "--format", "csv",
           "--out", str(out))  # fmt: skip
    _, rows = read_csv(out / "register.csv")
    at = [REGISTER_KEYS.index(k) for k in MEASURED]
    got = {row[0]: [row[i] for i in at] for row in rows}
    assert got == {history[k]: v for k, v in (measured | {"D": ["", "", "0.00"]}).items()}
    # everything else is what the whole-month export says
    month = {r["machine_id"]: r for r in expected_register(history, AS_OF_2)}
    for row in rows:
        other = [row[i] for i, k in enumerate(REGISTER_KEYS) if k not in MEASURED]
        assert other == [month[row[0]][k] for k in REGISTER_KEYS if k not in MEASURED]


def observation(ip: str, at: str, **kw: Any) -> dict[str, Any]:
    return {"ip": ip, "observed_at": t(at), **kw}


def test_ingest_keeps_the_hour_and_day_sums_equal_to_the_raw_history(
    engine: Engine, settings: Settings
) -> None:
    """Out-of-order polls, a poll into a bucket already kept, and a replayed batch: the sums
    kept at ingest equal the sums recomputed from the raw history rows."""
    with Session(engine) as session:
        site = Site(name="north", licence_number="KZ-1", owner_name="o")
        session.add(site)
        session.flush()
        assert site.id is not None
        session.add(Agent(id="AGSUMS", name="a", site_id=site.id, secret_hash="x"))
        session.flush()
        session.add(Segment(site_id=site.id, cidr="127.0.30.0/24", agent_id="AGSUMS"))
        session.commit()
        site_id = site.id
    agent = Principal(kind="agent", name="agent:a", agent_id="AGSUMS", site_id=site_id,
                      source="test")  # fmt: skip
    ingest(engine, settings, agent, 1,
           identity("127.0.30.1", "SX-1", "aa:00:00:00:30:01", "CB1", at=t("2026-10-10T23:00")),
           identity("127.0.30.2", "SX-2", "aa:00:00:00:30:02", "CB2", at=t("2026-10-10T23:00")))  # fmt: skip
    up = {"reachable": True, "is_mining": True}
    batches = [
        [observation("127.0.30.1", "2026-10-10T23:58", hashrate_ths=100.0, power_w=3000.0, **up),
         observation("127.0.30.1", "2026-10-11T00:10", hashrate_ths=90.0, power_w=2900.0, **up),
         observation("127.0.30.2", "2026-10-11T00:00", reachable=False, error="timeout"),
         observation("127.0.30.2", "2026-10-11T01:02", reachable=True, is_mining=False,
                     hashrate_ths=0.0, power_w=150.0)],
        # 00:01 falls in the bucket of 00:00 for .2 (kept already: dropped, not counted);
        # 00:04 for .1 is older than its latest poll but in a new bucket (kept and counted)
        [observation("127.0.30.2", "2026-10-11T00:01", hashrate_ths=500.0, power_w=9000.0, **up),
         observation("127.0.30.1", "2026-10-11T00:04", hashrate_ths=80.0, **up),
         observation("127.0.30.1", "2026-10-11T00:11", hashrate_ths=1.0, power_w=1.0, **up),
         observation("127.0.30.1", "2026-10-12T00:00", hashrate_ths=70.0, power_w=2800.0, **up)],
    ]  # fmt: skip
    for seq, items in enumerate(batches, start=2):
        batch = ReportBatch(batch_id=uuid.uuid4(), agent_clock=t("2026-10-12T00:00"),
                            sequence=seq, observations=items)  # fmt: skip
        for _ in range(2):  # delivered twice: the second is a duplicate and adds nothing
            with Session(engine) as session:
                ingest_batch(session, agent, batch, settings, now=t("2026-10-12T00:01"))

    def stored() -> dict[tuple[int, int, int], tuple[Any, ...]]:
        with engine.connect() as conn:
            rows = conn.execute(select(ObservationSum)).all()
        return {(r.machine_pk, r.span_s, r.start_s): tuple(r)[3:] for r in rows}

    kept = stored()
    with engine.begin() as conn:
        history_rollup.rebuild(conn)
    assert kept == stored()
    with Session(engine) as session:
        pks = {m.reported_serial: m.id for m in session.exec(select(Machine))}
    day = int(t("2026-10-11T00:00").timestamp())
    # .1 on 11 Oct: 00:04, 00:10 (00:11 shares 00:10's bucket); .2: 00:00 (down) and 01:02
    assert kept[(pks["SX-1"], 86400, day)] == (2, 2, 170.0, 2, 2900.0, 1)
    assert kept[(pks["SX-2"], 86400, day)] == (2, 0, 0.0, 1, 150.0, 1)
    assert kept[(pks["SX-2"], 3600, day)] == (1, 0, 0.0, 0, 0.0, 0)
    assert kept[(pks["SX-1"], 3600, day - 3600)] == (1, 1, 100.0, 1, 3000.0, 1)


@pytest.mark.usefixtures("officer")
def test_compliance_report_for_a_period(
    cli: CliInvoker, history: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "compliance"
    export(cli, "compliance", "--period", PERIOD, "--repeat-threshold", "2", "--out", str(out))
    machines, incidents, sites = expected_compliance(history)
    header, rows = read_csv(out / "compliance_machines.csv")
    assert len(header) == len(MACHINE_KEYS)
    assert rows == machines
    assert read_csv(out / "compliance_incidents.csv")[1] == incidents
    assert read_csv(out / "compliance_sites.csv")[1] == sites

    book = out / "compliance.xlsx"
    assert read_xlsx(book, "Machines", dict.fromkeys(range(4, 10), 2))[1] == machines
    assert read_xlsx(book, "Incidents", {})[1] == incidents
    assert read_xlsx(book, "Sites", dict.fromkeys(range(2, 8), 2))[1] == sites
    totals = {
        r[0]: r[1]
        for r in openpyxl.load_workbook(book)["Summary"].iter_rows(values_only=True)
        if r[0]
    }
    assert totals["Machines"] == 4 and totals["Repeat offenders"] == 1
    assert (
        totals["Unremediated incidents"] == 1 and totals["Fleet time in compliance, %"] == "85.20"
    )

    pages, text = pdf_text(out / "compliance.pdf")
    assert f"Page {pages} of {pages}" in text and "Period (UTC)" in text
    assert_in_pdf(text, machines + incidents + sites)
    assert cli_verify(out).exit_code == 0


def test_compliance_arithmetic() -> None:
    """Uncovered time is unknown; intervals are clipped to the window."""
    w = (t("2026-10-01T00:00"), t("2026-10-02T00:00"))
    s = summarise_machine(
        w,
        [
            ("compliant", t("2026-09-30T00:00"), t("2026-10-01T06:00")),
            ("exempt", t("2026-10-01T06:00"), t("2026-10-01T12:00")),
            ("non_compliant", t("2026-10-01T18:00"), None),
        ],
    )
    assert (
        s.hours("compliant"),
        s.hours("exempt"),
        s.hours("non_compliant"),
        s.hours("unknown"),
    ) == (6, 6, 6, 6)
    assert s.compliant_pct == pytest.approx(33.33)
    assert is_unremediated("verified", t("2026-10-03T00:00"), t("2026-10-02T00:00"))
    assert not is_unremediated("verified", t("2026-10-01T00:00"), t("2026-10-02T00:00"))
    assert is_unremediated("open", None, t("2026-10-02T00:00"))
    assert missing("ru") == []


# --- verification and tampering ----------------------------------------------------------------


@pytest.fixture
def cli_verify_factory() -> Iterator[Any]:
    yield cli_verify


def cli_verify(path: Path, *args: str) -> Any:
    from typer.testing import CliRunner

    from asicfleet.cli import app

    return CliRunner().invoke(app, ["verify-export", str(path), *args])


def public_key_file(cli: CliInvoker, tmp_path: Path) -> Path:
    result = cli("export", "public-key")
    assert result.exit_code == 0 and "BEGIN PUBLIC KEY" in result.output
    path = tmp_path / "controller.pub"
    path.write_text(result.output)
    return path


def fresh_copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
@pytest.mark.usefixtures("officer")
def test_tampering_fails_verification(
    cli: CliInvoker, history: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "export"
    export(cli, "register", "--as-of", AS_OF_2, "--out", str(out), "--zip")
    key = public_key_file(cli, tmp_path)
    good = cli_verify(out, "--public-key", str(key))
    assert good.exit_code == 0 and "note:" not in good.output, good.output
    assert cli_verify(tmp_path / "export.zip", "--public-key", str(key)).exit_code == 0
    unpinned = cli_verify(out)
    assert unpinned.exit_code == 0 and "embedded in the manifest" in unpinned.output

    # one changed cell of the CSV
    case = fresh_copy(out, tmp_path / "cell")
    text = (case / "register.csv").read_text(encoding="utf-8-sig")
    (case / "register.csv").write_text(text.replace("SC-LABEL-3", "SC-0003"), encoding="utf-8-sig")
    bad = cli_verify(case, "--public-key", str(key))
    assert bad.exit_code == 1 and "register.csv: content changed" in bad.output

    # one byte of the XLSX and of the PDF
    for name in ("register.xlsx", "register.pdf"):
        case = fresh_copy(out, tmp_path / f"byte-{name}")
        data = bytearray((case / name).read_bytes())
        data[len(data) // 2] ^= 0x01
        (case / name).write_bytes(bytes(data))
        bad = cli_verify(case, "--public-key", str(key))
        assert bad.exit_code == 1 and f"{name}: content changed" in bad.output

    # a missing file, an added file
    case = fresh_copy(out, tmp_path / "missing")
    (case / "register.pdf").unlink()
    bad = cli_verify(case, "--public-key", str(key))
    assert bad.exit_code == 1 and "register.pdf: missing" in bad.output
    case = fresh_copy(out, tmp_path / "added")
    (case / "notes.txt").write_text("x")
    assert "notes.txt: not listed" in cli_verify(case, "--public-key", str(key)).output

    # the manifest: a changed row count, and hashes rewritten to match a changed file
    case = fresh_copy(out, tmp_path / "manifest")
    manifest = json.loads((case / "manifest.json").read_text())
    manifest["rows"]["register"] = 3
    (case / "manifest.json").write_text(json.dumps(manifest))
    bad = cli_verify(case, "--public-key", str(key))
    assert bad.exit_code == 1 and "signature does not match" in bad.output

    # re-signed with another key: fails when the controller's key is pinned
    from controller.exports.manifest import write_manifest
    from controller.signing import load_or_create

    case = fresh_copy(out, tmp_path / "resigned")
    (case / "register.csv").write_text("forged\r\n", encoding="utf-8-sig")
    (case / "manifest.json").unlink()
    body = {
        k: v
        for k, v in manifest.items()
        if k not in ("files", "signature", "public_key", "key_fingerprint")
    }
    write_manifest(case, body, load_or_create(tmp_path / "attacker"))
    bad = cli_verify(case, "--public-key", str(key))
    assert bad.exit_code == 1 and "not with the given public key" in bad.output

    # the zip, one byte changed inside
    with (
        zipfile.ZipFile(tmp_path / "export.zip") as src,
        zipfile.ZipFile(tmp_path / "bad.zip", "w") as dst,
    ):
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("register.csv"):
                data = data.replace(b"north", b"nortH", 1)
            dst.writestr(item, data)
    assert cli_verify(tmp_path / "bad.zip", "--public-key", str(key)).exit_code == 1

    # the zip file itself, one raw byte flipped (a damaged CRC, not a clean rewrite)
    raw = bytearray((tmp_path / "export.zip").read_bytes())
    raw[len(raw) // 3] ^= 0x01
    (tmp_path / "flipped.zip").write_bytes(bytes(raw))
    flipped = cli_verify(tmp_path / "flipped.zip", "--public-key", str(key))
    assert flipped.exit_code == 1 and isinstance(flipped.exception, SystemExit), flipped.output
    assert "unreadable" in flipped.output or "content changed" in flipped.output

    # a manifest whose fields have the wrong types: a failed check in --json, not a crash
    case = fresh_copy(out, tmp_path / "types")
    odd = json.loads((case / "manifest.json").read_text())
    odd["request"], odd["files"] = "register", {"name": "register.csv"}
    (case / "manifest.json").write_text(json.dumps(odd))
    typed = cli_verify(case, "--public-key", str(key), "--json")
    assert typed.exit_code == 1 and isinstance(typed.exception, SystemExit), typed.output
    assert json.loads(typed.stdout)["ok"] is False

    # usage errors: exit 2
    assert cli_verify(tmp_path / "nowhere").exit_code == 2
    assert cli_verify(out, "--public-key", str(tmp_path / "none.pem")).exit_code == 2


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
@pytest.mark.usefixtures("officer")
def test_audit_log_export_is_verifiable(
    cli: CliInvoker, history: dict[str, str], tmp_path: Path
) -> None:
    out = tmp_path / "audit"
    export(cli, "audit", "--out", str(out))
    manifest = json.loads((out / "manifest.json").read_text())
    head = manifest["audit_chain_head"]
    assert head["seq"] > 5
    _, rows = read_csv(out / "audit_log.csv")
    assert len(rows) == head["seq"] and rows[-1][-1] == head["hash"]
    assert cli_verify(out).exit_code == 0

    # rewrite one entry and re-sign with another key: the chain check still catches it
    data = json.loads((out / "audit_log.json").read_text())
    data["entries"][1]["actor"] = "someone-else"
    case = tmp_path / "audit-edited"
    case.mkdir()
    (case / "audit_log.json").write_text(json.dumps(data))
    from controller.exports.manifest import write_manifest
    from controller.signing import load_or_create

    body = {
        k: v
        for k, v in manifest.items()
        if k not in ("files", "signature", "public_key", "key_fingerprint")
    }
    write_manifest(case, body, load_or_create(tmp_path / "other"))
    bad = cli_verify(case)
    assert bad.exit_code == 1 and "chain broken at entry 2: modified" in bad.output


@pytest.mark.usefixtures("officer")
def test_bad_requests_are_usage_errors(cli: CliInvoker, engine: Engine, tmp_path: Path) -> None:
    cases = [
        (["register", "--as-of", "yesterday", "--out", str(tmp_path / "a")], "expected an ISO 8601 time"),
        (["register", "--as-of", "2026-11-01T00:00", "--out", str(tmp_path / "a")], "no time zone"),
        (["register", "--as-of", AS_OF_2, "--format", "docx", "--out", str(tmp_path / "a")], "docx"),
        (["register", "--as-of", AS_OF_2, "--lang", "de", "--out", str(tmp_path / "a")], "--lang"),
        (["register", "--as-of", AS_OF_2, "--state", "lost", "--out", str(tmp_path / "a")], "--state"),
        (["register", "--as-of", AS_OF_2, "--site", "nowhere", "--out", str(tmp_path / "a")], "no site named"),
        (["compliance", "--period", "2026-11-01..2026-10-01", "--out", str(tmp_path / "b")], "FROM must be before TO"),
        (["compliance", "--period", "2026-10-01", "--out", str(tmp_path / "b")], "expected FROM..TO"),
    ]  # fmt: skip
    for args, message in cases:
        result = cli("export", *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    result = cli("export", "register", "--as-of", AS_OF_2, "--out", str(busy))
    assert result.exit_code == 2 and "not empty" in result.output


# --- the API -----------------------------------------------------------------------------------


def test_api_runs_exports_in_the_background_for_auditors_only(
    app_client: Any, make_user: Any, history: dict[str, str], tmp_path: Path
) -> None:

    inspector = make_user(Role.INSPECTOR).headers
    body = {
        "kind": "register",
        "formats": ["csv", "xlsx"],
        "as_of": AS_OF_1,
        "period": PERIOD,
        "lang": "ru",
    }
    for role in (Role.TECHNICIAN, Role.OPERATOR, Role.ADMIN):
        denied = app_client.post("/api/v1/exports", json=body, headers=make_user(role).headers)
        assert denied.status_code == 403
    started = app_client.post("/api/v1/exports", json=body, headers=inspector)
    assert started.status_code == 202, started.text
    job_id = started.json()["id"]
    job = app_client.get(f"/api/v1/exports/{job_id}", headers=inspector).json()
    assert job["status"] == "done", job
    assert job["progress"] == 1.0 and job["rows"] == {"register": 4}
    assert [j["id"] for j in app_client.get("/api/v1/exports", headers=inspector).json()] == [
        job_id
    ]
    download = app_client.get(job["download_url"], headers=inspector)
    assert download.status_code == 200 and download.headers["content-type"] == "application/zip"
    (tmp_path / "api.zip").write_bytes(download.content)
    assert cli_verify(tmp_path / "api.zip").exit_code == 0
    with zipfile.ZipFile(tmp_path / "api.zip") as archive:
        manifest = json.loads(archive.read("export/manifest.json"))
    assert manifest["requested_by"]["name"] == job["requested_by"]
    assert manifest["request"]["lang"] == "ru"

    bad = app_client.post("/api/v1/exports", json={**body, "as_of": "soon"}, headers=inspector)
    assert bad.status_code == 422 and "ISO 8601" in bad.json()["detail"]
    bad = app_client.post(
        "/api/v1/exports", json={"kind": "compliance", "formats": ["csv"]}, headers=inspector
    )
    assert bad.status_code == 422 and "needs --period" in bad.json()["detail"]
    bad = app_client.post("/api/v1/exports", json={**body, "site": "atlantis"}, headers=inspector)
    assert bad.status_code == 422 and bad.json()["detail"] == "no site 'atlantis'"
    assert (
        app_client.get("/api/v1/exports/0123456789abcdef01234567", headers=inspector).status_code
        == 404
    )


@pytest.mark.usefixtures("officer")
def test_compliance_status_and_export_count_the_same_window(
    cli: CliInvoker, history: dict[str, str], tmp_path: Path
) -> None:
    """One period string, one window: TO is excluded by both commands (docs/controller.md,
    "Times and periods"). The second incident opens at 00:00 on the TO day, so a command that
    took a bare-date TO as the whole day (the old `compliance status` rule) would count it."""
    period = "2026-10-01..2026-10-25"
    out = tmp_path / "cmp"
    export(cli, "compliance", "--period", period, "--format", "csv", "--out", str(out))
    manifest = json.loads((out / "manifest.json").read_text())
    incidents = read_csv(out / "compliance_incidents.csv")[1]
    status = cli("compliance", "status", "--period", period, "--json")
    assert status.exit_code == 0, status.output
    report = json.loads(status.output)
    window = {"from": "2026-10-01T00:00:00Z", "to": "2026-10-25T00:00:00Z"}
    assert manifest["request"]["period"] == window
    assert {"from": report["start"], "to": report["end"]} == window
    assert [row[2] for row in incidents] == ["2026-10-05T12:00:00Z"]
    assert report["fleet"]["incidents_opened"] == len(incidents) == 1
    machines = read_csv(out / "compliance_machines.csv")[1]
    assert report["fleet"]["machines_tracked"] == len(machines) == 4
