"""The hot poll in one round trip: a cgminer multi-command over our own socket code.

pyasic spends most of a poll's CPU in pydantic models, a new httpx client per call and Digest
auth (reference/pyasic.md §7.2). For the fields polled every cycle (pools, hashrate, power,
temperature, fans, is-mining) one ``pools+summary+stats`` request parsed here costs a fraction
of that. Identification and writes stay on pyasic.

The parsers mirror what pyasic 0.79 reads for each family (which key, which unit, which
rounding), so a fast-path snapshot and a pyasic-path snapshot of the same miner agree. The
builders are pure functions of the decoded replies; only :func:`rpc_exchange`,
:func:`http_exchange`, :class:`VnishWeb` and :func:`fast_poll` do I/O.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from agent.drivers.base import (
    PollSnapshot,
    PoolStatus,
    derive_is_mining,
    hottest,
    pool_kind,
    utcnow,
)
from agent.drivers.options import MAX_REPLY_BYTES as MAX_REPLY_BYTES  # re-exported
from agent.errors import AuthFailed, DriverError, MalformedReply, Timeout, Unreachable

RPC_PORT = 4028
MAX_COUNT = 16
"""Most fans or boards a reply may claim (the contract keeps 16 fan readings)."""
COMMANDS: dict[str, tuple[str, ...]] = {
    "antminer_stock": ("pools", "summary", "stats"),
    "vnish": ("pools", "summary", "stats"),
    "whatsminer_v2": ("pools", "summary", "devs"),
    "avalon": ("pools", "summary", "estats"),
}
"""The one multi-command per family that carries every hot field pyasic would read."""

_MM_TOKEN = re.compile(r"(\w+)\[([^\]]*)\]")
_OK = frozenset({"S", "I"})


# --- transport ---------------------------------------------------------------------------------


class _OneShot(asyncio.Protocol):
    """Send one request, collect the reply until the peer closes (cgminer's framing)."""

    def __init__(self, request: bytes, max_bytes: int, done: asyncio.Future[bytes]) -> None:
        self._request = request
        self._max = max_bytes
        self._done = done
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) > self._max and not self._done.done():
            self._done.set_exception(
                MalformedReply(f"reply larger than {self._max} bytes (oversized)")
            )
            if self._transport is not None:
                self._transport.abort()

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if self._done.done():
            return
        if exc is not None and not self._buffer:
            self._done.set_exception(Unreachable(f"connection lost: {exc}"))
        else:
            self._done.set_result(bytes(self._buffer))


