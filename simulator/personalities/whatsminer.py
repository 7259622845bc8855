"""MicroBT Whatsminer on stock firmware, API v2 (btminer, firmware dated before 2024-11).

Everything is on TCP 4028. Two programs answer there on a real miner, and the replies
show it: MicroBT's own ``api`` daemon answers ``get_*``, ``status`` and every error with a
*flat* object (``"STATUS":"S"`` is a bare string, ``Msg`` carries the data), while the
cgminer-derived ``btminer`` answers ``summary``/``pools``/``devs``/``edevs``/``devdetails``
in cgminer's envelope (and ``+`` joins of them).

Writes need the encrypted scheme (protocols.md §4.2, pyasic ``rpc/btminer.py``):
``get_token`` hands out ``time``/``salt``/``newsalt``; the client derives
``key = md5crypt(api_password, salt)`` and ``sign = md5crypt(key + time, newsalt)``,
sends ``{"enc":1,"data":base64(AES-256-ECB(sha256(key), json+token))}`` and gets
``{"enc":"<base64>"}`` back. The salt is the salt of the stored admin password hash, so
the miner only ever knows ``key`` for its *current* password: a client holding another
password encrypts with another key and the miner cannot parse the request
(``Code 23 "enc json load err"``, a real capture), exactly like real firmware.

Port 80 is left closed (``web_ports = ()``): real units answer 307 -> https with a LuCI
page, but pyasic only accepts that signature when the https page loads too, and the web
transport has no TLS; a closed port 80 is one of the two behaviours pyasic.md §4.2 lists,
and identification then runs over 4028 (``devdetails`` Driver ``bitmicro``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import random
import string
import time
from functools import lru_cache
from typing import Any, ClassVar

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from passlib.handlers.md5_crypt import md5_crypt

from simulator.personalities.base import (
    MinerIdentity,
    ModelSpec,
    Personality,
    RpcReply,
    random_alnum,
    random_mac,
)
from simulator.state import Credentials, MinerState, Mode, Pool

API_VERSION = "2.0.5"
CGMINER_DESCRIPTION = "cgminer 4.9.2"  # what btminer's cgminer sections carry
ERROR_DESCRIPTION = "whatsminer v1.1"  # protocols.md §1.3: the api daemon's flat errors
TOKEN_LIFETIME_S = 30 * 60  # WM-DOC 2.0.5: "a token keepalive time is 30 minutes"
TOKENS_KEPT = 32  # WM-DOC 2.0.5: "one IP can get 32 tokens"
MICROBT_OUI = "C4:08:28"  # MAC prefix of a real M3x capture (asic-rs whatsminer v1 summary)
SALT_ALPHABET = string.ascii_letters + string.digits
DEFAULT_HOSTNAME = "WhatsMiner"

# Commands the btminer (cgminer) process answers; only these can be joined with "+".
BTMINER_COMMANDS = frozenset({"summary", "pools", "devs", "edevs", "devdetails"})
# Read commands, answered in plaintext (and inside the encrypted envelope too).
READ_COMMANDS = BTMINER_COMMANDS | {
    "get_version",
    "get_miner_info",
    "get_psu",
    "get_error_code",
    "get_token",
    "status",
}
# Write commands: only accepted encrypted, with a valid token, when API writes are on.
PRIVILEGED_COMMANDS = frozenset(
    {
        "update_pools",
        "restart_btminer",
        "power_off",
        "power_on",
        "set_led",
        "set_low_power",
        "set_normal_power",
        "set_high_power",
        "reboot",
        "adjust_power_limit",
        "factory_reset",
        "update_pwd",
        "net_config",
        "set_target_freq",
        "enable_btminer_fast_boot",
        "disable_btminer_fast_boot",
        "enable_web_pools",
        "disable_web_pools",
        "set_hostname",
        "set_zone",
        "load_log",
        "set_power_pct",
        "set_power_pct_v2",
        "pre_power_on",
        "set_temp_offset",
        "adjust_upfreq_speed",
        "set_poweroff_cool",
        "set_fan_zero_speed",
        "upgrade_firmware",
        "download_logs",
    }
)
POWER_MODE_COMMANDS = {
    "set_low_power": Mode.LOW,
    "set_normal_power": Mode.NORMAL,
    "set_high_power": Mode.HIGH,
}

# --- extra-dict keys (per-miner firmware memory) ---------------------------------------------
_TOKENS = "wm_tokens"
_TOKEN_COUNTER = "wm_token_counter"
_RESUME_MODE = "wm_resume_mode"
_MINEROFF_AT = "wm_mineroff_at"


def _model(
    name: str,
    ths: float,
    watts: float,
    chips: int,
    firmware_version: str,
    **extra: Any,
) -> ModelSpec:
    return ModelSpec(
        name=name,
        nominal_ths=ths,
        nominal_w=watts,
        boards=3,
        chips_per_board=chips,
        fans=2,
        firmware_version=firmware_version,
        extra=tuple(sorted(extra.items())),
    )


# Model strings are as devdetails reports them; pyasic removes "_" and sets the last
# character to "0" (M30S++_VG30 -> M30S++VG30), which must be a key of MINER_CLASSES.
# Firmware dates are <= 2024-11, so pyasic picks BTMinerV2. Chip data strings, PSU
# models and platforms follow public captures (protocols.md §4.1/§4.3, asic-rs fixtures).
MODELS = (
    _model(
        "M30S++_VG30",
        112.0,
        3472.0,
        111,
        "20230508.18.Rel",
        platform="H6",
        psu="P221",
        freq=574,
        limit=3600,
        sn_code="3AS",
        made="2204",
        chip_data="HP5A01-19101436   BINV04-192101D",
    ),
    _model(
        "M50S_VH30",
        126.0,
        3276.0,
        156,
        "20230911.12.Rel",
        platform="H616",
        psu="P221B",
        freq=590,
        limit=3500,
        sn_code="3BS",
        made="2306",
        chip_data="K88Z347-2039 BINV01-195001D",
    ),
    _model(
        "M60S_VK10",
        186.0,
        3441.0,
        215,
        "20240624.18.REL",
        platform="H616",
        psu="P221B",
        freq=540,
        limit=3600,
        sn_code="3CS",
        made="2408",
        chip_data="K8EC374-2426 BINVE6-197806A",
    ),
)


class WhatsminerPersonality(Personality):
    """btminer API v2 on port 4028: flat ``get_*`` replies, cgminer sections, AES writes."""

    name = "whatsminer"
    make = "WhatsMiner"
    firmware = "stock"
    models = MODELS
    rpc_ports = (4028,)
    web_ports = ()
    # (inferred) replies written by MicroBT's api daemon carry no cgminer NUL terminator.
    rpc_nul_terminated = False
    default_credentials: ClassVar[Credentials] = Credentials(
        web_user="admin", web_password="admin", api_password="admin"
    )

    # --- identity -------------------------------------------------------------------------

    def new_identity(self, rng: random.Random, model: ModelSpec) -> MinerIdentity:
        """Serials in MicroBT's formats, from public captures.

        - chassis ``minersn``, 33 chars: ``HTM40X40HR250410…`` / ``BTM3CS40HD240831…``
          = plant + ``TM`` + 3-char series + 2-digit variant + line + YYMMDD + 17 chars;
        - hashboard ``PCB SN``, 20 chars, e.g. ``HEM1EP9C400929K60001``; the boards of one
          chassis share the first 15 characters and count up in the last five;
        - PSU ``serial_no``, 16 chars, e.g. ``A1232B0120100049``.
        """
        variant = model.name.rsplit("_V", 1)[-1][-2:]
        made = str(model.option("made", "2306"))
        day = f"{rng.randint(1, 28):02d}"
        tail = (
            random_alnum(rng, 11, string.digits)
            + rng.choice("ABCDEFGHJKLMNPRSTUVWXYZ")
            + random_alnum(rng, 5, string.digits)
        )
        serial = (
            rng.choice("HB")
            + "TM"
            + str(model.option("sn_code", "3AS"))
            + variant
            + rng.choice(("HR", "HD", "HK"))
            + made
            + day
            + tail
        )
        board_prefix = (
            rng.choice(("HE", "HH", "BK", "H5"))
            + "M"
            + str(rng.randint(1, 3))
            + random_alnum(rng, 3)
            + made
            + day
            + random_alnum(rng, 1, string.digits)
            + "K"
        )
        first = rng.randint(10_000, 99_000)
        boards = tuple(f"{board_prefix}{first + i:05d}" for i in range(model.boards))
        psu = (
            rng.choice("ABC")
            + random_alnum(rng, 4, string.digits)
            + rng.choice("ABCD")
            + random_alnum(rng, 10, string.digits)
        )
        return MinerIdentity(
            serial=serial,
            mac=random_mac(rng, MICROBT_OUI),
            hostname=DEFAULT_HOSTNAME,
            # Not exposed by API v2; kept for the true state (control board id).
            control_board_serial="CB" + random_alnum(rng, 14),
            psu_serial=psu,
            board_serials=boards,
        )

    # --- framing and dispatch -------------------------------------------------------------

    def handle_rpc(self, miner: MinerState, request: bytes, port: int, now: float) -> RpcReply:
        """Plain JSON is a read; ``{"enc":1,"data":…}`` is the encrypted (write) path."""
        if not miner.is_up(now):
            return None  # rebooting: the daemon is not there to answer
        try:
            payload = json.loads(request.rstrip(b"\x00\r\n ").decode("utf-8", "replace"))
        except ValueError:
            miner.log(now, "rpc", "?", detail="invalid json")
            return self.flat_error(23, "json load err", now)  # (inferred) text
        if not isinstance(payload, dict):
            return self.flat_error(23, "json load err", now)
        if "enc" in payload:
            return self.handle_encrypted(miner, payload, now)
        return self.handle_rpc_json(miner, payload, port, now)

    def dispatch_command(
        self,
        miner: MinerState,
        command: str,
        parameter: Any,
        payload: dict[str, Any],
        now: float,
    ) -> RpcReply:
        """Reads go to ``read_<command>``; a plaintext write is refused like the firmware does.

        An explicit list, not ``getattr(self, "rpc_" + command)``: the command ``status``
        would otherwise land on the base class's ``status_entry`` helper.
        """
        if command in PRIVILEGED_COMMANDS:
            miner.log(now, "rpc", command, detail="plaintext write refused")
            return self.flat_error(45, "can't access write cmd", now)
        handler = getattr(self, f"read_{command}", None) if command in READ_COMMANDS else None
        if handler is None:
            miner.log(now, "rpc", command or "?", detail="invalid command")
            return self.flat_error(14, "invalid cmd", now)
        miner.log(now, "rpc", command)
        reply: RpcReply = handler(miner, parameter, payload, now)
        return reply

    def multi_reply(
        self, miner: MinerState, command: str, payload: dict[str, Any], now: float
    ) -> RpcReply:
        """``a+b`` is btminer's cgminer join; members it does not know get cgminer's code 14."""
        reply: dict[str, Any] = {}
        for member in dict.fromkeys(c for c in command.split("+") if c):
            if member in BTMINER_COMMANDS:
                result = self.dispatch_command(miner, member, None, payload, now)
            else:
                miner.log(now, "rpc", member, detail="invalid command in join")
                result = self.cgminer_error(miner, 14, "Invalid command", now)
            if isinstance(result, dict):
                reply[member] = [result]
        reply["id"] = 1
        return reply

    def description(self, miner: MinerState) -> str:
        return CGMINER_DESCRIPTION

    def error_reply(self, code: int, msg: str, now: float) -> dict[str, Any]:
        """Errors outside a cgminer section come from the api daemon: flat."""
        return self.flat_error(code, msg, now)

    @staticmethod
    def flat_error(code: int, msg: str, now: float) -> dict[str, Any]:
        return {
            "STATUS": "E",
            "When": int(now),
            "Code": code,
            "Msg": msg,
            "Description": ERROR_DESCRIPTION,
        }

    @staticmethod
    def flat_ok(msg: Any, now: float, code: int = 131) -> dict[str, Any]:
        return {"STATUS": "S", "When": int(now), "Code": code, "Msg": msg, "Description": ""}

    def cgminer_error(self, miner: MinerState, code: int, msg: str, now: float) -> dict[str, Any]:
        return {"STATUS": [self.status_entry(miner, code, msg, now, status="E")], "id": 1}

    # --- reads: btminer's cgminer sections ------------------------------------------------------

    def read_summary(
        self, miner: MinerState, parameter: Any, payload: dict[str, Any], now: float
    ) -> RpcReply:
        t = miner.telemetry(now)
        rng = random.Random(f"{miner.seed}:summary:{int(now // 5)}")
        mhs = t.hashrate_ths * 1e6
        elapsed = _btminer_elapsed(miner, now)
        model = _spec(self, miner)
        limit = _power_limit(miner, model)
        chips = [c for c, b in zip(t.chip_temps, t.board_ths, strict=True) if b > 0]
        chips = chips or list(t.chip_temps)
        hr_factor = {Mode.LOW: 0.72, Mode.HIGH: 1.12}.get(_power_mode(miner), 1.0)
        accepted = int(elapsed * t.hashrate_ths * 0.0036)
        row: dict[str, Any] = {
            "Elapsed": elapsed,
            "MHS av": round(mhs * rng.uniform(0.995, 1.0), 2),
            "MHS 5s": round(mhs * rng.uniform(0.97, 1.03), 2),
            "MHS 1m": round(mhs, 2),
            "MHS 5m": round(mhs * rng.uniform(0.99, 1.01), 2),
            "MHS 15m": round(mhs * rng.uniform(0.995, 1.005), 2),
            "HS RT": round(mhs * rng.uniform(0.99, 1.01), 2),
            "Accepted": accepted,
            "Rejected": accepted // 700,
            "Total MH": round(mhs * elapsed, 4),
            "Temperature": max(t.board_temps, default=0.0),
            "freq_avg": int(model.option("freq", 600)) if t.hashing else 0,
            "Fan Speed In": t.fan_rpms[0] if t.fan_rpms else 0,
            "Fan Speed Out": t.fan_rpms[1] if len(t.fan_rpms) > 1 else 0,
            "Power": round(t.power_w),
            "Power Rate": round(t.power_w / t.hashrate_ths, 2) if t.hashrate_ths else 0.0,
            "Pool Rejected%": 0.0,
            "Pool Stale%": 0.0,
            "Last getwork": 0,
            "Uptime": miner.uptime(now),
            "Security Mode": 0,
            "Hash Stable": t.hashing and elapsed > 900,
            "Hash Stable Cost Seconds": min(elapsed, 900 + miner.seed % 700),
            "Hash Deviation%": round(rng.uniform(0.05, 0.2), 4) if t.hashing else 0.0,
            "Target Freq": int(model.option("freq", 600)),
            "Target MHS": int(miner.nominal_ths * hr_factor * 0.9e6),
            "Env Temp": t.env_temp,
            "Power Mode": str(_power_mode(miner)).capitalize(),
            "Factory GHS": int(miner.nominal_ths * 1000),
            "Power Limit": limit,
            "Chip Temp Min": round(min(chips) - 9.0, 2) if chips else 0.0,
            "Chip Temp Max": round(max(chips) + 8.0, 2) if chips else 0.0,
            "Chip Temp Avg": round(sum(chips) / len(chips), 2) if chips else 0.0,
            "Btminer Fast Boot": "disable",
        }
        return self.ok_reply(miner, 11, "Summary", "SUMMARY", [row], now)

    def read_pools(
        self, miner: MinerState, parameter: Any, payload: dict[str, Any], now: float
    ) -> RpcReply:
        """Runtime pools (a hidden malware pool shows here); POOL numbers start at 1."""
        hashing = miner.is_hashing(now)
        active = miner.active_pool_index()
        elapsed = _btminer_elapsed(miner, now)
        ths = miner.telemetry(now).hashrate_ths
        rows = []
        for index, pool in enumerate(miner.runtime_pools()):
            if not pool.url:
                continue
            is_active = hashing and index == active
            accepted = int(elapsed * ths * 0.0036) if is_active else 0
            rows.append(
                {
                    "POOL": index + 1,
                    "URL": pool.url,
                    "Status": "Alive",
                    "Priority": index,
                    "Quota": 1,
                    "Long Poll": "N",
                    "Getworks": elapsed // 30 if is_active else 0,
                    "Accepted": accepted,
                    "Rejected": accepted // 700,
                    "Works": accepted * 4,
                    "Discarded": 0,
                    "Stale": 0,
                    "Get Failures": 0,
                    "Remote Failures": 0,
                    "User": pool.user,
                    "Last Share Time": int(now) - 3 if is_active else 0,
                    "Diff1 Shares": 0,
                    "Proxy Type": "",
                    "Proxy": "",
                    "Difficulty Accepted": float(accepted * 65536),
                    "Difficulty Rejected": float(accepted // 700 * 65536),
                    "Difficulty Stale": 0.0,
                    "Last Share Difficulty": 65536.0 if is_active else 0.0,
                    "Work Difficulty": 65536.0 if is_active else 0.0,
                    "Has Stratum": 1,
                    "Stratum Active": is_active,
                    "Stratum URL": _stratum_host(pool.url) if is_active else "",
                    "Stratum Difficulty": 65536.0 if is_active else 0.0,
                    "Best Share": accepted * 3_117 if is_active else 0,
                    "Pool Rejected%": 0.0,
                    "Pool Stale%": 0.0,
                    "Bad Work": 0,
                    "Current Block Height": _block_height(now) if is_active else 0,
                    "Current Block Version": 536870916 if is_active else 0,
                }
            )
        return self.ok_reply(miner, 7, f"{len(rows)} Pool(s)", "POOLS", rows, now)

    def read_devs(
        self, miner: MinerState, parameter: Any, payload: dict[str, Any], now: float
    ) -> RpcReply:
        """One row per hashboard with its ``PCB SN``; a dead board reads 0 effective chips."""
        t = miner.telemetry(now)
        model = _spec(self, miner)
        dead = miner.dead_boards()
        rng = random.Random(f"{miner.seed}:devs:{int(now // 5)}")
        elapsed = _btminer_elapsed(miner, now)
        rows = []
        for board in miner.hashboards:
            i = board.index
            mhs = t.board_ths[i] * 1e6
            chip = t.chip_temps[i]
            live = mhs > 0
            accepted = int(elapsed * t.board_ths[i] * 0.0036)
            rows.append(
                {
                    "ASC": i,
                    "Slot": i,
                    "Enabled": "Y",
                    "Status": "Alive",
                    "Temperature": t.board_temps[i],
                    "Chip Frequency": int(model.option("freq", 600)) if live else 0,
                    "MHS av": round(mhs * rng.uniform(0.995, 1.0), 2),
                    "MHS 5s": round(mhs * rng.uniform(0.97, 1.03), 2),
                    "MHS 1m": round(mhs, 2),
                    "MHS 5m": round(mhs * rng.uniform(0.99, 1.01), 2),
                    "MHS 15m": round(mhs * rng.uniform(0.995, 1.005), 2),
                    "HS RT": round(mhs * rng.uniform(0.99, 1.01), 2),
                    "Accepted": accepted,
                    "Rejected": accepted // 700,
                    "Last Valid Work": int(now) - rng.randint(1, 9) if live else 0,
                    "Upfreq Complete": 1 if live and elapsed > 900 else 0,
                    "Effective Chips": 0 if i in dead else board.chips,
                    "PCB SN": board.serial,
                    "Chip Data": str(model.option("chip_data", "")),
                    "Chip Temp Min": round(chip - 9.0, 2) if live else chip,
                    "Chip Temp Max": round(chip + 8.0, 2) if live else chip,
                    "Chip Temp Avg": chip,
                    "chip_vol_diff": 9 if live else 0,
                }
            )
        return self.ok_reply(miner, 9, f"{len(rows)} ASC(s)", "DEVS", rows, now)

    def read_edevs(
        self, miner: MinerState, parameter: Any, payload: dict[str, Any], now: float
    ) -> RpcReply:
        return self.read_devs(miner, parameter, payload, now)

    def read_devdetails(
        self, miner: MinerState, parameter: Any, payload: dict[str, Any], now: float
    ) -> RpcReply:
        """``Driver "bitmicro"`` is what pyasic identifies a Whatsminer by; ``Model`` its class."""
        rows = [
            {
                "DEVDETAILS": b.index,
                "Name": "SM",
                "ID": b.index,
                "Driver": "bitmicro",
                "Kernel": "",
                "Model": miner.model,
            }
            for b in miner.hashboards
        ]
        return self.ok_reply(miner, 69, "Device Details", "DEVDETAILS", rows, now)

    # --- reads: the api daemon's flat replies ---------------------------------------------------

    def read_get_version(
        self, miner: MinerState, parameter: Any, payload: dict[str, Any], now: float
    ) -> RpcReply:
        model = _spec(self, miner)
        msg = {
            "api_ver": API_VERSION,
            "fw_ver": miner.firmware_version,
            "platform": str(model.option("platform", "H616")),
        }
        return self.flat_ok(msg, now)

    def read_get_miner_info(
        self, miner: MinerState, parameter: Any, payload: dict[str, Any], now: float
    ) -> RpcReply:
        """The chassis serial lives here (``minersn``; '' when the serial is unreadable)."""
        subnet, host = miner.ip.rsplit(".", 1)
        gateway = f"{subnet}.{254 if host == '1' else 1}"
        msg = {
            "ntp": [f"{i}.openwrt.pool.ntp.org" for i in range(4)],
            "ip": miner.ip,
            "proto": "dhcp",
            "netmask": "255.255.255.0",
            "gateway": gateway,
            "dns": gateway,
            "hostname": miner.hostname,
            "mac": miner.mac,
            "ledstat": "manual" if miner.blinking else "auto",
            "minersn": miner.reported_serial(),
            "powersn": miner.psu_serial,
        }
        return self.flat_ok(msg, now)

    def read_get_psu(
        self, miner: MinerState, parameter: Any, payload: dict[str, Any], now: float
    ) -> RpcReply:
        """Shape of a real P221B capture; every value is a string."""
        t = miner.telemetry(now)
        psu = str(_spec(self, miner).option("psu", "P221B"))
        fan = 6000 + miner.seed % 900 if t.power_w > 500 else 2400 + miner.seed % 300
        msg = {
            "name": psu,
            "hw_version": "V01.00",
            "sw_version": "V01.00.V01.03",
            "model": psu,
            "iin": str(round(8718 * t.power_w / 3593)),
            "vin": str(22300 + miner.seed % 300),
            "fan_speed": str(fan),
            "version": "-1",
            "serial_no": miner.psu_serial,
            "vender": "7",
        }
        return self.flat_ok(msg, now)

    def read_status(
        self, miner: MinerState, parameter: Any, payload: dict[str, Any], now: float
    ) -> RpcReply:
        """btminer status, new-firmware shape; pyasic's is_mining is ``mineroff == "false"``."""
        off = miner.mode is Mode.SLEEP
        off_at = miner.extra.get(_MINEROFF_AT)
        msg = {
            "FirmwareVersion": miner.firmware_version,
            "hash_percent": "0",
            "mineroff": "true" if off else "false",
            "mineroff_reason": "by whatsminer API" if off else "",
            "mineroff_time": _timestamp(float(off_at)) if off and off_at is not None else "",
            "power_limit_set": str(_power_limit(miner, _spec(self, miner))),
            "power_mode": str(_power_mode(miner)),
        }
        return self.flat_ok(msg, now)

    def read_get_error_code(
        self, miner: MinerState, parameter: Any, payload: dict[str, Any], now: float
    ) -> RpcReply:
        """A dead board reports 54<slot> ("Slot n error reading chip id")."""
        since = _timestamp(max(miner.booted_at, now - miner.uptime(now)))
        codes = [{f"54{slot}": since} for slot in sorted(miner.dead_boards())]
        return self.flat_ok({"error_code": codes}, now)

    def read_get_token(
        self, miner: MinerState, parameter: Any, payload: dict[str, Any], now: float
    ) -> RpcReply:
        """Issue a token: remember ``sign`` for 30 minutes, at most 32 at a time."""
        counter = int(miner.extra.get(_TOKEN_COUNTER, 0)) + 1
        miner.extra[_TOKEN_COUNTER] = counter
        rng = random.Random(f"{miner.seed}:token:{counter}:{now}")
        newsalt = "".join(rng.choice(SALT_ALPHABET) for _ in range(8))
        stamp = f"{int(now) % 10_000:04d}"
        salt = _salt(miner)
        key = host_passwd_md5(miner.credentials.api_password, salt)
        sign = md5_crypt_body(key + stamp, newsalt)
        tokens = [tok for tok in miner.extra.get(_TOKENS, []) if float(tok["expires"]) > now][
            -(TOKENS_KEPT - 1) :
        ]
        tokens.append({"sign": sign, "expires": now + TOKEN_LIFETIME_S})
        miner.extra[_TOKENS] = tokens
        return self.flat_ok({"time": stamp, "salt": salt, "newsalt": newsalt}, now, code=134)

    # --- the encrypted (write) path -------------------------------------------------------------

    def handle_encrypted(self, miner: MinerState, payload: dict[str, Any], now: float) -> RpcReply:
        """Check access, decrypt with the key of the *current* password, check the token."""
        if not miner.api_write_enabled:
            miner.log(now, "rpc", "enc", detail="write API disabled")
            return self.flat_error(45, "can't access write cmd", now)
        try:
            raw = base64.b64decode(str(payload.get("data", "")), validate=False)
        except (binascii.Error, ValueError):
            miner.log(now, "rpc", "enc", detail="base64 decode error")
            return self.flat_error(137, "base64 decode error", now)
        key = host_passwd_md5(miner.credentials.api_password, _salt(miner))
        request = _decrypt(key, raw)
        if request is None:
            miner.log(now, "rpc", "enc", detail="cannot decrypt (wrong password?)")
            return self.flat_error(23, "enc json load err", now)
        command = str(request.get("cmd", request.get("command", "")))
        if not self._token_ok(miner, request.get("token"), now):
            miner.log(now, "rpc", command or "enc", detail="token check failed")
            return self.flat_error(135, "check token error", now)
        reply: RpcReply
        if command in PRIVILEGED_COMMANDS:
            miner.log(now, "rpc", command, detail="authenticated")
            reply = self.privileged(miner, command, request, now)
        elif command and "+" not in command:
            reply = self.dispatch_command(miner, command, request.get("parameter"), request, now)
        else:
            reply = self.flat_error(14, "invalid cmd", now)
        if not isinstance(reply, dict):
            return reply
        return {"enc": _encrypt(key, reply)}

    def _token_ok(self, miner: MinerState, token: Any, now: float) -> bool:
        if not isinstance(token, str):
            return False
        return any(
            tok["sign"] == token and float(tok["expires"]) > now
            for tok in miner.extra.get(_TOKENS, [])
        )

    def privileged(
        self, miner: MinerState, command: str, request: dict[str, Any], now: float
    ) -> dict[str, Any]:
        """Carry out one authenticated write through the state methods."""
        ok = self.flat_ok("API command OK", now)
        if command == "update_pools":
            pools = []
            for n in (1, 2, 3):
                url = str(request.get(f"pool{n}") or "").strip()
                if url:
                    pools.append(
                        Pool(
                            url,
                            str(request.get(f"worker{n}") or ""),
                            str(request.get(f"passwd{n}") or ""),
                        )
                    )
            if not pools:
                return self.flat_error(14, "invalid API command or data", now)
            miner.write_pools(pools, now, "rpc")
            return ok
        if command in POWER_MODE_COMMANDS:
            mode = POWER_MODE_COMMANDS[command]
            if miner.mode is Mode.SLEEP:
                miner.extra[_RESUME_MODE] = str(mode)  # applies at power_on
                miner.log(now, "rpc", "mode", write=True, detail=f"{mode} saved while off")
            elif miner.set_mode(mode, now, "rpc").applied:
                miner.extra[_RESUME_MODE] = str(mode)
            return ok
        if command == "power_off":
            if miner.mode is not Mode.SLEEP:
                previous = miner.mode
                if miner.set_mode(Mode.SLEEP, now, "rpc").applied:
                    miner.extra[_RESUME_MODE] = str(previous)
                    miner.extra[_MINEROFF_AT] = now
            return ok
        if command == "power_on":
            if miner.mode is Mode.SLEEP:
                resume = Mode(str(miner.extra.get(_RESUME_MODE, Mode.NORMAL)))
                if miner.set_mode(resume, now, "rpc").applied:
                    miner.extra.pop(_MINEROFF_AT, None)
            return ok
        if command == "adjust_power_limit":
            try:
                watts = int(str(request.get("power_limit", "")).strip())
            except ValueError:
                return self.flat_error(14, "invalid API command or data", now)
            if watts <= 0:
                return self.flat_error(14, "invalid API command or data", now)
            miner.set_power_limit(watts, now, "rpc")
            miner.reboot(now, "rpc")  # WM-DOC 2.0.5: the miner reboots to apply the limit
            return ok
        if command == "restart_btminer":
            _restart_mining(miner, now)
            return ok
        if command == "reboot":
            miner.reboot(now, "rpc")
            return ok
        if command == "set_led":
            miner.blinking = request.get("param") != "auto"
            miner.log(now, "rpc", "led", write=True, detail="manual" if miner.blinking else "auto")
            return ok
        # Accepted and acknowledged, but nothing the simulated state models.
        miner.log(now, "rpc", command, write=True, detail="acknowledged, not modelled")
        return ok


