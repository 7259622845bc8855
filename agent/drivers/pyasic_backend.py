"""The pyasic backend: identification, the pyasic poll path, and writes, behind MinerDriver.

pyasic 0.79 is frozen upstream, so its breakages that matter are fixed here rather than
patched in place (reference/pyasic.md §0, §9):

- every call runs under a timeout (pyasic has 100 s RPC reads and no gRPC timeout);
- a pool URL with an unfamiliar scheme aborts pyasic's whole ``get_data``: we read the rest
  without pools and parse the raw ``pools`` reply ourselves, keeping the URL as a string;
- an offline or garbled miner comes back from pyasic as "mining" with every field None: we
  notice the empty read and ask the RPC port ourselves why (refused, silent, malformed);
- is-mining is derived from the current hashrate (pyasic says Avalon always mines and a
  restarting Antminer mines);
- Antminer writes are read-modify-write with a check that the read worked (on a refused login
  pyasic hands back a pool-less config, and writing that back wipes the pools);
- Whatsminer pools go through ``update_pools`` (``send_config`` adds a power-limit write that
  reboots the miner); VNish through ``post_settings`` with normalised URLs; Avalon through
  Canaan's raw ``setpool`` (pyasic's ``send_config`` is a silent no-op there).

Every exception leaving this module is a :class:`~agent.errors.DriverError`.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import httpx
from pyasic.config import MinerConfig, MiningModeConfig
from pyasic.config.pools import PoolConfig
from pyasic.errors import APIError
from pydantic import ValidationError

from agent.drivers import fastpath
from agent.drivers.base import (
    Identity,
    MinerDriver,
    MinerLogin,
    PollSnapshot,
    PoolStatus,
    PoolTarget,
    derive_is_mining,
    hottest,
    normalise_mac,
    normalise_pool_url,
    pool_kind,
    utcnow,
)
from agent.drivers.bounded import run_bounded
from agent.drivers.options import DriverOptions as DriverOptions  # re-exported
from agent.errors import (
    AuthFailed,
    DriverError,
    MalformedReply,
    Timeout,
    Unreachable,
    Unsupported,
)
from contract.text import clean_text
from firmware_profiles import Profiles, ResolvedProfile, load_profiles

T = TypeVar("T")

HOT_FIELDS = ("hashrate", "wattage", "pools", "is_mining", "hashboards", "fans")
"""The pyasic ``get_data`` options the hot poll needs (hashboards carry the temperatures)."""

_AUTH_WORDS = re.compile(
    r"enc json load err|can't access write cmd|password|unauthori|authenticat|token|"
    r"access denied|forbidden|\b401\b|\b403\b",
    re.IGNORECASE,
)
_UNREACHABLE_WORDS = re.compile(
    r"connect|refused|unreachable|no route|reset by peer|HTTP error", re.IGNORECASE
)
_SN = re.compile(r"SN:\s*(\S+)")
_NO_SERIAL = {"", "N/A", "NA", "NONE", "NULL", "UNKNOWN"}


def classify(exc: BaseException, ip: str, doing: str) -> DriverError:
    """Turn whatever pyasic, httpx or the OS raised into one typed DriverError."""
    if isinstance(exc, DriverError):
        exc.ip = exc.ip or ip
        return exc
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return Timeout(f"{doing}: no answer in time", ip=ip)
    if isinstance(exc, APIError):
        message = str(getattr(exc, "message", None) or exc)
        if _AUTH_WORDS.search(message):
            return AuthFailed(f"{doing}: {message}", ip=ip)
        if _UNREACHABLE_WORDS.search(message):
            return Unreachable(f"{doing}: {message}", ip=ip)
        return DriverError(f"{doing}: {message}", ip=ip)
    if isinstance(exc, httpx.HTTPError | ConnectionError | OSError):
        return Unreachable(f"{doing}: {exc or type(exc).__name__}", ip=ip)
    if isinstance(exc, ValueError | KeyError | TypeError | IndexError | ValidationError):
        return MalformedReply(f"{doing}: {type(exc).__name__}: {exc}"[:300], ip=ip)
    return DriverError(f"{doing}: {type(exc).__name__}: {exc}"[:300], ip=ip)


def hashrate_ths(value: Any) -> float | None:
    """pyasic hashrate -> TH/s; its generic class (unknown models) reports plain H/s."""
    if value is None:
        return None
    try:
        rate = float(value)
        scale = getattr(getattr(value, "unit", None), "value", 10**12)
        return round(rate * float(scale) / 1e12, 3)
    except (TypeError, ValueError):
        return None


def pools_from_pyasic(pools: Sequence[Any]) -> tuple[PoolStatus, ...]:
    """pyasic PoolMetrics -> PoolStatus; unconfigured slots dropped, the dev fee labelled."""
    out = []
    for pool in pools:
        user = str(pool.user or "")
        url = str(pool.url) if pool.url is not None else ("DevFee" if user == "DevFee" else "")
        if not url:
            continue
        out.append(
            PoolStatus(
                url=url,
                user=user,
                status="alive" if pool.alive else "dead",
                active=None if pool.active is None else bool(pool.active),
                kind=pool_kind(url, user),
            )
        )
    return tuple(out)


def snapshot_from_data(
    ip: str, data: Any, pools: tuple[PoolStatus, ...] | None, observed_at: datetime
) -> PollSnapshot | None:
    """A pyasic MinerData -> snapshot; None when pyasic read nothing at all (offline/garbage)."""
    rate = hashrate_ths(data.hashrate)
    temps = [getattr(board, "temp", None) for board in data.hashboards or []]
    fans = tuple(int(f.speed) for f in data.fans or [] if f.speed is not None)
    polled = pools if pools is not None else pools_from_pyasic(data.pools or [])
    power = None if data.wattage is None else float(data.wattage)
    if rate is None and power is None and not polled and hottest(temps) is None:
        return None
    return PollSnapshot(
        ip=ip,
        observed_at=observed_at,
        reachable=True,
        is_mining=derive_is_mining(rate, data.is_mining),
        hashrate_ths=rate,
        power_w=power,
        temperature_c=hottest(temps),
        fan_rpm=fans,
        pools=polled,
    )


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _serial(value: Any) -> str | None:
    text = _text(value)
    return None if text is None or text.upper() in _NO_SERIAL else text


def _mac_of(raw: Any, notes: list[str]) -> str | None:
    """The normalised MAC; a value that is not one is ignored and noted, not dropped silently."""
    mac = normalise_mac(raw)
    if mac is None and raw is not None and str(raw).strip():
        shown = clean_text(str(raw), 40).text
        notes.append(f"mac: {shown!r} is not a MAC address, ignored")
    return mac


def _first_row(reply: Mapping[str, Any], section: str) -> dict[str, Any]:
    rows = reply.get(section)
    if isinstance(rows, list) and rows and isinstance(rows[0], dict):
        return rows[0]
    return {}


class PyasicDriver(MinerDriver):
    """One miner behind a kept pyasic object (plus our fast path for the hot poll)."""

    def __init__(
        self,
        ip: str,
        miner: Any,
        family: str,
        *,
        login: MinerLogin | None = None,
        options: DriverOptions | None = None,
        profiles: Profiles | None = None,
    ) -> None:
        self.ip = ip
        self.miner = miner
        self.family = family
        self.login = login
        self.options = options or DriverOptions()
        self._profiles = profiles or load_profiles()
        self.profile: ResolvedProfile | None = (
            self._profiles.resolve(family, None) if family in self._profiles.families else None
        )
        self.identity: Identity | None = None
        self._vnish: fastpath.VnishWeb | None = None
        self._apply_login()

    # --- setup --------------------------------------------------------------------------------

    def _apply_login(self) -> None:
        """pyasic reads global default passwords; per-miner ones go onto its clients."""
        login = self.login
        if login is None:
            return
        web = getattr(self.miner, "web", None)
        rpc = getattr(self.miner, "rpc", None)
        if self.family == "whatsminer_v2":
            if rpc is not None and login.password is not None:
                rpc.pwd = login.password
            return
        if web is not None:
            if login.password is not None:
                web.pwd = login.password
            if login.username is not None and hasattr(web, "username"):
                web.username = login.username

    @property
    def fast_path(self) -> bool:
        caps = self.profile.capabilities if self.profile else None
        return bool(self.options.fast_path and caps and caps.fast_path) and fastpath.supports(
            self.family
        )

    def _web_password(self, default: str) -> str:
        if self.login is not None and self.login.password:
            return self.login.password
        web = getattr(self.miner, "web", None)
        password = getattr(web, "pwd", None)
        return str(password) if password else default

    def _web_user(self, default: str) -> str:
        if self.login is not None and self.login.username:
            return self.login.username
        return default

    async def _guard(self, what: str, call: Callable[[], Awaitable[T]], timeout_s: float) -> T:
        """``call`` bounded (deadline and byte cap, see :mod:`agent.drivers.bounded`); every
        exception comes out as a DriverError."""
        try:
            return await run_bounded(
                call, ip=self.ip, what=what, timeout_s=timeout_s,
                max_bytes=self.options.max_reply_bytes,
            )  # fmt: skip
        except Exception as exc:
            raise classify(exc, self.ip, what) from exc

    # --- reads --------------------------------------------------------------------------------

    async def poll(self) -> PollSnapshot:
        if self.fast_path:
            return await self.poll_fast()
        return await self.poll_pyasic()

    async def poll_fast(self) -> PollSnapshot:
        """One multi-command round trip parsed by us (VNish adds its web summary)."""
        if not fastpath.supports(self.family):
            return PollSnapshot.failed(self.ip, Unsupported(f"no fast path for {self.family}"))
        vnish = None
        if self.family == "vnish":
            if self._vnish is None:
                self._vnish = fastpath.VnishWeb(
                    self.ip, self._web_password("admin"), self.options.timeout
                )
            vnish = self._vnish
        return await fastpath.fast_poll(
            self.ip,
            self.family,
            timeout_s=self.options.timeout,
            vnish=vnish,
            max_bytes=self.options.max_reply_bytes,
        )

    async def poll_pyasic(self) -> PollSnapshot:
        """``get_data(include=HOT_FIELDS)`` with our fixes; never raises."""
        observed_at = utcnow()

        async def read() -> PollSnapshot | DriverError:
            data, pools = await self._hot_data()
            snapshot = snapshot_from_data(self.ip, data, pools, observed_at)
            return snapshot if snapshot is not None else await self._diagnose()

        try:
            result = await run_bounded(
                read, ip=self.ip, what="poll", timeout_s=self.options.timeout,
                max_bytes=self.options.max_reply_bytes,
            )  # fmt: skip
        except Timeout:
            result = Timeout(f"no complete reply within {self.options.timeout:g} s", ip=self.ip)
        except Exception as exc:
            result = classify(exc, self.ip, "poll")
        if isinstance(result, PollSnapshot):
            return result
        return PollSnapshot.failed(self.ip, result, observed_at)

    async def _hot_data(self) -> tuple[Any, tuple[PoolStatus, ...] | None]:
        try:
            return await self.miner.get_data(include=list(HOT_FIELDS)), None
        except APIError as exc:
            if "pools" not in str(exc):
                raise
        # pyasic's PoolUrl refused a URL (stratum+tls://, malware's odd schemes …): read the
        # rest without pools and keep the raw URLs ourselves.
        rest = [f for f in HOT_FIELDS if f != "pools"]
        data = await self.miner.get_data(include=rest)
        try:
            raw = await self.miner.rpc.pools()
        except APIError:
            return data, ()
        return data, fastpath.parse_pools(raw if isinstance(raw, dict) else {})

    async def _diagnose(self) -> DriverError:
        """pyasic read nothing: ask the RPC port ourselves what is wrong."""
        try:
            reply = await fastpath.rpc_command(
                self.ip, "summary", timeout_s=self.options.timeout,
                max_bytes=self.options.max_reply_bytes,
            )  # fmt: skip
        except DriverError as exc:
            return exc
        ok, message = fastpath.status_of(reply)
        if not ok:
            return DriverError(f"summary refused: {message}", ip=self.ip)
        return MalformedReply("pyasic could not read the miner's replies", ip=self.ip)

    async def identify(self) -> Identity:
        """Serial, MAC, model, firmware version and board/PSU serials, per family."""
        readers = {
            "antminer_stock": self._identify_antminer,
            "whatsminer_v2": self._identify_whatsminer,
            "avalon": self._identify_avalon,
            "vnish": self._identify_vnish,
        }
        reader = readers.get(self.family, self._identify_generic)
        identity = await self._guard("identify", reader, self.options.timeout * 2)
        self.identity = identity
        if self.family in self._profiles.families:
            self.profile = self._profiles.resolve(self.family, identity.model)
        return identity

    def _base(self) -> dict[str, Any]:
        return {
            "ip": self.ip,
            "make": str(self.miner.make),
            "firmware": str(self.miner.firmware).lower(),
            "family": self.family,
        }

    def _web_failure(self, reply: Mapping[str, Any], doing: str) -> DriverError:
        """pyasic's Antminer web client never raises; it returns success False and a message."""
        message = str(reply.get("message") or "no data")
        if message.startswith("HTTP error"):
            return Unreachable(f"{doing}: {message}", ip=self.ip)
        if message.startswith("Failed to decode"):
            return MalformedReply(f"{doing}: {message}", ip=self.ip)
        return AuthFailed(f"{doing}: web login refused ({message})", ip=self.ip)

    async def _identify_antminer(self) -> Identity:
        notes: list[str] = []  # what cleaning the MAC took (strings: Identity itself)
        web, rpc = self.miner.web, self.miner.rpc
        if web is None:
            # pyasic fell back to an RPC-only class: the model could not be read, which on a
            # stock Antminer means its replies are garbled.
            raise MalformedReply(
                "identify: model unreadable (pyasic chose no web client)", ip=self.ip
            )
        info, stats, version = await asyncio.gather(
            web.get_system_info(), web.send_command("stats"), rpc.version()
        )
        if not isinstance(info, dict) or "macaddr" not in info:
            raise self._web_failure(info if isinstance(info, dict) else {}, "get_system_info")
        chains = _first_row(stats, "STATS").get("chain", []) if isinstance(stats, dict) else []
        serial = _serial(info.get("serinum"))
        return Identity(
            **self._base(),
            model=_text(info.get("minertype")) or str(self.miner.model),
            firmware_version=_text(_first_row(version, "VERSION").get("CompileTime")),
            mac=_mac_of(info.get("macaddr"), notes),
            cleaned=tuple(notes),
            serial=serial,
            serial_source="web:get_system_info.serinum" if serial else None,
            hashboard_serials=tuple(
                s for c in chains if isinstance(c, dict) and (s := _serial(c.get("sn")))
            ),
            hostname=_text(info.get("hostname")),
        )

    async def _identify_whatsminer(self) -> Identity:
        notes: list[str] = []  # what cleaning the MAC took (strings: Identity itself)
        rpc = self.miner.rpc
        info, details, devs, version = await asyncio.gather(
            rpc.send_command("get_miner_info", allow_warning=False),
            rpc.send_command("devdetails"),
            rpc.send_command("devs"),
            rpc.send_command("get_version"),
        )
        msg = info.get("Msg") if isinstance(info.get("Msg"), dict) else {}
        vmsg = version.get("Msg") if isinstance(version.get("Msg"), dict) else {}
        serial = _serial(msg.get("minersn"))
        rows = devs.get("DEVS") if isinstance(devs.get("DEVS"), list) else []
        return Identity(
            **self._base(),
            model=_text(_first_row(details, "DEVDETAILS").get("Model")) or str(self.miner.model),
            firmware_version=_text(vmsg.get("fw_ver")),
            mac=_mac_of(msg.get("mac"), notes),
            cleaned=tuple(notes),
            serial=serial,
            serial_source="rpc:get_miner_info.minersn" if serial else None,
            hashboard_serials=tuple(
                s for r in rows if isinstance(r, dict) and (s := _serial(r.get("PCB SN")))
            ),
            psu_serial=_serial(msg.get("powersn")),
            hostname=_text(msg.get("hostname")),
        )

    async def _identify_avalon(self) -> Identity:
        notes: list[str] = []  # what cleaning the MAC took (strings: Identity itself)
        rpc = self.miner.rpc
        version = _first_row(await rpc.version(), "VERSION")

        async def board_serial(index: int) -> str | None:
            try:
                reply = await rpc.send_command("ascset", parameters=f"0,hash-sn-read,{index}")
            except APIError:
                return None
            status = reply.get("STATUS")
            msg = status[0].get("Msg", "") if isinstance(status, list) and status else ""
            found = _SN.search(str(msg))
            return _serial(found.group(1)) if found else None

        boards = await asyncio.gather(*(board_serial(i) for i in range(4)))
        return Identity(
            **self._base(),
            model=_text(version.get("PROD")) or str(self.miner.model),
            firmware_version=_text(version.get("VERSION")),
            mac=_mac_of(version.get("MAC"), notes),
            cleaned=tuple(notes),
            serial=None,  # the chassis serial is on the label only
            serial_source=None,
            control_board_serial=_serial(version.get("DNA")),
            hashboard_serials=tuple(b for b in boards if b),
        )

    async def _identify_vnish(self) -> Identity:
        """/info and /chains/factory-info need no token: identity survives a wrong password."""
        notes: list[str] = []  # what cleaning the MAC took (strings: Identity itself)
        info, factory = await asyncio.gather(
            self._vnish_json("/api/v1/info"), self._vnish_json("/api/v1/chains/factory-info")
        )
        system = info.get("system") if isinstance(info.get("system"), dict) else {}
        network = system.get("network_status") if isinstance(system, dict) else {}
        network = network if isinstance(network, dict) else {}
        raw_chains = factory.get("chains")
        chains: list[Any] = raw_chains if isinstance(raw_chains, list) else []
        serial = _serial(info.get("serial"))
        return Identity(
            **self._base(),
            model=_text(info.get("miner")) or str(self.miner.model),
            firmware_version=_text(info.get("fw_version")),
            mac=_mac_of(network.get("mac"), notes),
            cleaned=tuple(notes),
            serial=serial,
            serial_source="web:/api/v1/info.serial" if serial else None,
            hashboard_serials=tuple(
                s for c in chains if isinstance(c, dict) and (s := _serial(c.get("serial")))
            ),
            psu_serial=_serial(factory.get("psu_serial")),
            hostname=_text(network.get("hostname")),
        )

    async def _vnish_json(self, path: str) -> dict[str, Any]:
        status, body = await fastpath.http_exchange(
            self.ip, "GET", path, timeout_s=self.options.timeout
        )
        if status != 200:
            raise MalformedReply(f"VNish {path} answered HTTP {status}", ip=self.ip)
        try:
            value = json.loads(body)
        except ValueError:
            raise MalformedReply(f"VNish {path} is not JSON", ip=self.ip) from None
        if not isinstance(value, dict):
            raise MalformedReply(f"VNish {path} is not an object", ip=self.ip)
        return value

    async def _identify_generic(self) -> Identity:
        notes: list[str] = []  # what cleaning the MAC took (strings: Identity itself)
        data = await self.miner.get_data(
            include=["serial_number", "mac", "hostname", "fw_ver", "hashboards"]
        )
        serial = _serial(data.serial_number)
        return Identity(
            **self._base(),
            model=str(self.miner.model),
            firmware_version=_text(data.fw_ver),
            mac=_mac_of(data.mac, notes),
            cleaned=tuple(notes),
            serial=serial,
            serial_source="pyasic:serial_number" if serial else None,
            hashboard_serials=tuple(
                s for b in data.hashboards if (s := _serial(getattr(b, "serial_number", None)))
            ),
            hostname=_text(data.hostname),
        )

    # --- writes -------------------------------------------------------------------------------

    def _require(self, capability: str) -> None:
        caps = self.profile.capabilities if self.profile else None
        if caps is None or not getattr(caps, capability):
            raise Unsupported(f"{self.family} profile does not allow {capability}", ip=self.ip)

    async def _write(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        return await self._guard(what, call, self.options.write_timeout)

    async def set_pools(self, pools: Sequence[PoolTarget]) -> None:
        """Write the pools in slot order (not verified here: the caller reads back)."""
        self._require("can_set_pools")
        assert self.profile is not None
        slots = self.profile.capabilities.pool_slots
        if not pools or len(pools) > slots:
            raise Unsupported(f"{self.family} takes 1 to {slots} pools, not {len(pools)}")
        targets = [PoolTarget(normalise_pool_url(p.url), p.user.strip(), p.password) for p in pools]
        writers = {
            "antminer_stock": self._set_pools_antminer,
            "whatsminer_v2": self._set_pools_whatsminer,
            "vnish": self._set_pools_vnish,
            "avalon": self._set_pools_avalon,
        }
        writer = writers.get(self.family)
        if writer is None:
            raise Unsupported(f"no pool writer for {self.family}", ip=self.ip)
        await self._write("set pools", lambda: writer(targets))

    async def _antminer_config(self) -> MinerConfig:
        """get_miner_conf, refusing to go on unless it really carries the pools."""
        conf = await self.miner.web.get_miner_conf()
        if not isinstance(conf, dict) or not isinstance(conf.get("pools"), list):
            raise self._web_failure(
                conf if isinstance(conf, dict) else {}, "read config (nothing written)"
            )
        return MinerConfig.from_am_modern(conf)

    async def _antminer_send(self, config: MinerConfig) -> None:
        reply = await self.miner.web.set_miner_conf(config.as_am_modern())
        if not isinstance(reply, dict) or reply.get("stats") != "success":
            if isinstance(reply, dict) and "success" in reply:
                raise self._web_failure(reply, "set_miner_conf")
            raise DriverError(f"set_miner_conf refused: {reply}", ip=self.ip)

    async def _set_pools_antminer(self, targets: list[PoolTarget]) -> None:
        config = await self._antminer_config()
        config.pools = PoolConfig.simple(
            [{"url": t.url, "user": t.user, "password": t.password} for t in targets]
        )
        await self._antminer_send(config)

    async def _set_pools_whatsminer(self, targets: list[PoolTarget]) -> None:
        padded = targets + [PoolTarget("", "", "")] * (3 - len(targets))
        args: dict[str, str] = {}
        for n, target in enumerate(padded[:3], start=1):
            args[f"pool_{n}"], args[f"worker_{n}"], args[f"passwd_{n}"] = (
                target.url, target.user, target.password,
            )  # fmt: skip
        reply = await self.miner.rpc.update_pools(**args)
        ok, message = fastpath.status_of(reply) if isinstance(reply, dict) else (False, "")
        if not ok:
            raise DriverError(f"update_pools refused: {message or reply}", ip=self.ip)

    async def _set_pools_vnish(self, targets: list[PoolTarget]) -> None:
        body = {"pools": [{"url": t.url, "user": t.user, "pass": t.password} for t in targets]}
        reply = await self.miner.web.post_settings(miner_settings={"miner": body})
        if not isinstance(reply, dict):
            raise MalformedReply(f"VNish settings reply: {reply!r}", ip=self.ip)

    async def _set_pools_avalon(self, targets: list[PoolTarget]) -> None:
        user = self._web_user("root")
        password = self._web_password("root")
        for field in (user, password, *(v for t in targets for v in (t.url, t.user, t.password))):
            if "," in field:
                raise Unsupported("Avalon setpool cannot carry a ',' in any field", ip=self.ip)
        padded = targets + [PoolTarget("", "", "")] * (3 - len(targets))
        for slot, target in enumerate(padded[:3]):
            parameter = f"{user},{password},{slot},{target.url},{target.user},{target.password}"
            await self.miner.rpc.send_command("setpool", parameters=parameter)

    async def set_power_target(self, watts: int) -> None:
        target = self.profile.capabilities.power_target if self.profile else None
        if target is None or self.family != "whatsminer_v2":
            raise Unsupported(f"{self.family} has no power target in watts", ip=self.ip)
        if not target.min_w <= watts <= target.max_w:
            raise Unsupported(
                f"{watts} W is outside {target.min_w}-{target.max_w} W for this model", ip=self.ip
            )

        async def adjust() -> None:
            reply = await self.miner.rpc.adjust_power_limit(watts)
            if not fastpath.status_of(reply)[0]:
                raise DriverError(f"adjust_power_limit refused: {reply}", ip=self.ip)

        await self._write("set power target", adjust)

    async def sleep(self) -> None:
        self._require("can_sleep")
        await self._write("sleep", lambda: self._mining(False))

    async def wake(self) -> None:
        self._require("can_sleep")
        await self._write("wake", lambda: self._mining(True))

    async def _mining(self, on: bool) -> None:
        if self.family == "antminer_stock":
            config = await self._antminer_config()
            config.mining_mode = MiningModeConfig.normal() if on else MiningModeConfig.sleep()
            await self._antminer_send(config)
        elif self.family == "whatsminer_v2":
            reply = await (self.miner.rpc.power_on() if on else self.miner.rpc.power_off())
            if not fastpath.status_of(reply)[0]:
                raise DriverError(f"power_{'on' if on else 'off'} refused: {reply}", ip=self.ip)
        elif self.family == "vnish":
            await self._vnish_mining(on)
        else:
            done = await (self.miner.resume_mining() if on else self.miner.stop_mining())
            if not done:
                raise DriverError(f"{'wake' if on else 'sleep'} refused", ip=self.ip)

    async def _vnish_mining(self, on: bool) -> None:
        """VNish answers start/stop with an empty 200, which pyasic reports as an error."""
        try:
            await (self.miner.web.start_mining() if on else self.miner.web.stop_mining())
        except APIError as exc:
            if "empty response" not in str(exc) and "JSON decode" not in str(exc):
                raise
        status, body = await fastpath.http_exchange(
            self.ip, "GET", "/api/v1/status", timeout_s=self.options.timeout
        )
        try:
            state = json.loads(body).get("miner_state") if status == 200 else None
        except (ValueError, AttributeError):
            state = None
        if (state == "stopped") == on:
            raise DriverError(f"miner state is {state!r} after {'start' if on else 'stop'}")

    async def reboot(self) -> None:
        async def call() -> None:
            if not await self.miner.reboot():
                raise DriverError("reboot refused", ip=self.ip)

        await self._write("reboot", call)

    async def locate(self, on: bool) -> None:
        async def call() -> None:
            done = await (self.miner.fault_light_on() if on else self.miner.fault_light_off())
            if done is not on and self.family != "vnish":
                raise DriverError(f"locate light still {'off' if on else 'on'}", ip=self.ip)

        await self._write("locate", call)