async def exchange(
    ip: str, request: bytes, *, port: int, timeout_s: float, max_bytes: int = MAX_REPLY_BYTES
) -> bytes:
    """One request, one reply read to EOF, all under ``timeout_s``; typed errors only."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bytes] = loop.create_future()
    transport: asyncio.BaseTransport | None = None
    try:
        async with asyncio.timeout(timeout_s):
            transport, _ = await loop.create_connection(
                lambda: _OneShot(request, max_bytes, done), ip, port
            )
            return await done
    except TimeoutError:
        raise Timeout(f"no complete reply on port {port} within {timeout_s:g} s", ip=ip) from None
    except ConnectionRefusedError:
        raise Unreachable(f"connection refused on port {port}", ip=ip) from None
    except DriverError as exc:
        exc.ip = exc.ip or ip
        raise
    except OSError as exc:
        raise Unreachable(f"port {port}: {exc.strerror or exc}", ip=ip) from None
    finally:
        if transport is not None:
            transport.close()


def parse_reply(raw: bytes) -> dict[str, Any]:
    """cgminer JSON, tolerating a trailing NUL and ``}{`` between objects; else MalformedReply."""
    text = raw.rstrip(b"\x00 \t\r\n").replace(b"\x00", b"")
    if not text:
        raise MalformedReply("empty reply")
    try:
        value = json.loads(text)
    except ValueError:
        try:
            value = json.loads(text.replace(b"}{", b"},{"))
        except ValueError as exc:
            if not text.endswith(b"}"):
                raise MalformedReply(f"truncated reply ({len(raw)} bytes)") from None
            pos = getattr(exc, "pos", "?")
            raise MalformedReply(f"reply is not JSON (byte {pos} of {len(raw)})") from None
    if not isinstance(value, dict):
        raise MalformedReply("reply is not a JSON object")
    return value


def status_of(reply: Mapping[str, Any]) -> tuple[bool, str]:
    """(ok, message) from cgminer's ``STATUS`` list or btminer's flat ``STATUS`` string."""
    status = reply.get("STATUS")
    if isinstance(status, list) and status and isinstance(status[0], dict):
        return str(status[0].get("STATUS")) in _OK, str(status[0].get("Msg", ""))
    if isinstance(status, str):
        return status in _OK, str(reply.get("Msg", ""))
    return False, "no STATUS"


async def rpc_command(
    ip: str,
    command: str,
    parameter: str | None = None,
    *,
    timeout_s: float,
    port: int = RPC_PORT,
    max_bytes: int = MAX_REPLY_BYTES,
) -> dict[str, Any]:
    """One cgminer command, decoded (the caller checks STATUS)."""
    body: dict[str, str] = {"command": command}
    if parameter is not None:
        body["parameter"] = parameter
    raw = await exchange(
        ip, json.dumps(body).encode(), port=port, timeout_s=timeout_s, max_bytes=max_bytes
    )
    try:
        return parse_reply(raw)
    except MalformedReply as exc:
        exc.ip = ip
        raise


async def rpc_multi(
    ip: str,
    commands: Sequence[str],
    *,
    timeout_s: float,
    port: int = RPC_PORT,
    max_bytes: int = MAX_REPLY_BYTES,
) -> dict[str, dict[str, Any]]:
    """``a+b+c`` in one round trip -> ``{cmd: reply}``; split up if the firmware refuses joins."""
    joined = await rpc_command(ip, "+".join(commands), timeout_s=timeout_s, port=port,
                               max_bytes=max_bytes)  # fmt: skip
    if not any(cmd in joined for cmd in commands):
        ok, _ = status_of(joined)
        if ok:
            raise MalformedReply("multi-command reply has none of the commands", ip=ip)
        replies = await asyncio.gather(
            *(rpc_command(ip, c, timeout_s=timeout_s, port=port, max_bytes=max_bytes)
              for c in commands)
        )  # fmt: skip
        return dict(zip(commands, replies, strict=True))
    return split_multi(joined, commands, ip)


def split_multi(joined: Mapping[str, Any], commands: Iterable[str], ip: str) -> dict[str, Any]:
    """Unwrap ``{"pools": [{…}], "summary": [{…}]}``; a member that failed maps to ``{}``."""
    out: dict[str, dict[str, Any]] = {}
    for cmd in commands:
        member = joined.get(cmd)
        if not isinstance(member, list) or not member or not isinstance(member[0], dict):
            raise MalformedReply(f"multi-command reply lacks {cmd!r}", ip=ip)
        out[cmd] = member[0] if status_of(member[0])[0] else {}
    return out


# --- HTTP (VNish power) ------------------------------------------------------------------------


async def http_exchange(
    ip: str,
    method: str,
    path: str,
    *,
    timeout_s: float,
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    port: int = 80,
) -> tuple[int, bytes]:
    """A minimal HTTP/1.1 request with ``Connection: close``: (status, body)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {ip}", "Connection: close",
             "Accept: application/json"]  # fmt: skip
    for key, value in (headers or {}).items():
        lines.append(f"{key}: {value}")
    if body or method != "GET":
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    raw = await exchange(ip, request, port=port, timeout_s=timeout_s)
    head, sep, content = raw.partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/1."):
        raise MalformedReply("not an HTTP reply", ip=ip)
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise MalformedReply("bad HTTP status line", ip=ip) from None
    if b"\r\ntransfer-encoding: chunked" in head.lower():
        content = _dechunk(content)
    return status, content


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            raise MalformedReply("bad chunked encoding") from None
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return bytes(out)


class VnishWeb:
    """VNish's REST summary with a cached session token (for power, which RPC lacks)."""

    def __init__(self, ip: str, password: str, timeout: float) -> None:
        self.ip = ip
        self.password = password
        self.timeout = timeout
        self._token: str | None = None

    async def _unlock(self) -> str:
        body = json.dumps({"pw": self.password}).encode()
        status, content = await http_exchange(
            self.ip, "POST", "/api/v1/unlock", timeout_s=self.timeout, body=body
        )
        if status in (401, 403):
            raise AuthFailed("VNish refused the web password", ip=self.ip)
        if status != 200:
            raise MalformedReply(f"VNish unlock answered HTTP {status}", ip=self.ip)
        try:
            token = json.loads(content)["token"]
        except (ValueError, KeyError, TypeError):
            raise MalformedReply("VNish unlock reply has no token", ip=self.ip) from None
        self._token = str(token)
        return self._token

    async def get(self, path: str) -> dict[str, Any]:
        """GET an authenticated endpoint, unlocking once more if the token expired."""
        for attempt in range(2):
            token = self._token or await self._unlock()
            status, content = await http_exchange(
                self.ip, "GET", path, timeout_s=self.timeout, headers={"Authorization": token}
            )
            if status == 401 and attempt == 0:
                self._token = None
                continue
            if status != 200:
                raise MalformedReply(f"VNish {path} answered HTTP {status}", ip=self.ip)
            try:
                value = json.loads(content)
            except ValueError:
                raise MalformedReply(f"VNish {path} is not JSON", ip=self.ip) from None
            if not isinstance(value, dict):
                raise MalformedReply(f"VNish {path} is not an object", ip=self.ip)
            return value
        raise AuthFailed("VNish token refused", ip=self.ip)

    async def power_w(self) -> float | None:
        summary = await self.get("/api/v1/summary")
        miner = summary.get("miner")
        return _num(miner.get("power_usage")) if isinstance(miner, dict) else None


