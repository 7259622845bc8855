"""The firmware personalities the simulator can play, by their ``--mix`` name.

Each personality lives in its own module and exposes a module-level ``PERSONALITY``.
Adding a firmware family means adding one module and one line to ``_MODULES``.
"""

from __future__ import annotations

import importlib
from functools import cache

from simulator.errors import FarmSpecError
from simulator.personalities.base import Personality

_MODULES: dict[str, str] = {
    "antminer": "simulator.personalities.antminer",
    "whatsminer": "simulator.personalities.whatsminer",
    "avalon": "simulator.personalities.avalon",
    "vnish": "simulator.personalities.vnish",
}


def names() -> list[str]:
    """Every personality name, in a stable order."""
    return list(_MODULES)


@cache
def get(name: str) -> Personality:
    """The personality called ``name``; a clear error for an unknown one."""
    try:
        module = _MODULES[name]
    except KeyError:
        known = ", ".join(_MODULES)
        raise FarmSpecError(f"unknown personality {name!r} (known: {known})") from None
    personality: Personality = importlib.import_module(module).PERSONALITY
    return personality
