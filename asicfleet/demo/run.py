"""Run the demo: each component is its own process, set up the way an operator would.

1. The controller's database is created and seeded in a temporary data directory (SQLite): four
   people (admin, operator, two compliance officers), the site and its segment, an enrollment
   token. Then ``asicfleet controller serve`` starts.
2. ``asicfleet sim run`` serves a mixed farm on loopback whose workers follow the
   ``{account}.{serial}`` rule; 10% of the miners are moved to a foreign pool and 2% get
   persistent malware that puts a foreign pool back two minutes after every correction.
3. Over the controller's API: the operator proposes the approved pool set, a compliance officer
   approves it (four eyes), the operator switches the site to ``enforce``.
4. An agent enrolls with the token and runs (``asicfleet agent run``).
5. A summary line every few seconds, by the simulator's *true* state (not by what the agent or
   the controller believe) and by the controller's compliance evidence.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import tomli_w

from asicfleet.demo.plan import (
    DEMO_ACCOUNT,
    DEMO_LICENCE,
    DEMO_POOLS,
    DEMO_SITE,
    DEMO_TEMPLATE,
    Tampering,
    TruthSummary,
    choose_tampering,
    farm_subnet,
    summarise_truth,
)

STARTUP_TIMEOUT_S = 90.0
MALWARE_EVERY_S = 120.0
REPORT_EVERY_S = 5.0
API = "/api/v1"


class DemoError(Exception):
    """Something kept the demo from running; the message says what, in one line."""


@dataclass(frozen=True)
class DemoOptions:
    miners: int = 200
    port: int = 8080
    exit_when_compliant: bool = False
    timeout_s: float = 170.0
    poll_interval_s: float = 10.0
    seed: int = 7
    keep_data: bool = False
    sim_control_port: int = 0
    mode: str = "enforce"
    malware_every_s: float = MALWARE_EVERY_S
    restart_seconds: float = 10.0


@dataclass
class People:
    """API tokens of the demo's users, kept in memory only (their passwords go to a 0600 file
    in the data directory, for a person who wants to explore the API)."""

    tokens: dict[str, str] = field(default_factory=dict)

    def headers(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def check(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise DemoError(f"the {self.name} exited with code {code}: {tail(self.log)}")


def tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def asicfleet(*args: str) -> list[str]:
    return [sys.executable, "-m", "asicfleet", *args]


class Demo:
    """One demo run; :meth:`run` returns the exit code."""

    def __init__(self, options: DemoOptions, say: Callable[[str], None]) -> None:
        self.options = options
        self.say = say
        self.root = Path(tempfile.mkdtemp(prefix="asicfleet-demo-"))
        os.chmod(self.root, 0o700)
        self.subnet = farm_subnet(options.miners)
        self.sim_port = options.sim_control_port or free_port()
        self.people = People()
        self.children: list[Child] = []
        self.enrollment_token = ""
        self.tampering = Tampering(foreign=(), malware=())
        self.started = time.monotonic()
        self.stopping = False
        self.hurry = False
        self._spawning = False
        self._deferred_interrupt = False

    @property
    def controller_url(self) -> str:
        return f"http://127.0.0.1:{self.options.port}"

    @property
    def sim_url(self) -> str:
        return f"http://127.0.0.1:{self.sim_port}"

    # --- the whole run -------------------------------------------------------------------------

    def run(self) -> int:
        """Run until done or interrupted; any number of Ctrl-C (or SIGTERM) still cleans up."""
        with self._interrupts():
            return self._run()

    def _run(self) -> int:
        try:
            self._start()
            return self._watch()
        except DemoError as exc:
            self.say(f"error: {exc}")
            return 1
        except KeyboardInterrupt:
            self.say("stopping (Ctrl-C) …")
            return 130
        finally:
            self._stop()

    def agent_status(self) -> dict[str, Any]:
        """The agent daemon's status file (empty until it wrote one)."""
        try:
            data: dict[str, Any] = json.loads(
                (self.root / "agent" / "data" / "status.json").read_text()
            )
        except (OSError, ValueError):
            return {}
        return data

    def start(self) -> None:
        """Start everything (public for tests, which then watch with :meth:`snapshot`)."""
        self._start()

    def stop(self) -> None:
        self._stop()

    def _start(self) -> None:
        if not port_free(self.options.port):
            raise DemoError(f"port {self.options.port} on 127.0.0.1 is in use; choose --port")
        self.say(f"data directory {self.root} (removed at exit unless --keep-data)")
        self._seed_controller()
        self._spawn(
            "controller",
            asicfleet(
                "controller",
                "serve",
                "--data-dir",
                str(self.root / "controller"),
                "--bind",
                f"127.0.0.1:{self.options.port}",
            ),
            env={"ASICFLEET_HISTORY_RESOLUTION_S": "10"},
        )
        self._spawn(
            "simulated farm",
            asicfleet(
                "sim",
                "run",
                "--miners",
                str(self.options.miners),
                "--subnet",
                str(self.subnet),
                "--seed",
                str(self.options.seed),
                "--control-port",
                str(self.sim_port),
                "--worker-names",
                "serial",
                "--restart-seconds",
                str(self.options.restart_seconds),
                "--reboot-seconds",
                "15",
            ),
        )
        self._wait_up("controller", f"{self.controller_url}/healthz")
        self._wait_up("simulated farm", f"{self.sim_url}/health")
        self.say(f"controller listening on {self.controller_url} (API docs at /docs)")
        self._tamper()
        self._approve_pool_set()
        self._start_agent()

    # --- controller --------------------------------------------------------------------------

    def _seed_controller(self) -> None:
        """Create the schema, the people, the site and an enrollment token, as the CLI would."""
        from controller import migrations, signing
        from controller.accounts import create_api_token, create_user
        from controller.actors import ConsoleActor
        from controller.db import engine_for, session_scope
        from controller.enrollment import create_token
        from controller.models import Role
        from controller.settings import load_settings
        from controller.sites import create_site

        data_dir = self.root / "controller"
        settings = load_settings(data_dir=data_dir)
        engine = engine_for(settings)
        try:
            migrations.upgrade(engine)
            signing.load_or_create(data_dir)
            actor = ConsoleActor(name="demo")
            lines = []
            with session_scope(engine) as session:
                for name, role in (
                    ("admin", Role.ADMIN),
                    ("operator", Role.OPERATOR),
                    ("compliance-a", Role.COMPLIANCE),
                    ("compliance-b", Role.COMPLIANCE),
                ):
                    password = secrets.token_urlsafe(18)
                    user = create_user(session, actor, name=name, role=role, password=password)
                    assert user.id is not None
                    token = create_api_token(session, actor, user.id, name="demo", expires_in=None)
                    self.people.tokens[name] = token.secret
                    lines.append(f"{name} ({role.value}): password {password}")
                create_site(
                    session, actor, name=DEMO_SITE, licence_number=DEMO_LICENCE,
                    dmp_account=DEMO_ACCOUNT, owner_name="Demo Mining LLP",
                )  # fmt: skip
                issued = create_token(
                    session, actor, site_name=DEMO_SITE, cidrs=[str(self.subnet)],
                    ttl=timedelta(hours=1),
                )  # fmt: skip
                self.enrollment_token = issued.secret
        finally:
            engine.dispose()
        logins = self.root / "logins.txt"
        logins.touch(mode=0o600)
        logins.write_text("\n".join(lines) + "\n")
        self.say(f"users admin, operator, compliance-a, compliance-b: passwords in {logins}")

    def _api(
        self, who: str, method: str, path: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        try:
            response = httpx.request(
                method, f"{self.controller_url}{API}{path}", json=body,
                headers=self.people.headers(who), timeout=30,
            )  # fmt: skip
        except httpx.HTTPError as exc:
            raise DemoError(f"{method} {path}: {exc}") from None
        if response.status_code >= 400:
            raise DemoError(f"{method} {path} as {who}: {response.status_code} {response.text}")
        data: dict[str, Any] = response.json() if response.content else {}
        return data

    def _approve_pool_set(self) -> None:
        proposed = self._api(
            "operator", "POST", f"/sites/{DEMO_SITE}/pool-sets",
            {
                "name": "DMP Alpha", "accreditation_ref": "DMP-KZ-0007",
                "urls": list(DEMO_POOLS), "account": DEMO_ACCOUNT,
                "reason": "demo: the site's accredited pool",
            },
        )  # fmt: skip
        version = proposed.get("version", 1)
        self._api(
            "compliance-b", "POST", f"/sites/{DEMO_SITE}/pool-sets/{version}/approve",
            {"reason": "accreditation checked"},
        )  # fmt: skip
        self._api(
            "operator", "PATCH", f"/sites/{DEMO_SITE}/policy",
            {"mode": self.options.mode, "worker_template": DEMO_TEMPLATE},
        )  # fmt: skip
        self.say(
            f"pool set 'DMP Alpha' v{version} proposed by operator, approved by compliance-b; "
            f"site {DEMO_SITE} in {self.options.mode} mode, workers {DEMO_TEMPLATE}"
        )

    # --- farm --------------------------------------------------------------------------------

    def _tamper(self) -> None:
        from simulator.faults import FOREIGN_POOL

        miners = self._sim_get("/miners")
        plan = choose_tampering([m["ip"] for m in miners], self.options.seed)
        self.tampering = plan
        with httpx.Client(base_url=self.sim_url, timeout=30) as client:
            for ip in plan.malware:
                client.post(
                    f"/miners/{ip}/faults",
                    json={"fault": "malware", "params": {"delay": self.options.malware_every_s}},
                ).raise_for_status()
            for ip in (*plan.foreign, *plan.malware):
                client.put(
                    f"/miners/{ip}/pools", json={"pools": [FOREIGN_POOL], "actor": "insider"}
                ).raise_for_status()
        self.say(
            f"farm of {len(miners)} miners on {self.subnet}: {len(plan.foreign)} moved to a "
            f"foreign pool, {len(plan.malware)} with malware re-injecting one every "
            f"{self.options.malware_every_s:g} s after each correction"
        )

    def _sim_get(self, path: str) -> Any:
        try:
            response = httpx.get(f"{self.sim_url}{path}", timeout=60)
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise DemoError(f"simulator control API {path}: {exc}") from None
        return response.json()

    # --- agent -------------------------------------------------------------------------------

    def _start_agent(self) -> None:
        from agent.config import apply_enrollment
        from agent.uplink import enroll

        agent_dir = self.root / "agent"
        agent_dir.mkdir(mode=0o700)
        config = agent_dir / "agent.toml"
        poll = self.options.poll_interval_s
        doc = {
            "data_dir": str(agent_dir / "data"),
            "secrets_file": str(agent_dir / "secrets.toml"),
            "controller": {"url": self.controller_url},
            "polling": {
                "poll_interval_s": poll,
                "identity_interval_s": max(600.0, poll),
                "discovery_interval_s": 300.0,
                "miner_timeout_s": min(5.0, poll / 2),
            },
        }
        config.write_text(tomli_w.dumps(doc))
        try:
            response = asyncio.run(enroll(self.controller_url, self.enrollment_token, "demo-agent"))
        except Exception as exc:
            raise DemoError(f"agent enrollment failed: {exc}") from None
        apply_enrollment(config, self.controller_url, response)
        self._spawn("agent", asicfleet("agent", "run", "--config", str(config)))
        self.say(f"agent {response.agent_id} enrolled; polling every {poll:g} s")

    # --- processes ---------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        log = self.root / f"{name.replace(' ', '-')}.log"
        clean = {k: v for k, v in os.environ.items() if not k.startswith("ASICFLEET_")}
        self._spawning = True
        try:
            with log.open("ab") as out:
                process = subprocess.Popen(
                    argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    env=clean | (env or {}) | {"PYTHONUNBUFFERED": "1"}, start_new_session=True,
                )  # fmt: skip
            self.children.append(Child(name, process, log))
        finally:
            self._spawning = False
        if self._deferred_interrupt and not self.stopping:
            self.stopping = True
            raise KeyboardInterrupt

    def _wait_up(self, name: str, url: str) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            for child in self.children:
                child.check()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            time.sleep(0.3)
        raise DemoError(f"the {name} did not come up within {STARTUP_TIMEOUT_S:g} s")

    @contextlib.contextmanager
    def _interrupts(self) -> Iterator[None]:
        """The first Ctrl-C (or SIGTERM) stops the demo; one during the shutdown only hurries
        it (the components are killed instead of waited for), so the data directory, with
        the demo users' passwords, is still removed, however often the user presses Ctrl-C."""

        def interrupt(signum: int, frame: object) -> None:
            if self.stopping:
                self.hurry = True  # no printing here: the main thread may be inside a print
            elif self._spawning:  # a started process must be on the list before we stop
                self._deferred_interrupt = True
            else:
                self.stopping = True
                raise KeyboardInterrupt

        previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stop(self) -> None:
        self.stopping = True
        try:
            self._stop_children()
        finally:
            self._remove_data()

    def _stop_children(self) -> None:
        for child in reversed(self.children):  # agent first: it flushes to the controller
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGINT if "farm" in child.name else signal.SIGTERM)
        deadline = time.monotonic() + 40
        announced = False
        for child in reversed(self.children):
            while child.process.poll() is None:
                if self.hurry and not announced:
                    announced = True
                    self.say("interrupted again: killing the components now; still cleaning up")
                if self.hurry or time.monotonic() > deadline:
                    with contextlib.suppress(OSError):  # its own session: its whole group
                        os.killpg(child.process.pid, signal.SIGKILL)
                    child.process.wait()
                    break
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.process.wait(timeout=0.2)

    def _remove_data(self) -> None:
        """Remove the data directory, or say plainly what was left where."""
        if self.options.keep_data:
            self.say(
                f"kept {self.root} (logs and databases; logins.txt there holds the demo "
                "users' passwords)"
            )
            return
        problems: list[str] = []
        shutil.rmtree(  # Python 3.11: onerror (onexc is 3.12)
            self.root, onerror=lambda _f, path, info: problems.append(f"{path}: {info[1]}")
        )
        if self.root.exists():
            self.say(
                f"warning: could not remove the data directory {self.root} ({'; '.join(problems)}"
                f"); it holds logins.txt with the demo users' passwords: remove it by hand"
            )
        else:
            self.say(f"removed the data directory {self.root}")

    # --- watching ----------------------------------------------------------------------------

    def register_by_ip(self) -> dict[str, dict[str, Any]]:
        machines: dict[str, dict[str, Any]] = {}
        skip = 0
        while True:
            page = self._api("admin", "GET", f"/machines?site={DEMO_SITE}&skip={skip}&limit=1000")
            for machine in page.get("data", []):
                if machine.get("current_ip"):
                    machines[machine["current_ip"]] = machine
            skip += 1000
            if skip >= page.get("count", 0):
                return machines

    def _evidence(self) -> dict[str, Any]:
        """The controller's compliance status for the site (empty if not answering)."""
        try:
            return self._api("admin", "GET", f"/compliance/status?site={DEMO_SITE}")
        except DemoError:
            return {}

    def snapshot(self) -> tuple[TruthSummary, dict[str, Any]]:
        truth = summarise_truth(self._sim_get("/miners"), self.register_by_ip())
        return truth, self._evidence()

    def _watch(self) -> int:
        deadline = time.monotonic() + self.options.timeout_s
        last = ""
        while True:
            for child in self.children:
                child.check()
            truth, evidence = self.snapshot()
            line = self._line(truth, evidence)
            if line != last:
                self.say(f"[{time.monotonic() - self.started:5.0f} s] {line}")
                last = line
            if self.options.exit_when_compliant and truth.all_compliant:
                self.say(
                    f"done: all {truth.writable} writable machines are on the approved pools by "
                    f"the simulator's true state after {time.monotonic() - self.started:.0f} s "
                    f"({line})"
                )
                return 0
            if self.options.exit_when_compliant and time.monotonic() > deadline:
                self.say(
                    f"timeout: after {self.options.timeout_s:g} s, {len(truth.off_pool)} "
                    f"writable machine(s) are still off the approved pools: "
                    f"{', '.join(truth.off_pool[:10])}"
                )
                return 1
            time.sleep(REPORT_EVERY_S)

    @staticmethod
    def _line(truth: TruthSummary, evidence: dict[str, Any]) -> str:
        fleet = evidence.get("fleet") or {}
        p95 = fleet.get("detect_to_verified_p95_s")
        return (
            f"machines {truth.miners} (in register {truth.registered}) | "
            f"on approved pools {truth.writable_compliant}/{truth.writable} writable "
            f"({truth.percent:.1f}%) | drifts fixed {fleet.get('incidents_verified', '?')}, "
            f"open {fleet.get('incidents_open', '?')}, failed {fleet.get('incidents_failed', '?')}"
            + (f" | p95 detect-to-verified {p95:.1f} s" if p95 is not None else "")
            + (f" | repeat offenders {len(fleet['repeat_offenders'])}"
               if fleet.get("repeat_offenders") else "")
        )  # fmt: skip


def run_demo(options: DemoOptions, say: Callable[[str], None] = print) -> int:
    return Demo(options, say).run()