# --- pure parsing -------------------------------------------------------------------------------


def _num(value: Any) -> float | None:
    """A finite number from a reply field; None for anything else (NaN and inf included: a
    hostile ``"inf"`` must not reach ``int()`` or a sum)."""
    if isinstance(value, bool) or value is None:
        return None
    number: float | None = None
    if isinstance(value, int | float):
        number = float(value) if abs(value) < 1e300 else None
    elif isinstance(value, str) and len(value) <= 64:
        try:
            number = float(value.strip())
        except ValueError:
            return None
    return number if number is not None and math.isfinite(number) else None


def _count(value: Any, default: int) -> int:
    """A count of fans or boards from a reply, bounded (a hostile ``fan_num`` of 10^9 would
    otherwise build a billion-entry tuple)."""
    number = _num(value)
    return max(0, min(int(number) if number else default, MAX_COUNT))


def _rows(reply: Mapping[str, Any] | None, section: str) -> list[dict[str, Any]]:
    rows = reply.get(section) if reply else None
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def parse_pools(reply: Mapping[str, Any] | None) -> tuple[PoolStatus, ...]:
    """cgminer ``POOLS`` rows -> PoolStatus, keeping any URL as a raw string (any scheme)."""
    pools = []
    for row in _rows(reply, "POOLS"):
        url = str(row.get("URL") or "").strip()
        if not url:
            continue  # an unconfigured slot
        user = str(row.get("User") or "")
        active = row.get("Stratum Active")
        pools.append(
            PoolStatus(
                url=url,
                user=user,
                status="alive" if row.get("Status") == "Alive" else "dead",
                active=None if active is None else bool(active),
                kind=pool_kind(url, user, row.get("Type")),
            )
        )
    return tuple(pools)


def _fans_cgminer(stats: Mapping[str, Any]) -> tuple[int, ...]:
    """fan1..fanN as BMMiner prints them (pyasic starts at fan5 when fan1-4 are all zero)."""
    count = _count(stats.get("fan_num"), 4)
    offset = 1
    if not any(_num(stats.get(f"fan{i}")) for i in range(1, 5)) and any(
        _num(stats.get(f"fan{i}")) for i in range(5, 9)
    ):
        offset = 5
    return tuple(int(_num(stats.get(f"fan{offset + i}")) or 0) for i in range(count))


def _legacy_stats(reply: Mapping[str, Any] | None) -> dict[str, Any]:
    rows = _rows(reply, "STATS")
    return rows[1] if len(rows) > 1 else (rows[0] if rows else {})


def _dash_ints(text: Any) -> list[int]:
    if not isinstance(text, str):
        return []
    try:
        return [int(v) for v in text.split("-") if v.strip()]
    except ValueError:
        return []


