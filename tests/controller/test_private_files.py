"""The controller and the agent keep their data to their owner, whatever the umask (issue 10).

Reproduced first at 22d955d: outside systemd (umask 022) the database, its WAL, export zips
and job files came out 0644 and the data directory 0755. Here the real commands run as
separate processes under umask 022 and 000 — the controller's CLI and ``serve`` with an API
export, a CLI export, an enrolled agent's daemon — and then every directory they made must be
0700 and every file 0600.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

PASSWORD = "correct horse battery staple"
SEGMENT = "127.143.0.0/30"  # loopback only; no other test uses 127.143.x


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def modes(*roots: Path) -> dict[str, str]:
    """Every path under ``roots`` (and the roots): ``"dir 700"``, ``"file 600"``…"""
    found: dict[str, str] = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            info = path.lstat()
            kind = "dir" if stat.S_ISDIR(info.st_mode) else "file"
            found[str(path)] = f"{kind} {stat.S_IMODE(info.st_mode):o}"
    return found


class Runner:
    def __init__(self, tmp_path: Path, umask: int) -> None:
        self.umask = umask
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("ASICFLEET_")}
        self.env["XDG_CONFIG_HOME"] = str(tmp_path / "config")
        self.cwd = tmp_path

    def _umask(self) -> None:
        os.umask(self.umask)

    def run(self, *args: str, stdin: str | None = None, token: str | None = None) -> str:
        env = self.env | ({"ASICFLEET_TOKEN": token} if token else {})
        done = subprocess.run(
            [sys.executable, "-m", "asicfleet", *args],
            input=stdin,
            env=env,
            cwd=self.cwd,
            capture_output=True,
            text=True,
            timeout=180,
            preexec_fn=self._umask,
        )
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout

    @contextmanager
    def process(self, *args: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "asicfleet", *args],
                env=self.env,
                cwd=self.cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=self._umask,
            )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.mark.parametrize("umask", [0o022, 0o000], ids=["umask022", "umask000"])
def test_controller_and_agent_files_are_private_whatever_the_umask(
    tmp_path: Path, umask: int
) -> None:
    runner = Runner(tmp_path, umask)
    data = tmp_path / "controller-data"  # the controller creates it (not "controller": cwd)
    ctl = ["controller", "--data-dir", str(data)]
    runner.run(*ctl, "user", "add", "admin", "--role", "admin", "--password-stdin", stdin=PASSWORD)
    runner.run(*ctl, "login", "--as", "admin", "--password-stdin", stdin=PASSWORD)
    runner.run(*ctl, "user", "add", "carla", "--role", "compliance", "--password-stdin",
               stdin=PASSWORD)  # fmt: skip
    runner.run(*ctl, "site", "add", "farm", "--licence", "KZ-F-1")
    enrollment = runner.run(*ctl, "agent", "token", "--site", "farm", "--segment", SEGMENT)

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with runner.process(*ctl, "serve", "--bind", f"127.0.0.1:{port}", log=tmp_path / "serve.log"):

        def healthy() -> bool:
            try:
                return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for("the controller", healthy)
        token = httpx.post(
            f"{base}/api/v1/auth/token", data={"username": "carla", "password": PASSWORD}
        ).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        job = httpx.post(
            f"{base}/api/v1/exports", json={"kind": "audit", "formats": ["csv"]}, headers=headers
        ).json()
        wait_for(
            "the API export",
            lambda: (
                httpx.get(f"{base}/api/v1/exports/{job['id']}", headers=headers).json()["status"]
                in ("done", "failed")
            ),
        )
        runner.run(*ctl, "export", "audit", "--out", str(tmp_path / "out"), "--zip", token=token)

        agent = tmp_path / "agent-home"
        agent.mkdir(mode=0o700)
        config = agent / "agent.toml"
        config.write_text(
            'data_dir = "data"\n[polling]\npoll_interval_s = 2.0\nminer_timeout_s = 1.0\n'
            "discovery_interval_s = 3600\n"
        )
        token_file = agent / "token"
        token_file.write_text(enrollment)
        runner.run("agent", "enroll", "--controller", base, "--token-file", str(token_file),
                   "--config", str(config))  # fmt: skip
        token_file.unlink()
        agent_data = agent / "data"
        with runner.process("agent", "run", "--config", str(config), log=tmp_path / "agent.log"):
            wait_for(
                "the agent's status and outbox",
                lambda: (
                    (agent_data / "status.json").exists()
                    and any(p.name.startswith("outbox") for p in agent_data.iterdir())
                ),
            )
            running = modes(data, agent_data)  # while open: the -wal and -shm files exist

    found = running | modes(data, tmp_path / "out", agent_data, tmp_path / "config" / "asicfleet")
    found |= modes(tmp_path / "out.zip", agent / "secrets.toml")
    names = {Path(p).name for p in found}
    # what the issue found open: the database and its WAL, the key, the job file, the zips
    for expected in ("asicfleet.db", "asicfleet.db-wal", "job.json", "export.zip", "out.zip",
                     "status.json", "secrets.toml", "controller-token.json"):  # fmt: skip
        assert expected in names, (expected, sorted(names))
    wrong = {path: mode for path, mode in found.items() if mode not in ("dir 700", "file 600")}
    assert wrong == {}
