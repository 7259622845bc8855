"""The worker-name rule: a site's template over a machine's facts yields one worker per machine.

Pure and shared: the policy bundle, the compliance evidence and the exports all need the same
answer to "what should this machine's pool user be?".
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from functools import lru_cache

DEFAULT_TEMPLATE = "{account}.{machine_id}"
FIELDS = ("account", "machine_id", "serial", "site", "rack", "container", "shelf", "slot")
_UNSAFE = re.compile(r"[^A-Za-z0-9._\-]")


class WorkerTemplateError(ValueError):
    """A template that cannot yield one distinct worker per machine."""


def check_template(template: str) -> str:
    """Return ``template`` if it is usable; say exactly what is wrong otherwise."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise WorkerTemplateError(f"worker template {template!r}: {exc}") from None
    unknown = sorted({n for n in names if n not in FIELDS})
    if unknown:
        raise WorkerTemplateError(
            f"worker template {template!r}: unknown field(s) {', '.join(unknown)}; "
            f"use {', '.join('{' + f + '}' for f in FIELDS)}"
        )
    if "machine_id" not in names and "serial" not in names:
        raise WorkerTemplateError(
            f"worker template {template!r} must contain {{machine_id}} or {{serial}} "
            "so that every machine gets its own worker"
        )
    if not template.startswith("{account}") or template[len("{account}") :][:1] not in (
        ".",
        "_",
        "-",
    ):
        raise WorkerTemplateError(
            f"worker template {template!r} must start with {{account}} and a separator "
            "(e.g. {account}.{machine_id}): the approved pool set's account, which a second "
            "person approved, decides whose account the hashrate is credited to"
        )
    if len(template) > 200:
        raise WorkerTemplateError("worker template is longer than 200 characters")
    return template


def worker_facts(
    *,
    account: str | None,
    site: str | None,
    machine_id: str | None,
    reported_serial: str | None,
    label_serial: str | None,
    rack: str | None = None,
    container: str | None = None,
    shelf: str | None = None,
    slot: str | None = None,
) -> dict[str, str | None]:
    """What a template may use, the same for the bundle, the evidence and the exports. The
    serial is the one the miner reports (what the agent matches and the evidence reads back);
    the label serial stands in only when the miner reports none."""
    return {
        "account": account,
        "machine_id": machine_id,
        "serial": reported_serial or label_serial,
        "site": site,
        "rack": rack,
        "container": container,
        "shelf": shelf,
        "slot": slot,
    }


def render_worker(template: str, facts: Mapping[str, str | None]) -> str:
    """The worker for one machine. Characters a stratum user cannot carry become ``_``; a
    missing fact renders as ``x``, except an unreadable serial, which falls back to the
    machine id so that workers stay one per machine (Avalon keeps its serial on the label)."""
    values: dict[str, str] = {}
    for name in _used_fields(template):  # only these: exports render 10^5 workers at once
        if name == "account":
            values[name] = (facts.get("account") or "").strip() or "x"
            continue
        value = facts.get(name)
        if name == "serial" and not (value or "").strip():
            value = facts.get("machine_id")
        values[name] = _UNSAFE.sub("_", (value or "x").strip() or "x")
    return template.format_map(values)


@lru_cache(maxsize=256)
def _used_fields(template: str) -> tuple[str, ...]:
    """The fields of :data:`FIELDS` that ``template`` names (an unknown one stays missing, so
    ``format_map`` fails on it as it always did)."""
    try:
        parsed = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    except ValueError:
        return FIELDS
    used = {re.split(r"[.\[]", name, maxsplit=1)[0] for name in parsed}
    return tuple(name for name in FIELDS if name in used)