def _antminer(replies: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    summary = (_rows(replies.get("summary"), "SUMMARY") or [{}])[0]
    stats = _legacy_stats(replies.get("stats"))
    ghs = _num(summary.get("GHS 5s"))
    temps = []
    for i in range(1, 17):
        sensors = [v for v in _dash_ints(stats.get(f"temp_pcb{i}")) if v != 0]
        if sensors:  # as pyasic averages the web chain's non-zero temp_pcb
            temps.append(sum(sensors) / len(sensors))
    return {
        "hashrate_ths": None if ghs is None else ghs / 1000,
        "temperature_c": hottest(temps),
        "fan_rpm": _fans_cgminer(stats) if stats else (),
        "power_w": None,  # stock firmware reports no wattage pyasic reads
    }


def _vnish(replies: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    summary = (_rows(replies.get("summary"), "SUMMARY") or [{}])[0]
    stats = _legacy_stats(replies.get("stats"))
    ghs = _num(summary.get("GHS 5s"))
    boards = _count(stats.get("temp_num") or stats.get("miner_count"), 3)
    temps = [_num(stats.get(f"temp2_{i}")) for i in range(1, boards + 1)]
    return {
        "hashrate_ths": None if ghs is None else ghs / 1000,
        "temperature_c": hottest([None if t is None else float(round(t)) for t in temps]),
        "fan_rpm": _fans_cgminer(stats) if stats else (),
        "power_w": None,  # from the web summary, filled in by fast_poll
    }


def _whatsminer(replies: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    summary = (_rows(replies.get("summary"), "SUMMARY") or [{}])[0]
    devs = _rows(replies.get("devs"), "DEVS")
    board_mhs = [_num(d.get("MHS 1m")) for d in devs]
    if devs and all(v is not None for v in board_mhs):
        hashrate: float | None = sum(v or 0.0 for v in board_mhs) / 1e6
    else:
        mhs = _num(summary.get("MHS 1m"))
        hashrate = None if mhs is None else mhs / 1e6
    temps = [_num(d.get("Temperature")) for d in devs]
    fans = tuple(int(_num(summary.get(k)) or 0) for k in ("Fan Speed In", "Fan Speed Out"))
    return {
        "hashrate_ths": hashrate,
        "temperature_c": hottest([None if t is None else float(round(t)) for t in temps]),
        "fan_rpm": fans if summary else (),
        "power_w": _num(summary.get("Power")),
    }


def parse_mm(text: str) -> dict[str, str]:
    """Avalon's ``MM ID0`` string of ``Key[value]`` tokens."""
    return {key: value.strip() for key, value in _MM_TOKEN.findall(text)}


def _avalon(replies: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    summary = (_rows(replies.get("summary"), "SUMMARY") or [{}])[0]
    mm: dict[str, str] = {}
    for row in _rows(replies.get("estats"), "STATS"):
        for key, value in row.items():
            if key.startswith("MM ID") and isinstance(value, str):
                mm = parse_mm(value)
                break
        if mm:
            break
    boards = [_num(v) for v in mm.get("MGHS", "").split()]
    if boards and all(b is not None for b in boards):
        hashrate: float | None = sum(b or 0.0 for b in boards) / 1000
    else:
        mhs = _num(summary.get("MHS 1m"))
        hashrate = None if mhs is None else mhs / 1e6
    tmax = [_num(v) for v in mm.get("MTmax", "").split()] or [_num(mm.get("TMax"))]
    fans = tuple(int(_num(mm[f"Fan{i}"]) or 0) for i in range(1, 9) if f"Fan{i}" in mm)
    return {
        "hashrate_ths": hashrate,
        "temperature_c": hottest([None if t is None else float(int(t)) for t in tmax]),
        "fan_rpm": fans,
        "power_w": _num(mm.get("WALLPOWER")),
    }


_BUILDERS = {
    "antminer_stock": _antminer,
    "vnish": _vnish,
    "whatsminer_v2": _whatsminer,
    "avalon": _avalon,
}


def build_snapshot(
    ip: str,
    family: str,
    replies: Mapping[str, Mapping[str, Any]],
    observed_at: datetime,
    *,
    power_w: float | None = None,
) -> PollSnapshot:
    """Decoded replies of one family's multi-command -> the hot snapshot (pure)."""
    if not any(replies.values()):
        raise MalformedReply("every command in the reply failed", ip=ip)
    fields = _BUILDERS[family](replies)
    hashrate = fields["hashrate_ths"]
    return PollSnapshot(
        ip=ip,
        observed_at=observed_at,
        reachable=True,
        is_mining=derive_is_mining(hashrate, None),
        hashrate_ths=None if hashrate is None else round(hashrate, 3),
        power_w=power_w if power_w is not None else fields["power_w"],
        temperature_c=fields["temperature_c"],
        fan_rpm=tuple(fields["fan_rpm"]),
        pools=parse_pools(replies.get("pools")),
    )


# --- the poll ----------------------------------------------------------------------------------


def supports(family: str) -> bool:
    return family in COMMANDS


async def fast_poll(
    ip: str,
    family: str,
    *,
    timeout_s: float,
    vnish: VnishWeb | None = None,
    max_bytes: int = MAX_REPLY_BYTES,
) -> PollSnapshot:
    """One round trip (plus VNish's web summary, concurrently); never raises."""
    observed_at = utcnow()
    web: asyncio.Task[float | None] | None = None
    try:
        async with asyncio.timeout(timeout_s):
            if vnish is not None:
                web = asyncio.create_task(vnish.power_w())
            replies = await rpc_multi(
                ip, COMMANDS[family], timeout_s=timeout_s, max_bytes=max_bytes
            )
            power: float | None = None
            if web is not None:
                try:
                    power = await web
                except DriverError:
                    power = None  # the hot fields from RPC still stand
            return build_snapshot(ip, family, replies, observed_at, power_w=power)
    except TimeoutError:
        error: DriverError = Timeout(f"no complete reply within {timeout_s:g} s", ip=ip)
    except DriverError as exc:
        error = exc
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError) as exc:
        error = MalformedReply(f"unparseable reply ({type(exc).__name__})", ip=ip)
    finally:
        if web is not None and not web.done():
            web.cancel()
    return PollSnapshot.failed(ip, error, observed_at)
