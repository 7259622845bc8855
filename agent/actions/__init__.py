"""Writes to miners as journaled actions, worked apart from polling (see docs/agent.md)."""

from agent.actions.journal import Journal, JournalEntry
from agent.actions.kinds import Action, ActionKind, ActionResult, ActionState
from agent.actions.runner import ActionRunner, ActionSettings

__all__ = [
    "Action",
    "ActionKind",
    "ActionResult",
    "ActionRunner",
    "ActionSettings",
    "ActionState",
    "Journal",
    "JournalEntry",
]
