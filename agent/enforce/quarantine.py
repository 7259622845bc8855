"""Which machines this agent put to sleep for quarantine, kept on disk across restarts.

Only a machine the agent itself quarantined is woken when it is claimed (an operator's own
sleep is never undone), so the agent must remember which ones those are. The record lives in
``data_dir/quarantine.json`` (mode 0600, written atomically): a restarted daemon, and the
daemon after an ``asicfleet agent enforce`` run, still wake the machines slept before. The file
is read again before every pass (when it changed), so the daemon and one-shot runs share it.

A machine is recognised by its chassis serial, else its MAC, else (neither known on either
side) its IP: an address that now holds another miner is not mistaken for the slept one.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from agent.config import atomic_write
from agent.drivers.base import normalise_mac
from agent.errors import AgentError

log = logging.getLogger(__name__)

QUARANTINE_FILE = "quarantine.json"
QUARANTINE_FILE_MODE = 0o600
FORMAT_VERSION = 1


def quarantine_path(data_dir: Path) -> Path:
    return data_dir / QUARANTINE_FILE


@dataclass(frozen=True)
class Slept:
    """One machine this agent put to sleep, as identified when it did."""

    ip: str
    serial: str | None = None
    mac: str | None = None
    machine_id: str | None = None
    at: str | None = None

    def same_machine(self, ip: str, serial: str | None, mac: str | None) -> bool:
        """Serial first (the identity), then MAC (Avalon has no serial), then the IP."""
        mine, theirs = _serial(self.serial), _serial(serial)
        if mine and theirs:
            return mine == theirs
        mine_mac, their_mac = normalise_mac(self.mac), normalise_mac(mac)
        if mine_mac and their_mac:
            return mine_mac == their_mac
        return self.ip == ip


def _serial(value: str | None) -> str | None:
    return value.strip().upper() if value and value.strip() else None


class QuarantineRecord:
    """The slept machines, in memory and (with a ``path``) on disk."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.entries: list[Slept] = []
        self._stamp: tuple[int, int, int] | None = None
        self.reload()

    def __len__(self) -> int:
        return len(self.entries)

    def holds(self, ip: str, serial: str | None, mac: str | None) -> bool:
        return any(entry.same_machine(ip, serial, mac) for entry in self.entries)

    def add(
        self,
        ip: str,
        serial: str | None,
        mac: str | None,
        machine_id: str | None,
        at: datetime,
    ) -> None:
        self.entries = [e for e in self.entries if not e.same_machine(ip, serial, mac)]
        self.entries.append(Slept(ip, serial, mac, machine_id, at.isoformat()))

    def remove(self, ip: str, serial: str | None, mac: str | None) -> None:
        self.entries = [e for e in self.entries if not e.same_machine(ip, serial, mac)]

    # --- the file -------------------------------------------------------------------------------

    def reload(self) -> None:
        """Read the file again if it changed since we last read or wrote it. A missing file is
        an empty record; an unreadable or malformed one is logged and the memory kept."""
        if self.path is None:
            return
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._stamp = None
            return
        except OSError as exc:
            log.error("%s: cannot read the quarantine record: %s", self.path, exc.strerror)
            return
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)  # each save is a new inode
        if stamp == self._stamp:
            return
        try:
            self.entries = _parse(self.path.read_bytes())
        except OSError as exc:
            log.error("%s: cannot read the quarantine record: %s", self.path, exc.strerror)
            return
        except ValueError as exc:
            log.error("%s: not a quarantine record (%s); keeping what is in memory", self.path, exc)
        self._stamp = stamp

    def save(self) -> None:
        """Write the record (atomically, 0600); a failure is logged, the memory stays."""
        if self.path is None:
            return
        doc = {"version": FORMAT_VERSION, "slept": [asdict(e) for e in self.entries]}
        try:
            atomic_write(
                self.path, (json.dumps(doc, indent=1) + "\n").encode(), QUARANTINE_FILE_MODE
            )
            st = os.stat(self.path)
        except (AgentError, OSError) as exc:
            log.error("cannot store the quarantine record: %s", exc)
            return
        self._stamp = (st.st_ino, st.st_mtime_ns, st.st_size)


def _parse(raw: bytes) -> list[Slept]:
    try:
        doc: Any = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("slept"), list):
        raise ValueError("expected an object with a 'slept' list")
    entries = []
    for item in doc["slept"]:
        if not isinstance(item, dict) or not isinstance(item.get("ip"), str):
            raise ValueError("every entry needs an 'ip'")
        entries.append(
            Slept(
                ip=item["ip"],
                serial=_text(item.get("serial")),
                mac=_text(item.get("mac")),
                machine_id=_text(item.get("machine_id")),
                at=_text(item.get("at")),
            )
        )
    return entries


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None
