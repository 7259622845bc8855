"""Fault injection: parsing ``--faults`` specs and applying faults to a miner's state.

Transport faults (blackhole, slow, malformed …) only need the flag in ``miner.faults``;
the transports read it. State faults (password changed, MAC change …) also change the
true state here, and remember what they replaced so that clearing restores it.
"""

from __future__ import annotations

import random
from typing import Any

from simulator.errors import FarmSpecError
from simulator.state import Fault, MinerState, Pool

FOREIGN_POOL = {
    "url": "stratum+tcp://pool.hijack.example:3333",
    "user": "bc1qhj4ck3r7wq0v9l3x5m2k8p6d4f0s9a7e2r5t.rig",
    "password": "x",
}
CHANGED_PASSWORD = "s3cr3t-changed"
HOSTILE_FIELDS = (
    "serial", "hostname", "model", "firmware_version", "mac", "control_board_serial",
    "psu_serial", "hashboard_serial", "worker", "pool_url",
)  # fmt: skip
"""Where ``hostile_strings`` can put a hostile value (worker and pool_url: the first slot)."""
DEFAULT_HOSTILE = {"field": "serial", "value": "S" * 300}


def parse_fault_spec(spec: str) -> dict[Fault, float]:
    """``"blackhole=1%,malware=2%,offline=3"`` -> fraction (<1) or count (>=1) per fault."""
    result: dict[Fault, float] = {}
    if not spec.strip():
        return result
    for item in spec.split(","):
        name, sep, amount = item.strip().partition("=")
        try:
            fault = Fault(name.strip().replace("-", "_"))
        except ValueError:
            known = ", ".join(f.value for f in Fault)
            raise FarmSpecError(f"unknown fault {name.strip()!r} (known: {known})") from None
        if not sep:
            raise FarmSpecError(f"fault {name!r} needs an amount, e.g. {name}=1% or {name}=5")
        amount = amount.strip()
        try:
            value = float(amount[:-1]) / 100 if amount.endswith("%") else float(amount)
        except ValueError:
            raise FarmSpecError(f"bad amount {amount!r} for fault {name!r}") from None
        if value < 0 or (amount.endswith("%") and value > 1):
            raise FarmSpecError(f"amount for fault {name!r} must be 0-100% or a count")
        if not amount.endswith("%") and value != int(value):
            raise FarmSpecError(f"count for fault {name!r} must be a whole number")
        result[fault] = value
    return result


def default_params(fault: Fault, rng: random.Random, miner: MinerState) -> dict[str, Any]:
    """Sensible parameters for a fault injected at start with no further detail."""
    if fault is Fault.SLOW:
        return {"seconds": 2.5}
    if fault is Fault.FLAPPING:
        return {"period": 20.0}
    if fault is Fault.MALWARE:
        return {"delay": 30.0, "pools": [FOREIGN_POOL]}
    if fault is Fault.HIDDEN_POOL:
        return {"pool": FOREIGN_POOL}
    if fault is Fault.DEAD_HASHBOARD:
        return {"board": rng.randrange(max(1, len(miner.hashboards)))}
    if fault is Fault.HOSTILE_STRINGS:
        return dict(DEFAULT_HOSTILE)
    return {}


def inject(miner: MinerState, fault: Fault, params: dict[str, Any], now: float) -> None:
    """Give ``miner`` the fault; state faults change the true state too."""
    params = dict(params)
    if fault in miner.faults:
        clear(miner, fault, now)
    if fault is Fault.FLAPPING:
        params.setdefault("period", 20.0)
        params.setdefault("since", now)
    elif fault is Fault.MALWARE:
        params.setdefault("delay", 30.0)
        params.setdefault("pools", [FOREIGN_POOL])
        _check_pools(params["pools"])
    elif fault is Fault.HIDDEN_POOL:
        params.setdefault("pool", FOREIGN_POOL)
        _check_pools([params["pool"]])
    elif fault is Fault.DEAD_HASHBOARD:
        board = int(params.setdefault("board", 0))
        if not 0 <= board < len(miner.hashboards):
            raise FarmSpecError(f"{miner.ip} has no hashboard {board}")
    elif fault is Fault.PASSWORD_CHANGED:
        new = str(params.setdefault("password", CHANGED_PASSWORD))
        params["_saved"] = {
            "web_password": miner.credentials.web_password,
            "api_password": miner.credentials.api_password,
        }
        miner.credentials.web_password = new
        miner.credentials.api_password = new
    elif fault is Fault.DUPLICATE_SERIAL:
        if "serial" not in params:
            raise FarmSpecError('duplicate_serial needs the serial to clone: {"serial": "…"}')
        params["_saved"] = miner.serial
        miner.serial = str(params["serial"])
    elif fault is Fault.MAC_CHANGE:
        rng = random.Random(f"{miner.seed}:mac:{now}")
        new_mac = str(params.get("mac") or _new_mac_like(miner.mac, rng))
        params["_saved"] = {"mac": miner.mac, "control_board_serial": miner.control_board_serial}
        params["mac"] = new_mac
        miner.mac = new_mac
        miner.control_board_serial = str(
            params.get("control_board_serial") or _new_serial_like(miner.control_board_serial, rng)
        )
        params["control_board_serial"] = miner.control_board_serial
    elif fault is Fault.HOSTILE_STRINGS:
        params.setdefault("field", DEFAULT_HOSTILE["field"])
        params.setdefault("value", DEFAULT_HOSTILE["value"])
        field, value = params["field"], params["value"]
        if field not in HOSTILE_FIELDS or not isinstance(value, str):
            raise FarmSpecError(
                f'hostile_strings needs {{"field": one of {", ".join(HOSTILE_FIELDS)}, '
                '"value": "…"}'
            )
        params["_saved"] = _hostile_field(miner, field)
        _set_hostile_field(miner, field, value)
    miner.faults[fault] = params
    miner.log(now, "control", "fault", detail=f"injected {fault}")


