"""Run a whole farm: shard worker processes behind one control API.

Why processes: every miner needs a listening socket per port on its own address, and a
process here may hold at most 20,000 open files. Splitting the farm into shards of at
most :data:`LISTENERS_PER_SHARD` sockets keeps each process well inside that limit and
puts both cores to work. Shards talk to the supervisor over a private HTTP control
server on 127.0.0.1; the supervisor's public control API forwards to them.
"""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import os
import signal
import socket
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from simulator import personalities
from simulator.control import build_control_app
from simulator.errors import FarmSpecError, StartupError, UnknownMinerError
from simulator.farm import FarmSpec, build_farm
from simulator.state import MinerState

LISTENERS_PER_SHARD = 8_000
MINERS_PER_SHARD_MIN = 400  # below this a second process costs more than it saves
SHARD_READY_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class ShardHandle:
    index: int
    process: multiprocessing.process.BaseProcess
    control_url: str
    ips: frozenset[str]


def listeners_for(miners: list[MinerState]) -> int:
    total = 0
    for miner in miners:
        personality = personalities.get(miner.personality)
        total += len(personality.rpc_ports) + len(personality.web_ports)
    return total


def plan_shards(miners: list[MinerState], workers: int | None) -> list[list[MinerState]]:
    """Split the farm into contiguous slices, one per worker process."""
    if workers is None:
        by_files = math.ceil(listeners_for(miners) / LISTENERS_PER_SHARD)
        by_cores = min(os.cpu_count() or 1, math.ceil(len(miners) / MINERS_PER_SHARD_MIN))
        workers = max(1, by_files, by_cores)
    workers = max(1, min(workers, len(miners)))
    size = math.ceil(len(miners) / workers)
    return [miners[i : i + size] for i in range(0, len(miners), size)]


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind the control port now, so that 'port in use' is reported before anything starts."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"control port {host}:{port} is not free: {exc.strerror}") from exc
    return sock


# --- the worker side --------------------------------------------------------------------------


