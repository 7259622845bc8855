"""The personality seam: one module per firmware family.

A personality knows how one firmware renders a :class:`~simulator.state.MinerState` on
the wire and how it turns requests into state changes. It is stateless: every handler
receives the miner it serves. To add a firmware (LuxOS, Braiins gRPC, Whatsminer v3 …)
write one module with a :class:`Personality` subclass and list it in
:mod:`simulator.personalities`.

Transports (``simulator.transport``) own sockets, framing and transport-level faults;
personalities never touch a socket.
"""

from __future__ import annotations

import json
import random
import string
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from aiohttp import web

from simulator.state import Credentials, Hashboard, MinerState, Pool

RpcReply = dict[str, Any] | bytes | None
"""A reply to one RPC request: a JSON object, raw bytes, or None to close silently."""

MINER_KEY = web.RequestKey("miner", MinerState)
"""Where the web transport puts the served miner on each aiohttp request."""


def miner_of(request: web.Request) -> MinerState:
    """The virtual miner an aiohttp request was addressed to."""
    return request[MINER_KEY]


@dataclass(frozen=True)
class ModelSpec:
    """One model this personality can be, with its nameplate figures."""

    name: str  # as the firmware spells it, e.g. "Antminer S19j Pro"
    nominal_ths: float
    nominal_w: float
    boards: int
    chips_per_board: int
    fans: int
    firmware_version: str
    extra: tuple[tuple[str, Any], ...] = ()

    def option(self, key: str, default: Any = None) -> Any:
        return dict(self.extra).get(key, default)


@dataclass(frozen=True)
class MinerIdentity:
    """The identifiers a personality mints for a new virtual miner."""

    serial: str
    mac: str
    hostname: str
    control_board_serial: str
    psu_serial: str
    board_serials: tuple[str, ...]


