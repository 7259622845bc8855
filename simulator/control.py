"""The control API: see the farm's true state, inject faults, tamper, read request logs.

The same aiohttp application serves two places: inside each shard process (backed by the
:class:`~simulator.shard.Shard` itself) and in the supervisor (backed by a router that
forwards to the shard owning the address). Tests and demos talk only to the supervisor.

Routes (JSON in and out):

- ``GET /health``
- ``GET /miners`` (filters: ``personality``, ``fault``, ``model``)
- ``GET /miners/{ip}``
- ``PATCH /miners/{ip}`` — ``api_write_enabled``, ``web_password``, ``api_password``
- ``POST /miners/{ip}/faults`` — ``{"fault": "blackhole", "params": {...}}``
- ``DELETE /miners/{ip}/faults`` and ``DELETE /miners/{ip}/faults/{fault}``
- ``PUT /miners/{ip}/pools`` — ``{"pools": [{"url", "user", "password"}], "actor": "attacker"}``
- ``POST /miners/{ip}/reboot`` and ``POST /miners/{ip}/reset``
- ``GET /miners/{ip}/log`` and ``DELETE /miners/{ip}/log``
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web

from simulator.errors import FarmSpecError, UnknownMinerError
from simulator.state import Fault

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class FarmControl(Protocol):
    """What the control API needs from whatever holds the miners."""

    async def list_miners(self) -> list[dict[str, Any]]: ...
    async def get_miner(self, ip: str) -> dict[str, Any]: ...
    async def patch_miner(self, ip: str, changes: dict[str, Any]) -> dict[str, Any]: ...
    async def inject_fault(self, ip: str, fault: str, params: dict[str, Any]) -> dict[str, Any]: ...
    async def clear_fault(self, ip: str, fault: str | None) -> dict[str, Any]: ...
    async def tamper_pools(
        self, ip: str, pools: list[dict[str, Any]], actor: str
    ) -> dict[str, Any]: ...
    async def reboot(self, ip: str) -> dict[str, Any]: ...
    async def reset(self, ip: str) -> dict[str, Any]: ...
    async def request_log(self, ip: str) -> list[dict[str, Any]]: ...
    async def clear_log(self, ip: str) -> None: ...
    async def health(self) -> dict[str, Any]: ...


CONTROL_KEY: web.AppKey[FarmControl] = web.AppKey("control", FarmControl)


def build_control_app(control: FarmControl) -> web.Application:
    app = web.Application(middlewares=[_errors_as_json])
    app[CONTROL_KEY] = control
    app.add_routes(
        [
            web.get("/health", _health),
            web.get("/miners", _list),
            web.get("/miners/{ip}", _get),
            web.patch("/miners/{ip}", _patch),
            web.post("/miners/{ip}/faults", _inject),
            web.delete("/miners/{ip}/faults", _clear_all),
            web.delete("/miners/{ip}/faults/{fault}", _clear_one),
            web.put("/miners/{ip}/pools", _tamper),
            web.post("/miners/{ip}/reboot", _reboot),
            web.post("/miners/{ip}/reset", _reset),
            web.get("/miners/{ip}/log", _log),
            web.delete("/miners/{ip}/log", _clear_log),
        ]
    )
    return app


def parse_fault(name: str) -> Fault:
    try:
        return Fault(name.replace("-", "_"))
    except ValueError:
        known = ", ".join(f.value for f in Fault)
        raise FarmSpecError(f"unknown fault {name!r} (known: {known})") from None


@web.middleware
async def _errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except UnknownMinerError as exc:
        return web.json_response({"error": str(exc)}, status=404)
    except FarmSpecError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    except web.HTTPException as exc:
        if exc.status >= 400:
            return web.json_response({"error": exc.reason}, status=exc.status)
        raise


def _control(request: web.Request) -> FarmControl:
    return request.app[CONTROL_KEY]


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise FarmSpecError("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise FarmSpecError("request body must be a JSON object")
    return body


async def _health(request: web.Request) -> web.Response:
    return web.json_response(await _control(request).health())


async def _list(request: web.Request) -> web.Response:
    miners = await _control(request).list_miners()
    query = request.query
    if "personality" in query:
        miners = [m for m in miners if m["personality"] == query["personality"]]
    if "model" in query:
        miners = [m for m in miners if m["model"] == query["model"]]
    if "fault" in query:
        wanted = parse_fault(query["fault"]).value
        miners = [m for m in miners if wanted in m["faults"]]
    return web.json_response(miners)


async def _get(request: web.Request) -> web.Response:
    return web.json_response(await _control(request).get_miner(request.match_info["ip"]))


async def _patch(request: web.Request) -> web.Response:
    body = await _body(request)
    allowed = {"api_write_enabled", "web_password", "api_password"}
    unknown = set(body) - allowed
    if unknown:
        raise FarmSpecError(
            f"cannot change {', '.join(sorted(unknown))}; allowed: {sorted(allowed)}"
        )
    if "api_write_enabled" in body and not isinstance(body["api_write_enabled"], bool):
        raise FarmSpecError("api_write_enabled must be true or false")
    for key in ("web_password", "api_password"):
        if key in body and not isinstance(body[key], str):
            raise FarmSpecError(f"{key} must be a string")
    result = await _control(request).patch_miner(request.match_info["ip"], body)
    return web.json_response(result)


async def _inject(request: web.Request) -> web.Response:
    body = await _body(request)
    fault = parse_fault(str(body.get("fault", "")))
    params = body.get("params", {})
    if not isinstance(params, dict):
        raise FarmSpecError("params must be a JSON object")
    result = await _control(request).inject_fault(request.match_info["ip"], fault.value, params)
    return web.json_response(result)


async def _clear_all(request: web.Request) -> web.Response:
    return web.json_response(await _control(request).clear_fault(request.match_info["ip"], None))


async def _clear_one(request: web.Request) -> web.Response:
    fault = parse_fault(request.match_info["fault"])
    result = await _control(request).clear_fault(request.match_info["ip"], fault.value)
    return web.json_response(result)


async def _tamper(request: web.Request) -> web.Response:
    body = await _body(request)
    pools = body.get("pools")
    if not isinstance(pools, list) or not pools or len(pools) > 8:
        raise FarmSpecError('pools must be a list of 1-8 {"url", "user", "password"} objects')
    for pool in pools:
        if (
            not isinstance(pool, dict)
            or not isinstance(pool.get("url"), str)
            or not isinstance(pool.get("user"), str)
        ):
            raise FarmSpecError('each pool needs string "url" and "user"')
    actor = str(body.get("actor", "attacker"))
    result = await _control(request).tamper_pools(request.match_info["ip"], pools, actor)
    return web.json_response(result)


async def _reboot(request: web.Request) -> web.Response:
    return web.json_response(await _control(request).reboot(request.match_info["ip"]))


async def _reset(request: web.Request) -> web.Response:
    return web.json_response(await _control(request).reset(request.match_info["ip"]))


async def _log(request: web.Request) -> web.Response:
    return web.json_response(await _control(request).request_log(request.match_info["ip"]))


async def _clear_log(request: web.Request) -> web.Response:
    await _control(request).clear_log(request.match_info["ip"])
    return web.json_response({"cleared": True})
