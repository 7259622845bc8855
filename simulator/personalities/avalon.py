"""Canaan AvalonMiner A12/A13 on stock firmware: Canaan's cgminer 4.11.1 fork, port 4028 only.

What a client sees, and where it comes from (public captures; "inferred" where none exists):

- ``version``: ``PROD "AvalonMiner 1246"``, ``MODEL "1246"``, ``MAC`` as 12 lower-case hex digits
  without separators, ``DNA`` (the MM controller's unique id, ``02010000`` + 8 hex). pyasic's
  model key is ``PROD`` upper-cased, so "AVALONMINER 1366" (unknown to pyasic 0.79.0) falls back
  to its generic ``AvalonUnknown`` class, exactly as a real A1366 does.
- ``stats``/``estats``: ``STATS[0]`` ``ID "AVA100"`` with one ``"MM ID0"`` string of ``Key[value]``
  tokens, laid out as in the A1246 (fw 21072802) and A1566 captures in asic-rs / pyasic tests.
  The A1246 firmware has no ``WALLPOWER`` token (wall power is only ``PS[6]``), so pyasic reads
  no wattage there; later firmware (A13 here) adds ``WALLPOWER`` and ``MVavg``.
- The A-series controller clock counts from boot (``When`` ~ uptime in both captures), and
  ``DEVS[0].Temperature`` is the sentinel ``-273.0``.
- No chassis serial is readable over the API (pyasic reports ``None``); the label serial lives
  only in the true state. Board serials come back from ``ascset 0,hash-sn-read,<n>``.
- Writes: ``ascset 0,softoff|softon,1:<epoch>`` (sleep/wake; answered with STATUS "I", code 118,
  ``success softoff:<epoch>``), ``ascset 0,worklevel|workmode,set,<0-2>`` (low/normal/high),
  ``ascset 0,led,1-<0|1>``, ``ascset 0,reboot,<0-300>``, Canaan's ``setpool
  <web_user>,<web_password>,<slot>,<url>,<user>,<pass>``, cgminer ``addpool``/``switchpool``,
  and ``restart`` answered ``{"STATUS":"RESTART"}`` as pyasic's ``reboot()`` expects.

Timestamps in softoff/softon and the reboot delay are accepted but applied at once, so the
true state changes with the reply (a simulator simplification).
"""

from __future__ import annotations

import random
from typing import Any, ClassVar

from simulator.personalities.base import (
    MinerIdentity,
    ModelSpec,
    Personality,
    RpcReply,
    random_alnum,
    random_mac,
)
from simulator.state import (
    MODE_FACTORS,
    NOISE_BUCKET_S,
    Credentials,
    Fault,
    MinerState,
    Mode,
    Pool,
    Telemetry,
)

CGMINER_VERSION = "4.11.1"
API_VERSION = "3.7"
DESCRIPTION = f"cgminer {CGMINER_VERSION}"
CANAAN_OUI = "b4:a2:eb"  # seen on an A1126 Pro (pyasic issue #251)
DNA_PREFIX = "02010000"  # every captured DNA (A1246, A1566, Mini3, Nano3s) starts so
CGMINER_START_DELAY_S = 15  # Elapsed trails the controller clock by 11-17 s in the captures
SHARE_DIFFICULTY = 262144.0
MAX_FAN_RPM = 7500
POOL_SLOTS = 3

# Work level / work mode number <-> simulator mode (0 eco, 1 standard, 2 super).
LEVEL_OF_MODE: dict[Mode, int] = {Mode.LOW: 0, Mode.NORMAL: 1, Mode.HIGH: 2}
MODE_OF_LEVEL: dict[int, Mode] = {level: mode for mode, level in LEVEL_OF_MODE.items()}

RESUME_MODE_KEY = "avalon_resume_mode"
SOFTOFF_KEY = "avalon_softoff_at"
PRIORITY_KEY = "avalon_pool_priority"

# cgminer api.c status codes (ids as in cgminer 4.x; 118 is Canaan's "set info").
MSG_POOL = 7
MSG_NOPOOL = 8
MSG_DEVS = 9
MSG_SUMM = 11
MSG_INVCMD = 14
MSG_MISID = 15
MSG_VERSION = 22
MSG_MISPDP = 25
MSG_INVPID = 26
MSG_SWITCHP = 27
MSG_ADDPOOL = 55
MSG_DEVDETAILS = 69
MSG_MINESTATS = 70
MSG_INVASC = 106  # inferred id
MSG_MISASCOPT = 116  # inferred id
MSG_ASCSETINFO = 118
MSG_ASCSETOK = 119
MSG_SETPOOL = 140  # Canaan's setpool; id not captured (inferred)

ASCSET_HELP = (
    "led|fan-spd|frequency|voltage-level|target-temp|hash-sn-read|workmode|worklevel|"
    "reboot|softon|softoff"
)

MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="AvalonMiner 1246",
        nominal_ths=90.0,
        nominal_w=3420.0,
        boards=3,
        chips_per_board=120,  # PVT_T0..2 in the A1246 capture hold 120 chips each
        fans=4,  # Fan1..Fan4 in the capture
        firmware_version="21072802_4ec6bb0_211fc46",  # Ver[1246-83-21072802_4ec6bb0_211fc46]
        extra=(
            ("model_code", "1246"),
            ("hwtype", "MM3v2_X3"),  # inferred (A15 reports MM4v2_X3)
            ("swtype", "MM314"),  # inferred (A15 reports MM319)
            ("loader", "d0d779de.00"),
            ("core", "A3201"),  # Core[A3201] in the capture
            ("freqs", (472, 492, 512, 532)),  # SF0/ATABD0 in the capture
            ("wallpower", False),  # the 2021 firmware has no WALLPOWER token
        ),
    ),
    ModelSpec(
        name="AvalonMiner 1366",
        nominal_ths=130.0,
        nominal_w=3250.0,
        boards=3,
        chips_per_board=120,  # inferred (same MM3 chassis family)
        fans=4,  # inferred
        firmware_version="23081801_9a2c1e7_5b3f0d4",  # synthetic, in the real VERSION shape
        extra=(
            ("model_code", "1366"),
            ("hwtype", "MM3v2_X3"),  # inferred
            ("swtype", "MM317"),  # inferred
            ("loader", "d0d779de.00"),
            ("core", "A3205"),  # inferred
            ("freqs", (500, 520, 540, 560)),  # inferred
            ("wallpower", True),  # newer firmware carries WALLPOWER (as the A1566 capture)
        ),
    ),
)


