"""The controller as a service: migrations, settings, `serve`/`migrate`, /metrics, systemd unit."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine
from sqlmodel import Session
from typer.testing import CliRunner

from asicfleet.cli import app as asicfleet_app
from controller import migrations
from controller.api.metrics import FleetSnapshot, age_bucket, fleet_metrics
from controller.db import engine_for, make_engine
from controller.models import (
    Agent,
    IngestedBatch,
    LifecycleState,
    Machine,
    RegisterEvent,
    Role,
    Site,
    utcnow,
)
from controller.security import AGENT_SECRET_PREFIX, new_token, token_hash
from controller.settings import load_settings
from tests.controller.conftest import CliInvoker, UserFactory, create_user

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "systemd" / "asicfleet-controller.service"


# --- migrations --------------------------------------------------------------------------------


def test_migrations_produce_exactly_the_models(engine: Engine) -> None:
    assert migrations.current(engine) == migrations.head()
    assert migrations.differences(engine) == []
    assert migrations.main(["check", "--database-url", str(engine.url)]) == 0


def test_upgrade_is_idempotent_and_reversible(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        assert migrations.current(engine) is None
        head = migrations.head()
        assert migrations.upgrade(engine) == head
        assert migrations.upgrade(engine) == head
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
        assert migrations.downgrade(engine, "base") is None
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}
        assert migrations.upgrade(engine) == head
        assert migrations.differences(engine) == []
    finally:
        engine.dispose()


def test_history_kept_before_the_sums_existed_is_summed_by_the_upgrade(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        assert migrations.upgrade(engine, "0001") == "0001"
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO machine (id, machine_id, hashboard_serials, lifecycle_state, "
                    "state_since, first_seen, serial_unconfirmed, flags, record_version, "
                    "updated_at) VALUES (1, 'M1', '[]', 'ACTIVE', :t, :t, false, '[]', 1, :t)"
                ),
                {"t": datetime(2026, 10, 1, tzinfo=UTC)},
            )
            for n, hashrate in enumerate((100.0, 110.0, None)):
                conn.execute(
                    text(
                        "INSERT INTO observation_history (machine_pk, bucket, observed_at, "
                        "reachable, is_mining, hashrate_ths, power_w, pools) VALUES "
                        "(1, :b, :t, true, true, :h, 3000.0, '[]')"
                    ),
                    {"b": n, "t": datetime(2026, 10, 1, 10, 5 * n, tzinfo=UTC), "h": hashrate},
                )
        assert migrations.upgrade(engine) == migrations.head()
        with engine.connect() as conn:
            hour = conn.execute(
                text(
                    "SELECT polls, mining, hashrate_sum, hashrate_n, power_sum, power_n "
                    "FROM observation_sum WHERE machine_pk = 1 AND span_s = 3600"
                )
            ).one()
            spans = conn.execute(text("SELECT count(*) FROM observation_sum")).scalar()
        assert tuple(hour) == (3, 3, 210.0, 2, 9000.0, 3)
        assert spans == 3  # the hour, the day and the week
    finally:
        engine.dispose()


def test_failed_migration_changes_nothing(database_url: str, cli: CliInvoker) -> None:
    """A revision failing half-way (here: a table already exists) is rolled back whole."""
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE site (id INTEGER PRIMARY KEY)"))
        result = cli("migrate")
        assert result.exit_code == 1
        assert result.stderr.startswith("error: cannot migrate ")
        assert result.stderr.count("\n") == 1
        assert set(inspect(engine).get_table_names()) == {"site"}
        assert migrations.current(engine) is None
    finally:
        engine.dispose()


def test_concurrent_upgrades_serialise(database_url: str) -> None:
    """Two replicas starting at once on one empty database both end at head, no errors."""
    engines = [make_engine(database_url) for _ in range(2)]
    # The database exists before the replicas start (on SQLite: is already in WAL mode;
    # switching a brand-new file to WAL refuses a second connection without waiting).
    with engines[0].connect() as conn:
        conn.execute(text("SELECT 1"))
    results: list[str | None] = []
    errors: list[BaseException] = []

    def run(engine: Engine) -> None:
        try:
            results.append(migrations.upgrade(engine))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(e,)) for e in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for engine in engines:
        engine.dispose()
    assert errors == []
    assert results == [migrations.head()] * 2


def test_revisions_render_without_model_imports() -> None:
    """Revisions must not depend on controller code that changes (only sqlalchemy/sqlmodel)."""
    versions = Path(migrations.SCRIPT_LOCATION) / "versions"
    for path in versions.glob("[0-9]*.py"):
        source = path.read_text()
        assert "controller" not in source, path.name
        assert "UTCDateTime" not in source, path.name
    head_number = int(migrations.head().split("_", 1)[0])  # 0003 or 0003_<helper>
    assert migrations.next_revision_id() == f"{head_number + 1:04d}"


def test_package_data_ships_the_migrations() -> None:
    """An installed package (not just a checkout) must carry the template and revisions."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["controller"]
    package = REPO / "controller"
    shipped = {p for pattern in patterns for p in package.glob(pattern)}
    assert package / "alembic" / "script.py.mako" in shipped
    assert set((package / "alembic" / "versions").glob("*.py")) <= shipped
    assert (package / "alembic" / "__init__.py").exists()
    assert (package / "alembic" / "versions" / "__init__.py").exists()


