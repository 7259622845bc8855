"""``asicfleet sim`` end to end: a real subprocess farm, its control API and its errors."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
from pathlib import Path

import pytest

from simulator.farm import build_farm, farm_spec
from tests.farmproc import farm_process, free_port, sim_command


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(sim_command(*args), capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mix", "antminer=5,bitaxe=1"], "unknown personality 'bitaxe'"),
        (["--subnet", "10.20.0.0/16"], "not inside 127.0.0.0/8"),
        (["--miners", "300", "--subnet", "127.40.0.0/24"], "do not fit in 127.40.0.0/24"),
        (["--faults", "gremlins=3%"], "unknown fault 'gremlins'"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(args: list[str], message: str) -> None:
    result = run_cli("run", *args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert message in lines[0]


def test_control_port_in_use_is_refused() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli(
            "run", "--miners", "2", "--subnet", "127.41.0.0/24", "--control-port", str(port)
        )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: control port 127.0.0.1:{port} is not free: Address already in use"
    ]


def test_miner_address_in_use_is_refused() -> None:
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.42.0.1", 4028))
        busy.listen()
        result = run_cli(
            "run",
            "--miners",
            "2",
            "--subnet",
            "127.42.0.0/24",
            "--mix",
            "avalon=1",
            "--control-port",
            str(free_port()),
        )
    assert result.returncode == 2
    assert "127.42.0.1: address already in use" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_run_writes_inventory_matching_the_seeded_farm(tmp_path: Path) -> None:
    inventory = tmp_path / "inventory.json"
    args = [
        "--miners",
        "40",
        "--subnet",
        "127.43.0.0/24",
        "--seed",
        "5",
        "--workers",
        "2",
        "--faults",
        "malware=2",
        "--inventory-out",
        str(inventory),
    ]
    with farm_process(*args) as farm:
        assert "40 miners" in farm.banner
        assert "2 worker process(es)" in farm.banner
        listed = json.loads(inventory.read_text())
        assert len(listed) == 40
        for entry in listed:
            assert {"ip", "make", "model", "firmware", "serial", "mac", "pools", "faults"} <= set(
                entry
            )
            assert all({"url", "user"} <= set(p) for p in entry["pools"])
        expected = build_farm(
            farm_spec(miners=40, subnet="127.43.0.0/24", seed=5, faults="malware=2")
        )
        assert [(e["ip"], e["serial"], e["mac"], e["model"]) for e in listed] == [
            (m.ip, m.serial, m.mac, m.model) for m in expected
        ]
        assert sum("malware" in e["faults"] for e in listed) == 2
        with farm.api() as api:
            health = api.get("/health").json()
        assert health == {"status": "ok", "miners": 40, "listening": 40, "shards": 2}


def _connect(ip: str, port: int) -> str:
    try:
        with socket.create_connection((ip, port), timeout=2) as sock:
            sock.sendall(b'{"command":"version"}')
            sock.settimeout(2)
            return "answered" if sock.recv(65536) else "closed"
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "silent"


def test_control_api_faults_tamper_and_log() -> None:
    with (
        farm_process(
            "--miners", "6", "--subnet", "127.44.0.0/24", "--mix", "avalon=1", "--workers", "2"
        ) as farm,
        farm.api() as api,
    ):
        ip = "127.44.0.5"  # lives in the second shard
        assert _connect(ip, 4028) == "answered"

        assert api.post(f"/miners/{ip}/faults", json={"fault": "offline"}).status_code == 200
        assert _connect(ip, 4028) == "refused"
        assert api.delete(f"/miners/{ip}/faults/offline").json()["faults"] == {}
        assert _connect(ip, 4028) == "answered"

        api.post(f"/miners/{ip}/faults", json={"fault": "blackhole"})
        assert _connect(ip, 4028) == "silent"
        api.delete(f"/miners/{ip}/faults")

        evil = [{"url": "stratum+tcp://evil.example:3333", "user": "thief.1", "password": "x"}]
        state = api.put(f"/miners/{ip}/pools", json={"pools": evil, "actor": "insider"}).json()
        assert state["pools"] == evil
        log = api.get(f"/miners/{ip}/log").json()
        assert any(e["via"] == "insider" and e["write"] for e in log)
        assert any(e["op"] == "version" for e in log)

        assert api.get("/miners/127.44.0.99").status_code == 404
        bad = api.post(f"/miners/{ip}/faults", json={"fault": "meteor"})
        assert bad.status_code == 400 and "unknown fault" in bad.json()["error"]
        assert api.put(f"/miners/{ip}/pools", json={"pools": "nope"}).status_code == 400

        reset = api.post(f"/miners/{ip}/reset").json()
        assert reset["pools"][0]["url"] != evil[0]["url"]
        assert len(api.get("/miners", params={"personality": "avalon"}).json()) == 6


def test_client_commands_talk_to_a_running_farm() -> None:
    with farm_process("--miners", "3", "--subnet", "127.45.0.0/24", "--mix", "avalon=1") as farm:
        url = farm.control_url
        out = run_cli("fault", "127.45.0.2", "slow", "--param", "seconds=0.2", "--control", url)
        assert out.returncode == 0 and "slow" in out.stdout
        listed = json.loads(run_cli("miners", "--json", "--fault", "slow", "--control", url).stdout)
        assert [m["ip"] for m in listed] == ["127.45.0.2"]
        assert run_cli("clear", "127.45.0.2", "--control", url).returncode == 0
        missing = run_cli("fault", "127.45.0.200", "slow", "--control", url)
        assert missing.returncode == 1 and "no virtual miner" in missing.stderr


def test_pyasic_scan_finds_every_live_miner_and_no_offline_one() -> None:
    import pyasic
    from pyasic import settings
    from pyasic.network import MinerNetwork

    args = ["--miners", "300", "--subnet", "127.46.0.0/22", "--seed", "9", "--faults", "offline=12"]
    with farm_process(*args) as farm, farm.api() as api:
        truth = api.get("/miners").json()
        live = {m["ip"] for m in truth if "offline" not in m["faults"]}
        offline = {m["ip"] for m in truth if "offline" in m["faults"]}
        assert len(offline) == 12

        async def scan() -> list[object]:
            # Unbounded (pyasic's default), 1,022 probes at once starve the event loop and
            # every identification hits pyasic's 3 s factory timeout; bound it as a user must.
            settings.update("network_scan_semaphore", 100)
            try:
                return await MinerNetwork.from_subnet("127.46.0.0/22").scan()
            finally:
                settings.update("network_scan_semaphore", None)

        found = asyncio.run(scan())
        found_ips = {str(m.ip) for m in found}
        assert found_ips == live
        by_ip = {m["ip"]: m for m in truth}
        for miner in found:
            assert isinstance(miner, pyasic.miners.base.BaseMiner)
            assert by_ip[str(miner.ip)]["make"] == miner.make