class AvalonPersonality(Personality):
    """Canaan AvalonMiner A12/A13 with the stock cgminer 4.11.1 fork (RPC 4028, no web)."""

    name: ClassVar[str] = "avalon"
    make: ClassVar[str] = "AvalonMiner"
    firmware: ClassVar[str] = "stock"
    models: ClassVar[tuple[ModelSpec, ...]] = MODELS
    rpc_ports: ClassVar[tuple[int, ...]] = (4028,)
    web_ports: ClassVar[tuple[int, ...]] = ()
    rpc_nul_terminated: ClassVar[bool] = True
    # setpool authenticates with the web login (pyasic's Avalon web client uses root:root).
    default_credentials: ClassVar[Credentials] = Credentials(
        web_user="root", web_password="root", api_password=""
    )

    # --- identity --------------------------------------------------------------------------

    def new_identity(self, rng: random.Random, model: ModelSpec) -> MinerIdentity:
        """MAC under Canaan's OUI, DNA as the controller id; label serials in an inferred shape."""
        code = str(model.option("model_code"))
        mac = random_mac(rng, CANAAN_OUI, sep="", upper=False)
        dna = DNA_PREFIX + "".join(rng.choice("0123456789abcdef") for _ in range(8))
        year, week = rng.choice(("21", "22", "23")), rng.randint(1, 52)
        serial = f"{code}{year}{week:02d}{random_alnum(rng, 8)}"
        boards = tuple(
            f"{code}H{year}{week:02d}{random_alnum(rng, 7)}" for _ in range(model.boards)
        )
        return MinerIdentity(
            serial=serial,
            mac=mac,
            hostname=f"Avalon{code}-{mac[-6:]}",
            control_board_serial=dna,
            psu_serial=f"P{code}{year}{random_alnum(rng, 9)}",
            board_serials=boards,
        )

    # --- framing ----------------------------------------------------------------------------

    def handle_rpc(self, miner: MinerState, request: bytes, port: int, now: float) -> RpcReply:
        """A rebooting controller answers nothing (the listener may still be bound)."""
        if not miner.is_up(now):
            return None
        return super().handle_rpc(miner, request, port, now)

    def dispatch_command(
        self,
        miner: MinerState,
        command: str,
        parameter: Any,
        payload: dict[str, Any],
        now: float,
    ) -> RpcReply:
        """As the base dispatcher, but errors carry this firmware's clock and description."""
        if getattr(self, f"rpc_{command}", None) is None:
            miner.log(now, "rpc", command or "?", detail="invalid command")
            return self._reply(miner, now, "E", MSG_INVCMD, "Invalid command")
        return super().dispatch_command(miner, command, parameter, payload, now)

    def description(self, miner: MinerState) -> str:
        return DESCRIPTION

    def status_entry(
        self, miner: MinerState, code: int, msg: str, now: float, status: str = "S"
    ) -> dict[str, Any]:
        """``When`` is the controller's clock, which counts from boot on the A-series."""
        return {
            "STATUS": status,
            "When": self._clock(miner, now),
            "Code": code,
            "Msg": msg,
            "Description": DESCRIPTION,
        }

    def error_reply(self, code: int, msg: str, now: float) -> dict[str, Any]:
        return {
            "STATUS": [
                {
                    "STATUS": "E",
                    "When": int(now),
                    "Code": code,
                    "Msg": msg,
                    "Description": DESCRIPTION,
                }
            ],
            "id": 1,
        }

    def _reply(
        self, miner: MinerState, now: float, status: str, code: int, msg: str
    ) -> dict[str, Any]:
        return {"STATUS": [self.status_entry(miner, code, msg, now, status)], "id": 1}

    # --- read commands ------------------------------------------------------------------------

    def rpc_version(
        self, miner: MinerState, parameter: Any, payload: dict[str, Any], now: float
    ) -> RpcReply:
        spec = self._spec(miner)
        row = {
            "CGMiner": CGMINER_VERSION,
            "API": API_VERSION,
            "STM8": "20.08.01",
            "PROD": miner.model,
            "MODEL": str(spec.option("model_code")),
            "HWTYPE": str(spec.option("hwtype")),
            "SWTYPE": str(spec.option("swtype")),
            "VERSION": miner.firmware_version,
            "LOADER": str(spec.option("loader")),
            "DNA": miner.control_board_serial,
            "MAC": miner.mac.replace(":", "").lower(),
            "UPAPI": "2",
        }
        return self.ok_reply(miner, MSG_VERSION, "CGMiner versions", "VERSION", [row], now)

    def rpc_devdetails(
        self, miner: MinerState, parameter: Any, payload: dict[str, Any], now: float
    ) -> RpcReply:
        row = {
            "DEVDETAILS": 0,
            "Name": "AVA10",
            "ID": 0,
            "Driver": "avalon10",
            "Kernel": "",
            "Model": "",
            "Device Path": "",
        }
        return self.ok_reply(miner, MSG_DEVDETAILS, "Device Details", "DEVDETAILS", [row], now)

    def rpc_summary(
        self, miner: MinerState, parameter: Any, payload: dict[str, Any], now: float
    ) -> RpcReply:
        t = miner.telemetry(now)
        elapsed = self._elapsed(miner, now)
        mhs = t.hashrate_ths * 1e6
        accepted, rejected = self._shares(miner, now)
        row = {
            "Elapsed": elapsed,
            "MHS av": round(mhs * 0.985, 2),
            "MHS 30s": round(mhs * 1.004, 2),
            "MHS 1m": round(mhs, 2),
            "MHS 5m": round(mhs * 0.997, 2),
            "MHS 15m": round(mhs * 0.99, 2),
            "Found Blocks": 0,
            "Getworks": max(1, elapsed // 30),
            "Accepted": accepted,
            "Rejected": rejected,
            "Hardware Errors": accepted // 40,
            "Utility": round(accepted * 60.0 / max(1, elapsed), 2),
            "Discarded": elapsed * 3,
            "Stale": 0,
            "Get Failures": 0,
            "Local Work": elapsed * 1000,
            "Remote Failures": 0,
            "Network Blocks": max(1, elapsed // 600),
            "Total MH": round(mhs * 0.985 * elapsed, 1),
            "Work Utility": round(accepted * SHARE_DIFFICULTY * 60.0 / max(1, elapsed), 2),
            "Difficulty Accepted": accepted * SHARE_DIFFICULTY,
            "Difficulty Rejected": rejected * SHARE_DIFFICULTY,
            "Difficulty Stale": 0.0,
            "Best Share": accepted * 5233,
            "Device Hardware%": 0.0,
            "Device Rejected%": self._pct(rejected, accepted + rejected),
            "Pool Rejected%": self._pct(rejected, accepted + rejected),
            "Pool Stale%": 0.0,
            "Last getwork": self._clock(miner, now),
        }
        return self.ok_reply(miner, MSG_SUMM, "Summary", "SUMMARY", [row], now)

    def rpc_devs(
        self, miner: MinerState, parameter: Any, payload: dict[str, Any], now: float
    ) -> RpcReply:
        t = miner.telemetry(now)
        elapsed = self._elapsed(miner, now)
        mhs = t.hashrate_ths * 1e6
        accepted, rejected = self._shares(miner, now)
        clock = self._clock(miner, now)
        row = {
            "ASC": 0,
            "Name": "AVA10",
            "ID": 0,
            "Enabled": "Y",
            "Status": "Alive",
            "Temperature": -273.0,  # the A-series never fills it in (A1566 capture)
            "MHS av": round(mhs * 0.985, 2),
            "MHS 30s": round(mhs * 1.004, 2),
            "MHS 1m": round(mhs, 2),
            "MHS 5m": round(mhs * 0.997, 2),
            "MHS 15m": round(mhs * 0.99, 2),
            "Accepted": accepted,
            "Rejected": rejected,
            "Hardware Errors": accepted // 40,
            "Utility": round(accepted * 60.0 / max(1, elapsed), 2),
            "Last Share Pool": self._active_pool(miner) if accepted else -1,
            "Last Share Time": clock - 9 if accepted else 0,
            "Total MH": round(mhs * 0.985 * elapsed, 1),
            "Diff1 Work": accepted * int(SHARE_DIFFICULTY),
            "Difficulty Accepted": accepted * SHARE_DIFFICULTY,
            "Difficulty Rejected": rejected * SHARE_DIFFICULTY,
            "Last Share Difficulty": SHARE_DIFFICULTY if accepted else 0.0,
            "Last Valid Work": clock if t.hashing else clock - 60,
            "Device Hardware%": 0.0,
            "Device Rejected%": self._pct(rejected, accepted + rejected),
            "Device Elapsed": elapsed,
        }
        return self.ok_reply(miner, MSG_DEVS, "1 ASC(s)", "DEVS", [row], now)

    def rpc_pools(
        self, miner: MinerState, parameter: Any, payload: dict[str, Any], now: float
    ) -> RpcReply:
        rows = self._pool_rows(miner, now)
        if not rows:
            return self._reply(miner, now, "E", MSG_NOPOOL, "No pools")
        return self.ok_reply(miner, MSG_POOL, f"{len(rows)} Pool(s)", "POOLS", rows, now)

    def rpc_stats(
        self, miner: MinerState, parameter: Any, payload: dict[str, Any], now: float
    ) -> RpcReply:
        return self.ok_reply(
            miner, MSG_MINESTATS, "CGMiner stats", "STATS", self._stats_rows(miner, now), now
        )

    def rpc_estats(
        self, miner: MinerState, parameter: Any, payload: dict[str, Any], now: float
    ) -> RpcReply:
        """Same payload as ``stats`` on this firmware (the A1566 capture shows both equal)."""
        return self.rpc_stats(miner, parameter, payload, now)

    # --- write commands -----------------------------------------------------------------------

    def rpc_restart(
        self, miner: MinerState, parameter: Any, payload: dict[str, Any], now: float
    ) -> RpcReply:
        """The controller restarts; pyasic's ``reboot()`` looks for ``STATUS == "RESTART"``."""
        miner.reboot(now, "rpc restart")
        return {"STATUS": "RESTART"}

    def rpc_ascset(
        self, miner: MinerState, parameter: Any, payload: dict[str, Any], now: float
    ) -> RpcReply:
        """``0,<option>[,<setting>]``; driver replies come back as code 118 "set info"."""
        text = "" if parameter is None else str(parameter)
        if not text:
            return self._reply(miner, now, "E", MSG_MISID, "Missing device id parameter")
        asc, _, rest = text.partition(",")
        if asc.strip() != "0":
            return self._reply(
                miner, now, "E", MSG_INVASC, f"Invalid ASC id {asc.strip()} - range is 0 - 0"
            )
        option, _, setting = rest.partition(",")
        option = option.strip().lower()
        if not option:
            return self._reply(miner, now, "E", MSG_MISASCOPT, "Missing option after ASC number")
        handler = {
            "help": self._ascset_help,
            "led": self._ascset_led,
            "softoff": self._ascset_softoff,
            "softon": self._ascset_softon,
            "worklevel": self._ascset_level,
            "workmode": self._ascset_level,
            "reboot": self._ascset_reboot,
            "hash-sn-read": self._ascset_hash_sn,
        }.get(option)
        if handler is None:
            return self._ascset_info(miner, now, f"Unknown option: {option}")
        return handler(miner, option, setting.strip(), now)

    def rpc_setpool(
        self, miner: MinerState, parameter: Any, payload: dict[str, Any], now: float
    ) -> RpcReply:
        """Canaan's ``setpool user,password,slot,url,worker,pass``: replaces one of 3 slots."""
        fields = [] if parameter is None else str(parameter).split(",")
        if len(fields) != 6:
            return self._reply(miner, now, "E", MSG_SETPOOL, "Invalid setpool parameter")
        user, password, slot_text, url, worker, worker_pass = fields
        creds = miner.credentials
        if user != creds.web_user or password != creds.web_password:
            miner.log(now, "rpc setpool", "auth", detail="wrong web password")
            return self._reply(miner, now, "E", MSG_SETPOOL, "Invalid username or password")
        try:
            slot = int(slot_text)
        except ValueError:
            slot = -1
        if not 0 <= slot < POOL_SLOTS:
            return self._reply(
                miner, now, "E", MSG_SETPOOL, f"Invalid pool id {slot_text} - range is 0 - 2"
            )
        pools = [Pool(p.url, p.user, p.password) for p in miner.pools[:POOL_SLOTS]]
        while len(pools) <= slot:
            pools.append(Pool("", "", ""))
        pools[slot] = Pool(url, worker, worker_pass)
        miner.write_pools(pools, now, "rpc setpool")
        miner.extra.pop(PRIORITY_KEY, None)
        msg = f"Set pool {slot}: {url},{worker},{worker_pass}"
        return self._reply(miner, now, "S", MSG_SETPOOL, msg)

    def rpc_addpool(
        self, miner: MinerState, parameter: Any, payload: dict[str, Any], now: float
    ) -> RpcReply:
        """cgminer ``addpool url,user,pass``: appended after the configured slots."""
        fields = [] if parameter is None else str(parameter).split(",")
        if len(fields) < 2 or not fields[0]:
            return self._reply(miner, now, "E", MSG_MISPDP, "Missing addpool details")
        url, user = fields[0], fields[1]
        password = fields[2] if len(fields) > 2 else ""
        pools = [Pool(p.url, p.user, p.password) for p in miner.pools]
        pools.append(Pool(url, user, password))
        miner.write_pools(pools, now, "rpc addpool")
        miner.extra.pop(PRIORITY_KEY, None)
        number = sum(1 for p in pools if p.url) - 1
        return self._reply(miner, now, "S", MSG_ADDPOOL, f"Added pool {number}: '{url}'")

    def rpc_switchpool(
        self, miner: MinerState, parameter: Any, payload: dict[str, Any], now: float
    ) -> RpcReply:
        """cgminer ``switchpool N``: pool N gets priority 0, the others keep their order."""
        listed = self._listed_pools(miner)
        try:
            number = int(str(parameter if parameter is not None else 0))
        except ValueError:
            number = -1
        if not 0 <= number < len(listed):
            return self._reply(
                miner,
                now,
                "E",
                MSG_INVPID,
                f"Invalid pool id {number} - range is 0 - {max(0, len(listed) - 1)}",
            )
        order = [i for i in self._priority(miner, len(listed)) if i != number]
        miner.extra[PRIORITY_KEY] = [number, *order]
        miner.log(now, "rpc", "switchpool", write=True, detail=f"pool {number}")
        url = listed[number][1].url
        return self._reply(miner, now, "S", MSG_SWITCHP, f"Switching to pool {number}:'{url}'")

    # --- ascset options ---------------------------------------------------------------------

    def _ascset_info(self, miner: MinerState, now: float, text: str) -> dict[str, Any]:
        return self._reply(miner, now, "I", MSG_ASCSETINFO, f"ASC 0 set info: {text}")

    def _ascset_ok(self, miner: MinerState, now: float) -> dict[str, Any]:
        return self._reply(miner, now, "S", MSG_ASCSETOK, "ASC 0 set OK")

    def _ascset_help(
        self, miner: MinerState, option: str, setting: str, now: float
    ) -> dict[str, Any]:
        return self._ascset_info(miner, now, ASCSET_HELP)

    def _ascset_led(
        self, miner: MinerState, option: str, setting: str, now: float
    ) -> dict[str, Any]:
        """``led,<module>[-<0|1>]`` (module 1 is the only MM; no state toggles the LED)."""
        if not setting:
            return self._ascset_info(miner, now, "missing module_id setting")
        module_text, _, state_text = setting.partition("-")
        try:
            module = int(module_text)
            state = int(state_text) if state_text else None
        except ValueError:
            return self._ascset_info(miner, now, "invalid module_id setting")
        if module != 1:
            return self._ascset_info(miner, now, f"invalid module_id: {module}, valid range 1-1")
        if state is not None and state not in (0, 1):
            return self._ascset_info(miner, now, f"invalid LED status: {state}, valid value 0|1")
        miner.blinking = (not miner.blinking) if state is None else bool(state)
        miner.log(now, "rpc ascset", "led", write=True, detail="on" if miner.blinking else "off")
        return self._ascset_ok(miner, now)

    def _ascset_softoff(
        self, miner: MinerState, option: str, setting: str, now: float
    ) -> dict[str, Any]:
        """``softoff,1:<epoch>``: stop hashing, remembering the level to come back to."""
        stamp = self._soft_stamp(setting)
        if stamp is None:
            return self._ascset_info(miner, now, "invalid softoff parameter")
        if miner.mode is not Mode.SLEEP:
            miner.extra[RESUME_MODE_KEY] = str(miner.mode)
        outcome = miner.set_mode(Mode.SLEEP, now, "rpc ascset softoff")
        if outcome.applied:
            miner.extra[SOFTOFF_KEY] = stamp
        return self._ascset_info(miner, now, f"success softoff:{stamp}")

    def _ascset_softon(
        self, miner: MinerState, option: str, setting: str, now: float
    ) -> dict[str, Any]:
        """``softon,1:<epoch>``: hash again at the level held before softoff."""
        stamp = self._soft_stamp(setting)
        if stamp is None:
            return self._ascset_info(miner, now, "invalid softon parameter")
        if miner.mode is Mode.SLEEP:  # awake already: nothing to do, same answer
            outcome = miner.set_mode(self._resume_mode(miner), now, "rpc ascset softon")
            if outcome.applied:
                miner.extra.pop(SOFTOFF_KEY, None)
        return self._ascset_info(miner, now, f"success softon:{stamp}")

    def _ascset_level(
        self, miner: MinerState, option: str, setting: str, now: float
    ) -> dict[str, Any]:
        """``worklevel|workmode,get`` or ``,set,<0-2>``; while asleep only the target changes."""
        action, _, value = setting.partition(",")
        action = action.strip().lower()
        if action == "get":
            return self._ascset_info(
                miner, now, f"{option} {LEVEL_OF_MODE[self._level_mode(miner)]}"
            )
        if action != "set" or not value.strip():
            # pyasic's ascset() drops a falsy value, so set_power_limit(<=80 W) lands here.
            return self._ascset_info(miner, now, f"invalid {option} parameter")
        try:
            level = int(value.strip())
        except ValueError:
            level = -1
        if level not in MODE_OF_LEVEL:
            return self._ascset_info(
                miner, now, f"invalid {option}: {value.strip()}, valid range 0-2"
            )
        mode = MODE_OF_LEVEL[level]
        if miner.mode is Mode.SLEEP:
            ignored = Fault.WRITE_IGNORED in miner.faults
            if not ignored:
                miner.extra[RESUME_MODE_KEY] = str(mode)
            detail = "write acknowledged but ignored" if ignored else f"after softon: {mode}"
            miner.log(now, f"rpc ascset {option}", "mode", write=True, detail=detail)
        else:
            miner.set_mode(mode, now, f"rpc ascset {option}")
        return self._ascset_ok(miner, now)

    def _ascset_reboot(
        self, miner: MinerState, option: str, setting: str, now: float
    ) -> dict[str, Any]:
        """``reboot,<0-300>`` (seconds of delay; the simulator reboots at once)."""
        try:
            delay = int(setting)
        except ValueError:
            return self._ascset_info(miner, now, "missing reboot value")
        if not 0 <= delay <= 300:
            return self._ascset_info(
                miner, now, f"invalid reboot delay: {delay}, valid range 0-300"
            )
        miner.reboot(now, f"rpc ascset reboot {delay}")
        return self._ascset_ok(miner, now)

    def _ascset_hash_sn(
        self, miner: MinerState, option: str, setting: str, now: float
    ) -> dict[str, Any]:
        """``hash-sn-read,<n>``: the hashboard serial as the board EEPROM holds it."""
        try:
            index = int(setting)
        except ValueError:
            return self._ascset_info(miner, now, "missing hash index")
        if not 0 <= index < len(miner.hashboards):
            return self._ascset_info(
                miner,
                now,
                f"invalid hash index: {index}, valid range 0-{len(miner.hashboards) - 1}",
            )
        return self._ascset_info(miner, now, f"Hash-{index} SN:{miner.hashboards[index].serial}")

    # --- rendering helpers --------------------------------------------------------------------

    def _spec(self, miner: MinerState) -> ModelSpec:
        return self.model_named(miner.model)

    @staticmethod
    def _clock(miner: MinerState, now: float) -> int:
        """The controller's clock: seconds since it booted (no RTC on the A-series MM)."""
        return miner.uptime(now)

    @staticmethod
    def _elapsed(miner: MinerState, now: float) -> int:
        return max(0, miner.uptime(now) - CGMINER_START_DELAY_S)

    @staticmethod
    def _pct(part: int, whole: int) -> float:
        return round(100.0 * part / whole, 4) if whole else 0.0

    def _resume_mode(self, miner: MinerState) -> Mode:
        try:
            mode = Mode(str(miner.extra.get(RESUME_MODE_KEY, Mode.NORMAL)))
        except ValueError:
            mode = Mode.NORMAL
        return Mode.NORMAL if mode is Mode.SLEEP else mode

    def _level_mode(self, miner: MinerState) -> Mode:
        """The work level in force, or the one softon will return to."""
        return self._resume_mode(miner) if miner.mode is Mode.SLEEP else miner.mode

    @staticmethod
    def _soft_stamp(setting: str) -> int | None:
        flag, sep, stamp = setting.partition(":")
        try:
            int(flag)
            return int(stamp) if sep else 0
        except ValueError:
            return None

    def _shares(self, miner: MinerState, now: float) -> tuple[int, int]:
        """Accepted/rejected counts consistent with the nominal rate and the uptime."""
        factor = MODE_FACTORS[self._level_mode(miner)][0]
        rate = miner.nominal_ths * 1e12 * factor / (SHARE_DIFFICULTY * 2**32)
        accepted = int(self._elapsed(miner, now) * rate)
        return accepted, accepted // 150

    def _listed_pools(self, miner: MinerState) -> list[tuple[int, Pool]]:
        """Runtime pools cgminer lists (slots without a URL are not pools), with slot index."""
        return [(i, p) for i, p in enumerate(miner.runtime_pools()) if p.url]

    def _priority(self, miner: MinerState, count: int) -> list[int]:
        saved = miner.extra.get(PRIORITY_KEY)
        if isinstance(saved, list) and sorted(saved) == list(range(count)):
            return [int(i) for i in saved]
        return list(range(count))

    def _active_pool(self, miner: MinerState) -> int:
        """Index in the listed pools of the pool getting work."""
        listed = self._listed_pools(miner)
        if not listed:
            return -1
        if Fault.HIDDEN_POOL in miner.faults:
            return len(listed) - 1
        return self._priority(miner, len(listed))[0]

    def _pool_rows(self, miner: MinerState, now: float) -> list[dict[str, Any]]:
        listed = self._listed_pools(miner)
        priority = self._priority(miner, len(listed))
        active = self._active_pool(miner)
        accepted, rejected = self._shares(miner, now)
        clock = self._clock(miner, now)
        rows: list[dict[str, Any]] = []
        for number, (_, pool) in enumerate(listed):
            on = number == active
            acc, rej = (accepted, rejected) if on else (0, 0)
            host = pool.url.split("://", 1)[-1].rsplit(":", 1)[0]
            rows.append(
                {
                    "POOL": number,
                    "URL": pool.url,
                    "Status": "Alive",
                    "Priority": priority.index(number) if number in priority else number,
                    "Quota": 1,
                    "Long Poll": "N",
                    "Getworks": max(1, self._elapsed(miner, now) // 30) if on else 2,
                    "Accepted": acc,
                    "Rejected": rej,
                    "Works": acc * 69,
                    "Discarded": 0,
                    "Stale": 0,
                    "Get Failures": 0,
                    "Remote Failures": 0,
                    "User": pool.user,
                    "Last Share Time": clock - 9 if acc else 0,
                    "Diff1 Shares": acc * int(SHARE_DIFFICULTY),
                    "Proxy Type": "",
                    "Proxy": "",
                    "Difficulty Accepted": acc * SHARE_DIFFICULTY,
                    "Difficulty Rejected": rej * SHARE_DIFFICULTY,
                    "Difficulty Stale": 0.0,
                    "Last Share Difficulty": SHARE_DIFFICULTY if acc else 0.0,
                    "Work Difficulty": SHARE_DIFFICULTY if on else 0.0,
                    "Has Stratum": True,
                    "Stratum Active": on,
                    "Stratum URL": host,  # host only, as in the A1566 capture
                    "Stratum Difficulty": SHARE_DIFFICULTY if on else 0.0,
                    "Has Vmask": True,
                    "Has GBT": False,
                    "Best Share": acc * 5233,
                    "Pool Rejected%": self._pct(rej, acc + rej),
                    "Pool Stale%": 0.0,
                    "Bad Work": 0,
                    "Current Block Height": 882588 if on else 0,
                    "Current Block Version": 536870912,
                }
            )
        return rows

    def _stats_rows(self, miner: MinerState, now: float) -> list[dict[str, Any]]:
        elapsed = self._elapsed(miner, now)
        rows: list[dict[str, Any]] = [
            {
                "STATS": 0,
                "ID": "AVA100",
                "Elapsed": elapsed,
                "Calls": 0,
                "Wait": 0.0,
                "Max": 0.0,
                "Min": 99999999.0,
                "MM ID0": self._mm_id(miner, now),
                "MM Count": 1,
                "Smart Speed": 1,
                "Voltage Level Offset": 0,
                "Nonce Mask": 25,
            }
        ]
        active = self._active_pool(miner)
        for number, _ in enumerate(self._listed_pools(miner)):
            on = number == active
            rows.append(
                {
                    "STATS": number + 1,
                    "ID": f"POOL{number}",
                    "Elapsed": elapsed,
                    "Calls": 0,
                    "Wait": 0.0,
                    "Max": 0.0,
                    "Min": 99999999.0,
                    "Pool Calls": 0,
                    "Pool Attempts": 0,
                    "Pool Wait": 0.0,
                    "Pool Max": 0.0,
                    "Pool Min": 99999999.0,
                    "Pool Av": 0.0,
                    "Work Had Roll Time": False,
                    "Work Can Roll": False,
                    "Work Had Expire": False,
                    "Work Roll Time": 0,
                    "Work Diff": SHARE_DIFFICULTY if on else 0.0,
                    "Min Diff": SHARE_DIFFICULTY if on else 0.0,
                    "Max Diff": SHARE_DIFFICULTY if on else 0.0,
                    "Min Diff Count": 2 if on else 0,
                    "Max Diff Count": max(2, elapsed // 10) if on else 0,
                    "Times Sent": max(3, elapsed // 15) if on else 3,
                    "Bytes Sent": max(255, elapsed * 9) if on else 255,
                    "Times Recv": max(6, elapsed // 6) if on else 6,
                    "Bytes Recv": max(2055, elapsed * 170) if on else 2055,
                    "Net Bytes Sent": max(255, elapsed * 9) if on else 255,
                    "Net Bytes Recv": max(2055, elapsed * 170) if on else 2055,
                }
            )
        return rows

    def _mm_id(self, miner: MinerState, now: float) -> str:
        """The ``MM ID0`` string: per-board and per-chip telemetry as ``Key[value]`` tokens."""
        spec = self._spec(miner)
        t = miner.telemetry(now)
        dead = miner.dead_boards()
        boards = miner.hashboards
        live = [b for b in boards if b.index not in dead]
        level = LEVEL_OF_MODE[self._level_mode(miner)]
        hr_factor = MODE_FACTORS[self._level_mode(miner)][0]
        rng = random.Random(f"{miner.seed}:mm:{int(now // NOISE_BUCKET_S)}")
        uptime = miner.uptime(now)
        freqs = [round(f * (0.9 + 0.1 * hr_factor)) for f in spec.option("freqs")]
        hashing = t.hashing
        mghs = [ths * 1000.0 for ths in t.board_ths]
        hw_per_board = [
            int(uptime * 0.04 * rng.uniform(0.7, 1.1)) if hashing and b.index not in dead else 0
            for b in boards
        ]
        chip_max = [
            int(c) if b.index not in dead else 0 for b, c in zip(boards, t.chip_temps, strict=True)
        ]
        chip_avg = [
            int(c) if b.index not in dead else 0 for b, c in zip(boards, t.board_temps, strict=True)
        ]
        live_max = [chip_max[b.index] for b in live] or [0]
        live_avg = [chip_avg[b.index] for b in live] or [0]
        total_chips = sum(b.chips for b in boards)
        wall = round(t.power_w)
        psu = self._ps(miner, t)
        fan_pct = min(100, round(100 * max(t.fan_rpms or (0,)) / MAX_FAN_RPM))
        work = "In Work" if hashing else "In Idle"
        softoff = int(miner.extra.get(SOFTOFF_KEY, 0)) if miner.mode is Mode.SLEEP else 0
        mpo = round(miner.nominal_w * MODE_FACTORS[self._level_mode(miner)][1] * 0.935, -1)
        ghs_now = t.hashrate_ths * 1000.0
        tokens: list[tuple[str, str]] = [
            (
                "Ver",
                f"{spec.option('model_code')}-{round(miner.nominal_ths)}-{miner.firmware_version}",
            ),
            ("DNA", miner.control_board_serial),
            ("MEMFREE", "1201472"),
            ("NETFAIL", "0 0 0 0 0 0 0 0"),
            ("SYSTEMSTATU", f"Work: {work}, Hash Board: {len(live)}"),
            ("Elapsed", str(self._elapsed(miner, now))),  # cgminer's, as in both captures
            ("BOOTBY", "0x08.00000000"),
            ("LW", str(uptime * 995 if hashing else uptime * 10)),
            ("MH", _join(hw_per_board)),
            ("HW", str(sum(hw_per_board))),
            ("DH", f"{2.7 if hashing else 0.0:.3f}%"),
            ("Temp", str(round(t.env_temp))),
            ("TMax", str(max(live_max))),
            ("TAvg", str(round(sum(live_avg) / len(live_avg)))),
        ]
        tokens += [(f"Fan{i + 1}", str(rpm)) for i, rpm in enumerate(t.fan_rpms)]
        tokens += [
            ("FanR", f"{fan_pct}%"),
            ("Vo", "329" if hashing else "0"),
            ("PS", _join(psu)),
        ]
        if spec.option("wallpower"):
            tokens.append(("WALLPOWER", str(wall)))
        tokens += [
            (f"PLL{b.index}", _join(self._pll(rng) if hashing and b.index not in dead else [0] * 4))
            for b in boards
        ]
        tokens += [
            ("GHSspd", f"{ghs_now * rng.uniform(0.99, 1.01):.2f}" if hashing else "0.00"),
            ("DHspd", f"{2.7 if hashing else 0.0:.3f}%"),
            ("GHSmm", f"{miner.nominal_ths * 1000.0 * hr_factor * 0.995:.2f}"),
            ("GHSavg", f"{sum(mghs):.2f}"),
            ("WU", f"{ghs_now * 13.97:.2f}"),
            ("Freq", f"{sum(freqs) / len(freqs) * 0.985:.2f}" if hashing else "0.00"),
            ("Led", "1" if miner.blinking else "0"),
            ("MGHS", " ".join(f"{v:.2f}" for v in mghs)),
            ("MTmax", _join(chip_max)),
            ("MTavg", _join(chip_avg)),
        ]
        if spec.option("wallpower"):
            volts = [round(rng.uniform(285.0, 287.0), 1) if hashing else 0.0 for _ in boards]
            tokens.append(("MVavg", " ".join(f"{v:.1f}" for v in volts)))
        tokens += [
            ("TA", str(total_chips)),
            ("Core", str(spec.option("core"))),
            ("PING", str(rng.randint(120, 460))),
            ("POWS", "0"),
            ("POW_I2C", "OK"),
            ("HASHS", _join([0] * len(boards))),
            ("POOLS", "0"),
            ("SoftOFF", str(softoff)),
            ("ECHU", _join([0] * len(boards))),
            ("ECMM", "0"),
        ]
        tokens += [(f"SF{b.index}", _join(freqs)) for b in boards]
        chips: dict[int, tuple[list[int], list[int], list[int]]] = {
            b.index: self._chips(
                miner, now, b.index, b.chips, chip_avg[b.index], chip_max[b.index], hashing
            )
            for b in live
        }
        # A dead board drops out of the per-chip tables, as an undetected board does.
        tokens += [(f"PVT_T{i}", " ".join(f"{v:3d}" for v in c[0])) for i, c in chips.items()]
        tokens += [(f"PVT_V{i}", _join(c[1])) for i, c in chips.items()]
        tokens.append(
            ("MW", _join([sum(chips[b.index][2]) if b.index in chips else 0 for b in boards]))
        )
        tokens += [(f"MW{i}", _join(c[2])) for i, c in chips.items()]
        tokens += [(f"ASICCRC{i}", _join([0] * len(c[0]))) for i, c in chips.items()]
        tokens += [
            ("CRC", _join([0] * len(boards))),
            (
                "ATAOPTS0",
                f"--avalon10-freq {_colons([f - 96 for f in freqs])} --avalon10-voltage-level 46",
            ),
            (
                "ATAOPTS1",
                f"--avalon10-freq {_colons(freqs)} --avalon10-voltage-level 55",
            ),
            ("ADJ", "1"),
            ("COP", _join([0] * len(boards))),
            ("MPO", str(int(mpo))),
            ("MVL", "87"),
        ]
        tokens += [(f"ATABD{b.index}", _join(freqs)) for b in boards]
        tokens.append(("WORKMODE", str(level)))
        return " ".join(f"{key}[{value}]" for key, value in tokens)

    @staticmethod
    def _ps(miner: MinerState, t: Telemetry) -> list[int]:
        """``PS[err ctrl_cV hash_cV amps dc_W set_cV wall_W]`` (A1246: ``... 3189 1320 3504``)."""
        wall = round(t.power_w)
        if not t.hashing:
            return [0, 1214, 0, 0, 0, 1320, wall]
        dc = round(wall * 0.91)
        hash_cv = 1316
        return [0, 1214, hash_cv, round(dc / (hash_cv / 100)), dc, 1320, wall]

    @staticmethod
    def _pll(rng: random.Random) -> list[int]:
        return [rng.randint(1500, 5500) for _ in range(4)]

    @staticmethod
    def _chips(
        miner: MinerState,
        now: float,
        board: int,
        count: int,
        avg: int,
        peak: int,
        hashing: bool,
    ) -> tuple[list[int], list[int], list[int]]:
        """Per-chip temperature, voltage (mV) and work counters; the hottest chip is MTmax."""
        rng = random.Random(f"{miner.seed}:pvt:{board}:{int(now // NOISE_BUCKET_S)}")
        if not hashing:
            temps = [max(0, avg + rng.randint(-2, 0)) for _ in range(count)]
            return temps, [0] * count, [0] * count
        low = min(avg - 5, peak)
        temps = [rng.randint(low, peak) for _ in range(count)]
        temps[rng.randrange(count)] = peak
        volts = [rng.randint(297, 317) for _ in range(count)]
        works = [rng.randint(540, 700) for _ in range(count)]
        return temps, volts, works


def _join(values: list[int]) -> str:
    return " ".join(str(v) for v in values)


def _colons(values: list[int]) -> str:
    return ":".join(str(v) for v in values)


PERSONALITY = AvalonPersonality()
