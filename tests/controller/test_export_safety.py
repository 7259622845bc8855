# ruff: noqa: E501, F811  (tables stay one case per line; ``history`` is a shared fixture)
"""Exports that are safe to open and to verify, and that never count what did not happen.

- Miner-supplied text (a serial, a pool URL, a worker) that a spreadsheet would run as a
  formula reaches the CSV neutralised (OWASP: a leading ``'``) and the XLSX as a plain
  string cell, never a formula; the value itself is kept.
- ``verify-export`` refuses, each with its own message: a symbolic link standing in for a
  listed file, a sub-folder, a zip entry outside the export folder, a duplicate entry (a
  tampered copy placed before the original), ``..``, absolute and backslash paths, and a
  symbolic link inside the zip.
- A future ``--as-of`` or a period not begun is refused; a period ending later is counted
  up to now and says so; an empty export says why.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import stat
import uuid
import zipfile
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import openpyxl
import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session

from contract import IdentityRecord, Observation, PoolReading, ReportBatch
from controller.api.deps import Principal
from controller.exports.csv_writer import neutralise
from controller.ingest import ingest_batch
from controller.models import Agent, PoolSet, PoolSetStatus, Segment, Site
from controller.settings import Settings
from tests.controller.conftest import CliInvoker
from tests.controller.test_exports import cli_verify, history, officer, read_csv  # noqa: F401

HOSTILE_SERIAL = '=HYPERLINK("HTTP://EVIL.EXAMPLE/X","SERIAL")'  # serials are kept upper-case
HOSTILE_URL = "-2+3+cmd|' /C calc'!A0"
HOSTILE_WORKER = "@SUM(1+1)*cmd|' /C calc'!A0"
T0 = datetime(2026, 6, 1, 8, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _exports_act_as_an_officer(request: pytest.FixtureRequest) -> None:
    """Exports are attributed: the CLI acts as a compliance officer's personal token."""
    if "cli" in request.fixturenames:
        request.getfixturevalue("officer")


def test_neutralise_follows_the_owasp_rule() -> None:
    for start in ("=", "+", "-", "@", "\t", "\r"):
        assert neutralise(f"{start}1+1") == f"'{start}1+1"
    for safe in ("stratum+tcp://a:1", "kzfarm.M1", "", " =1", "1-2"):
        assert neutralise(safe) == safe


@pytest.fixture
def hostile_machine(engine: Engine, settings: Settings) -> str:
    """A machine whose agent reported a formula for a serial and for its pool and worker."""
    with Session(engine) as session:
        site = Site(name="hostile", licence_number="KZ-H-1")
        session.add(site)
        session.flush()
        assert site.id is not None
        session.add(Agent(id="AGHOST", name="h", site_id=site.id, secret_hash="x"))
        session.flush()
        session.add(Segment(site_id=site.id, cidr="127.86.0.0/24", agent_id="AGHOST"))
        session.add(
            PoolSet(site_id=site.id, version=1, name="DMP", urls=["stratum+tcp://dmp.kz:3333"],
                    account="acct", status=PoolSetStatus.APPROVED, proposed_by="a",
                    decided_by="b", decided_at=T0 - timedelta(days=1), password="x")
        )  # fmt: skip
        session.commit()
        site_id = site.id
    agent = Principal(kind="agent", name="agent:h", agent_id="AGHOST", site_id=site_id, source="t")
    ip = IPv4Address("127.86.0.5")
    identity = IdentityRecord(
        ip=ip, observed_at=T0, mac="aa:86:00:00:00:05", serial=HOSTILE_SERIAL,
        serial_source="api", make="Bitmain", model="Antminer S19 Pro",
    )  # fmt: skip
    poll = Observation(
        ip=ip, observed_at=T0 + timedelta(minutes=1), reachable=True,
        pools=[PoolReading(url=HOSTILE_URL, user=HOSTILE_WORKER)],
    )  # fmt: skip
    for seq, items in enumerate(({"identities": [identity]}, {"observations": [poll]}), 1):
        with Session(engine) as session:
            batch = ReportBatch(batch_id=uuid.uuid4(), agent_clock=T0, sequence=seq, **items)  # type: ignore[arg-type]
            ack = ingest_batch(session, agent, batch, settings, now=T0 + timedelta(minutes=1))
            assert not ack.refused, ack.refused
    return "hostile"