def test_sqlite_is_in_wal_mode(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ASICFLEET_CONFIG", raising=False)
    monkeypatch.delenv("ASICFLEET_DATABASE_URL", raising=False)
    engine = engine_for(load_settings(data_dir=data_dir))
    try:
        migrations.upgrade(engine)
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            # The migration switched foreign keys off around its transaction, and back on.
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        engine.dispose()
    # WAL is a property of the file: a plain connection sees it too.
    with sqlite3.connect(data_dir / "asicfleet.db") as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# --- settings ----------------------------------------------------------------------------------


def test_settings_precedence_flag_over_env_over_toml(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "controller.toml"
    config.write_text(
        "[controller]\n"
        'bind = "127.0.0.1:9001"\n'
        "history_resolution_s = 60\n"
        f'data_dir = "{tmp_path / "from-toml"}"\n'
    )
    for name in ("ASICFLEET_BIND", "ASICFLEET_DATA_DIR", "ASICFLEET_HISTORY_RESOLUTION_S"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ASICFLEET_CONFIG", str(config))

    settings = load_settings()
    assert settings.bind == "127.0.0.1:9001"
    assert settings.history_resolution_s == 60
    assert settings.data_dir == tmp_path / "from-toml"

    monkeypatch.setenv("ASICFLEET_BIND", "127.0.0.1:9002")
    settings = load_settings()
    assert (settings.bind, settings.port, settings.host) == ("127.0.0.1:9002", 9002, "127.0.0.1")
    assert settings.history_resolution_s == 60  # still from TOML

    assert load_settings(bind="127.0.0.1:9003").bind == "127.0.0.1:9003"


def _run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(asicfleet_app, ["controller", *args], env=env)
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize(
    ("toml", "env", "args", "code", "message"),
    [
        ("x = [", {}, [], 2, "not valid TOML"),
        ('[controller]\nbind = "nonsense"\n', {}, [], 2, "bind must be host:port"),
        ("[controller]\nno_such_setting = 1\n", {}, [], 2, "no_such_setting"),
        ("", {"ASICFLEET_BIND": "127.0.0.1:99999"}, [], 2, "bind must be host:port"),
        ("", {}, ["--database-url", "nosuchdb://x"], 2, "bad database URL"),
        (
            "",
            {},
            ["--database-url", "postgresql+psycopg://postgres:s3cret@127.0.0.1:1/test"],
            1,
            "cannot migrate",
        ),
    ],
    ids=["bad-toml", "bad-bind-toml", "unknown-key", "bad-bind-env", "bad-url", "db-down"],
)
def test_migrate_reports_bad_configuration_in_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    toml: str,
    env: dict[str, str],
    args: list[str],
    code: int,
    message: str,
) -> None:
    config = tmp_path / "controller.toml"
    config.write_text(toml)
    monkeypatch.setenv("ASICFLEET_CONFIG", str(config))
    exit_code, stdout, stderr = _run_cli(
        "migrate", "--data-dir", str(tmp_path / "data"), *args, env=env
    )
    assert exit_code == code, (stdout, stderr)
    assert stderr.startswith("error: ") and message in stderr, stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr + stdout
    assert "s3cret" not in stderr


def test_serve_refuses_bad_bind_and_busy_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ASICFLEET_CONFIG", raising=False)
    data = str(tmp_path / "data")
    code, _, stderr = _run_cli("serve", "--data-dir", data, "--bind", "localhost")
    assert code == 2 and "bind must be host:port" in stderr and stderr.count("\n") == 1

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, stderr = _run_cli("serve", "--data-dir", data, "--bind", f"127.0.0.1:{port}")
    assert code == 1
    assert stderr.splitlines()[-1].startswith(f"error: cannot listen on 127.0.0.1:{port}")


def test_migrate_command_says_which_revision(cli: CliInvoker) -> None:
    head = migrations.head()
    first = cli("migrate")
    assert first.exit_code == 0, first.output
    assert first.stdout.strip() == f"upgraded to revision {head} (from empty database)"
    again = cli("migrate")
    assert again.exit_code == 0, again.output
    assert again.stdout.strip() == f"already at revision {head}"


# --- metrics -----------------------------------------------------------------------------------


def test_age_buckets() -> None:
    now = utcnow()
    cases = {
        None: "never",
        now: "1m",
        now - timedelta(seconds=60): "1m",
        now - timedelta(seconds=61): "5m",
        now - timedelta(minutes=14): "15m",
        now - timedelta(minutes=59): "1h",
        now - timedelta(hours=2): "stale",
    }
    for seen, label in cases.items():
        assert age_bucket(seen, now) == label, seen


def test_fleet_metrics_always_list_every_state_and_bucket() -> None:
    families = {m.name: m for m in fleet_metrics(FleetSnapshot())}
    states = {s.labels["state"]: s.value for s in families["asicfleet_machines"].samples}
    assert states == {state.value: 0 for state in LifecycleState}
    buckets = {s.labels["last_seen"] for s in families["asicfleet_agents"].samples}
    assert buckets == {"1m", "5m", "15m", "1h", "stale", "never"}


def _populate(engine: Engine) -> str:
    """A small fleet: machines in several states, agents of various ages, recent batches.

    Returns an agent's bearer secret."""
    now = utcnow()
    secret = new_token(AGENT_SECRET_PREFIX)
    with Session(engine) as session:
        site = Site(name="alpha", licence_number="KZ-1")
        session.add(site)
        session.flush()
        assert site.id is not None
        states = [LifecycleState.DISCOVERED] * 2 + [LifecycleState.ACTIVE] * 3
        states += [LifecycleState.RMA]
        for state in states:
            session.add(Machine(lifecycle_state=state, site_id=site.id))
        agents = [
            ("a1", now - timedelta(seconds=10), False),
            ("a2", now - timedelta(seconds=20), False),
            ("a3", now - timedelta(minutes=10), False),
            ("a4", None, False),
            ("a5", now, True),
        ]
        for agent_id, seen, disabled in agents:
            session.add(
                Agent(
                    id=agent_id,
                    name=agent_id,
                    site_id=site.id,
                    secret_hash=token_hash(secret if agent_id == "a1" else agent_id),
                    last_seen_at=seen,
                    disabled=disabled,
                )
            )
        for n, (age_s, observations) in enumerate([(5, 500), (30, 400), (300, 999)]):
            session.add(
                IngestedBatch(
                    batch_id=f"00000000-0000-0000-0000-{n:012d}",
                    agent_id="a1",
                    sequence=n,
                    received_at=now - timedelta(seconds=age_s),
                    ack={"observations": observations, "duplicate": False},
                )
            )
        session.add(RegisterEvent(kind="duplicate_serial", severity="alert"))
        session.add(RegisterEvent(kind="moved", severity="info", resolved_at=now))
        session.commit()
    return secret


def _sample(body: str, name: str, **labels: str) -> float:
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(f"{name}{{{label_text}}}" if labels else name) + r" (\S+)"
    match = re.search("^" + pattern + "$", body, re.MULTILINE)
    assert match, f"{name} {labels} not in metrics"
    return float(match.group(1))


def test_metrics_need_a_user_token(
    app_client: TestClient, engine: Engine, make_user: UserFactory
) -> None:
    agent_secret = _populate(engine)
    assert app_client.get("/metrics").status_code == 401
    bad = app_client.get("/metrics", headers={"Authorization": "Bearer afu_nope"})
    assert bad.status_code == 401
    as_agent = app_client.get("/metrics", headers={"Authorization": f"Bearer {agent_secret}"})
    assert as_agent.status_code == 403

    for role in Role:
        response = app_client.get("/metrics", headers=make_user(role).headers)
        assert response.status_code == 200, (role, response.text)
    assert response.headers["content-type"].startswith("text/plain")
    body = response.text
    assert _sample(body, "asicfleet_machines", state="discovered") == 2
    assert _sample(body, "asicfleet_machines", state="active") == 3
    assert _sample(body, "asicfleet_machines", state="rma") == 1
    assert _sample(body, "asicfleet_machines", state="decommissioned") == 0
    assert _sample(body, "asicfleet_agents", last_seen="1m") == 2
    assert _sample(body, "asicfleet_agents", last_seen="15m") == 1
    assert _sample(body, "asicfleet_agents", last_seen="never") == 1
    assert _sample(body, "asicfleet_agents_disabled") == 1
    assert _sample(body, "asicfleet_ingested_batches_last_minute") == 2
    assert _sample(body, "asicfleet_ingested_observations_last_minute") == 900
    assert _sample(body, "asicfleet_ingestion_observations_per_second") == 15
    assert _sample(body, "asicfleet_open_events", kind="duplicate_serial", severity="alert") == 1
    assert 'kind="moved"' not in body


# --- serve, for real ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def served(
    database_url: str, data_dir: Path, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """`asicfleet controller serve` in a subprocess (cwd elsewhere: no alembic.ini needed),
    answering /healthz. Killed at teardown if the test did not stop it."""
    port = _free_port()
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASICFLEET_")}
    argv = [sys.executable, "-m", "asicfleet", "controller", "serve"]
    argv += ["--data-dir", str(data_dir), "--database-url", database_url]
    argv += ["--bind", f"127.0.0.1:{port}"]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield proc, base, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_migrates_serves_and_stops_on_sigterm(
    served: tuple[subprocess.Popen[bytes], str, Path], database_url: str
) -> None:
    proc, base, log = served
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{base}/metrics").status_code == 401

    engine = make_engine(database_url)
    try:
        assert migrations.current(engine) == migrations.head()  # serve migrated it
        _populate(engine)
        user = create_user(engine, Role.INSPECTOR)
    finally:
        engine.dispose()
    response = httpx.get(f"{base}/metrics", headers=user.headers)
    assert response.status_code == 200
    assert _sample(response.text, "asicfleet_machines", state="active") == 3
    assert "process_resident_memory_bytes" in response.text

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    output = log.read_text()
    assert f"schema at revision {migrations.head()}" in output
    assert "listening on http://127.0.0.1:" in output
    assert "Finished server process" in output
    assert "Traceback" not in output
    assert user.token not in output


# --- systemd -----------------------------------------------------------------------------------


def test_systemd_unit_is_hardened(tmp_path: Path) -> None:
    unit = UNIT.read_text()
    directives = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and line[:1].isalpha()
    )
    expected = {
        "User": "asicfleet",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "CapabilityBoundingSet": "",
        "StateDirectory": "asicfleet",
        "ReadWritePaths": "/var/lib/asicfleet",
        "UMask": "0077",
        "EnvironmentFile": "-/etc/asicfleet/controller.env",
        "Environment": "ASICFLEET_DATA_DIR=/var/lib/asicfleet",
    }
    for key, value in expected.items():
        assert directives.get(key) == value, key
    assert "AF_INET" in directives["RestrictAddressFamilies"]
    assert directives["ExecStart"].endswith("asicfleet controller serve")

    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    local = tmp_path / UNIT.name
    local.write_text(unit.replace(directives["ExecStart"], "/bin/true"))
    verify = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    security = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=20", str(local)],
        capture_output=True,
        text=True,
    )
    assert security.returncode == 0, security.stdout[-2000:]
