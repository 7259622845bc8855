"""The register's history: one ``machine_version`` row per machine per ``record_version``.

Whoever inserts a machine or bumps its ``record_version`` calls :func:`snapshot` in the same
transaction, after the row holds its new values. The copy is one ``INSERT … SELECT`` over
the machines named (bulk, no Python-side row handling), valid from the row's
``updated_at``. Reconstructing the register as of a moment is then "the newest version of
each machine with ``valid_from <= as_of``" (:mod:`controller.exports.register`).
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import String, cast, insert, select
from sqlalchemy.engine import Connection

from controller.tables import MACHINE, VERSION

COPIED = (
    "machine_id",
    "label_serial",
    "reported_serial",
    "control_board_serial",
    "mac",
    "vendor",
    "model",
    "firmware",
    "firmware_version",
    "hashboard_serials",
    "psu_serial",
    "site_id",
    "container",
    "rack",
    "shelf",
    "slot",
    "lifecycle_state",
    "state_since",
    "nominal_ths",
    "nominal_w",
    "current_ip",
    "serial_unconfirmed",
    "flags",
    "commissioned_at",
    "decommissioned_at",
)
"""Machine columns kept in each version (``machine_pk``, ``record_version`` and
``valid_from`` come from ``id``, ``record_version`` and ``updated_at``)."""

_CHUNK = 500  # bound parameters per statement stay well under SQLite's limit


def snapshot(conn: Connection, machine_pks: Iterable[int]) -> None:
    """Append the current state of each machine in ``machine_pks`` as a new version."""
    pks = sorted(set(machine_pks))
    for start in range(0, len(pks), _CHUNK):
        chunk = pks[start : start + _CHUNK]
        columns = [
            cast(MACHINE.c[name], String).label(name)
            if name == "lifecycle_state"
            else MACHINE.c[name]
            for name in COPIED
        ]
        source = select(
            MACHINE.c.id, MACHINE.c.record_version, MACHINE.c.updated_at, *columns
        ).where(MACHINE.c.id.in_(chunk))
        conn.execute(
            insert(VERSION).from_select(
                ["machine_pk", "record_version", "valid_from", *COPIED], source
            )
        )
