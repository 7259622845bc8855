"""``asicfleet demo`` as a user runs it: Ctrl-C stops everything; a busy port is one line."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from asicfleet.demo.run import free_port

pytestmark = [pytest.mark.slow]


def demo(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "asicfleet", "demo", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )


def processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline}")
    return found


def test_ctrl_c_stops_every_component_and_removes_the_data() -> None:
    process = demo("--miners", "20", "--port", str(free_port()), "--poll-interval", "3")
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        assert line, "".join(lines)
        lines.append(line)
        if line.startswith("["):  # the first summary line: everything is running
            break
    output = "".join(lines)
    data_dir = re.search(r"data directory (\S+)", output)
    assert data_dir is not None, output
    assert processes_mentioning(data_dir.group(1)), "no component runs from the data directory"

    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=90)
    assert process.returncode == 130, output + rest
    assert "stopping (Ctrl-C)" in rest and "Traceback" not in rest
    assert f"removed the data directory {data_dir.group(1)}" in rest
    assert processes_mentioning(data_dir.group(1)) == []
    assert not Path(data_dir.group(1)).exists()


def read_until(process: subprocess.Popen[str], lines: list[str], wanted: str) -> str:
    """Read the demo's output until a line containing ``wanted`` (a deadline, not a sleep)."""
    assert process.stdout is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        assert line, "".join(lines)
        lines.append(line)
        if wanted in line:
            return line
    raise AssertionError(f"no {wanted!r} within 120 s: {''.join(lines)}")


@pytest.mark.parametrize("when", ["starting", "running"])
def test_more_ctrl_c_during_the_shutdown_still_remove_the_data(when: str) -> None:
    """Before: a second Ctrl-C while the demo waited for its components interrupted the
    shutdown itself, leaving the data directory (logins.txt: every demo password) behind
    without a word. Now further interrupts only hurry the shutdown."""
    process = demo("--miners", "20", "--port", str(free_port()), "--poll-interval", "3")
    lines: list[str] = []
    found = re.search(r"data directory (\S+)", read_until(process, lines, "data directory"))
    assert found is not None
    data_dir = found.group(1)
    read_until(process, lines, "users admin" if when == "starting" else "] machines")
    assert (Path(data_dir) / "logins.txt").exists()

    process.send_signal(signal.SIGINT)
    read_until(process, lines, "stopping (Ctrl-C)")
    for _ in range(3):  # the impatient user
        process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=90)
    output = "".join(lines) + rest
    assert process.returncode == 130, output
    assert "Traceback" not in output
    assert f"removed the data directory {data_dir}" in rest, output
    assert not Path(data_dir).exists()
    assert processes_mentioning(data_dir) == []


def test_a_busy_port_is_one_line_and_exit_1() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "asicfleet", "demo", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert f"error: port {port} on 127.0.0.1 is in use; choose --port" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
