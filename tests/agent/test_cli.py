"""``asicfleet agent`` against a simulated farm: scan and poll output, the loopback-only safety
rule, and one-line errors with a non-zero exit for every bad input."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from asicfleet.cli import app
from simulator.state import Fault
from tests.conftest import FarmFactory, first
from tests.farmproc import farm_process, free_port

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SCAN_KEYS = {"ip", "make", "model", "firmware", "serial", "mac"}


def invoke(*args: str) -> Result:
    return CliRunner().invoke(app, ["agent", *args])


async def ainvoke(*args: str) -> Result:
    """The farm is served by this test's event loop; the command runs its own in a thread."""
    return await asyncio.to_thread(invoke, *args)


def one_line_error(result: Result) -> str:
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    return lines[0]


def write_config(tmp_path: Path, segments: list[str], **extra: str) -> Path:
    path = tmp_path / "agent.toml"
    body = [
        f"segments = {json.dumps(segments)}",
        'data_dir = "data"',
        *(f"{k} = {v}" for k, v in extra.items()),
        "[controller]",
        f'url = "http://127.0.0.1:{free_port()}"',
    ]
    path.write_text("\n".join(body) + "\n")
    return path


def _net(shard_ips: list[str]) -> str:
    return shard_ips[0].rsplit(".", 1)[0] + ".0/24"


def _mac(value: str | None) -> str:
    return (value or "").replace(":", "").replace("-", "").upper()


