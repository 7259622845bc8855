"""The outbox: FIFO with persisted sequences, kill -9 safety, and a loud full disk."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from agent.errors import OutboxError, OutboxFull
from agent.outbox import PARKED_EVENT, Outbox
from contract import CONTRACT_VERSION, EventSeverity, Observation, ReportBatch

NOW = datetime(2026, 11, 1, tzinfo=UTC)


def make_batch(observations: int = 1, note: str = "") -> ReportBatch:
    return ReportBatch(
        batch_id=uuid.uuid4(),
        agent_clock=NOW,
        sequence=0,
        observations=[
            Observation(
                ip=IPv4Address(f"127.77.{i // 250}.{1 + i % 250}"),
                observed_at=NOW,
                reachable=False,
                error=note or None,
            )
            for i in range(observations)
        ],
    )


@pytest.fixture
def outbox(tmp_path: Path) -> Iterator[Outbox]:
    with Outbox(tmp_path / "outbox.sqlite3") as box:
        yield box


def test_put_assigns_increasing_sequences_and_peek_is_oldest_first(outbox: Outbox) -> None:
    stored = [outbox.put(make_batch()) for _ in range(5)]
    sequences = [b.sequence for b in stored]
    assert sequences == sorted(sequences) and len(set(sequences)) == 5
    assert outbox.depth() == 5
    assert outbox.peek(3) == stored[:3]
    assert outbox.peek(100) == stored
    assert outbox.peek(0) == []


def test_put_is_durable_and_the_stored_batch_is_what_comes_back(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    with Outbox(path) as box:
        sent = make_batch(observations=3, note="timeout after 5 s")
        stored = box.put(sent)
    assert stored.batch_id == sent.batch_id
    assert stored.observations == sent.observations
    with Outbox(path) as box:
        assert box.peek(10) == [stored]
        assert box.integrity_check() == "ok"


def test_sequences_keep_increasing_after_acks_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    with Outbox(path) as box:
        first = [box.put(make_batch()) for _ in range(3)]
        for batch in first:
            assert box.ack(batch.batch_id)
        assert box.depth() == 0
    with Outbox(path) as box:
        later = box.put(make_batch())
    assert later.sequence > max(b.sequence for b in first)


def test_sequences_start_at_one(outbox: Outbox) -> None:
    """Small numbers: the controller stores them in a 32-bit column on PostgreSQL."""
    assert outbox.put(make_batch()).sequence == 1


def test_putting_the_same_batch_twice_stores_it_once(outbox: Outbox) -> None:
    batch = make_batch()
    first = outbox.put(batch)
    again = outbox.put(batch)
    assert again == first
    assert outbox.depth() == 1


def test_ack_removes_exactly_that_batch(outbox: Outbox) -> None:
    a, b, c = (outbox.put(make_batch()) for _ in range(3))
    assert outbox.ack(b.batch_id)
    assert outbox.peek(10) == [a, c]
    assert not outbox.ack(b.batch_id), "a second ack is a no-op"
    assert not outbox.ack(uuid.uuid4())
    assert outbox.depth() == 2


def test_park_keeps_the_batch_and_the_reason(outbox: Outbox) -> None:
    a, b = outbox.put(make_batch()), outbox.put(make_batch())
    assert outbox.park(a.batch_id, "422: observations.0.ip: not an IPv4 address", 422)
    # The queue moves on, and the controller will hear of it: an event queued behind.
    b_again, report = outbox.peek(10)
    assert b_again == b
    [event] = report.events
    assert (event.kind, event.severity) == (PARKED_EVENT, EventSeverity.CRITICAL)
    assert event.data["batch_id"] == str(a.batch_id) and event.data["status_code"] == 422
    assert event.data["items"] == {"observations": 1, "identities": 0, "events": 0}
    assert "not an IPv4 address" in event.detail and report.sequence > b.sequence
    [dead] = outbox.dead_letters()
    assert dead.batch_id == a.batch_id and dead.sequence == a.sequence
    assert dead.status_code == 422 and "not an IPv4" in dead.reason
    assert ReportBatch.model_validate_json(dead.body).batch_id == a.batch_id
    stats = outbox.stats()
    assert (stats.depth, stats.dead_letters) == (2, 1)
    assert stats.oldest_queued_at is not None
    assert not outbox.park(a.batch_id, "again")
    # A parked report about parking does not report itself again (no endless chain).
    assert outbox.park(report.batch_id, "422: refused", 422)
    assert outbox.peek(10) == [b] and outbox.stats().dead_letters == 2


def test_failures_and_strikes_are_counted_per_batch_and_shown(outbox: Outbox) -> None:
    a, b = outbox.put(make_batch()), outbox.put(make_batch())
    assert outbox.failed(a.batch_id, "controller answered 503") == 0
    assert outbox.failed(a.batch_id, "controller answered 500", strike=True) == 1
    assert outbox.failed(b.batch_id, "x", strike=True) == 1
    assert outbox.failed(uuid.uuid4(), "not pending", strike=True) == 0
    stats = outbox.stats()
    assert (stats.head_attempts, stats.head_last_error) == (2, "controller answered 500")
    assert stats.clock_skew_s is None
    outbox.record_clock(-2.5, datetime(2026, 12, 1, tzinfo=UTC))
    stats = outbox.stats()
    assert stats.clock_skew_s == -2.5 and stats.clock_checked_at == "2026-12-01T00:00:00+00:00"


def test_a_schema_1_outbox_is_upgraded_keeping_its_batches(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    with sqlite3.connect(path) as conn:  # what agents before parking-with-strikes wrote
        conn.executescript(
            "CREATE TABLE outbox_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) "
            "WITHOUT ROWID;"
            "CREATE TABLE pending (sequence INTEGER PRIMARY KEY, batch_id TEXT NOT NULL UNIQUE, "
            "queued_at TEXT NOT NULL, body TEXT NOT NULL);"
            "CREATE TABLE dead_letter (sequence INTEGER PRIMARY KEY, batch_id TEXT NOT NULL "
            "UNIQUE, queued_at TEXT NOT NULL, parked_at TEXT NOT NULL, status_code INTEGER, "
            "reason TEXT NOT NULL, body TEXT NOT NULL);"
            "INSERT INTO outbox_meta VALUES ('next_sequence', 8);"
            "PRAGMA user_version=1;"
        )
        old = make_batch().model_copy(update={"sequence": 7})
        conn.execute(
            "INSERT INTO pending VALUES (7, ?, '2026-12-01T00:00:00+00:00', ?)",
            (str(old.batch_id), old.model_dump_json()),
        )
    conn.close()
    with Outbox(path) as box:
        assert box.peek(10) == [old]
        assert box.failed(old.batch_id, "500", strike=True) == 1
        assert box.put(make_batch()).sequence == 8


def test_an_unreadable_row_is_parked_instead_of_blocking_the_queue(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    with Outbox(path) as box:
        bad, good = box.put(make_batch()), box.put(make_batch())
    with sqlite3.connect(path) as conn:  # e.g. written by a newer agent with a new major
        ours = f'"contract_version":"{CONTRACT_VERSION}"'
        body = bad.model_dump_json().replace(ours, '"contract_version":"9.0"')
        assert body != bad.model_dump_json()
        conn.execute("UPDATE pending SET body = ? WHERE batch_id = ?", (body, str(bad.batch_id)))
    conn.close()
    with Outbox(path) as box:
        assert box.peek(10) == [good]
        [dead] = box.dead_letters()
        assert dead.batch_id == bad.batch_id and "unreadable" in dead.reason


def test_an_outbox_from_a_newer_agent_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    Outbox(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version=99")
    conn.close()
    with pytest.raises(OutboxError, match="newer agent"):
        Outbox(path)


def test_garbage_file_is_a_typed_error(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(OutboxError, match=str(path)):
        Outbox(path)


# --- kill -9 -------------------------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys, uuid
    from datetime import UTC, datetime
    from agent.outbox import Outbox
    from contract import Observation, ReportBatch

    box = Outbox(sys.argv[1])
    now = datetime.now(UTC)
    i = 0
    while True:
        batch = ReportBatch(
            batch_id=uuid.uuid4(), agent_clock=now, sequence=0,
            observations=[
                Observation(ip=f"127.78.0.{1 + k}", observed_at=now, reachable=True)
                for k in range(1 + i % 40)
            ],
        )
        stored = box.put(batch)
        print("P", stored.batch_id, stored.sequence, flush=True)
        if i % 3 == 2:
            oldest = box.peek(1)[0].batch_id
            print("a", oldest, flush=True)
            box.ack(oldest)
            print("A", oldest, flush=True)
        i += 1
    """
)


