"""The error a malformed profile file raises.

It lives here, not in ``agent.errors``, so the profiles import nothing from the agent (the
layering contract in ``pyproject.toml``); ``agent.errors`` re-exports it under the agent's tree.
"""

from __future__ import annotations


class ProfileError(Exception):
    """A firmware profile file is malformed; the message names the file and the field."""