async def test_scan_json_lists_exactly_the_identified_miners(farm: FarmFactory) -> None:
    shard = await farm(miners=8, mix="antminer=1,whatsminer=1,avalon=1,vnish=1", faults="offline=1")
    result = await ainvoke("scan", _net(list(shard.miners)), "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    live = {ip: m for ip, m in shard.miners.items() if Fault.OFFLINE not in m.faults}
    assert [r["ip"] for r in rows] == sorted(live, key=lambda ip: int(ip.rsplit(".", 1)[1]))
    for row in rows:
        assert set(row) == SCAN_KEYS
        true = live[row["ip"]]
        assert (row["make"], row["model"], row["firmware"]) == (
            true.make,
            true.model,
            true.firmware,
        )
        assert _mac(row["mac"]) == _mac(true.mac)
        assert row["serial"] == (None if true.personality == "avalon" else true.serial)


async def test_scan_table_names_every_miner(farm: FarmFactory) -> None:
    shard = await farm(miners=3, mix="antminer=1,whatsminer=1")
    result = await ainvoke("scan", _net(list(shard.miners)))
    assert result.exit_code == 0, result.output
    for header in ("IP", "make", "model", "firmware", "serial", "MAC"):
        assert header in result.stdout
    for ip, miner in shard.miners.items():
        assert ip in result.stdout and miner.serial in result.stdout
    assert "3 miner(s) identified" in result.stderr


async def test_poll_json_has_identity_and_state(farm: FarmFactory) -> None:
    shard = await farm(miners=4, mix="antminer=1,whatsminer=1")
    miner = first(shard, personality="whatsminer")
    result = await ainvoke("poll", miner.ip, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    expected = {"serial", "mac", "make", "model", "firmware", "pools", "hashrate", "power"}
    assert expected | {"is_mining"} <= set(data)
    assert (data["serial"], data["make"], data["model"]) == (miner.serial, miner.make, miner.model)
    assert _mac(data["mac"]) == _mac(miner.mac)
    assert [(p["url"], p["user"]) for p in data["pools"]] == [(p.url, p.user) for p in miner.pools]
    assert all(set(p) == {"url", "user", "status"} for p in data["pools"])
    assert data["is_mining"] is True and data["hashrate"] > 0 and data["power"] > 0

    table = await ainvoke("poll", miner.ip)
    assert table.exit_code == 0 and miner.serial in table.stdout and "TH/s" in table.stdout


async def test_poll_of_a_dead_or_silent_address_is_a_one_line_error(farm: FarmFactory) -> None:
    shard = await farm(miners=2, mix="antminer=1", faults="blackhole=1")
    net = _net(list(shard.miners))
    nobody = net.replace(".0/24", ".200")
    assert "nothing answers" in one_line_error(await ainvoke("poll", nobody, "--timeout", "1"))
    (silent,) = [ip for ip, m in shard.miners.items() if Fault.BLACKHOLE in m.faults]
    assert "timeout" in one_line_error(await ainvoke("poll", silent, "--timeout", "1"))


@pytest.mark.parametrize(
    ("command", "target", "why"),
    [
        ("scan", "10.0.0.0/24", "outside the allowed segments"),
        ("scan", "192.168.1.0/24", "outside the allowed segments"),
        ("scan", "127.0.0.0/8", "wider than a /16"),
        ("scan", "127.1.2.3/24", "host bits"),
        ("scan", "not-a-network", "not an IPv4"),
        ("poll", "10.1.2.3", "outside the allowed segments"),
        ("poll", "8.8.8.8", "outside the allowed segments"),
        ("poll", "127.1.2.0/24", "give one address"),
    ],
)
def test_targets_outside_loopback_are_refused_without_a_config(
    command: str, target: str, why: str
) -> None:
    result = invoke(command, target)
    assert result.exit_code == 2
    assert why in one_line_error(result)


def test_a_config_allows_its_own_segments_only(tmp_path: Path) -> None:
    config = write_config(tmp_path, ["10.77.0.0/24"])
    refused = invoke("scan", "127.9.9.0/24", "--config", str(config))
    assert "outside the allowed segments (10.77.0.0/24)" in one_line_error(refused)
    refused = invoke("poll", "10.77.1.5", "--config", str(config))
    assert "outside the allowed segments" in one_line_error(refused)


async def test_a_config_listing_a_loopback_segment_allows_it(
    farm: FarmFactory, tmp_path: Path
) -> None:
    shard = await farm(miners=2, mix="antminer=1")
    net = _net(list(shard.miners))
    config = write_config(tmp_path, [net])
    result = await ainvoke("scan", net, "--json", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert {r["ip"] for r in json.loads(result.stdout)} == set(shard.miners)


def test_bad_config_files_are_one_line_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("segments = [\n")
    for args in (
        ("scan", "127.9.0.0/24", "--config", str(broken)),
        ("status", "--config", str(broken)),
        ("run", "--config", str(broken)),
        ("status", "--config", str(tmp_path / "missing.toml")),
    ):
        result = invoke(*args)
        assert result.exit_code == 2, args
        one_line_error(result)
    typo = write_config(tmp_path, ["127.9.0.0/24"], pol_interval="5")
    assert "unknown field" in one_line_error(invoke("status", "--config", str(typo)))


def test_run_refuses_an_unenrolled_config_or_readable_secrets(tmp_path: Path) -> None:
    config = write_config(tmp_path, ["127.9.0.0/24"])
    assert "not enrolled" in one_line_error(invoke("run", "--config", str(config)))
    key = "A" * 43 + "="
    text = config.read_text().replace(
        "[controller]", 'agent_id = "ag_1"\nsite = "s1"\n[controller]'
    )
    config.write_text(text + f'public_key = "{key}"\n')
    secrets = tmp_path / "secrets.toml"
    secrets.write_text('agent_secret = "afa_x"\n')
    os.chmod(secrets, 0o644)
    error = one_line_error(invoke("run", "--config", str(config)))
    assert "mode 0644" in error and "chmod 600" in error


def test_a_group_writable_config_pinning_the_key_is_refused(tmp_path: Path) -> None:
    config = write_config(tmp_path, ["127.9.0.0/24"])
    config.write_text(config.read_text() + f'public_key = "{"A" * 43}="\n')
    os.chmod(config, 0o664)
    for args in (("status", "--config", str(config)), ("run", "--config", str(config))):
        result = invoke(*args)
        assert result.exit_code == 2, args
        error = one_line_error(result)
        assert "mode 0664" in error and f"chmod go-w {config}" in error
    os.chmod(config, 0o644)
    assert invoke("status", "--config", str(config)).exit_code != 2


def test_enroll_errors_are_one_line(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    token_file = tmp_path / "token"
    token_file.write_text("t" * 20 + "\n")
    bad_url = invoke(
        "enroll",
        "--controller",
        "ftp://x",
        "--token-file",
        str(token_file),
        "--config",
        str(config),
    )
    assert bad_url.exit_code == 2 and "--controller" in one_line_error(bad_url)
    unreachable = CliRunner().invoke(
        app,
        ["agent", "enroll", "--controller", f"http://127.0.0.1:{free_port()}", "--token-stdin",
         "--config", str(config)],
        input="t" * 20 + "\n",
    )  # fmt: skip
    assert "cannot reach" in one_line_error(unreachable)
    assert not config.exists()


def test_enroll_takes_the_token_from_stdin_or_a_file_not_the_process_list(
    tmp_path: Path,
) -> None:
    config = tmp_path / "agent.toml"
    base = ["enroll", "--controller", f"http://127.0.0.1:{free_port()}", "--config", str(config)]
    none = invoke(*base)
    assert none.exit_code == 2
    assert "one of --token-stdin (piped in) or --token-file" in one_line_error(none)
    token_file = tmp_path / "token"
    token_file.write_text("t" * 20)
    both = CliRunner().invoke(
        app, ["agent", *base, "--token-stdin", "--token-file", str(token_file)], input="x\n"
    )
    assert both.exit_code == 2 and "not --token-stdin and --token-file" in one_line_error(both)
    empty = CliRunner().invoke(app, ["agent", *base, "--token-stdin"], input="")
    assert empty.exit_code == 2
    assert (
        one_line_error(empty)
        == "error: standard input: expected the token on one line, found 0 lines"
    )
    missing = invoke(*base, "--token-file", str(tmp_path / "nope"))
    assert "--token-file" in one_line_error(missing) and "No such file" in missing.output
    # the flag still works, but says plainly that the process list shows it
    flag = invoke(*base, "--token", "t" * 20)
    lines = flag.stderr.strip().splitlines()
    assert lines[0].startswith("warning: --token is visible to every user of this host")
    assert "cannot reach" in lines[1] and len(lines) == 2
    assert not config.exists()


def test_status_before_the_daemon_ever_ran(tmp_path: Path) -> None:
    config = write_config(tmp_path, ["127.9.0.0/24"])
    result = invoke("status", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert "has not run" in result.stdout and "0 batch(es) waiting" in result.stdout
    data = json.loads(invoke("status", "--config", str(config), "--json").stdout)
    assert data == {"running": False, "outbox_depth": 0, "dead_letters": 0, "status": None}


def test_status_shows_parked_batches_failing_head_and_clock_skew(tmp_path: Path) -> None:
    import uuid
    from datetime import UTC, datetime

    from agent.config import load_config
    from agent.outbox import Outbox
    from contract import ReportBatch

    config = write_config(tmp_path, ["127.9.0.0/24"])
    now = datetime.now(UTC)
    with Outbox(load_config(config).outbox_path) as outbox:
        bad, stuck = (
            outbox.put(ReportBatch(batch_id=uuid.uuid4(), agent_clock=now, sequence=0))
            for _ in range(2)
        )
        outbox.park(bad.batch_id, "controller answered 422: observations.0.ip: bad", 422)
        outbox.failed(stuck.batch_id, "controller answered 503: db down")
        outbox.record_clock(-95.0, now)
    result = invoke("status", "--config", str(config))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "2 batch(es) waiting, 1 parked" in out  # the stuck one and the parking report
    assert f"parked: #{bad.sequence} {bad.batch_id}" in out and "(422)" in out
    assert "oldest batch failed 1 time(s): controller answered 503: db down" in out
    assert "95.0 s behind the controller" in out and "CHECK NTP" in out
    data = json.loads(invoke("status", "--config", str(config), "--json").stdout)
    assert data["clock_skew_s"] == -95.0 and data["parked"][0]["status_code"] == 422


def test_scan_as_a_real_process_keeps_progress_off_stdout(tmp_path: Path) -> None:
    subnet = f"127.{60 + os.getpid() % 30}.7.0/24"  # clear of the farm fixture's subnets
    with farm_process("--miners", "6", "--subnet", subnet, "--mix", "antminer=1,avalon=1"):
        done = subprocess.run(
            [sys.executable, "-m", "asicfleet", "agent", "scan", subnet, "--json"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert len(rows) == 6 and all(set(r) == SCAN_KEYS for r in rows)
    assert "6 miner(s) identified" in done.stderr


UNIT = Path(__file__).resolve().parents[2] / "systemd" / "asicfleet-agent.service"


def test_systemd_unit_is_hardened(tmp_path: Path) -> None:
    unit = UNIT.read_text()
    directives = dict(
        line.split("=", 1) for line in unit.splitlines() if "=" in line and line[:1].isalpha()
    )
    expected = {
        "User": "asicfleet-agent",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "StateDirectory": "asicfleet-agent",
        "StateDirectoryMode": "0700",
        "ReadWritePaths": "/var/lib/asicfleet-agent",
        "UMask": "0077",
        "KillSignal": "SIGTERM",
    }
    for key, value in expected.items():
        assert directives.get(key) == value, key
    assert directives["ExecStart"].endswith(
        "asicfleet agent run --config /etc/asicfleet/agent.toml"
    )
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