def _write_until_killed(path: Path, puts: int) -> list[list[str]]:
    """Run the writer, SIGKILL it after ``puts`` reported puts, return every line it printed."""
    lines: list[list[str]] = []
    with subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        try:
            while sum(1 for line in lines if line[0] == "P") < puts:
                line = proc.stdout.readline()
                if not line:
                    pytest.fail(f"writer died: {proc.stderr.read()}")
                lines.append(line.split())
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        # Not communicate(): it reads the raw pipe and would miss what readline() buffered.
        rest = proc.stdout.read()
    assert proc.returncode == -signal.SIGKILL
    lines.extend(line.split() for line in rest.splitlines() if line.strip())
    return lines


def test_survives_kill_9_with_every_returned_put_present_once_in_order(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite3"
    lines: list[list[str]] = []
    for round_ in range(3):
        lines += _write_until_killed(path, puts=120 + 37 * round_)
        put = [(uuid.UUID(w[1]), int(w[2])) for w in lines if w[0] == "P"]
        acked = {uuid.UUID(w[1]) for w in lines if w[0] == "A"}
        in_flight_acks = {uuid.UUID(w[1]) for w in lines if w[0] == "a"} - acked
        put_ids = [bid for bid, _ in put]
        sequences = [seq for _, seq in put]
        assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)

        with Outbox(path) as box:
            assert box.integrity_check() == "ok"
            actual = [b.batch_id for b in box.peek(1_000_000)]
            actual_sequences = [b.sequence for b in box.peek(1_000_000)]

        assert len(actual) == len(set(actual)), "a batch is stored twice"
        assert actual_sequences == sorted(actual_sequences)
        # At most one batch was committed but killed before it could report: it must be last.
        unreported = [bid for bid in actual if bid not in set(put_ids)]
        assert len(unreported) <= 1
        if unreported:
            assert actual[-1] == unreported[0]
        assert not acked & set(actual), "an acknowledged batch came back"
        expected = [
            bid
            for bid in put_ids
            if bid not in acked and not (bid in in_flight_acks and bid not in actual)
        ]
        assert [bid for bid in actual if bid in set(put_ids)] == expected
        # The next run continues the same queue: the unreported batch counts as put.
        if unreported:
            lines.append(["P", str(unreported[0]), str(actual_sequences[-1])])


