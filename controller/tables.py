"""SQLAlchemy Core handles of the tables that bulk paths (ingest, evidence, exports) use.

One definition, so that every module speaks of the same table by the same name; the ORM models
stay in :mod:`controller.models`.
"""

from __future__ import annotations

from sqlalchemy import Table

from controller.models import (
    Agent,
    ComplianceInterval,
    DriftIncident,
    Exemption,
    IngestedBatch,
    LatestObservation,
    Machine,
    MachineStateChange,
    MachineVersion,
    ObservationHistory,
    ObservationSum,
    PoolSet,
    RegisterEvent,
    Segment,
    Site,
    SitePolicy,
)

AGENT: Table = Agent.__table__  # type: ignore[attr-defined]
INTERVAL: Table = ComplianceInterval.__table__  # type: ignore[attr-defined]
INCIDENT: Table = DriftIncident.__table__  # type: ignore[attr-defined]
EXEMPTION: Table = Exemption.__table__  # type: ignore[attr-defined]
BATCH: Table = IngestedBatch.__table__  # type: ignore[attr-defined]
LATEST: Table = LatestObservation.__table__  # type: ignore[attr-defined]
MACHINE: Table = Machine.__table__  # type: ignore[attr-defined]
STATE_CHANGE: Table = MachineStateChange.__table__  # type: ignore[attr-defined]
VERSION: Table = MachineVersion.__table__  # type: ignore[attr-defined]
HISTORY: Table = ObservationHistory.__table__  # type: ignore[attr-defined]
SUM: Table = ObservationSum.__table__  # type: ignore[attr-defined]
POOL_SET: Table = PoolSet.__table__  # type: ignore[attr-defined]
EVENT: Table = RegisterEvent.__table__  # type: ignore[attr-defined]
SEGMENT: Table = Segment.__table__  # type: ignore[attr-defined]
SITE: Table = Site.__table__  # type: ignore[attr-defined]
SITE_POLICY: Table = SitePolicy.__table__  # type: ignore[attr-defined]
