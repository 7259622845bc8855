"""VNish (AnthillOS) on Antminer: a REST API on port 80 and a cgminer 4.11.1 RPC on 4028.

Wire shapes follow public captures of real VNish: the xminer-api OpenAPI schema (VNish 1.2.x),
a curl transcript of an S19 on 1.2.6, a full ``/api/v1/summary`` from an S19j Pro on 1.2.0-rc3,
and ``stats``/``summary``/``pools`` RPC replies from an S19 XP on 1.2.0-rc1. What they show, and
what this module therefore does:

- ``GET /`` is the AnthillOS single-page app; ``/api/v1/unlock {"pw"}`` returns a 32-character
  session token that later requests send as ``Authorization: <token>`` (pyasic) or
  ``Authorization: Bearer <token>``. Tokens are bound to the password they were issued under,
  so a password change (or the ``password_changed`` fault) invalidates every session.
- ``/info``, ``/model``, ``/status``, ``/perf-summary``, ``/chains/factory-info`` and
  ``/find-miner`` need no token; ``/summary``, ``/settings``, ``/autotune/presets``,
  ``/mining/*`` and ``/system/*`` do (401 with an empty body otherwise).
- Since 1.2.x ``/summary`` has only a ``miner`` object (the network block moved to ``/info``).
  Pool URLs are shown without a scheme (``btc.example:3333``); the dev-fee slot appears as an
  extra pool ``{"url": "DevFee", "pool_type": "DevFee"}`` next to the ``UserPool`` entries.
- ``/settings`` stores pools as ``host:port``. A URL posted with ``stratum+tcp://`` is stripped
  to that form, other schemes are kept verbatim. pyasic writes the URL as given
  (``Pool.as_vnish``) and prefixes ``stratum+tcp://`` on every read (``Pool.from_vnish``), so
  ``stratum+tcp`` pools round-trip cleanly while e.g. ``stratum+ssl://…`` comes back from
  ``get_config`` as ``stratum+tcp://stratum+ssl://…``. The true state keeps the canonical
  ``stratum+tcp://host:port`` that the RPC ``pools`` command also reports.
- ``/mining/{stop,start,pause,resume,restart}`` answer 200 with an **empty body** (OpenAPI:
  "null (empty response body)"); pyasic's ``VNishWebAPI.send_command`` calls ``response.json()``
  on it and raises ``APIError`` although the command took effect.
- The RPC speaks cgminer 4.11.1 (``Description "cgminer 4.11.1"``): ``stats`` carries
  ``Type "Antminer S19j Pro (Vnish 1.2.6)"`` (pyasic's model probe) and legacy ``STATS[1]``
  board keys; ``pools`` lists the user pools with a scheme plus one ``DevFee`` row (``Type 1``).
  ``version`` and ``devdetails`` deliberately carry no "Antminer": pyasic's socket probe checks
  ANTMINER before VNISH, and a real ``version`` with ``Type "Antminer …"`` would let the socket
  race misidentify the miner as stock. ``version`` names the miner program ``"Vnish"`` instead,
  in the cgminer-fork convention (``"BMMiner": …``, ``"LUXminer": …``) — inferred, not captured.
"""

from __future__ import annotations

import json
import random
import secrets
import string
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, ClassVar

from aiohttp import web