# --- crypto (the client side of this is pyasic rpc/btminer.py) ----------------------------------


@lru_cache(maxsize=4096)
def md5_crypt_body(word: str, salt: str) -> str:
    """The hash field of ``openssl passwd -1 -salt SALT WORD`` (``$1$salt$<this>``)."""
    full: str = md5_crypt.using(salt=salt).hash(word)
    return full.split("$")[3]


def host_passwd_md5(password: str, salt: str) -> str:
    """``key`` of the v2 scheme; the AES key is sha256 of it."""
    return md5_crypt_body(password, salt)


def _aes(key: str) -> Cipher[modes.ECB]:
    return Cipher(algorithms.AES(hashlib.sha256(key.encode()).digest()), modes.ECB())


def _encrypt(key: str, reply: dict[str, Any]) -> str:
    text = json.dumps(reply, separators=(",", ":")).encode()
    text += b"\0" * (-len(text) % 16)
    encryptor = _aes(key).encryptor()
    return base64.b64encode(encryptor.update(text) + encryptor.finalize()).decode()


def _decrypt(key: str, raw: bytes) -> dict[str, Any] | None:
    """The decrypted request, or None when it is not JSON (wrong key, garbage)."""
    if not raw or len(raw) % 16:
        return None
    decryptor = _aes(key).decryptor()
    plain = (decryptor.update(raw) + decryptor.finalize()).rstrip(b"\0")
    try:
        request = json.loads(plain.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return request if isinstance(request, dict) else None


def _salt(miner: MinerState) -> str:
    """Salt of the stored admin password hash: fixed per miner and password."""
    rng = random.Random(f"{miner.seed}:salt:{miner.credentials.api_password}")
    return "".join(rng.choice(SALT_ALPHABET) for _ in range(8))


# --- rendering helpers ---------------------------------------------------------------------------


def _spec(personality: Personality, miner: MinerState) -> ModelSpec:
    try:
        return personality.model_named(miner.model)
    except KeyError:
        return MODELS[0]


def _power_mode(miner: MinerState) -> Mode:
    """The configured power mode (kept while the hashboards are powered off)."""
    if miner.mode is not Mode.SLEEP:
        return miner.mode
    return Mode(str(miner.extra.get(_RESUME_MODE, Mode.NORMAL)))


def _power_limit(miner: MinerState, model: ModelSpec) -> int:
    if miner.power_limit_w is not None:
        return miner.power_limit_w
    return int(model.option("limit", 3600))


def _btminer_elapsed(miner: MinerState, now: float) -> int:
    """Seconds since the mining process last started (summary ``Elapsed``)."""
    started = max(miner.booted_at, miner.mining_resumes_at - miner.restart_seconds)
    return max(0, int(now - started))


def _restart_mining(miner: MinerState, now: float) -> None:
    """``restart_btminer``: the mining process goes away and comes back."""
    if miner.mode is not Mode.SLEEP:
        miner.mining_resumes_at = max(miner.mining_resumes_at, now + miner.restart_seconds)
    miner.log(now, "rpc", "restart_btminer", write=True)


def _stratum_host(url: str) -> str:
    host = url.split("://", 1)[-1]
    return host.rsplit(":", 1)[0]


def _block_height(now: float) -> int:
    # ~ one block per 600 s since block 840000 (2024-04-20 00:09 UTC).
    return 840_000 + int((now - 1_713_571_767) // 600)


def _timestamp(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch))


PERSONALITY = WhatsminerPersonality()
