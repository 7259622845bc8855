"""The HTTP transport: one aiohttp application per personality, shared by all its miners.

Each miner gets its own listening socket on its own loopback address; the application
finds the miner a request is for from the socket's local address, so ten thousand miners
share a handful of application objects. Transport faults are applied in a middleware.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from simulator.personalities.base import MINER_KEY, Personality
from simulator.state import Fault, MinerState
from simulator.transport.mangle import mangle, reply_delay
from simulator.transport.rpc import BLACKHOLE_HOLD_S, Lookup

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_web_app(personality: Personality, lookup: Lookup) -> web.Application:
    """The aiohttp application serving ``personality``'s web API for every miner."""

    @web.middleware
    async def resolve_miner(request: web.Request, handler: Handler) -> web.StreamResponse:
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        target = lookup(sockname[0]) if sockname else None
        if target is None:
            raise web.HTTPNotFound()
        miner = target[0]
        if Fault.BLACKHOLE in miner.faults:
            await asyncio.sleep(BLACKHOLE_HOLD_S)
            raise web.HTTPServiceUnavailable()
        now = time.time()
        miner.tick(now)
        miner.log(now, "http", f"{request.method} {request.path}")
        request[MINER_KEY] = miner
        delay = reply_delay(miner)
        if delay > 0:
            await asyncio.sleep(delay)
        response = await handler(request)
        return _apply_body_faults(miner, response)

    app = web.Application(middlewares=[resolve_miner], client_max_size=1024 * 1024)
    app.add_routes(personality.web_routes())
    return app


def _apply_body_faults(miner: MinerState, response: web.StreamResponse) -> web.StreamResponse:
    if not isinstance(response, web.Response) or not isinstance(response.body, bytes):
        return response
    if not ({Fault.MALFORMED, Fault.TRUNCATED, Fault.OVERSIZED} & miner.faults.keys()):
        return response
    mangled = web.Response(
        body=mangle(miner, response.body),
        status=response.status,
        content_type=response.content_type,
    )
    for key, value in response.headers.items():
        if key.lower() not in {"content-length", "content-type"}:
            mangled.headers[key] = value
    return mangled


async def start_web_runner(app: web.Application) -> web.AppRunner:
    """Set up a runner whose ``server`` is the protocol factory for every miner's socket."""
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    return runner