def shard_main(miners: list[MinerState], conn: Connection) -> None:
    """Entry point of a worker process: serve the slice until the supervisor goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when we stop
    try:
        asyncio.run(_serve_shard(miners, conn))
    except StartupError as exc:
        conn.send(("error", str(exc)))


async def _serve_shard(miners: list[MinerState], conn: Connection) -> None:
    from simulator.shard import Shard

    shard = Shard(miners)
    await shard.start()
    runner = web.AppRunner(build_control_app(shard), handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.Server)
    port = server.sockets[0].getsockname()[1]
    conn.send(("ready", port))
    loop = asyncio.get_running_loop()
    gone = asyncio.Event()
    loop.add_reader(conn.fileno(), gone.set)  # readable means EOF: the supervisor died or quit
    await gone.wait()
    await runner.cleanup()
    await shard.stop()


# --- the supervisor side --------------------------------------------------------------------


class ShardRouter:
    """The control API's view of a farm spread over worker processes."""

    def __init__(self, shards: list[ShardHandle], session: aiohttp.ClientSession) -> None:
        self._shards = shards
        self._session = session
        self._owner = {ip: shard for shard in shards for ip in shard.ips}

    def _shard_for(self, ip: str) -> ShardHandle:
        try:
            return self._owner[ip]
        except KeyError:
            raise UnknownMinerError(f"no virtual miner at {ip}") from None

    async def _call(self, shard: ShardHandle, method: str, path: str, body: Any = None) -> Any:
        async with self._session.request(method, shard.control_url + path, json=body) as resp:
            payload = await resp.json()
            if resp.status == 404:
                raise UnknownMinerError(payload.get("error", "not found"))
            if resp.status >= 400:
                raise FarmSpecError(payload.get("error", f"shard answered {resp.status}"))
            return payload

    async def _for_ip(self, method: str, ip: str, suffix: str = "", body: Any = None) -> Any:
        return await self._call(self._shard_for(ip), method, f"/miners/{ip}{suffix}", body)

    async def health(self) -> dict[str, Any]:
        states = await asyncio.gather(*(self._call(s, "GET", "/health") for s in self._shards))
        return {
            "status": "ok",
            "miners": sum(s["miners"] for s in states),
            "listening": sum(s["listening"] for s in states),
            "shards": len(self._shards),
        }

    async def list_miners(self) -> list[dict[str, Any]]:
        parts = await asyncio.gather(*(self._call(s, "GET", "/miners") for s in self._shards))
        return [miner for part in parts for miner in part]

    async def get_miner(self, ip: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._for_ip("GET", ip)
        return result

    async def patch_miner(self, ip: str, changes: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self._for_ip("PATCH", ip, "", changes)
        return result

    async def inject_fault(self, ip: str, fault: str, params: dict[str, Any]) -> dict[str, Any]:
        body = {"fault": fault, "params": params}
        result: dict[str, Any] = await self._for_ip("POST", ip, "/faults", body)
        return result

    async def clear_fault(self, ip: str, fault: str | None) -> dict[str, Any]:
        suffix = "/faults" if fault is None else f"/faults/{fault}"
        result: dict[str, Any] = await self._for_ip("DELETE", ip, suffix)
        return result

    async def tamper_pools(
        self, ip: str, pools: list[dict[str, Any]], actor: str
    ) -> dict[str, Any]:
        body = {"pools": pools, "actor": actor}
        result: dict[str, Any] = await self._for_ip("PUT", ip, "/pools", body)
        return result

    async def reboot(self, ip: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._for_ip("POST", ip, "/reboot")
        return result

    async def reset(self, ip: str) -> dict[str, Any]:
        result: dict[str, Any] = await self._for_ip("POST", ip, "/reset")
        return result

    async def request_log(self, ip: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._for_ip("GET", ip, "/log")
        return result

    async def clear_log(self, ip: str) -> None:
        await self._for_ip("DELETE", ip, "/log")


@dataclass(frozen=True)
class FarmStarted:
    """What the supervisor tells the person who started the farm."""

    miners: int
    first_ip: str
    last_ip: str
    counts: dict[str, int]
    shards: int
    control_url: str
    startup_seconds: float
    inventory_path: Path | None


async def run_farm(
    spec: FarmSpec,
    control_port: int,
    workers: int | None,
    inventory_out: Path | None,
    on_ready: Callable[[FarmStarted], None],
    stop: asyncio.Event | None = None,
) -> None:
    """Start the farm, call ``on_ready``, serve until ``stop`` is set or a signal arrives."""
    started = time.monotonic()
    control_sock = reserve_port("127.0.0.1", control_port)
    miners = build_farm(spec)
    slices = plan_shards(miners, workers)
    ctx = multiprocessing.get_context("spawn")
    handles: list[ShardHandle] = []
    pipes: list[Connection] = []
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    pending: list[tuple[int, multiprocessing.process.BaseProcess, Connection, frozenset[str]]] = []
    try:
        for index, part in enumerate(slices):
            parent_conn, child_conn = ctx.Pipe()
            process = ctx.Process(
                target=shard_main,
                args=(part, child_conn),
                name=f"asicfleet-sim-{index}",
                daemon=True,
            )
            process.start()
            child_conn.close()
            pipes.append(parent_conn)
            pending.append((index, process, parent_conn, frozenset(m.ip for m in part)))
        for index, started_process, conn, ips in pending:
            kind, value = await asyncio.wait_for(
                asyncio.to_thread(_receive, conn, started_process), SHARD_READY_TIMEOUT_S
            )
            if kind != "ready":
                raise StartupError(str(value))
            handles.append(ShardHandle(index, started_process, f"http://127.0.0.1:{value}", ips))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            router = ShardRouter(handles, session)
            runner = web.AppRunner(build_control_app(router), handle_signals=False, access_log=None)
            await runner.setup()
            await web.SockSite(runner, control_sock).start()
            if inventory_out is not None:
                write_inventory(inventory_out, await router.list_miners())
            counts = Counter(m.personality for m in miners)
            on_ready(
                FarmStarted(
                    miners=len(miners),
                    first_ip=miners[0].ip,
                    last_ip=miners[-1].ip,
                    counts=dict(counts),
                    shards=len(handles),
                    control_url=f"http://127.0.0.1:{control_port}",
                    startup_seconds=time.monotonic() - started,
                    inventory_path=inventory_out,
                )
            )
            watchdog = asyncio.create_task(_watch_workers(handles, stop))
            await stop.wait()
            watchdog.cancel()
            await runner.cleanup()
        dead = [h for h in handles if not h.process.is_alive()]
        if dead:
            raise StartupError(f"worker process {dead[0].process.name} died unexpectedly")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        for conn in pipes:
            conn.close()
        for _, worker, _, _ in pending:
            worker.join(timeout=5)
            if worker.is_alive():
                worker.terminate()
        control_sock.close()


def _receive(conn: Connection, process: multiprocessing.process.BaseProcess) -> tuple[str, Any]:
    while not conn.poll(0.2):
        if not process.is_alive():
            return ("error", f"worker process exited with code {process.exitcode} while starting")
    try:
        message: tuple[str, Any] = conn.recv()
    except EOFError:
        return ("error", "worker process closed its pipe while starting")
    return message


async def _watch_workers(handles: list[ShardHandle], stop: asyncio.Event) -> None:
    while not stop.is_set():
        await asyncio.sleep(1.0)
        if any(not h.process.is_alive() for h in handles):
            stop.set()


def write_inventory(path: Path, miners: list[dict[str, Any]]) -> None:
    """Write the true state of every miner, atomically (a crash never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(miners, handle, indent=1)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