def test_formulas_from_a_miner_are_neutralised_in_csv_and_plain_strings_in_xlsx(
    cli: CliInvoker, hostile_machine: str, tmp_path: Path
) -> None:
    out = tmp_path / "reg"
    result = cli("export", "register", "--as-of", "now", "--format", "csv,xlsx",
                 "--site", hostile_machine, "--out", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    header, rows = read_csv(out / "register.csv")
    [row] = rows
    cell = dict(zip(header, row, strict=True))
    assert cell["Reported serial"] == "'" + HOSTILE_SERIAL
    assert cell["Configured pools (read back)"] == f"'{HOSTILE_URL} ({HOSTILE_WORKER})"
    assert cell["Pool compliance"] == "non-compliant"
    # no cell of the file starts with a formula character
    for value in [*header, *row]:
        assert not value.startswith(("=", "+", "-", "@", "\t", "\r")), value

    sheet = openpyxl.load_workbook(out / "register.xlsx")["Register"]
    titles = [c.value for c in sheet[1]]
    serial = sheet.cell(row=2, column=titles.index("Reported serial") + 1)
    pools = sheet.cell(row=2, column=titles.index("Configured pools (read back)") + 1)
    assert (serial.data_type, serial.value) == ("s", HOSTILE_SERIAL)  # a string, not a formula
    assert (pools.data_type, pools.value) == ("s", f"{HOSTILE_URL} ({HOSTILE_WORKER})")


# --- verify-export refuses what is not a plain listed file -------------------------------------


@pytest.fixture
def signed(cli: CliInvoker, engine: Engine, tmp_path: Path) -> Path:
    out = tmp_path / "exp"
    result = cli("export", "audit", "--out", str(out), "--zip")
    assert result.exit_code == 0, result.output
    assert cli_verify(out).exit_code == 0
    assert cli_verify(tmp_path / "exp.zip").exit_code == 0
    return out


def refused(path: Path, message: str) -> None:
    result = cli_verify(path)
    assert result.exit_code == 1, result.output
    assert message in result.output, result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_symlink_or_folder_in_the_export_folder_is_refused(signed: Path, tmp_path: Path) -> None:
    # a symlink to an identical copy elsewhere: the hash matches, but the file is not there
    linked = tmp_path / "linked"
    shutil.copytree(signed, linked)
    outside = tmp_path / "elsewhere.csv"
    shutil.copy(linked / "audit_log.csv", outside)
    (linked / "audit_log.csv").unlink()
    os.symlink(outside, linked / "audit_log.csv")
    refused(linked, "audit_log.csv: a symbolic link, refused")

    nested = tmp_path / "nested"
    shutil.copytree(signed, nested)
    (nested / "more").mkdir()
    (nested / "more" / "note.csv").write_text("=1+1\r\n")
    refused(nested, "more/: a folder inside the export")

    os.symlink(signed, tmp_path / "export-link")
    result = cli_verify(tmp_path / "export-link")
    assert result.exit_code == 2 and "a symbolic link" in result.output


def rezip(source: Path, target: Path, entries: list[tuple[str, bytes, int | None]]) -> Path:
    """A copy of the export zip with ``entries`` (name, data, unix mode) inserted first."""
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as out:
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            if mode is not None:
                info.external_attr = mode << 16
            out.writestr(info, data)
        for info in original.infolist():
            out.writestr(info, original.read(info.filename))
    return target


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
@pytest.mark.parametrize(
    ("entry", "mode", "message"),
    [
        ("evil.csv", None, "evil.csv: outside the export folder, not in the manifest"),
        ("other/evil.csv", None, "other/evil.csv: outside the export folder"),
        ("exp/sub/evil.csv", None, "exp/sub/evil.csv: outside the export folder"),
        ("exp/audit_log.csv", None, "exp/audit_log.csv: 2 entries of this name in the zip"),
        ("exp/../evil.csv", None, "exp/../evil.csv: a path that climbs out (..), refused"),
        ("/etc/evil.csv", None, "/etc/evil.csv: an absolute path, refused"),
        ("exp\\..\\evil.csv", None, "a backslash in the path, refused"),
        ("exp/link.csv", stat.S_IFLNK | 0o777, "exp/link.csv: a symbolic link in the zip, refused"),
    ],
)
def test_zip_tricks_are_refused(
    signed: Path, tmp_path: Path, entry: str, mode: int | None, message: str
) -> None:
    tampered = b"seq,at,actor\r\n1,2026-01-01,nobody\r\n"
    case = rezip(tmp_path / "exp.zip", tmp_path / "case.zip", [(entry, tampered, mode)])
    refused(case, message)


# --- only real hours, never the future, and a word when empty ----------------------------------


def test_future_moments_are_refused_and_empty_exports_say_why(
    cli: CliInvoker, engine: Engine, tmp_path: Path
) -> None:
    future = (datetime.now(UTC) + timedelta(days=30)).strftime("%Y-%m-%dT%H:%MZ")
    result = cli("export", "register", "--as-of", future, "--out", str(tmp_path / "a"))
    assert result.exit_code == 2 and "is in the future" in result.output, result.output
    assert not (tmp_path / "a").exists()
    result = cli("export", "compliance", "--period", f"{future[:10]}..{future[:10]}T23:00Z",
                 "--out", str(tmp_path / "b"))  # fmt: skip
    assert result.exit_code == 2 and "in the future" in result.output, result.output

    result = cli(
        "export", "register", "--as-of", "now", "--format", "csv", "--out", str(tmp_path / "c")
    )
    assert result.exit_code == 0, result.output
    assert "0 rows: the register is empty" in result.output
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["rows"] == {"register": 0} and "the register is empty" in manifest["notes"][0]


def test_a_register_before_the_first_record_says_so(
    cli: CliInvoker,
    history: dict[str, str],
    tmp_path: Path,
) -> None:
    out = tmp_path / "early"
    result = cli(
        "export", "register", "--as-of", "2026-09-01T00:00Z", "--format", "csv", "--out", str(out)
    )
    assert result.exit_code == 0, result.output
    assert (
        "0 rows: no machine was on the register at 2026-09-01T00:00:00Z; the first register record is from 2026-10-01T01:00:00Z"
        in result.output
    )
    result = cli("export", "register", "--as-of", "2026-10-12T00:00Z", "--model", "Nope",
                 "--format", "csv", "--out", str(tmp_path / "none"))  # fmt: skip
    assert "0 rows: no machine matched model Nope at 2026-10-12T00:00:00Z" in result.output


def test_a_period_to_the_future_counts_only_up_to_now(
    cli: CliInvoker,
    history: dict[str, str],
    tmp_path: Path,
) -> None:
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%d")
    out = tmp_path / "cmp"
    result = cli("export", "compliance", "--period", f"2026-10-01..{tomorrow}", "--format", "csv",
                 "--out", str(out))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "time was counted up to" in result.output
    manifest: dict[str, Any] = json.loads((out / "manifest.json").read_text())
    made = datetime.fromisoformat(manifest["generated_at"].replace("Z", "+00:00"))
    header, rows = read_csv(out / "compliance_machines.csv")
    hours = {r[0]: float(r[header.index("Hours in period")]) for r in rows}
    lived = (made - datetime(2026, 10, 1, 1, 0, tzinfo=UTC)).total_seconds() / 3600
    for letter in "ABC":  # in service since first seen, up to the moment of the export
        assert hours[history[letter]] == pytest.approx(lived, abs=0.02)
    assert hours[history["D"]] == 464.0  # first seen 10-01 02:00, decommissioned 10-20 10:00
    text = (out / "compliance_machines.csv").read_text(encoding="utf-8-sig")
    assert sum(1 for _ in csv.reader(io.StringIO(text))) == 5