class Personality(ABC):
    """How one firmware family looks from the network."""

    name: ClassVar[str]
    """Short name used in ``--mix`` (e.g. ``antminer``)."""
    make: ClassVar[str]
    firmware: ClassVar[str]
    models: ClassVar[tuple[ModelSpec, ...]]
    rpc_ports: ClassVar[tuple[int, ...]] = (4028,)
    web_ports: ClassVar[tuple[int, ...]] = ()
    rpc_nul_terminated: ClassVar[bool] = True
    default_credentials: ClassVar[Credentials] = Credentials()

    # --- building a miner ---------------------------------------------------------------------

    @abstractmethod
    def new_identity(self, rng: random.Random, model: ModelSpec) -> MinerIdentity:
        """Serial, MAC and board serials in this vendor's real formats."""

    def new_miner(
        self,
        rng: random.Random,
        ip: str,
        model: ModelSpec,
        pools: list[Pool],
        now: float,
    ) -> MinerState:
        identity = self.new_identity(rng, model)
        per_board = round(model.nominal_ths / model.boards, 3)
        creds = self.default_credentials
        return MinerState(
            ip=ip,
            personality=self.name,
            make=self.make,
            model=model.name,
            firmware=self.firmware,
            firmware_version=model.firmware_version,
            serial=identity.serial,
            mac=identity.mac,
            hostname=identity.hostname,
            control_board_serial=identity.control_board_serial,
            psu_serial=identity.psu_serial,
            hashboards=[
                Hashboard(index=i, serial=s, chips=model.chips_per_board, nominal_ths=per_board)
                for i, s in enumerate(identity.board_serials)
            ],
            pools=[Pool(p.url, p.user, p.password) for p in pools],
            nominal_ths=model.nominal_ths,
            nominal_w=model.nominal_w,
            fan_count=model.fans,
            seed=rng.getrandbits(32),
            booted_at=now - rng.randint(3_600, 40 * 86_400),
            credentials=Credentials(creds.web_user, creds.web_password, creds.api_password),
        )

    def model_named(self, name: str) -> ModelSpec:
        for model in self.models:
            if model.name == name:
                return model
        raise KeyError(name)

    # --- serving ---------------------------------------------------------------------------------

    def handle_rpc(self, miner: MinerState, request: bytes, port: int, now: float) -> RpcReply:
        """Answer one request received on an RPC port (default: cgminer JSON)."""
        try:
            payload = json.loads(request.rstrip(b"\x00\r\n ").decode("utf-8", "replace"))
        except ValueError:
            return self.error_reply(23, "Invalid JSON", now)
        if not isinstance(payload, dict):
            return self.error_reply(23, "Invalid JSON", now)
        return self.handle_rpc_json(miner, payload, port, now)

    def handle_rpc_json(
        self, miner: MinerState, payload: dict[str, Any], port: int, now: float
    ) -> RpcReply:
        """Answer a decoded JSON RPC request; the default speaks cgminer with ``+`` joins."""
        command = str(payload.get("command", payload.get("cmd", "")))
        parameter = payload.get("parameter")
        if "+" in command:
            return self.multi_reply(miner, command, payload, now)
        return self.dispatch_command(miner, command, parameter, payload, now)

    def multi_reply(
        self, miner: MinerState, command: str, payload: dict[str, Any], now: float
    ) -> RpcReply:
        """cgminer multi-command: each member's full reply wrapped in a 1-element list."""
        reply: dict[str, Any] = {}
        for member in dict.fromkeys(c for c in command.split("+") if c):
            result = self.dispatch_command(miner, member, None, payload, now)
            if isinstance(result, dict):
                reply[member] = [result]
        reply["id"] = 1
        return reply

    def dispatch_command(
        self,
        miner: MinerState,
        command: str,
        parameter: Any,
        payload: dict[str, Any],
        now: float,
    ) -> RpcReply:
        """Dispatch a single command to ``rpc_<command>``; unknown commands get code 14."""
        handler: Callable[..., RpcReply] | None = (
            getattr(self, f"rpc_{command}", None) if command.isidentifier() else None
        )
        if handler is None:
            miner.log(now, "rpc", command or "?", detail="invalid command")
            return self.error_reply(14, "Invalid command", now)
        miner.log(now, "rpc", command)
        return handler(miner, parameter, payload, now)

    def description(self, miner: MinerState) -> str:
        return "cgminer 1.0.0"

    def status_entry(
        self, miner: MinerState, code: int, msg: str, now: float, status: str = "S"
    ) -> dict[str, Any]:
        return {
            "STATUS": status,
            "When": int(now),
            "Code": code,
            "Msg": msg,
            "Description": self.description(miner),
        }

    def ok_reply(
        self,
        miner: MinerState,
        code: int,
        msg: str,
        section: str,
        rows: list[dict[str, Any]],
        now: float,
    ) -> dict[str, Any]:
        return {"STATUS": [self.status_entry(miner, code, msg, now)], section: rows, "id": 1}

    def error_reply(self, code: int, msg: str, now: float) -> dict[str, Any]:
        return {
            "STATUS": [
                {
                    "STATUS": "E",
                    "When": int(now),
                    "Code": code,
                    "Msg": msg,
                    "Description": "cgminer 1.0.0",
                }
            ],
            "id": 1,
        }

    def web_routes(self) -> list[web.RouteDef]:
        """aiohttp routes for the web ports; handlers find their miner with :func:`miner_of`."""
        return []

    # --- helpers for subclasses ------------------------------------------------------------------

    @staticmethod
    def clock() -> float:
        return time.time()


def random_alnum(rng: random.Random, length: int, alphabet: str | None = None) -> str:
    chars = alphabet or (string.ascii_uppercase + string.digits)
    return "".join(rng.choice(chars) for _ in range(length))


def random_mac(rng: random.Random, oui: str, sep: str = ":", upper: bool = True) -> str:
    tail = [f"{rng.randrange(256):02x}" for _ in range(3)]
    octets = oui.lower().split(":") + tail
    text = sep.join(octets)
    return text.upper() if upper else text
