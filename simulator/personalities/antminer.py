"""Antminer stock firmware: BMMiner's cgminer API on 4028 and the lighttpd web UI on 80.

Replies follow the public captures in protocols.md §2–§3 key for key, quirks included
(``"Pool Stale%%"``, ``"Tenperature"``, ``"Deed"`` for unconfigured pool slots, string
``chain_rate`` values, web ``STATUS`` as an object with a lower-case ``when``). The RPC only
answers the ``api-groups`` commands the stock config allows from the network
(``A:stats:pools:devs:summary:version``); everything that changes state goes through the
web UI, which speaks real HTTP Digest (MD5, ``qop="auth"``) against ``miner.credentials``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import random
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from simulator.personalities.base import (
    MinerIdentity,
    ModelSpec,
    Personality,
    RpcReply,
    miner_of,
    random_alnum,
)
from simulator.state import MODE_FACTORS, Credentials, MinerState, Mode, Pool, Telemetry

REALM = "antMiner Configuration"
API_GROUP = frozenset({"stats", "pools", "devs", "summary", "version"})
"""Commands group ``A`` may run from any address (stock ``api-groups``)."""

CGMINER_COMMANDS = frozenset(
    {
        "version", "config", "summary", "pools", "devs", "edevs", "stats", "estats",
        "devdetails", "switchpool", "addpool", "poolpriority", "poolquota", "enablepool",
        "disablepool", "removepool", "save", "quit", "privileged", "notify", "restart",
        "check", "failover-only", "coin", "debug", "setconfig", "zero", "hotplug", "lcd",
        "asc", "ascenable", "ascdisable", "ascidentify", "ascset", "asccount", "pgacount",
        "usbstats", "lockstats",
    }
)  # fmt: skip
"""What BMMiner (cgminer 4.x underneath) knows: these get Code 45, anything else Code 14."""

WORK_MODE: dict[Mode, int] = {Mode.NORMAL: 0, Mode.SLEEP: 1, Mode.HIGH: 2, Mode.LOW: 3}
MINER_MODE: dict[int, Mode] = {0: Mode.NORMAL, 1: Mode.SLEEP, 3: Mode.LOW}
"""``miner-mode`` values set_miner_conf.cgi accepts (pyasic: 0 normal, 1 sleep, 3 low)."""

SHARES_PER_TH_S = 0.00073  # S19 Pro capture: 4057 accepted in 50474 s at ~110 TH/s
TEMP_OFFSETS = (11, -17, 2, 4)  # four sensors per board spread like the S19 Pro capture
ASIC_GROUP = 8  # chain_acs groups of "o", as in the S21 XP capture

HTML_HEAD = (
    '<?xml version="1.0" encoding="iso-8859-1"?>\n'
    '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN"\n'
    '         "http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">\n'
    '<html xmlns="http://www.w3.org/1999/xhtml" xml:lang="en" lang="en">\n'
)
INDEX_HTML = (
    '<!DOCTYPE html><html><head><meta charset="utf-8">'
    '<meta name="viewport" content="width=device-width,initial-scale=1">'
    "<title>Antminer</title></head><body><div id=app></div></body></html>"
)
SUCCESS = {"stats": "success", "code": "M000", "msg": "OK!"}


def _lighttpd_page(status: int, reason: str) -> str:
    """The error page lighttpd sends (captured on the Antminer-derived Hiveon UI)."""
    title = f"{status} {reason}"
    return (
        f"{HTML_HEAD} <head>\n  <title>{title}</title>\n </head>\n"
        f" <body>\n  <h1>{title}</h1>\n </body>\n</html>\n"
    )


def _model(
    name: str,
    ths: float,
    watts: float,
    chips: int,
    *,
    miner: str,
    compile_time: str,
    kernel: str,
    freq: int,
    voltage: str,
    subtype: str,
    chain_power: bool,
) -> ModelSpec:
    return ModelSpec(
        name=name,
        nominal_ths=ths,
        nominal_w=watts,
        boards=3,
        chips_per_board=chips,
        fans=4,
        firmware_version=compile_time,
        extra=(
            ("miner_version", miner),
            ("filesystem_version", compile_time),
            ("kernel_version", kernel),
            ("freq", freq),
            ("voltage", voltage),
            ("subtype", subtype),
            ("chain_power", chain_power),
        ),
    )


MODELS = (
    _model(
        "Antminer S19j Pro", 104.0, 3068.0, 126,
        miner="49.0.1.3",
        compile_time="Mon Dec 26 17:10:01 CST 2022",
        kernel="Linux 4.6.0-xilinx-g03c746f7 #2 SMP PREEMPT Mon Sep 21 11:50:03 CST 2020",
        freq=525, voltage="1360", subtype="BHB42601", chain_power=False,
    ),
    _model(
        "Antminer S19 XP", 140.0, 3010.0, 110,
        miner="uart_trans.1.3",
        compile_time="Wed Jun 14 11:02:33 CST 2023",
        kernel="Linux 4.9.113 #1 SMP PREEMPT Wed Jun 14 10:58:21 CST 2023",
        freq=485, voltage="1320", subtype="BHB56801", chain_power=False,
    ),
    _model(
        "Antminer S21", 200.0, 3500.0, 108,
        miner="uart_trans.1.3",
        compile_time="Thu Jul 11 16:38:25 CST 2024",
        kernel="Linux 4.9.113 #1 SMP PREEMPT Thu Jul 11 16:35:02 CST 2024",
        freq=490, voltage="1320", subtype="BHB68601", chain_power=True,
    ),
    _model(
        "Antminer T21", 190.0, 3610.0, 108,
        miner="uart_trans.1.3",
        compile_time="Fri Apr 26 14:33:19 CST 2024",
        kernel="Linux 4.9.113 #1 SMP PREEMPT Fri Apr 26 14:29:47 CST 2024",
        freq=500, voltage="1320", subtype="BHB68606", chain_power=True,
    ),
)  # fmt: skip

SERIAL_PREFIXES = ("JYZZ", "THQI", "SMTT")  # as seen on captured chassis and board labels


def bitmain_serial(rng: random.Random) -> str:
    """A 17-character Bitmain serial: ``JYZZ B0U BDJ AB F06 RB`` (4+3+"BDJ"+2+3+2)."""
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return (
        rng.choice(SERIAL_PREFIXES)
        + random_alnum(rng, 3)
        + "BDJ"
        + random_alnum(rng, 2, letters)
        + random_alnum(rng, 3)
        + random_alnum(rng, 2)
    )


# --- HTTP Digest (RFC 2617, as lighttpd's mod_auth does it) ------------------------------------

_DIGEST_PARAM = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


def _md5(text: str) -> str:
    return hashlib.md5(text.encode("utf-8"), usedforsecurity=False).hexdigest()


class DigestAuth:
    """Stateless Digest: a nonce is a timestamp plus an HMAC, so any worker can check it."""

    def __init__(self, realm: str) -> None:
        self.realm = realm
        self._secret = secrets.token_bytes(16)

    def nonce(self, now: float) -> str:
        stamp = f"{int(now):08x}"
        mac = hmac.new(self._secret, stamp.encode(), hashlib.sha256).hexdigest()[:24]
        return stamp + mac

    def challenge(self, now: float) -> str:
        return f'Digest realm="{self.realm}", nonce="{self.nonce(now)}", qop="auth", algorithm=MD5'

    def _nonce_ok(self, nonce: str) -> bool:
        if len(nonce) != 32:
            return False
        expected = hmac.new(self._secret, nonce[:8].encode(), hashlib.sha256).hexdigest()[:24]
        return hmac.compare_digest(expected, nonce[8:])

    def verify(self, header: str, method: str, uri: str, creds: Credentials) -> bool:
        """Whether an ``Authorization`` header proves ``creds`` for this request."""
        scheme, _, rest = header.partition(" ")
        if scheme.lower() != "digest":
            return False
        params = {
            m[1].lower(): m[3] if m[2] is None else m[2] for m in _DIGEST_PARAM.finditer(rest)
        }
        if params.get("username") != creds.web_user or params.get("realm") != self.realm:
            return False
        if params.get("uri") != uri or not self._nonce_ok(params.get("nonce", "")):
            return False
        if params.get("algorithm", "MD5").upper() != "MD5":
            return False
        ha1 = _md5(f"{creds.web_user}:{self.realm}:{creds.web_password}")
        ha2 = _md5(f"{method}:{uri}")
        qop = params.get("qop")
        if qop == "auth":
            nc, cnonce = params.get("nc", ""), params.get("cnonce", "")
            expected = _md5(f"{ha1}:{params['nonce']}:{nc}:{cnonce}:auth:{ha2}")
        elif qop is None:
            expected = _md5(f"{ha1}:{params['nonce']}:{ha2}")
        else:
            return False
        return hmac.compare_digest(expected, params.get("response", ""))


# --- what the sensors and counters say ----------------------------------------------------------


@dataclass(frozen=True)
class Chain:
    """One hashboard as BMMiner reports it."""

    index: int
    serial: str
    asic_num: int
    rate_ghs: float
    ideal_ghs: float
    freq: int
    hw: int
    pcb: tuple[int, ...]
    chip: tuple[int, ...]
    pic: tuple[int, ...]

    @property
    def asic_status(self) -> str:
        if not self.asic_num:
            return ""
        groups, rest = divmod(self.asic_num, ASIC_GROUP)
        parts = ["o" * ASIC_GROUP] * groups + (["o" * rest] if rest else [])
        return " " + " ".join(parts)


@dataclass(frozen=True)
class Snapshot:
    """Everything one reply renders, computed once from the true state at ``now``."""

    telemetry: Telemetry
    elapsed: int
    chains: tuple[Chain, ...]
    rate_5s: float
    rate_avg: float
    rate_30m: float
    rate_ideal: float
    accepted: int
    rejected: int
    hw_total: int
    share_diff: float


def _ideal_factor(miner: MinerState) -> float:
    """Hashrate factor of the configured work mode; sleep keeps the nameplate figure."""
    return 1.0 if miner.mode is Mode.SLEEP else MODE_FACTORS[miner.mode][0]


def snapshot(miner: MinerState, model: ModelSpec, now: float) -> Snapshot:
    """Derive every figure from telemetry once, so summary, stats and pools agree."""
    t = miner.telemetry(now)
    elapsed = miner.uptime(now)
    dead = miner.dead_boards()
    rng = random.Random(f"{miner.seed}:counters")
    chains = []
    for board, ths, temp, chip_temp in zip(
        miner.hashboards, t.board_ths, t.board_temps, t.chip_temps, strict=True
    ):
        alive = board.index not in dead
        # A board without hashing chips sits at ambient on every sensor and reads no chip temps.
        offsets = TEMP_OFFSETS if alive else (0, 0, 0, 0)
        pcb = tuple(round(temp + o) for o in offsets)
        chips = tuple(round(chip_temp + o) for o in offsets) if alive else (0,) * 4
        chains.append(
            Chain(
                index=board.index,
                serial=board.serial,
                asic_num=board.chips if alive else 0,
                rate_ghs=round(ths * 1000, 2),
                ideal_ghs=round(board.nominal_ths * 1000 * _ideal_factor(miner), 1),
                freq=int(model.option("freq", 500)) if alive else 0,
                hw=int(elapsed / rng.uniform(150, 600)) if alive else 0,
                pcb=pcb,
                chip=chips,
                pic=tuple(max(0, v - 10) for v in pcb),
            )
        )
    rate_5s = round(t.hashrate_ths * 1000, 2)
    avg_factor = rng.uniform(0.995, 1.01)
    accepted = int(elapsed * miner.nominal_ths * SHARES_PER_TH_S)
    diff = float(2 ** round(math.log2(max(1.0, miner.nominal_ths * 4700))))
    return Snapshot(
        telemetry=t,
        elapsed=elapsed,
        chains=tuple(chains),
        rate_5s=rate_5s,
        rate_avg=round(rate_5s * avg_factor, 2),
        rate_30m=round(rate_5s * (2 - avg_factor), 2),
        rate_ideal=round(sum(c.ideal_ghs for c in chains), 1),
        accepted=accepted,
        rejected=int(accepted * 0.0027),
        hw_total=sum(c.hw for c in chains),
        share_diff=diff,
    )


def _stratum_host(url: str) -> str:
    host = url.split("://", 1)[-1]
    return host.rsplit(":", 1)[0] if ":" in host else host


def _pool_slots(pools: list[Pool]) -> list[Pool]:
    """Stock firmware always shows three slots; extra runtime pools are appended after."""
    return pools + [Pool("", "", "")] * max(0, 3 - len(pools))


def _diff_label(diff: float) -> str:
    return f"{int(diff // 1024)}K" if diff >= 1024 else f"{int(diff)}"


# --- the personality ----------------------------------------------------------------------------

CgiHandler = Callable[[MinerState, bytes, float], dict[str, Any]]


class AntminerStock(Personality):
    """Bitmain stock firmware on S19j Pro / S19 XP / S21 / T21."""

    name = "antminer"
    make = "AntMiner"
    firmware = "stock"
    models = MODELS
    rpc_ports = (4028,)
    web_ports = (80,)
    rpc_nul_terminated = True
    default_credentials = Credentials(web_user="root", web_password="root", api_password="")

    def __init__(self) -> None:
        self.digest = DigestAuth(REALM)
        self._cgi: dict[str, CgiHandler] = {
            "get_system_info": self.cgi_get_system_info,
            "get_network_info": self.cgi_get_network_info,
            "get_miner_conf": self.cgi_get_miner_conf,
            "set_miner_conf": self.cgi_set_miner_conf,
            "summary": self.cgi_summary,
            "stats": self.cgi_stats,
            "pools": self.cgi_pools,
            "get_blink_status": self.cgi_get_blink_status,
            "blink": self.cgi_blink,
            "reboot": self.cgi_reboot,
            "miner_type": self.cgi_miner_type,
            "set_network_conf": self.cgi_set_network_conf,
        }

    # --- identity ---------------------------------------------------------------------------------

    def new_identity(self, rng: random.Random, model: ModelSpec) -> MinerIdentity:
        # Amlogic/Xilinx control boards come up with a locally administered 02:xx MAC.
        mac = ":".join(["02"] + [f"{rng.randrange(256):02X}" for _ in range(5)])
        return MinerIdentity(
            serial=bitmain_serial(rng),
            mac=mac,
            hostname="Antminer",
            control_board_serial=bitmain_serial(rng),
            psu_serial=bitmain_serial(rng),
            board_serials=tuple(bitmain_serial(rng) for _ in range(model.boards)),
        )

    def spec(self, miner: MinerState) -> ModelSpec:
        """The nameplate a miner was built from (firmware strings live in its extras)."""
        return self.model_named(miner.model)

    def info(self, miner: MinerState) -> dict[str, Any]:
        """The ``INFO`` block of the new-style (web / new_api) replies."""
        spec = self.spec(miner)
        return {
            "miner_version": spec.option("miner_version"),
            "CompileTime": miner.firmware_version,
            "type": miner.model,
        }

    # --- RPC (port 4028) --------------------------------------------------------------------------

    def dispatch_command(
        self,
        miner: MinerState,
        command: str,
        parameter: Any,
        payload: dict[str, Any],
        now: float,
    ) -> RpcReply:
        """cgminer access control: unknown → 14, known but outside group A → 45."""
        if command not in CGMINER_COMMANDS:
            miner.log(now, "rpc", command or "?", detail="invalid command")
            return self.error_reply(14, "Invalid command", now)
        if command not in API_GROUP:
            miner.log(now, "rpc", command, detail="access denied")
            return self.error_reply(45, f"Access denied to '{command}' command", now)
        miner.log(now, "rpc", command)
        handler: Callable[..., RpcReply] = getattr(self, f"rpc_{command}")
        return handler(miner, parameter, payload, now)

    def rpc_version(
        self, miner: MinerState, parameter: Any, payload: dict[str, Any], now: float
    ) -> RpcReply:
        row = {
            "BMMiner": "1.0.0",
            "API": "3.1",
            "Miner": self.spec(miner).option("miner_version"),
            "CompileTime": miner.firmware_version,
            "Type": miner.model,
        }
        return self.ok_reply(miner, 22, "CGMiner versions", "VERSION", [row], now)

    def rpc_summary(
        self, miner: MinerState, parameter: Any, payload: dict[str, Any], now: float
    ) -> RpcReply:
        if payload.get("new_api"):
            return self.cgi_summary(miner, b"", now)
        s = snapshot(miner, self.spec(miner), now)
        diff_acc = round(s.accepted * s.share_diff * 0.61, 1)
        diff_rej = round(s.rejected * s.share_diff * 0.61, 1)
        row = {
            "Elapsed": s.elapsed,
            "GHS 5s": s.rate_5s,
            "GHS av": s.rate_avg,
            "GHS 30m": s.rate_30m,
            "Found Blocks": 0,
            "Getwork": int(s.accepted * 0.975),
            "Accepted": s.accepted,
            "Rejected": s.rejected,
            "Hardware Errors": s.hw_total,
            "Utility": round(s.accepted / max(1, s.elapsed) * 60, 2),
            "Discarded": s.accepted * 1116,
            "Stale": s.accepted // 4000,
            "Get Failures": 1 if s.elapsed > 3600 else 0,
            "Local Work": s.accepted * 1117,
            "Remote Failures": 0,
            "Network Blocks": s.elapsed // 615,
            "Total MH": round(s.rate_avg * 1000 * s.elapsed, 1),
            "Work Utility": round(diff_acc / max(1, s.elapsed) * 60, 2),
            "Difficulty Accepted": diff_acc,
            "Difficulty Rejected": diff_rej,
            "Difficulty Stale": 0.0,
            "Best Share": int(s.share_diff * 24_613),
            "Device Hardware%": 0.0,
            "Device Rejected%": round(100 * diff_rej / max(1.0, diff_acc + diff_rej), 4),
            "Pool Rejected%": round(100 * diff_rej / max(1.0, diff_acc + diff_rej), 4),
            "Pool Stale%": 0.0,
            "Last getwork": int(now),
        }
        return self.ok_reply(miner, 11, "Summary", "SUMMARY", [row], now)

    def rpc_pools(
        self, miner: MinerState, parameter: Any, payload: dict[str, Any], now: float
    ) -> RpcReply:
        if payload.get("new_api"):
            return self.cgi_pools(miner, b"", now)
        s = snapshot(miner, self.spec(miner), now)
        active = miner.active_pool_index()
        rows = []
        for index, pool in enumerate(_pool_slots(miner.runtime_pools())):
            live = bool(pool.url)
            is_active = live and index == active
            accepted = s.accepted if is_active else 0
            rejected = s.rejected if is_active else 0
            diff_acc = round(accepted * s.share_diff * 0.61, 1)
            rows.append(
                {
                    "POOL": index,
                    "URL": pool.url,
                    "Status": "Alive" if live else "Deed",
                    "Priority": index,
                    "Quota": 1,
                    "Long Poll": "N",
                    "Getworks": int(accepted * 0.975) if is_active else (2 if live else 0),
                    "Accepted": accepted,
                    "Rejected": rejected,
                    "Discarded": accepted * 1116,
                    "Stale": accepted // 4000,
                    "Get Failures": 1 if is_active and s.elapsed > 3600 else 0,
                    "Remote Failures": 0,
                    "User": pool.user,
                    "Last Share Time": "0:00:03" if is_active and accepted else "0",
                    "Diff": _diff_label(s.share_diff) if is_active else "",
                    "Diff1 Shares": 0,
                    "Proxy Type": "",
                    "Proxy": "",
                    "Difficulty Accepted": diff_acc,
                    "Difficulty Rejected": round(rejected * s.share_diff * 0.61, 1),
                    "Difficulty Stale": 0.0,
                    "Last Share Difficulty": s.share_diff if is_active else 0.0,
                    "Has Stratum": True,
                    "Stratum Active": is_active,
                    "Stratum URL": _stratum_host(pool.url) if is_active else "",
                    "Has GBT": False,
                    "Best Share": float(int(s.share_diff * 24_613)) if is_active else 0.0,
                    "Pool Rejected%": round(100 * rejected / max(1, accepted + rejected), 4),
                    "Pool Stale%%": 0.0,
                }
            )
        return self.ok_reply(miner, 7, f"{len(rows)} Pool(s)", "POOLS", rows, now)

    def rpc_stats(
        self, miner: MinerState, parameter: Any, payload: dict[str, Any], now: float
    ) -> RpcReply:
        """Legacy two-element STATS; ``new_api`` as a top-level key gives the chain[] shape."""
        if payload.get("new_api"):
            return self.cgi_stats(miner, b"", now)
        spec = self.spec(miner)
        s = snapshot(miner, spec, now)
        head = {
            "BMMiner": "1.0.0",
            "Miner": spec.option("miner_version"),
            "CompileTime": miner.firmware_version,
            "Type": miner.model,
        }
        fans = list(s.telemetry.fan_rpms)[:4] + [0] * max(0, 4 - len(s.telemetry.fan_rpms))
        live = [c for c in s.chains if c.asic_num]
        freq_avg = int(sum(c.freq for c in live) / len(live)) if live else 0
        body: dict[str, Any] = {
            "STATS": 0,
            "ID": "BTM_SOC0",
            "Elapsed": s.elapsed,
            "Calls": 0,
            "Wait": 0,
            "Max": 0,
            "Min": 99999999,
            "GHS 5s": s.rate_5s,
            "GHS av": s.rate_avg,
            "rate_30m": s.rate_30m,
            "Mode": 2,
            "miner_count": len(s.chains),
            "frequency": int(spec.option("freq", 500)),
            "fan_num": len(s.telemetry.fan_rpms),
            **{f"fan{i + 1}": rpm for i, rpm in enumerate(fans)},
            "temp_num": len(s.chains),
        }
        for c in s.chains:
            body[f"temp{c.index + 1}"] = max(c.pcb)
            body[f"temp2_{c.index + 1}"] = max(c.chip)
        for key, attr in (("temp_pcb", "pcb"), ("temp_chip", "chip"), ("temp_pic", "pic")):
            for i in range(4):
                values = getattr(s.chains[i], attr) if i < len(s.chains) else (0, 0, 0, 0)
                body[f"{key}{i + 1}"] = "-".join(str(v) for v in values)
        body.update(
            {
                "total_rateideal": s.rate_ideal,
                "rate_unit": "GH",
                "total_freqavg": freq_avg,
                "total_acn": sum(c.asic_num for c in s.chains),
                "total rate": s.rate_avg,
                "temp_max": 0,
                "no_matching_work": s.hw_total,
            }
        )
        padded: list[Chain | None] = [*s.chains, *[None] * max(0, 4 - len(s.chains))]
        columns: tuple[tuple[str, Callable[[Chain], Any], Any], ...] = (
            ("chain_acn", lambda ch: ch.asic_num, 0),
            ("chain_acs", lambda ch: ch.asic_status, ""),
            ("chain_hw", lambda ch: ch.hw, 0),
            ("chain_rate", lambda ch: f"{ch.rate_ghs:.2f}", ""),
            ("freq", lambda ch: ch.freq, 0),
        )
        for key, value, empty in columns:  # grouped by key, as BMMiner prints them
            for i, slot in enumerate(padded, start=1):
                body[f"{key}{i}"] = value(slot) if slot is not None else empty
        if spec.option("chain_power"):
            body["chain_power"] = f"{int(s.telemetry.power_w)} W"
        body["miner_version"] = spec.option("miner_version")
        body["miner_id"] = f"{random.Random(f'{miner.seed}:id').getrandbits(64):016x}"
        return self.ok_reply(miner, 70, "CGMiner stats", "STATS", [head, body], now)

    def rpc_devs(
        self, miner: MinerState, parameter: Any, payload: dict[str, Any], now: float
    ) -> RpcReply:
        """One pseudo-device with zeroed rates and the ``Tenperature`` typo, as captured."""
        s = snapshot(miner, self.spec(miner), now)
        diff_acc = int(s.accepted * s.share_diff * 0.61)
        row = {
            "ASC": 0,
            "Name": "BTM_SOC",
            "ID": 0,
            "Enabled": "Y",
            "Status": "Alive",
            "Tenperature": 0.0,
            "MHS av": 0.0,
            "MHS 5s": 0.0,
            "Accepted": s.accepted,
            "Rejected": s.rejected,
            "Hardware Errors": 0,
            "Utility": 0.0,
            "Last Share Pool": miner.active_pool_index(),
            "Last Share Time": int(now) - 3,
            "Total MH": 0.0,
            "Diff1 Work": 0,
            "Difficulty Accepted": diff_acc,
            "Difficulty Rejected": int(s.rejected * s.share_diff * 0.61),
            "Last Share Difficulty": int(now) - 3,
            "Last Valid Work": int(now) - 3,
            "Device Hardware%": 0.0,
            "Device Rejected%": 0.0,
            "Device Elapsed": s.elapsed,
        }
        return self.ok_reply(miner, 9, "1 ASC(s)", "DEVS", [row], now)

    # --- web (port 80) ----------------------------------------------------------------------------

    def web_routes(self) -> list[web.RouteDef]:
        return [web.route("*", "/{tail:.*}", self.serve)]

    async def serve(self, request: web.Request) -> web.StreamResponse:
        """lighttpd: Digest on every path, then the CGI, the UI shell, or a 404 page."""
        miner = miner_of(request)
        now = time.time()
        body = await request.read()
        header = request.headers.get("Authorization", "")
        if not header or not self.digest.verify(
            header, request.method, request.raw_path, miner.credentials
        ):
            if header:
                miner.log(now, "http", f"{request.method} {request.path}", detail="auth failed")
            return web.Response(
                status=401,
                text=_lighttpd_page(401, "Unauthorized"),
                content_type="text/html",
                headers={"WWW-Authenticate": self.digest.challenge(now)},
            )
        path = request.path
        if path in ("/", "/index.html"):
            return web.Response(text=INDEX_HTML, content_type="text/html")
        if path.startswith("/cgi-bin/") and path.endswith(".cgi"):
            handler = self._cgi.get(path[len("/cgi-bin/") : -len(".cgi")])
            if handler is not None:
                reply = handler(miner, body, now)
                return web.Response(
                    text=json.dumps(reply, separators=(",", ":")), content_type="text/plain"
                )
        return web.Response(
            status=404, text=_lighttpd_page(404, "Not Found"), content_type="text/html"
        )

    def cgi_get_system_info(self, miner: MinerState, body: bytes, now: float) -> dict[str, Any]:
        spec = self.spec(miner)
        return {
            "minertype": miner.model,
            "nettype": "DHCP",
            "netdevice": "eth0",
            "macaddr": miner.mac,
            "hostname": miner.hostname,
            "ipaddress": miner.ip,
            "netmask": "255.255.255.0",
            "gateway": "",
            "dnsservers": "",
            "system_mode": "GNU/Linux",
            "system_kernel_version": spec.option("kernel_version"),
            "system_filesystem_version": spec.option("filesystem_version"),
            "firmware_type": "Release",
            "serinum": miner.reported_serial(),
        }

    def cgi_get_network_info(self, miner: MinerState, body: bytes, now: float) -> dict[str, Any]:
        return {
            "nettype": "DHCP",
            "netdevice": "eth0",
            "macaddr": miner.mac,
            "ipaddress": miner.ip,
            "netmask": "255.255.255.0",
            "conf_nettype": "DHCP",
            "conf_hostname": miner.hostname,
            "conf_ipaddress": "",
            "conf_netmask": "",
            "conf_gateway": "",
            "conf_dnsservers": "",
        }

    def cgi_set_network_conf(self, miner: MinerState, body: bytes, now: float) -> dict[str, Any]:
        """Only the hostname is applied; the farm's addresses are fixed by the shard."""
        conf = _json_object(body)
        if conf is None:
            return {"stats": "error", "code": "N001", "msg": "Illegal parameter!"}
        hostname = str(conf.get("ipHost") or conf.get("conf_hostname") or "").strip()
        if hostname and hostname != miner.hostname:
            miner.log(now, "http", "hostname", write=True, detail=f"{miner.hostname} -> {hostname}")
            miner.hostname = hostname
        return {"stats": "success", "code": "N000", "msg": "OK!"}

    def cgi_get_miner_conf(self, miner: MinerState, body: bytes, now: float) -> dict[str, Any]:
        spec = self.spec(miner)
        return {
            "pools": [
                {"url": p.url, "user": p.user, "pass": p.password}
                for p in _pool_slots(miner.configured_pools())[:3]
            ],
            "api-listen": True,
            "api-network": True,
            "api-groups": "A:stats:pools:devs:summary:version",
            "api-allow": "A:0/0,W:*",
            "bitmain-fan-ctrl": bool(miner.extra.get("fan_ctrl", False)),
            "bitmain-fan-pwm": str(miner.extra.get("fan_pwm", "100")),
            "bitmain-use-vil": True,
            "bitmain-freq": str(spec.option("freq")),
            "bitmain-voltage": str(spec.option("voltage")),
            "bitmain-ccdelay": "0",
            "bitmain-pwth": "3",
            "bitmain-work-mode": str(WORK_MODE[miner.mode]),
            "bitmain-hashrate-percent": "100",
            "bitmain-freq-level": str(miner.extra.get("freq_level", "100")),
        }

    def cgi_set_miner_conf(self, miner: MinerState, body: bytes, now: float) -> dict[str, Any]:
        """Save the config and restart BMMiner (state.py times the restart)."""
        conf = _json_object(body)
        error = {"stats": "error", "code": "M001", "msg": "Illegal parameter!"}
        if conf is None:
            return error
        new_pools: list[Pool] | None = None
        if "pools" in conf:
            raw = conf["pools"]
            if not isinstance(raw, list) or len(raw) != 3:
                return error
            if not all(isinstance(p, dict) for p in raw):
                return error
            new_pools = [
                Pool(str(p.get("url", "")).strip(), str(p.get("user", "")), str(p.get("pass", "")))
                for p in raw
            ]
            new_pools = [p for p in new_pools if p.url]
        mode = _requested_mode(conf)
        if "bitmain-fan-ctrl" in conf:
            miner.extra["fan_ctrl"] = bool(conf["bitmain-fan-ctrl"])
        if "bitmain-fan-pwm" in conf:
            miner.extra["fan_pwm"] = str(conf["bitmain-fan-pwm"])
        if "freq-level" in conf:
            miner.extra["freq_level"] = str(conf["freq-level"])
        changed = False
        if new_pools is not None and _pool_key(new_pools) != _pool_key(miner.pools):
            miner.write_pools(new_pools, now, "http")
            changed = True
        if mode is not None and mode is not miner.mode:
            miner.set_mode(mode, now, "http")
            changed = True
        if not changed:  # the firmware rewrites the file and restarts BMMiner regardless
            miner.write_pools(miner.configured_pools(), now, "http")
        return dict(SUCCESS)

    def _new_api(self, miner: MinerState, msg: str, now: float) -> dict[str, Any]:
        return {
            "STATUS": {"STATUS": "S", "when": int(now), "Msg": msg, "api_version": "1.0.0"},
            "INFO": self.info(miner),
        }

    def cgi_summary(self, miner: MinerState, body: bytes, now: float) -> dict[str, Any]:
        s = snapshot(miner, self.spec(miner), now)
        dead = bool(miner.dead_boards())
        has_pool = any(p.url for p in miner.configured_pools())
        status = [
            _status_item("rate", "Low hashrate" if dead else ""),
            _status_item("network", "" if has_pool else "Pool connection failed"),
            _status_item("fans", ""),
            _status_item("temp", ""),
        ]
        row = {
            "elapsed": s.elapsed,
            "rate_5s": s.rate_5s,
            "rate_30m": s.rate_30m,
            "rate_avg": s.rate_avg,
            "rate_ideal": s.rate_ideal,
            "rate_unit": "GH/s",
            "hw_all": s.hw_total,
            "bestshare": int(s.share_diff * 24_613),
            "status": status,
        }
        return {**self._new_api(miner, "summary", now), "SUMMARY": [row]}

    def cgi_stats(self, miner: MinerState, body: bytes, now: float) -> dict[str, Any]:
        s = snapshot(miner, self.spec(miner), now)
        chains: list[dict[str, Any]] = [
            {
                "index": c.index,
                "freq_avg": c.freq,
                "rate_ideal": c.ideal_ghs,
                "rate_real": c.rate_ghs,
                "asic_num": c.asic_num,
                "asic": c.asic_status,
                "temp_pic": list(c.pic),
                "temp_pcb": list(c.pcb),
                "temp_chip": list(c.chip),
                "hw": c.hw,
                "eeprom_loaded": True,
                "sn": c.serial,
                "hwp": round(100 * c.hw / max(1, s.accepted * 50), 4),
            }
            for c in s.chains
        ]
        row = {
            "elapsed": s.elapsed,
            "rate_5s": s.rate_5s,
            "rate_30m": s.rate_30m,
            "rate_avg": s.rate_avg,
            "rate_ideal": s.rate_ideal,
            "rate_unit": "GH/s",
            "chain_num": len(chains),
            "fan_num": len(s.telemetry.fan_rpms),
            "fan": list(s.telemetry.fan_rpms),
            "hwp_total": round(sum(float(c["hwp"]) for c in chains) / max(1, len(chains)), 4),
            "miner-mode": WORK_MODE[miner.mode],
            "freq-level": int(miner.extra.get("freq_level", "100") or 100),
            "chain": chains,
        }
        return {**self._new_api(miner, "stats", now), "STATS": [row]}

    def cgi_pools(self, miner: MinerState, body: bytes, now: float) -> dict[str, Any]:
        s = snapshot(miner, self.spec(miner), now)
        active = miner.active_pool_index()
        rows = []
        for index, pool in enumerate(_pool_slots(miner.runtime_pools())):
            is_active = bool(pool.url) and index == active
            accepted = s.accepted if is_active else 0
            rows.append(
                {
                    "index": index,
                    "url": pool.url,
                    "user": pool.user,
                    "status": "Alive" if pool.url else "Dead",
                    "priority": index,
                    "getworks": int(accepted * 0.975),
                    "accepted": accepted,
                    "rejected": s.rejected if is_active else 0,
                    "discarded": accepted * 1116,
                    "stale": accepted // 4000,
                    "diff": f"{s.share_diff:.4f}" if is_active else "0.0000",
                    "diff1": 0,
                    "diffa": round(accepted * s.share_diff * 0.61, 1),
                    "diffr": int(s.rejected * s.share_diff * 0.61) if is_active else 0,
                    "diffs": 0,
                    "lsdiff": int(s.share_diff) if is_active else 0,
                    "lstime": "0:00:03" if is_active and accepted else "0",
                }
            )
        return {**self._new_api(miner, "pools", now), "POOLS": rows}

    def cgi_get_blink_status(self, miner: MinerState, body: bytes, now: float) -> dict[str, Any]:
        return {"blink": miner.blinking}

    def cgi_blink(self, miner: MinerState, body: bytes, now: float) -> dict[str, Any]:
        conf = _json_object(body) or {}
        value = conf.get("blink")
        if value in ("true", True):
            miner.blinking = True
            miner.log(now, "http", "blink", write=True, detail="on")
            return {"code": "B000"}
        if value in ("false", False):
            miner.blinking = False
            miner.log(now, "http", "blink", write=True, detail="off")
            return {"code": "B100"}
        return {"code": "B001"}

    def cgi_reboot(self, miner: MinerState, body: bytes, now: float) -> dict[str, Any]:
        """The reply goes out before the box goes dark (reply shape inferred, not captured)."""
        miner.reboot(now, "http")
        return {"stats": "success", "code": "R000", "msg": "OK!"}

    def cgi_miner_type(self, miner: MinerState, body: bytes, now: float) -> dict[str, Any]:
        subtype = self.spec(miner).option("subtype")
        return {
            "miner_type": miner.model,
            "subtype": f"AMLCtrl_{subtype}",
            "fw_version": miner.firmware_version,
        }


def _json_object(body: bytes) -> dict[str, Any] | None:
    """The POSTed JSON object (the UI posts it as text/plain, pyasic as application/json)."""
    try:
        value = json.loads(body.decode("utf-8", "replace") or "{}")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _requested_mode(conf: dict[str, Any]) -> Mode | None:
    raw = conf.get("miner-mode", conf.get("bitmain-work-mode"))
    try:
        return MINER_MODE.get(int(str(raw)))
    except ValueError:
        return None


def _pool_key(pools: list[Pool]) -> list[tuple[str, str, str]]:
    return [(p.url, p.user, p.password) for p in pools if p.url]


def _status_item(kind: str, error: str) -> dict[str, Any]:
    if error:
        return {"type": kind, "status": "e", "code": -1, "msg": error}
    return {"type": kind, "status": "s", "code": 0, "msg": ""}


PERSONALITY = AntminerStock()
