"""Identify an IP and hand back the right driver (pyasic's factory, bounded and cross-checked).

pyasic's ``get_miner`` races a web probe against a socket probe, and its socket probe checks
"ANTMINER" before "VNISH": a VNish miner whose RPC answers first is taken for stock firmware
(reference/pyasic.md §4.1, pyasic PR #423). Writing a stock config to VNish, or reading no
serial where one exists, would follow. So every "stock Antminer" answer is confirmed with one
cheap HTTP request: stock firmware answers ``GET /`` with a Digest challenge; VNish serves
AnthillOS and ``/api/v1/info``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyasic
from pyasic.miners.factory import MinerFactory, MinerTypes, miner_factory

from agent.drivers import fastpath
from agent.drivers.base import Credentials, MinerDriver, MinerLogin
from agent.drivers.bounded import run_bounded
from agent.drivers.options import DriverOptions
from agent.drivers.pyasic_backend import PyasicDriver, classify
from agent.errors import DriverError, Timeout, Unreachable, Unsupported
from firmware_profiles import Profiles, load_profiles

DEFAULT_IDENTIFY_TIMEOUT_S = 10.0


def _is_stock_antminer(miner: Any) -> bool:
    return str(miner.make) == "AntMiner" and str(miner.firmware).lower() == "stock"


async def looks_like_vnish(ip: str, timeout_s: float) -> bool:
    """AnthillOS on ``GET /``, or a ``/api/v1/info`` that names VNish."""
    try:
        status, body = await fastpath.http_exchange(ip, "GET", "/", timeout_s=timeout_s)
        if b"AnthillOS" in body:
            return True
        if status == 401:
            return False  # lighttpd's Digest challenge: stock
        status, body = await fastpath.http_exchange(ip, "GET", "/api/v1/info", timeout_s=timeout_s)
    except DriverError:
        return False
    if status != 200:
        return False
    try:
        info = json.loads(body)
    except ValueError:
        return False
    return isinstance(info, dict) and "vnish" in str(info.get("fw_name", "")).lower()


async def cross_check(ip: str, miner: Any, timeout_s: float) -> Any:
    """Return ``miner``, or the VNish class for it if pyasic lost the race to stock."""
    if not _is_stock_antminer(miner) or not await looks_like_vnish(ip, timeout_s):
        return miner
    try:
        model = await asyncio.wait_for(miner_factory.get_miner_model_vnish(ip), timeout_s)
    except TimeoutError:
        model = None
    vnish = MinerFactory._select_miner_from_classes(
        ip, miner_model=model, miner_type=MinerTypes.VNISH
    )
    return vnish if vnish is not None else miner


async def _why_not_found(ip: str, timeout_s: float) -> DriverError:
    """pyasic found nothing: say whether nothing listens, something silent does, or garbage."""
    probe = min(timeout_s, 2.0)
    try:
        await fastpath.rpc_command(ip, "version", timeout_s=probe)
    except Unreachable:
        try:
            await fastpath.http_exchange(ip, "GET", "/", timeout_s=probe)
        except Unreachable:
            return Unreachable("nothing listens on ports 4028 and 80", ip=ip)
        except DriverError as exc:
            return exc
        return Unsupported("its web page is not one of a miner pyasic knows", ip=ip)
    except Timeout:
        return Timeout("accepts connections but never answers", ip=ip)
    except DriverError as exc:
        return exc
    return Unsupported("answers, but not as any miner pyasic knows", ip=ip)


@dataclass
class DriverFactory:
    """Identifies miners and keeps one driver (and one pyasic object) per IP."""

    credentials: Credentials = field(default_factory=dict)
    options: DriverOptions = field(default_factory=DriverOptions)
    identify_timeout: float = DEFAULT_IDENTIFY_TIMEOUT_S
    profiles: Profiles = field(default_factory=load_profiles)
    _drivers: dict[str, MinerDriver] = field(default_factory=dict, init=False, repr=False)

    async def driver_for(self, ip: str) -> MinerDriver:
        """The kept driver, or a new one after identification."""
        driver = self._drivers.get(ip)
        if driver is None:
            driver = await self.create(ip)
            self._drivers[ip] = driver
        return driver

    def forget(self, ip: str) -> None:
        """Drop a kept driver (gone, or its MAC/model changed: re-identify next time)."""
        self._drivers.pop(ip, None)

    @property
    def drivers(self) -> Mapping[str, MinerDriver]:
        return self._drivers

    async def create(self, ip: str) -> MinerDriver:
        """pyasic's factory under our deadline and byte cap (:mod:`agent.drivers.bounded`: its
        tasks and sockets end at the deadline), cross-checked, wrapped in a PyasicDriver."""

        async def identify() -> Any:
            miner = await pyasic.get_miner(ip)
            if miner is None:
                raise await _why_not_found(ip, self.identify_timeout)
            return await cross_check(ip, miner, min(self.identify_timeout, 3.0))

        try:
            miner = await run_bounded(
                identify,
                ip=ip,
                what="identify",
                timeout_s=self.identify_timeout,
                max_bytes=self.options.max_reply_bytes,
            )
        except Timeout:
            raise Timeout(f"not identified within {self.identify_timeout:g} s", ip=ip) from None
        except DriverError:
            raise
        except Exception as exc:
            raise classify(exc, ip, "identify") from exc
        family_profile = self.profiles.find_family(str(miner.make), str(miner.firmware))
        if family_profile is None:
            family = f"{str(miner.make).lower()}_{str(miner.firmware).lower()}".replace(" ", "_")
            login: MinerLogin | None = None
        else:
            family = family_profile.family
            login = self.credentials.get(family_profile.credentials)
        return PyasicDriver(
            ip, miner, family, login=login, options=self.options, profiles=self.profiles
        )


async def identify(
    ip: str,
    credentials: Credentials | None = None,
    options: DriverOptions | None = None,
    identify_timeout: float = DEFAULT_IDENTIFY_TIMEOUT_S,
) -> MinerDriver:
    """One-off: identify ``ip`` and return its driver (no caching)."""
    factory = DriverFactory(
        credentials=credentials or {},
        options=options or DriverOptions(),
        identify_timeout=identify_timeout,
    )
    return await factory.create(ip)
