"""Behaviour every RPC personality shares: odd commands never crash a miner."""

from __future__ import annotations

import asyncio
import json

import pytest

from simulator import personalities
from tests.conftest import FarmFactory


async def raw(ip: str, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(ip, 4028)
    writer.write(payload)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


@pytest.mark.parametrize("name", personalities.names())
async def test_odd_commands_get_a_firmware_error_not_a_crash(farm: FarmFactory, name: str) -> None:
    shard = await farm(miners=1, mix=f"{name}=1")
    ip = next(iter(shard.miners))
    for command in ("ok", "error", "multi", "command", "__class__", "dispatch_command", "x.y"):
        reply = await raw(ip, json.dumps({"command": command}).encode())
        text = reply.rstrip(b"\x00").decode()
        assert "Internal error" not in text, (command, text)
        assert json.loads(text)
    garbage = await raw(ip, b'{"command": "summary"')  # never completed; the miner must not hang
    assert garbage == b"" or json.loads(garbage.rstrip(b"\x00"))
