"""Serve a slice of the farm from one process: listeners, fault timers, control operations.

A shard binds one listening socket per miner per port on the miner's own loopback
address. Offline miners simply have no listener (so clients get "connection refused");
a watcher task opens and closes listeners as reboots and flapping come and go.
"""

from __future__ import annotations

import asyncio
import copy
import errno
import logging
import time
from typing import Any

from aiohttp import web

from simulator import faults as fault_ops
from simulator import personalities
from simulator.errors import StartupError, UnknownMinerError
from simulator.personalities.base import Personality
from simulator.state import Fault, MinerState, Pool
from simulator.transport.rpc import RpcProtocol
from simulator.transport.web import build_web_app, start_web_runner

log = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.25
LISTEN_BACKLOG = 32


class Shard:
    """The miners one process serves, with their sockets."""

    def __init__(self, miners: list[MinerState]) -> None:
        self.miners: dict[str, MinerState] = {m.ip: m for m in miners}
        self._pristine: dict[str, MinerState] = {m.ip: copy.deepcopy(m) for m in miners}
        self._personalities: dict[str, Personality] = {
            m.ip: personalities.get(m.personality) for m in miners
        }
        self._servers: dict[str, list[asyncio.Server]] = {}
        self._runners: dict[str, web.AppRunner] = {}
        self._watch_task: asyncio.Task[None] | None = None
        self._dynamic: set[str] = set()

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind every live miner's ports; raises :class:`StartupError` with the cause."""
        for personality in {p.name: p for p in self._personalities.values()}.values():
            if personality.web_ports:
                app = build_web_app(personality, self.lookup)
                self._runners[personality.name] = await start_web_runner(app)
        now = time.time()
        for ip, miner in self.miners.items():
            self._note_dynamic(miner, now)
            if miner.is_up(now):
                await self._open(ip)
        self._watch_task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
        for ip in list(self._servers):
            self._close(ip)
        for runner in self._runners.values():
            await runner.cleanup()

    def lookup(self, ip: str) -> tuple[MinerState, Personality] | None:
        miner = self.miners.get(ip)
        if miner is None:
            return None
        return miner, self._personalities[ip]

    async def _open(self, ip: str) -> None:
        if ip in self._servers:
            return
        loop = asyncio.get_running_loop()
        personality = self._personalities[ip]
        servers: list[asyncio.Server] = []
        try:
            for port in personality.rpc_ports:
                servers.append(
                    await loop.create_server(
                        lambda port=port: RpcProtocol(self.lookup, port),  # type: ignore[misc]
                        host=ip,
                        port=port,
                        reuse_address=True,
                        backlog=LISTEN_BACKLOG,
                    )
                )
            for port in personality.web_ports:
                runner = self._runners[personality.name]
                assert runner.server is not None
                servers.append(
                    await loop.create_server(
                        runner.server,
                        host=ip,
                        port=port,
                        reuse_address=True,
                        backlog=LISTEN_BACKLOG,
                    )
                )
        except OSError as exc:
            for server in servers:
                server.close()
            raise StartupError(_explain_bind_error(ip, exc)) from exc
        self._servers[ip] = servers

    def _close(self, ip: str) -> None:
        for server in self._servers.pop(ip, []):
            server.close()

    def _note_dynamic(self, miner: MinerState, now: float) -> None:
        """Track miners whose reachability changes over time, so the watcher stays cheap."""
        if (
            Fault.FLAPPING in miner.faults
            or miner.booted_at > now
            or (Fault.OFFLINE in miner.faults)
        ):
            self._dynamic.add(miner.ip)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL_S)
            now = time.time()
            # A reboot asked for over a miner's own protocol makes it go dark too.
            self._dynamic.update(ip for ip, m in self.miners.items() if m.booted_at > now)
            for ip in list(self._dynamic):
                miner = self.miners[ip]
                up = miner.is_up(now)
                try:
                    if up and ip not in self._servers:
                        await self._open(ip)
                    elif not up and ip in self._servers:
                        self._close(ip)
                except StartupError as exc:
                    log.warning("cannot reopen %s: %s", ip, exc)
                    continue
                if up and Fault.FLAPPING not in miner.faults and Fault.OFFLINE not in miner.faults:
                    self._dynamic.discard(ip)

    async def _refresh(self, miner: MinerState) -> None:
        """Make the listeners match the miner's reachability right now."""
        now = time.time()
        self._note_dynamic(miner, now)
        if miner.is_up(now):
            await self._open(miner.ip)
        else:
            self._close(miner.ip)

    # --- control operations (used by the control API) ---------------------------------------------

    def miner(self, ip: str) -> MinerState:
        try:
            miner = self.miners[ip]
        except KeyError:
            raise UnknownMinerError(f"no virtual miner at {ip}") from None
        miner.tick(time.time())
        return miner

    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "miners": len(self.miners), "listening": len(self._servers)}

    async def list_miners(self) -> list[dict[str, Any]]:
        now = time.time()
        result = []
        for miner in self.miners.values():
            miner.tick(now)
            result.append(miner.as_dict(now))
        return result

    async def get_miner(self, ip: str) -> dict[str, Any]:
        return self.miner(ip).as_dict(time.time())

    async def patch_miner(self, ip: str, changes: dict[str, Any]) -> dict[str, Any]:
        miner = self.miner(ip)
        if "api_write_enabled" in changes:
            miner.api_write_enabled = bool(changes["api_write_enabled"])
        if "web_password" in changes:
            miner.credentials.web_password = str(changes["web_password"])
        if "api_password" in changes:
            miner.credentials.api_password = str(changes["api_password"])
        miner.log(time.time(), "control", "settings", detail=", ".join(sorted(changes)))
        return miner.as_dict(time.time())

    async def inject_fault(self, ip: str, fault: str, params: dict[str, Any]) -> dict[str, Any]:
        miner = self.miner(ip)
        fault_ops.inject(miner, Fault(fault), params, time.time())
        await self._refresh(miner)
        return miner.as_dict(time.time())

    async def clear_fault(self, ip: str, fault: str | None) -> dict[str, Any]:
        miner = self.miner(ip)
        fault_ops.clear(miner, None if fault is None else Fault(fault), time.time())
        await self._refresh(miner)
        return miner.as_dict(time.time())

    async def tamper_pools(
        self, ip: str, pools: list[dict[str, Any]], actor: str
    ) -> dict[str, Any]:
        """Change pools behind the operator's back, as malware or an insider would."""
        miner = self.miner(ip)
        now = time.time()
        miner.pools = [
            Pool(str(p["url"]), str(p["user"]), str(p.get("password", "x"))) for p in pools
        ]
        miner.mining_resumes_at = now + miner.restart_seconds
        miner.log(now, actor, "pools", write=True, detail="tampered via control API")
        return miner.as_dict(now)

    async def reboot(self, ip: str) -> dict[str, Any]:
        miner = self.miner(ip)
        miner.reboot(time.time(), "control")
        await self._refresh(miner)
        return miner.as_dict(time.time())

    async def reset(self, ip: str) -> dict[str, Any]:
        """Put the miner back exactly as the farm was generated (start faults included)."""
        self.miner(ip)
        fresh = copy.deepcopy(self._pristine[ip])
        self.miners[ip] = fresh
        await self._refresh(fresh)
        return fresh.as_dict(time.time())

    async def request_log(self, ip: str) -> list[dict[str, Any]]:
        return list(self.miner(ip).request_log)

    async def clear_log(self, ip: str) -> None:
        self.miner(ip).request_log.clear()


def _explain_bind_error(ip: str, exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"cannot listen on {ip}: address already in use (is another farm running there?)"
    if exc.errno == errno.EACCES:
        return (
            f"cannot listen on {ip}: permission denied "
            "(ports below 1024 need root or CAP_NET_BIND_SERVICE)"
        )
    if exc.errno == errno.EMFILE:
        return f"cannot listen on {ip}: too many open files (use more --workers)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {ip}: address not available on this host"
    return f"cannot listen on {ip}: {exc.strerror or exc}"
