"""Who made a change, for the audit log, whether it came through the API or the CLI.

Services take an :class:`Actor` rather than an API ``Principal`` so that the CLI and the API
call the same functions. ``controller.api.deps.Principal`` satisfies the protocol as it is.
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from typing import Any, Protocol

from sqlmodel import Session

from controller import audit


class Actor(Protocol):
    """Anything with a name, a kind (user, agent, system) and a source (address or 'cli')."""

    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> str: ...

    @property
    def source(self) -> str: ...


@dataclass(frozen=True)
class ConsoleActor:
    """The operating-system account at the console, audited as ``cli:<os user>``: only for the
    first admin of an empty controller (every other CLI write acts as a named user,
    :mod:`controller.cli.identity`), and for the demo's own seeding."""

    name: str
    kind: str = "user"
    source: str = "cli"


def cli_actor() -> ConsoleActor:
    """The operating-system user running the CLI (falls back to the uid when it has no name)."""
    try:  # the account of the process, not $USER/$LOGNAME, which anyone can set
        who = pwd.getpwuid(os.getuid()).pw_name
    except (KeyError, OSError):
        who = f"uid{os.getuid()}"
    return ConsoleActor(name=f"cli:{who}")


def record(
    session: Session,
    actor: Actor,
    *,
    action: str,
    entity: str,
    entity_id: str = "",
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    reason: str = "",
) -> None:
    """Append an audit entry for ``actor`` in the session's transaction."""
    audit.record(
        session,
        actor=actor.name,
        actor_kind=actor.kind,
        action=action,
        entity=entity,
        entity_id=entity_id,
        before=before,
        after=after,
        source=actor.source,
        reason=reason,
    )