from simulator.personalities.base import (
    MinerIdentity,
    ModelSpec,
    Personality,
    RpcReply,
    miner_of,
    random_alnum,
    random_mac,
)
from simulator.state import (
    MODE_FACTORS,
    Credentials,
    MinerState,
    Mode,
    Pool,
    Telemetry,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CGMINER_VERSION = "4.11.1"
RPC_API_VERSION = "3.7"
HARDWARE_VERSION = "uart_trans.1.3"
DEFAULT_SCHEME = "stratum+tcp://"
TOKENS_KEY = "vnish_tokens"
SETTINGS_KEY = "vnish_settings"
DEVFEE_KEY = "vnish_devfee"
STOPPED_AT_KEY = "vnish_stopped_at"
MAX_SESSIONS = 32
DEVFEE_PERIOD_S = 3600.0  # the fee is mined as a time slice of every hour
DEVFEE_SLOTS = 3  # RPC Msg counts hidden dev-fee slots ("6 Pool(s)" over 4 rows on 1.2.0)
USER_POOL_DIFF = 131072.0
DEVFEE_DIFF = 2048.0
PRESET_FACTORS = (0.7, 0.8, 0.9, 1.0, 1.1, 1.2)
PRIVILEGED_RPC = frozenset(
    {
        "addpool",
        "removepool",
        "switchpool",
        "enablepool",
        "disablepool",
        "poolpriority",
        "restart",
        "quit",
        "save",
        "ascset",
        "pgaset",
    }
)

# Firmware version -> (build time, build uuid) as /info reports them.
FW_BUILDS: dict[str, tuple[str, str]] = {
    "1.2.6": ("2025-05-29 19:22:26+00:00", "3f0c9a41-7d2e-4b8a-9e61-2c5d8f7a1b04"),
    "1.2.7": ("2025-08-21 11:04:52+00:00", "a81e4d27-5c3b-4f90-b7d2-6e9f0c1a3d58"),
}

INDEX_HTML = """<!doctype html>
<html lang="en">
  <head>
    <meta charset="UTF-8" />
    <link rel="icon" href="/favicon.ico" />
    <meta name="viewport" content="width=device-width, initial-scale=1.0" />
    <title>AnthillOS</title>
    <script type="module" crossorigin src="/assets/index-7c1e9a3f.js"></script>
    <link rel="stylesheet" href="/assets/index-2b84d0e6.css">
  </head>
  <body>
    <noscript>AnthillOS needs JavaScript to run.</noscript>
    <div id="app"></div>
  </body>
</html>
"""


def _spec(name: str, ths: float, watts: float, chips: int, fw: str, **extra: Any) -> ModelSpec:
    return ModelSpec(name, ths, watts, 3, chips, 4, fw, extra=tuple(extra.items()))


MODELS: tuple[ModelSpec, ...] = (
    _spec(
        "Antminer S19j Pro",
        104.0,
        3068.0,
        126,
        "1.2.6",
        code="s19jpro",
        series="x19",
        platform="xil",
        stats_id="BTM_S19JPRO",
        freq=525,
        volt=13600,
        board_model="BHB42601",
        psu_model="APW12_1215a",
        serial_prefixes=("JYZZ", "HKYT"),
        board_prefix="YNBH",
    ),
    _spec(
        "Antminer S19 XP",
        140.0,
        3010.0,
        110,
        "1.2.6",
        code="s19xp",
        series="x19",
        platform="aml",
        stats_id="BTM_S19XP",
        freq=495,
        volt=12625,
        board_model="BHB76601",
        psu_model="APW12_1215c",
        serial_prefixes=("ZLBQ", "YNAH"),
        board_prefix="ZKBK",
    ),
    _spec(
        "Antminer S21",
        200.0,
        3500.0,
        108,
        "1.2.7",
        code="s21",
        series="x21",
        platform="cv",
        stats_id="BTM_S21",
        freq=490,
        volt=13000,
        board_model="BHB68601",
        psu_model="APW17_1215a",
        serial_prefixes=("SMTT", "THQI"),
        board_prefix="FYDJ",
    ),
)


class VNishPersonality(Personality):
    """AnthillOS/VNish 1.2.x on Antminer control boards."""

    name: ClassVar[str] = "vnish"
    make: ClassVar[str] = "AntMiner"
    firmware: ClassVar[str] = "vnish"
    models: ClassVar[tuple[ModelSpec, ...]] = MODELS
    rpc_ports: ClassVar[tuple[int, ...]] = (4028,)
    web_ports: ClassVar[tuple[int, ...]] = (80,)
    rpc_nul_terminated: ClassVar[bool] = True
    default_credentials: ClassVar[Credentials] = Credentials(
        web_user="admin", web_password="admin", api_password="admin"
    )

    # --- identity ---------------------------------------------------------------------------

    def new_identity(self, rng: random.Random, model: ModelSpec) -> MinerIdentity:
        """Bitmain-style 17-character chassis/board serials, a Bitmain OUI MAC."""
        prefixes: tuple[str, ...] = model.option("serial_prefixes")
        return MinerIdentity(
            serial=_bitmain_serial(rng, rng.choice(prefixes)),
            mac=random_mac(rng, "B4:10:7B"),
            hostname="Antminer",
            control_board_serial=random_alnum(rng, 16, "0123456789abcdef"),
            psu_serial=random_alnum(rng, 14),
            board_serials=tuple(
                _bitmain_serial(rng, model.option("board_prefix")) for _ in range(model.boards)
            ),
        )

    def new_miner(
        self,
        rng: random.Random,
        ip: str,
        model: ModelSpec,
        pools: list[Pool],
        now: float,
    ) -> MinerState:
        """A VNish miner also carries its dev-fee slot, which is not one of the user's pools."""
        miner = super().new_miner(rng, ip, model, pools, now)
        miner.extra[DEVFEE_KEY] = {
            "percent": round(rng.uniform(1.8, 2.9), 3),
            "url": "DevFee",
            "user": "DevFee",
            "pool_type": "DevFee",
        }
        return miner

    # --- RPC (cgminer 4.11.1) ---------------------------------------------------------------

    def description(self, miner: MinerState) -> str:
        return f"cgminer {CGMINER_VERSION}"

    def error_reply(self, code: int, msg: str, now: float) -> dict[str, Any]:
        reply = super().error_reply(code, msg, now)
        reply["STATUS"][0]["Description"] = f"cgminer {CGMINER_VERSION}"
        return reply

    def dispatch_command(
        self,
        miner: MinerState,
        command: str,
        parameter: Any,
        payload: dict[str, Any],
        now: float,
    ) -> RpcReply:
        """Write commands exist in cgminer but the API group denies them from the network."""
        if command in PRIVILEGED_RPC:
            miner.log(now, "rpc", command, detail="access denied")
            return self.error_reply(45, f"Access denied to '{command}' command", now)
        return super().dispatch_command(miner, command, parameter, payload, now)

    def rpc_version(
        self, miner: MinerState, parameter: Any, payload: dict[str, Any], now: float
    ) -> RpcReply:
        row = {
            "CGMiner": CGMINER_VERSION,
            "Vnish": miner.firmware_version,
            "API": RPC_API_VERSION,
            "Miner": HARDWARE_VERSION,
            "CompileTime": _compile_time(miner.firmware_version),
        }
        return self.ok_reply(miner, 22, "CGMiner versions", "VERSION", [row], now)

    def rpc_devdetails(
        self, miner: MinerState, parameter: Any, payload: dict[str, Any], now: float
    ) -> RpcReply:
        rows = [
            {
                "DEVDETAILS": b.index,
                "Name": "BTM_SOC",
                "ID": b.index,
                "Driver": "bitmain_soc",
                "Kernel": "",
                "Model": "",
                "Device Path": "",
            }
            for b in miner.hashboards
        ]
        return self.ok_reply(miner, 69, "Device Details", "DEVDETAILS", rows, now)

    def rpc_summary(
        self, miner: MinerState, parameter: Any, payload: dict[str, Any], now: float
    ) -> RpcReply:
        tel = miner.telemetry(now)
        elapsed = _process_elapsed(miner, now)
        accepted = _shares(miner, now, USER_POOL_DIFF)
        ghs = tel.hashrate_ths * 1000
        avg = _ideal_ghs(miner) if tel.hashing else 0.0
        row = {
            "Elapsed": elapsed,
            "GHS 5s": f"{ghs:.2f}",
            "GHS av": round(avg, 2),
            "Found Blocks": 0,
            "Getworks": elapsed // 23,
            "Accepted": accepted,
            "Rejected": accepted // 2400,
            "Hardware Errors": accepted // 30,
            "Utility": round(accepted / max(elapsed, 1) * 60, 2),
            "Discarded": elapsed // 2,
            "Stale": accepted // 1300,
            "Get Failures": 0,
            "Local Work": elapsed * 260,
            "Remote Failures": 0,
            "Network Blocks": elapsed // 600,
            "Total MH": round(avg * 1000 * elapsed, 4),
            "Work Utility": round(avg * 1000 * 60 / 4295, 2),
            "Difficulty Accepted": accepted * USER_POOL_DIFF,
            "Difficulty Rejected": (accepted // 2400) * USER_POOL_DIFF,
            "Difficulty Stale": (accepted // 1300) * USER_POOL_DIFF,
            "Best Share": _best_share(miner),
            "Device Hardware%": 0.0 if not accepted else 0.0312,
            "Device Rejected%": 0.0 if not accepted else 0.0417,
            "Pool Rejected%": 0.0 if not accepted else 0.0416,
            "Pool Stale%": 0.0 if not accepted else 0.0769,
            "Last getwork": int(now),
            "Fee Percent": _devfee(miner)["percent"],
        }
        return self.ok_reply(miner, 11, "Summary", "SUMMARY", [row], now)

    def rpc_pools(
        self, miner: MinerState, parameter: Any, payload: dict[str, Any], now: float
    ) -> RpcReply:
        hashing = miner.is_hashing(now)
        fee_window = hashing and _in_devfee_window(miner, now)
        active = miner.active_pool_index()
        accepted = _shares(miner, now, USER_POOL_DIFF)
        rows: list[dict[str, Any]] = []
        for index, pool in enumerate(miner.runtime_pools()):
            is_active = hashing and not fee_window and index == active
            rows.append(
                _rpc_pool_row(
                    index,
                    _canonical_url(pool.url),
                    pool.user,
                    0,
                    is_active,
                    accepted if index == active else 0,
                    USER_POOL_DIFF,
                    now,
                )
            )
        fee = _devfee(miner)
        fee_shares = int(accepted * fee["percent"] / 100 * USER_POOL_DIFF / DEVFEE_DIFF)
        rows.append(
            _rpc_pool_row(
                len(rows), fee["url"], fee["user"], 1, fee_window, fee_shares, DEVFEE_DIFF, now
            )
        )
        msg = f"{len(rows) - 1 + DEVFEE_SLOTS} Pool(s)"
        return self.ok_reply(miner, 7, msg, "POOLS", rows, now)

    def rpc_stats(
        self, miner: MinerState, parameter: Any, payload: dict[str, Any], now: float
    ) -> RpcReply:
        model = self.model_named(miner.model)
        tel = miner.telemetry(now)
        dead = miner.dead_boards()
        head = {
            "Cgminer": CGMINER_VERSION,
            "Miner": HARDWARE_VERSION,
            "CompileTime": _compile_time(miner.firmware_version),
            "Type": _miner_type(miner),
        }
        ideal = _ideal_ghs(miner)
        freq = int(model.option("freq"))
        stats: dict[str, Any] = {
            "STATS": 0,
            "ID": model.option("stats_id"),
            "Elapsed": _process_elapsed(miner, now),
            "Calls": 0,
            "Wait": 0.0,
            "Max": 0.0,
            "Min": 99999999.0,
            "GHS 5s": f"{tel.hashrate_ths * 1000:.2f}",
            "GHS av": round(ideal if tel.hashing else 0.0, 2),
            "miner_count": len(miner.hashboards),
            "total_acn": sum(0 if b.index in dead else b.chips for b in miner.hashboards),
            "frequency": freq,
            "total_freqavg": float(freq) if tel.hashing else 0.0,
            "total_rateideal": round(ideal, 2),
            "total_rate": round(tel.hashrate_ths * 1000, 2),
            "state": _miner_state(miner, now),
            "fan_num": len(tel.fan_rpms),
            "fan_mode": 0,
            "fan_pwm": _fan_duty(tel),
        }
        for i, rpm in enumerate(tel.fan_rpms, start=1):
            stats[f"fan{i}"] = rpm
        stats["temp_num"] = len(miner.hashboards)
        for b in miner.hashboards:
            stats[f"temp{b.index + 1}"] = int(tel.board_temps[b.index])
        for b in miner.hashboards:
            stats[f"temp2_{b.index + 1}"] = int(tel.chip_temps[b.index])
        for b in miner.hashboards:
            stats[f"temp3_{b.index + 1}"] = int(tel.chip_temps[b.index])
        per_board_ideal = ideal / max(len(miner.hashboards), 1)
        for b in miner.hashboards:
            n = b.index + 1
            alive = b.index not in dead
            pcb = int(tel.board_temps[b.index])
            chip = int(tel.chip_temps[b.index])
            stats[f"temp_sens{n}"] = "m-m"
            stats[f"temp_pcb{n}"] = f"{max(pcb - 13, 0)}-{pcb}"
            stats[f"temp_chip{n}"] = f"{max(chip - 13, 0)}-{chip}"
            stats[f"chain_state{n}"] = _chain_state(miner, now, b.index)
            stats[f"chain_acn{n}"] = b.chips if alive else 0
            stats[f"chain_vol{n}"] = int(model.option("volt")) if alive else 0
            stats[f"freq_avg{n}"] = float(freq) if alive and tel.hashing else 0.0
            stats[f"chain_rateideal{n}"] = round(per_board_ideal, 2) if alive else 0.0
            stats[f"chain_rate{n}"] = round(tel.board_ths[b.index] * 1000, 2)
            stats[f"chain_hw{n}"] = 0
            stats[f"chain_acs{n}"] = _acs_string(b.chips) if alive else ""
            stats[f"chain_consumption{n}"] = 0
        stats["miner_version"] = HARDWARE_VERSION
        stats["build_version"] = miner.firmware_version
        return self.ok_reply(miner, 70, "CGMiner stats", "STATS", [head, stats], now)

    def rpc_devs(
        self, miner: MinerState, parameter: Any, payload: dict[str, Any], now: float
    ) -> RpcReply:
        tel = miner.telemetry(now)
        dead = miner.dead_boards()
        rows = [
            {
                "ASC": b.index,
                "Name": "BTM_SOC",
                "ID": b.index,
                "Enabled": "Y",
                "Status": "Dead" if b.index in dead else "Alive",
                "Temperature": tel.chip_temps[b.index],
                "MHS av": round(tel.board_ths[b.index] * 1e6, 2),
                "MHS 5s": round(tel.board_ths[b.index] * 1e6, 2),
                "Accepted": 0,
                "Rejected": 0,
                "Hardware Errors": 0,
                "Device Elapsed": _process_elapsed(miner, now),
            }
            for b in miner.hashboards
        ]
        return self.ok_reply(miner, 9, f"{len(rows)} ASC(s)", "DEVS", rows, now)

    # --- web (port 80) ------------------------------------------------------------------------

    def web_routes(self) -> list[web.RouteDef]:
        api = "/api/v1"
        return [
            web.get("/", self._index),
            web.post(f"{api}/unlock", self._unlock),
            web.get(f"{api}/auth-check", self._authed(self._auth_check)),
            web.get(f"{api}/info", self._info),
            web.get(f"{api}/model", self._model),
            web.get(f"{api}/status", self._status),
            web.get(f"{api}/summary", self._authed(self._summary)),
            web.get(f"{api}/perf-summary", self._perf_summary),
            web.get(f"{api}/autotune/presets", self._authed(self._presets)),
            web.get(f"{api}/chains/factory-info", self._factory_info),
            web.get(f"{api}/settings", self._authed(self._get_settings)),
            web.post(f"{api}/settings", self._authed(self._post_settings)),
            web.post(f"{api}/mining/{{action}}", self._authed(self._mining)),
            web.post(f"{api}/system/reboot", self._authed(self._reboot)),
            web.post(f"{api}/find-miner", self._find_miner),
        ]

    def _authed(self, handler: Handler) -> Handler:
        """Require a live session token; the firmware answers 401 with no body otherwise."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            if not _authorized(request, miner_of(request)):
                return web.Response(status=401)
            return await handler(request)

        return guarded

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text=INDEX_HTML, content_type="text/html")

    async def _unlock(self, request: web.Request) -> web.StreamResponse:
        miner = miner_of(request)
        body = await _json_body(request)
        password = body.get("pw") if isinstance(body, dict) else None
        if not isinstance(password, str):
            return web.json_response({"err": "Failed to parse request body"}, status=400)
        if password != miner.credentials.api_password:
            miner.log(self.clock(), "http", "unlock", detail="wrong password")
            return web.json_response({"unlock_timeout": 0}, status=403)
        token = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(32))
        tokens: dict[str, str] = miner.extra.setdefault(TOKENS_KEY, {})
        tokens[token] = password
        while len(tokens) > MAX_SESSIONS:
            tokens.pop(next(iter(tokens)))
        return web.json_response({"token": token})

    async def _auth_check(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=200)

    async def _info(self, request: web.Request) -> web.StreamResponse:
        miner = miner_of(request)
        model = self.model_named(miner.model)
        build_time, build_uuid = FW_BUILDS.get(miner.firmware_version, FW_BUILDS["1.2.6"])
        now = self.clock()
        return web.json_response(
            {
                "miner": miner.model,
                "model": model.option("code"),
                "fw_name": "Vnish",
                "fw_version": miner.firmware_version,
                "build_uuid": build_uuid,
                "build_name": "vnishnet",
                "platform": model.option("platform"),
                "install_type": "nand",
                "build_time": build_time,
                "algorithm": "sha256d",
                "hr_measure": "GH/s",
                "system": {
                    "os": "GNU/Linux",
                    "miner_name": model.option("code"),
                    "file_system_version": "",
                    "mem_total": 233712,
                    "mem_free": 171280,
                    "mem_free_percent": 73,
                    "mem_buf": 31928,
                    "mem_buf_percent": 13,
                    "network_status": _network_status(miner),
                    "uptime": _uptime_text(miner.uptime(now)),
                },
                "serial": miner.reported_serial() or "N/A",
            }
        )

    async def _model(self, request: web.Request) -> web.StreamResponse:
        miner = miner_of(request)
        model = self.model_named(miner.model)
        return web.json_response(
            {
                "full_name": miner.model,
                "model": model.option("code"),
                "algorithm": "sha256d",
                "series": model.option("series"),
                "platform": model.option("platform"),
                "install_type": "nand",
                "hr_measure": "GH/s",
                "serial": miner.reported_serial() or "N/A",
                "chain": {
                    "chips_per_chain": model.chips_per_board,
                    "chips_per_domain": 2,
                    "num_chains": model.boards,
                },
                "cooling": {
                    "min_fan_pwm": 10,
                    "min_target_temp": 20,
                    "max_target_temp": 90,
                    "fan_min_count": {"min": 1, "max": model.fans, "default": model.fans},
                },
                "overclock": {
                    "default_freq": model.option("freq"),
                    "default_voltage": model.option("volt") // 10,
                },
            }
        )

    async def _status(self, request: web.Request) -> web.StreamResponse:
        miner = miner_of(request)
        now = self.clock()
        reply: dict[str, Any] = {
            "miner_state": _miner_state(miner, now),
            "miner_state_time": _miner_state_time(miner, now),
            "find_miner": miner.blinking,
            "restart_required": False,
            "reboot_required": False,
            "unlocked": _authorized(request, miner),
        }
        if reply["miner_state"] == "failure":
            reply["description"] = "All chains failed"
            reply["failure_code"] = 1100
        return web.json_response(reply)

    async def _summary(self, request: web.Request) -> web.StreamResponse:
        miner = miner_of(request)
        return web.json_response({"miner": self._summary_miner(miner, self.clock())})

    def _summary_miner(self, miner: MinerState, now: float) -> dict[str, Any]:
        """The ``miner`` object of /summary: status, rates (TH and GH), power, pools, chains."""
        model = self.model_named(miner.model)
        tel = miner.telemetry(now)
        ghs = tel.hashrate_ths * 1000
        ideal = _ideal_ghs(miner)
        fee = _devfee(miner)
        state = _miner_state(miner, now)
        settings = _settings(miner, model)
        status: dict[str, Any] = {
            "miner_state": state,
            "miner_state_time": _miner_state_time(miner, now),
        }
        if state == "failure":
            status["description"] = "All chains failed"
            status["failure_code"] = 1100
        live = [
            t
            for b, t in zip(miner.hashboards, tel.board_temps, strict=True)
            if b.index not in miner.dead_boards()
        ] or list(tel.board_temps)
        live_chips = [
            t
            for b, t in zip(miner.hashboards, tel.chip_temps, strict=True)
            if b.index not in miner.dead_boards()
        ] or list(tel.chip_temps)
        return {
            "miner_status": status,
            "miner_type": _miner_type(miner),
            "hr_stock": round(miner.nominal_ths * 1000, 2),
            "average_hashrate": round(ideal / 1000 if tel.hashing else 0.0, 2),
            "instant_hashrate": round(tel.hashrate_ths, 2),
            "hr_realtime": round(ghs, 2),
            "hr_nominal": round(ideal, 2),
            "hr_average": round(ideal if tel.hashing else 0.0, 2),
            "pcb_temp": {"min": int(min(live)) - 13, "max": int(max(live))},
            "chip_temp": {"min": int(min(live_chips)) - 13, "max": int(max(live_chips))},
            "power_consumption": round(tel.power_w),
            "power_usage": round(tel.power_w),
            "power_efficiency": round(tel.power_w / tel.hashrate_ths, 2) if tel.hashing else 0.0,
            "hw_errors_percent": 0.0,
            "hr_error": 0.0,
            "hw_errors": 0,
            "devfee_percent": fee["percent"],
            "devfee": round(ghs * fee["percent"] / 100, 2),
            "pools": self._summary_pools(miner, now),
            "cooling": {
                "fan_num": len(tel.fan_rpms),
                "fans": [
                    {"id": i, "rpm": rpm, "status": "ok", "max_rpm": 6000}
                    for i, rpm in enumerate(tel.fan_rpms)
                ],
                "settings": {"mode": {"name": settings["cooling"]["mode"]["name"]}},
                "fan_duty": _fan_duty(tel),
            },
            "chains": [
                self._summary_chain(miner, model, tel, now, b.index) for b in miner.hashboards
            ],
            "found_blocks": 0,
            "best_share": _best_share(miner),
        }

    def _summary_chain(
        self, miner: MinerState, model: ModelSpec, tel: Telemetry, now: float, index: int
    ) -> dict[str, Any]:
        board = miner.hashboards[index]
        alive = index not in miner.dead_boards()
        per_board_ideal = _ideal_ghs(miner) / max(len(miner.hashboards), 1)
        rate = tel.board_ths[index] * 1000
        pcb = int(tel.board_temps[index])
        chip = int(tel.chip_temps[index])
        status: dict[str, Any] = {"state": _chain_state(miner, now, index)}
        if not alive:
            status["description"] = f"Chain {index + 1} failed: no chips found"
        return {
            "id": index + 1,
            "frequency": float(model.option("freq")) if alive and tel.hashing else 0.0,
            "voltage": int(model.option("volt")) if alive else 0,
            "power_consumption": int(tel.power_w / max(len(miner.hashboards), 1)) if alive else 0,
            "hashrate_ideal": round(per_board_ideal, 2) if alive else 0.0,
            "hashrate_rt": round(rate, 2),
            "hashrate_percentage": round(100 * rate / per_board_ideal, 2) if per_board_ideal else 0,
            "hr_error": 0.0,
            "hw_errors": 0,
            "pcb_temp": {"min": max(pcb - 13, 0), "max": pcb},
            "chip_temp": {"min": max(chip - 13, 0), "max": chip},
            "chip_statuses": {
                "red": 0 if alive else board.chips,
                "orange": 0,
                "grey": board.chips if alive else 0,
            },
            "status": status,
        }

    def _summary_pools(self, miner: MinerState, now: float) -> list[dict[str, Any]]:
        """User pools (as the mining process runs them) plus the dev-fee slot."""
        hashing = miner.is_hashing(now)
        fee_window = hashing and _in_devfee_window(miner, now)
        active = miner.active_pool_index()
        accepted = _shares(miner, now, USER_POOL_DIFF)

        def status(is_active: bool) -> str:
            if miner.mode is Mode.SLEEP:
                return "offline"
            if not hashing:
                return "unknown"
            return "active" if is_active else "working"

        pools = []
        for index, pool in enumerate(miner.runtime_pools()):
            is_active = not fee_window and index == active
            pools.append(
                _web_pool_row(
                    index,
                    _display_url(pool.url),
                    pool.user,
                    "UserPool",
                    status(is_active),
                    accepted if index == active else 0,
                    USER_POOL_DIFF,
                    hashing and is_active,
                )
            )
        fee = _devfee(miner)
        fee_shares = int(accepted * fee["percent"] / 100 * USER_POOL_DIFF / DEVFEE_DIFF)
        pools.append(
            _web_pool_row(
                len(pools),
                fee["url"],
                fee["user"],
                fee["pool_type"],
                status(fee_window),
                fee_shares,
                DEVFEE_DIFF,
                fee_window,
            )
        )
        return pools

    async def _perf_summary(self, request: web.Request) -> web.StreamResponse:
        miner = miner_of(request)
        model = self.model_named(miner.model)
        current = _current_preset(miner)
        presets = {p["name"]: p for p in _presets(miner, model)}
        preset = dict(presets.get(current, _disabled_preset(model)))
        preset["globals"] = {"volt": model.option("volt") // 10, "freq": model.option("freq")}
        return web.json_response(
            {
                "current_preset": preset,
                "preset_switcher": {
                    "enabled": False,
                    "top_preset": None,
                    "decrease_temp": 75,
                    "rise_temp": 55,
                    "check_time": 300,
                    "autochange_top_preset": False,
                    "ignore_fan_speed": False,
                    "min_preset": None,
                    "power_delta": 0,
                },
            }
        )

    async def _presets(self, request: web.Request) -> web.StreamResponse:
        miner = miner_of(request)
        return web.json_response(_presets(miner, self.model_named(miner.model)))

    async def _factory_info(self, request: web.Request) -> web.StreamResponse:
        """Factory data from the board EEPROMs: this is where the hashboard serials live."""
        miner = miner_of(request)
        model = self.model_named(miner.model)
        per_board = miner.nominal_ths * 1000 / max(len(miner.hashboards), 1)
        return web.json_response(
            {
                "hr_stock": round(miner.nominal_ths * 1000, 2),
                "has_pics": False,
                "psu_model": model.option("psu_model"),
                "psu_serial": miner.psu_serial,
                "chains": [
                    {
                        "id": b.index + 1,
                        "serial": b.serial,
                        "board_model": model.option("board_model"),
                        "chip_bin": 1,
                        "freq": model.option("freq"),
                        "volt": model.option("volt") // 10,
                        "hashrate": round(per_board, 2),
                    }
                    for b in miner.hashboards
                ],
            }
        )

    async def _get_settings(self, request: web.Request) -> web.StreamResponse:
        miner = miner_of(request)
        model = self.model_named(miner.model)
        settings = _settings(miner, model)
        pools = [
            {"url": _display_url(p.url), "user": p.user, "pass": p.password}
            for p in miner.configured_pools()
        ]
        pools += [{"url": "", "user": "", "pass": ""}] * max(0, 3 - len(pools))
        overclock = dict(settings["overclock"])
        overclock["preset"] = _current_preset(miner)
        return web.json_response(
            {
                "miner": {
                    "cooling": settings["cooling"],
                    "misc": settings["misc"],
                    "overclock": overclock,
                    "pools": pools,
                },
                "network": {
                    "hostname": miner.hostname,
                    "dhcp": True,
                    "ipaddress": miner.ip,
                    "netmask": "255.255.255.0",
                    "gateway": _gateway(miner.ip),
                    "dnsservers": [_gateway(miner.ip)],
                },
                "regional": {"timezone": {"current": "GMT+5"}},
                "ui": {"theme": "dark", "locale": "en"},
            }
        )

    async def _post_settings(self, request: web.Request) -> web.StreamResponse:
        """Save settings; pools are applied by restarting the mining process."""
        miner = miner_of(request)
        model = self.model_named(miner.model)
        now = self.clock()
        body = await _json_body(request)
        if not isinstance(body, dict):
            return web.json_response({"err": "Failed to parse request body"}, status=400)
        restart = False
        password = body.get("password")
        if isinstance(password, dict):
            if password.get("current") != miner.credentials.api_password or not isinstance(
                password.get("pw"), str
            ):
                return web.json_response({"err": "Wrong current password"}, status=403)
            miner.credentials.api_password = password["pw"]
            miner.log(now, "http", "password", write=True, detail="web password changed")
        section = body.get("miner")
        if isinstance(section, dict):
            pools = section.get("pools")
            if pools is not None:
                parsed = _parse_pools(pools)
                if parsed is None:
                    return web.json_response({"err": "Invalid pools"}, status=400)
                current = [(p.url, p.user, p.password) for p in miner.configured_pools()]
                if [(p.url, p.user, p.password) for p in parsed] != current:
                    miner.write_pools(parsed, now, "http")
                    restart = True
            settings = _settings(miner, model)
            for key in ("cooling", "misc"):
                if isinstance(section.get(key), dict):
                    _merge(settings[key], section[key])
            overclock = section.get("overclock")
            if isinstance(overclock, dict) and "preset" in overclock:
                preset = str(overclock["preset"])
                if preset != "disabled" and not preset.isdigit():
                    return web.json_response({"err": "Unknown preset"}, status=400)
                limit = None if preset == "disabled" else int(preset)
                if limit != miner.power_limit_w:
                    miner.set_power_limit(limit, now, "http")
                    restart = True
        return web.json_response({"reboot_required": False, "restart_required": restart})

    async def _mining(self, request: web.Request) -> web.StreamResponse:
        """stop/pause put the miner to sleep, start/resume wake it, restart restarts cgminer."""
        miner = miner_of(request)
        now = self.clock()
        action = request.match_info["action"]
        if action in ("stop", "pause"):
            if miner.mode is not Mode.SLEEP and miner.set_mode(Mode.SLEEP, now, "http").applied:
                miner.extra[STOPPED_AT_KEY] = now
        elif action in ("start", "resume"):
            if miner.mode is Mode.SLEEP:
                miner.set_mode(Mode.NORMAL, now, "http")
        elif action == "restart":
            if miner.mode is not Mode.SLEEP:
                miner.mining_resumes_at = now + miner.restart_seconds
                miner.log(now, "http", "restart", write=True, detail="mining restarted")
        else:
            return web.json_response({"err": "Not found"}, status=404)
        return web.Response(status=200)

    async def _reboot(self, request: web.Request) -> web.StreamResponse:
        miner = miner_of(request)
        miner.reboot(self.clock(), "http")
        return web.json_response({"after": 3})

    async def _find_miner(self, request: web.Request) -> web.StreamResponse:
        miner = miner_of(request)
        miner.blinking = not miner.blinking
        miner.log(self.clock(), "http", "find-miner", detail=f"on={miner.blinking}")
        return web.json_response({"on": miner.blinking})


# --- rendering helpers -------------------------------------------------------------------------


def _bitmain_serial(rng: random.Random, prefix: str) -> str:
    """17 characters like ``JYZZYRRBDJHJE023P``: line code, lot, year/month letters, number."""
    letters = string.ascii_uppercase
    return (
        prefix[:4]
        + random_alnum(rng, 3)
        + "B"
        + rng.choice("CD")
        + rng.choice("ABCDEFGHJKL")
        + random_alnum(rng, 2, letters)
        + f"{rng.randrange(1000):03d}"
        + random_alnum(rng, 2)
    )


def _compile_time(fw_version: str) -> str:
    build_time, _ = FW_BUILDS.get(fw_version, FW_BUILDS["1.2.6"])
    stamp = datetime.fromisoformat(build_time)
    return stamp.strftime("%a %b %d %H:%M:%S UTC %Y")


def _miner_type(miner: MinerState) -> str:
    return f"{miner.model} (Vnish {miner.firmware_version})"


def _authorized(request: web.Request, miner: MinerState) -> bool:
    header = request.headers.get("Authorization", "").strip()
    if header[:7].lower() == "bearer ":
        header = header[7:].strip()
    tokens: dict[str, str] = miner.extra.get(TOKENS_KEY, {})
    return bool(header) and tokens.get(header) == miner.credentials.api_password


async def _json_body(request: web.Request) -> Any:
    try:
        return json.loads(await request.read() or b"null")
    except ValueError:
        return None


def _display_url(url: str) -> str:
    """How /settings and /summary show a URL: ``stratum+tcp://`` is implied and dropped."""
    if url.lower().startswith(DEFAULT_SCHEME):
        return url[len(DEFAULT_SCHEME) :]
    return url


def _canonical_url(url: str) -> str:
    """The URL the mining process uses: a bare ``host:port`` gets ``stratum+tcp://``."""
    url = url.strip()
    if not url or "://" in url:
        return url
    return DEFAULT_SCHEME + url


def _parse_pools(raw: Any) -> list[Pool] | None:
    """Posted pool slots -> the configured pools (empty slots dropped); None if malformed."""
    if not isinstance(raw, list):
        return None
    pools: list[Pool] = []
    for item in raw:
        if not isinstance(item, dict):
            return None
        url, user = item.get("url", ""), item.get("user", "")
        password = item.get("pass", item.get("password", ""))
        if not (isinstance(url, str) and isinstance(user, str) and isinstance(password, str)):
            return None
        if not url.strip():
            continue
        display = _display_url(url.strip())
        pools.append(Pool(_canonical_url(display), user, password))
    return pools


def _merge(target: dict[str, Any], update: dict[str, Any]) -> None:
    """Shallow-recursive merge that ignores nulls (pyasic sends ``"param": null``)."""
    for key, value in update.items():
        if value is None:
            continue
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


def _settings(miner: MinerState, model: ModelSpec) -> dict[str, Any]:
    """Cooling/misc/overclock settings, created with the firmware defaults on first use."""
    settings: dict[str, Any] | None = miner.extra.get(SETTINGS_KEY)
    if settings is None:
        settings = {
            "cooling": {
                "fan_min_count": model.fans,
                "fan_min_duty": 10,
                "mode": {"name": "auto", "param": 75},
            },
            "misc": {
                "asic_boost": True,
                "restart_temp": 95,
                "quiet_mode": False,
                "restart_hashrate": 0,
                "max_restart_attempts": 3,
                "remain_stopped_on_reboot": False,
            },
            "overclock": {
                "modded_psu": False,
                "globals": {"volt": model.option("volt") // 10, "freq": model.option("freq")},
            },
        }
        miner.extra[SETTINGS_KEY] = settings
    return settings


def _current_preset(miner: MinerState) -> str:
    return "disabled" if miner.power_limit_w is None else str(miner.power_limit_w)


def _disabled_preset(model: ModelSpec) -> dict[str, Any]:
    return {
        "name": "disabled",
        "pretty": "Disabled",
        "status": "untuned",
        "modded_psu_required": False,
    }


def _presets(miner: MinerState, model: ModelSpec) -> list[dict[str, Any]]:
    """Autotune presets around the nameplate: ``{name: "3070", pretty: "3070 watt ~ 104 TH"}``."""
    presets = [_disabled_preset(model)]
    current = _current_preset(miner)
    for factor in PRESET_FACTORS:
        watts = int(round(miner.nominal_w * factor / 10) * 10)
        ths = round(miner.nominal_ths * factor**0.85)
        presets.append(
            {
                "name": str(watts),
                "pretty": f"{watts} watt ~ {ths} TH",
                "status": "tuned" if str(watts) == current else "untuned",
                "modded_psu_required": factor > 1.1,
            }
        )
    return presets


def _ideal_ghs(miner: MinerState) -> float:
    """The target hashrate for the current mode/preset (GH/s), as the firmware states it."""
    hr_factor, _ = MODE_FACTORS[Mode.NORMAL if miner.mode is Mode.SLEEP else miner.mode]
    if miner.power_limit_w is not None and miner.power_limit_w > 0:
        hr_factor = min(hr_factor, min(1.0, miner.power_limit_w / miner.nominal_w) ** 0.85)
    live = sum(b.nominal_ths for b in miner.hashboards if b.index not in miner.dead_boards())
    return live * 1000 * hr_factor


def _devfee(miner: MinerState) -> dict[str, Any]:
    fee: dict[str, Any] = miner.extra.setdefault(
        DEVFEE_KEY, {"percent": 2.8, "url": "DevFee", "user": "DevFee", "pool_type": "DevFee"}
    )
    return fee


def _in_devfee_window(miner: MinerState, now: float) -> bool:
    """The fee is a time slice at the start of every hour (phase-shifted per miner)."""
    phase = (now + miner.seed % int(DEVFEE_PERIOD_S)) % DEVFEE_PERIOD_S
    return phase < DEVFEE_PERIOD_S * float(_devfee(miner)["percent"]) / 100


def _process_start(miner: MinerState) -> float:
    return max(miner.booted_at, miner.mining_resumes_at - miner.restart_seconds)


def _process_elapsed(miner: MinerState, now: float) -> int:
    """cgminer's Elapsed: seconds since the mining process (re)started."""
    return max(0, int(now - _process_start(miner)))


def _shares(miner: MinerState, now: float, diff: float) -> int:
    """Accepted shares since the mining process started hashing (deterministic)."""
    if not miner.is_hashing(now):
        return 0
    start = max(miner.booted_at, miner.mining_resumes_at)
    seconds = max(0.0, now - start)
    return int(_ideal_ghs(miner) * 1e9 * seconds / (diff * 2**32))


def _best_share(miner: MinerState) -> int:
    return 150_000_000 + miner.seed % 900_000_000


def _miner_state(miner: MinerState, now: float) -> str:
    """VNish's miner_state: mining, restarting, stopped or failure."""
    if miner.mode is Mode.SLEEP:
        return "stopped"
    if miner.is_restarting(now):
        return "restarting"
    if not miner.is_hashing(now):
        return "failure"
    return "mining"


def _miner_state_time(miner: MinerState, now: float) -> int:
    state = _miner_state(miner, now)
    if state == "mining":
        return max(0, int(now - max(miner.booted_at, miner.mining_resumes_at)))
    if state == "restarting":
        return max(0, int(now - _process_start(miner)))
    if state == "stopped":
        return max(0, int(now - float(miner.extra.get(STOPPED_AT_KEY, now))))
    return 0


def _chain_state(miner: MinerState, now: float, index: int) -> str:
    if index in miner.dead_boards():
        return "failure"
    state = _miner_state(miner, now)
    if state == "restarting":
        return "initializing"
    return "mining" if state == "mining" else "stopped"


def _fan_duty(tel: Telemetry) -> int:
    if not tel.fan_rpms:
        return 0
    return min(100, round(max(tel.fan_rpms) / 6000 * 100))


def _acs_string(chips: int) -> str:
    """``chain_acs``: one 'o' per good chip, in groups of ten."""
    marks = "o" * chips
    return " ".join(marks[i : i + 10] for i in range(0, chips, 10))


def _uptime_text(seconds: int) -> str:
    """/info uptime as busybox ``uptime`` prints it: ``"3 days, 4:05"`` or ``"0:06"``."""
    days, rest = divmod(seconds, 86400)
    hours, minutes = rest // 3600, (rest % 3600) // 60
    clock = f"{hours}:{minutes:02d}"
    return f"{days} days, {clock}" if days else clock


def _gateway(ip: str) -> str:
    return ".".join([*ip.split(".")[:3], "1"])


def _network_status(miner: MinerState) -> dict[str, Any]:
    return {
        "mac": miner.mac,
        "dhcp": True,
        "ip": miner.ip,
        "netmask": "255.255.255.0",
        "gateway": _gateway(miner.ip),
        "dns": [_gateway(miner.ip)],
        "hostname": miner.hostname,
    }


def _block_height(now: float) -> int:
    return 810322 + int((now - 1696260268) // 600)


def _diff_text(diff: float) -> str:
    return f"{diff / 1000:.3g}K"


def _rpc_pool_row(
    index: int,
    url: str,
    user: str,
    pool_type: int,
    active: bool,
    accepted: int,
    diff: float,
    now: float,
) -> dict[str, Any]:
    host = url.split("://", 1)[-1].rsplit(":", 1)[0] if "://" in url else ""
    return {
        "POOL": index,
        "URL": url,
        "Status": "Alive",
        "Priority": index,
        "Long Poll": "N",
        "Getworks": accepted // 8,
        "Accepted": accepted,
        "Rejected": accepted // 2400,
        "Stale": accepted // 1300,
        "Works": accepted * 16,
        "Discarded": accepted // 2,
        "Get Failures": 0,
        "Remote Failures": 0,
        "User": user,
        "Type": pool_type,
        "Last Share Time": "0:00:07" if accepted else "0",
        "Diff": _diff_text(diff) if active or accepted else "",
        "Diff1 Shares": 0,
        "Proxy Type": "",
        "Proxy": "",
        "Difficulty Accepted": accepted * diff,
        "Difficulty Rejected": (accepted // 2400) * diff,
        "Difficulty Stale": (accepted // 1300) * diff,
        "Last Share Difficulty": diff if accepted else 0.0,
        "Work Difficulty": diff if active or accepted else 0.0,
        "Has Stratum": True,
        "Stratum Active": active,
        "Stratum URL": host if active else "",
        "Stratum Difficulty": diff if active else 0.0,
        "Has Vmask": True,
        "Best Share": 0,
        "Pool Rejected%": 0.0416 if accepted else 0.0,
        "Pool Stale%": 0.0769 if accepted else 0.0,
        "Bad Work": 0,
        "Current Block Height": _block_height(now),
        "Current Block Version": 536870912,
    }


def _web_pool_row(
    index: int,
    url: str,
    user: str,
    pool_type: str,
    status: str,
    accepted: int,
    diff: float,
    active: bool,
) -> dict[str, Any]:
    return {
        "id": index,
        "url": url,
        "pool_type": pool_type,
        "user": user,
        "status": status,
        "asic_boost": pool_type == "UserPool",
        "diff": _diff_text(diff) if active or accepted else "",
        "accepted": accepted,
        "rejected": accepted // 2400,
        "stale": accepted // 1300,
        "ls_diff": diff if accepted else 0.0,
        "ls_time": "0:00:07" if accepted else "0",
        "diffa": accepted * diff,
        "ping": 19 if active else 0,
    }


PERSONALITY = VNishPersonality()