def clear(miner: MinerState, fault: Fault | None, now: float) -> None:
    """Remove one fault (or all with ``None``), restoring what a state fault replaced."""
    targets = list(miner.faults) if fault is None else [fault]
    for target in targets:
        params = miner.faults.pop(target, None)
        if params is None:
            continue
        saved = params.get("_saved")
        if target is Fault.PASSWORD_CHANGED and isinstance(saved, dict):
            miner.credentials.web_password = saved["web_password"]
            miner.credentials.api_password = saved["api_password"]
        elif target is Fault.DUPLICATE_SERIAL and isinstance(saved, str):
            miner.serial = saved
        elif target is Fault.MAC_CHANGE and isinstance(saved, dict):
            miner.mac = saved["mac"]
            miner.control_board_serial = saved["control_board_serial"]
        elif target is Fault.MALWARE:
            miner.malware_revert_at = None
        elif target is Fault.WRITE_AFTER_REBOOT:
            miner.pending_pools = None
        elif target is Fault.HOSTILE_STRINGS and isinstance(saved, str):
            _set_hostile_field(miner, str(params["field"]), saved)
        miner.log(now, "control", "fault", detail=f"cleared {target}")


def _hostile_field(miner: MinerState, field: str) -> str:
    if field == "hashboard_serial":
        return miner.hashboards[0].serial if miner.hashboards else ""
    if field in ("worker", "pool_url"):
        pool = miner.pools[0] if miner.pools else Pool("", "")
        return pool.user if field == "worker" else pool.url
    return str(getattr(miner, field))


def _set_hostile_field(miner: MinerState, field: str, value: str) -> None:
    """Put ``value`` where the firmware reports ``field`` (the personalities render it as is;
    JSON carries a lone surrogate or NUL as a ``\\uXXXX`` escape, as a hostile miner would)."""
    if field == "hashboard_serial":
        if miner.hashboards:
            miner.hashboards[0].serial = value
    elif field in ("worker", "pool_url"):
        if not miner.pools:
            miner.pools = [Pool("", "")]
        if field == "worker":
            miner.pools[0].user = value
        else:
            miner.pools[0].url = value
    else:
        setattr(miner, field, value)


def _check_pools(pools: Any) -> None:
    if not isinstance(pools, list) or not all(
        isinstance(p, dict) and isinstance(p.get("url"), str) and isinstance(p.get("user"), str)
        for p in pools
    ):
        raise FarmSpecError('pools must be a list of {"url": …, "user": …, "password": …}')
    for p in pools:
        Pool(url=p["url"], user=p["user"], password=str(p.get("password", "x")))


def _new_mac_like(mac: str, rng: random.Random) -> str:
    sep = ":" if ":" in mac else ""
    raw = mac.replace(":", "")
    tail = "".join(f"{rng.randrange(256):02x}" for _ in range(3))
    tail = tail.upper() if raw.isupper() else tail
    new = raw[:6] + tail
    return sep.join(new[i : i + 2] for i in range(0, 12, 2)) if sep else new


def _new_serial_like(serial: str, rng: random.Random) -> str:
    alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"
    if not serial:
        return "".join(rng.choice(alphabet) for _ in range(16))
    keep = len(serial) // 2
    return serial[:keep] + "".join(rng.choice(alphabet) for _ in range(len(serial) - keep))
