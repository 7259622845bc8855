"""No request can make a 500: a bounded schemathesis run over the whole OpenAPI (issue 10).

Every operation of the controller's OpenAPI gets generated requests, valid and invalid by the
schema, sent as each role, as an agent and anonymously, to the app in-process over a real
SQLite or PostgreSQL database holding a small fleet. The bar is zero 5xx; the case count is
printed so CI's log shows how much was tried. ``ASICFLEET_FUZZ_EXAMPLES`` raises the number of
examples per operation and mode for a longer run; ``ASICFLEET_FUZZ_RANDOM=1`` draws new cases.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from controller.models import Agent, ApiToken, Machine, Role, User
from tests.controller.conftest import UserFactory
from tests.controller.test_platform import _populate

EXAMPLES = int(os.environ.get("ASICFLEET_FUZZ_EXAMPLES", "15"))
# CI tries the same cases every run (a red run is a real 5xx, not bad luck); set
# ASICFLEET_FUZZ_RANDOM=1 to explore new ones.
DERANDOMIZE = os.environ.get("ASICFLEET_FUZZ_RANDOM") != "1"


@dataclass
class Tally:
    cases: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)


def _restore_identities(engine: Engine) -> None:
    """Undo what earlier cases did to the callers (an admin revoking its own token, an agent
    disabled), so every case runs as who it says."""
    with engine.begin() as conn:
        conn.execute(update(ApiToken).values(revoked=False))
        conn.execute(update(User).values(disabled=False))
        conn.execute(update(Agent).values(disabled=False))


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_no_request_makes_a_5xx(
    app_client: TestClient,
    engine: Engine,
    make_user: UserFactory,
    backend: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    agent_secret = _populate(engine)
    identities: dict[str, dict[str, str]] = {"anonymous": {}, "agent": _bearer(agent_secret)}
    for role in Role:
        identities[role.value] = make_user(role).headers
    with Session(engine) as session:
        machine_id = session.exec(select(Machine.machine_id)).first()
    # Half the cases name things that exist, so they get past the 404s into the real work.
    known = {
        "name": "alpha",
        "machine_id": machine_id,
        "agent_id": "a1",
        "alert_id": 1,
        "version": 1,
        "exemption_id": 1,
        "token_id": 1,
    }
    schema = schemathesis.openapi.from_asgi("/openapi.json", app_client.app)
    tally = Tally()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 40  # the whole API, not a corner of it

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            existing = {k: known[k] for k in re.findall(r"{(\w+)}", operation.path) if k in known}
            cases = operation.as_strategy(generation_mode=mode)
            if existing:
                pinned = operation.as_strategy(generation_mode=mode, path_parameters=existing)
                cases = st.one_of(cases, pinned)

            @given(
                case=cases,
                who=st.sampled_from(sorted(identities)),
            )
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=DERANDOMIZE,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck),
            )
            def run(case: schemathesis.Case, who: str) -> None:
                _restore_identities(engine)
                tally.cases += 1
                try:
                    response = case.call(headers=identities[who])
                except Exception as exc:  # the in-process app raised: a 500 over HTTP
                    status, text = 500, f"{type(exc).__name__}: {exc}"
                else:
                    status, text = response.status_code, response.text
                tally.by_status[status] += 1
                if status >= 500:
                    tally.server_errors.append(
                        f"{status} {case.method} {case.formatted_path} as {who}: "
                        f"query={case.query!r} body={str(case.body)[:200]!r} -> {text[:400]!r}"
                    )

            try:
                run()
            except Unsatisfiable:  # nothing to get wrong (e.g. no parameters): no negative cases
                assert mode is GenerationMode.NEGATIVE, operation.label

    summary = (
        f"schemathesis on {backend}: {tally.cases} cases over {len(operations)} operations, "
        f"{len(tally.server_errors)} 5xx; statuses {dict(sorted(tally.by_status.items()))}"
    )
    with capsys.disabled():  # in CI's log, whatever the capture mode
        print(f"\n{summary}")
    assert tally.cases >= len(operations) * 2
    assert tally.server_errors == [], "\n".join(tally.server_errors)