# --- a full disk ---------------------------------------------------------------------------------


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (we run as root in CI); skipped where mounting is not allowed."""
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mountpoint)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); see the max_bytes test")
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def _fill(box: Outbox, limit: int = 2000) -> tuple[list[ReportBatch], ReportBatch]:
    """Put batches until the outbox is full; return what was stored and the refused batch."""
    stored: list[ReportBatch] = []
    for _ in range(limit):
        batch = make_batch(observations=40, note="x" * 40)
        try:
            stored.append(box.put(batch))
        except OutboxFull as exc:
            assert "OUTBOX FULL" in str(exc) and str(batch.batch_id) in str(exc)
            return stored, batch
    pytest.fail(f"the outbox never filled up after {limit} batches")


def test_a_full_disk_raises_outbox_full_and_loses_nothing(
    tiny_fs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ballast = tiny_fs / "ballast"
    ballast.write_bytes(b"\0" * 64 * 1024)
    path = tiny_fs / "outbox.sqlite3"
    with Outbox(path) as box:
        stored, refused = _fill(box)
        assert stored, "the disk filled before anything was stored"
        assert any(r.levelname == "CRITICAL" for r in caplog.records)
        # Still consistent and readable while full: reads and acks keep working.
        assert box.depth() == len(stored)
        assert box.peek(len(stored) + 5) == stored
        assert box.integrity_check() == "ok"
        # The operator frees space; the caller's retry of the refused batch now succeeds.
        ballast.unlink()
        again = box.put(refused)
        assert again.sequence > stored[-1].sequence
    with Outbox(path) as box:
        assert box.peek(len(stored) + 5) == [*stored, again]
        assert box.integrity_check() == "ok"


def test_a_size_capped_outbox_is_full_at_its_cap(tmp_path: Path) -> None:
    """Also the fallback where a tmpfs cannot be mounted: SQLite's max_page_count."""
    path = tmp_path / "outbox.sqlite3"
    with Outbox(path, max_bytes=128 * 1024) as box:
        stored, refused = _fill(box)
        assert box.peek(len(stored) + 5) == stored
        assert box.integrity_check() == "ok"
        for batch in stored[:5]:  # acknowledged batches free pages inside the file
            box.ack(batch.batch_id)
        again = box.put(refused)
    with Outbox(path) as box:
        assert box.peek(len(stored) + 5) == [*stored[5:], again]
    assert os.path.getsize(path) <= 128 * 1024
