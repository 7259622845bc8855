"""The cgminer-style TCP transport (port 4028 and friends).

One request per connection: read a JSON object (no terminator; pyasic sends none), hand
it to the personality, write the reply and close — closing is what tells pyasic the reply
is complete. Transport faults (blackhole, slow, malformed, truncated, oversized) are
applied here so that every personality gets them alike.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

from simulator.personalities.base import Personality
from simulator.state import Fault, MinerState
from simulator.transport.mangle import mangle, reply_delay

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024
REQUEST_IDLE_TIMEOUT_S = 10.0
REQUEST_SETTLE_S = 0.5  # like cgminer's single recv(): an incomplete request is answered as is
BLACKHOLE_HOLD_S = 600.0

Lookup = Callable[[str], tuple[MinerState, Personality] | None]


class RpcProtocol(asyncio.Protocol):
    """Serves one TCP connection to a virtual miner's RPC port."""

    def __init__(self, lookup: Lookup, port: int) -> None:
        self._lookup = lookup
        self._port = port
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._target: tuple[MinerState, Personality] | None = None
        self._answered = False
        self._timer: asyncio.TimerHandle | None = None
        self._settle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sockname = transport.get_extra_info("sockname")
        self._target = self._lookup(sockname[0]) if sockname else None
        if self._target is None:
            transport.abort()
            return
        loop = asyncio.get_running_loop()
        miner = self._target[0]
        hold = BLACKHOLE_HOLD_S if Fault.BLACKHOLE in miner.faults else REQUEST_IDLE_TIMEOUT_S
        self._timer = loop.call_later(hold, transport.abort)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._timer, self._settle):
            if timer is not None:
                timer.cancel()

    def data_received(self, data: bytes) -> None:
        if self._answered or self._target is None:
            return
        self._buffer.extend(data)
        if len(self._buffer) > MAX_REQUEST_BYTES:
            self._respond(b'{"STATUS":[{"STATUS":"E","Code":23,"Msg":"Invalid JSON"}],"id":1}')
            return
        if self._settle is not None:
            self._settle.cancel()
        if self._complete():
            self._dispatch()
        else:
            loop = asyncio.get_running_loop()
            self._settle = loop.call_later(REQUEST_SETTLE_S, self._dispatch_if_pending)

    def _dispatch_if_pending(self) -> None:
        if not self._answered and self._target is not None and self._buffer:
            self._dispatch()

    def eof_received(self) -> bool | None:
        if not self._answered and self._target is not None and self._buffer:
            self._dispatch()
            return True  # keep the write side open until the reply is sent
        return None

    def _complete(self) -> bool:
        text = bytes(self._buffer).rstrip(b"\x00\r\n ")
        if not text.endswith(b"}"):
            return False
        try:
            json.loads(text)
        except ValueError:
            return False
        return True

    def _dispatch(self) -> None:
        assert self._target is not None
        miner, personality = self._target
        if Fault.BLACKHOLE in miner.faults:
            self._answered = True  # swallow the request; the hold timer closes eventually
            return
        now = time.time()
        miner.tick(now)
        try:
            reply = personality.handle_rpc(miner, bytes(self._buffer), self._port, now)
        except Exception:  # a bug in a personality must not kill the farm
            log.exception("personality %s failed on %s", personality.name, miner.ip)
            reply = personality.error_reply(14, "Internal error", now)
        if reply is None:
            self._answered = True
            self._close()
            return
        if isinstance(reply, dict):
            body = json.dumps(reply, separators=(",", ":")).encode()
            if personality.rpc_nul_terminated:
                body += b"\x00"
        else:
            body = reply
        body = mangle(miner, body)
        delay = reply_delay(miner)
        self._answered = True
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self._respond, body)
        else:
            self._respond(body)

    def _respond(self, body: bytes) -> None:
        self._answered = True
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(body)
        self._close()

    def _close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
