"""Run ``asicfleet sim run`` as a real subprocess for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

STARTUP_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class FarmProcess:
    process: subprocess.Popen[str]
    control_url: str
    banner: str

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.control_url, timeout=30)


def sim_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "asicfleet", "sim", *args]


@contextmanager
def farm_process(*args: str, control_port: int | None = None) -> Iterator[FarmProcess]:
    """Start a farm, wait until it says it listens, stop it (SIGINT) afterwards."""
    port = control_port or free_port()
    process = subprocess.Popen(
        sim_command("run", "--control-port", str(port), *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    banner: list[str] = []
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                _, err = process.communicate(timeout=10)
                raise AssertionError(f"farm exited with {process.returncode}: {err}")
            banner.append(line)
            if line.startswith("Ctrl-C"):
                break
        else:
            raise AssertionError("farm did not start in time")
        yield FarmProcess(process, f"http://127.0.0.1:{port}", "".join(banner))
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def read_json(path: Path) -> object:
    import json

    return json.loads(path.read_text(encoding="utf-8"))
