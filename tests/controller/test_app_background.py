"""What the running app does by itself: the missing-machine sweep and the body-size limit."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from controller.app import create_app
from controller.models import LifecycleState, Machine, RegisterEvent
from controller.settings import Settings
from tests.controller.conftest import TestUser


def test_running_app_flags_registered_machines_unseen_too_long(
    settings: Settings, engine: Engine
) -> None:
    stale = datetime.now(UTC) - timedelta(hours=2)
    with Session(engine) as session:
        session.add(
            Machine(mac="AA:BB:CC:00:00:01", lifecycle_state=LifecycleState.ACTIVE, last_seen=stale)
        )
        session.add(
            Machine(mac="AA:BB:CC:00:00:02", lifecycle_state=LifecycleState.ACTIVE,
                    last_seen=datetime.now(UTC))
        )  # fmt: skip
        session.commit()
    quick = settings.model_copy(update={"missing_sweep_interval_s": 0.2})
    with TestClient(create_app(quick, engine)):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with Session(engine) as session:
                events = session.exec(
                    select(RegisterEvent).where(RegisterEvent.kind == "machine_missing")
                ).all()
            if events:
                break
            time.sleep(0.2)
    assert len(events) == 1
    with Session(engine) as session:
        flagged = session.get(Machine, events[0].machine_pk)
        assert flagged is not None and flagged.mac == "AA:BB:CC:00:00:01"


def test_oversized_bodies_are_refused_before_reading(
    settings: Settings, engine: Engine, admin: TestUser
) -> None:
    small = settings.model_copy(update={"max_batch_bytes": 2048})
    with TestClient(create_app(small, engine)) as client:
        response = client.post(
            "/api/v1/agent/reports", content=b"{" + b" " * 4096 + b"}", headers=admin.headers
        )
    assert response.status_code == 413
    assert "2048 bytes" in response.json()["detail"]
