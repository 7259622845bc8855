"""The uplink against real HTTP servers on 127.0.0.1: the real controller app (enrollment,
ingestion, idempotent acks) and, for faults the controller cannot be made to produce on cue
(503 with Retry-After, a stalled or trickling answer, a garbage body), a small scripted one."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from pydantic import SecretStr
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from agent.config import apply_enrollment, load_config, load_secrets
from agent.errors import ControllerUnreachable, RejectedBatch, Unauthorized, UplinkError
from agent.outbox import Outbox
from agent.uplink import (
    Backoff,
    Uplink,
    backoff_delay,
    classify,
    enroll,
    retry_after_s,
)
from contract import BatchAck, IdentityRecord, Observation, PolicyBundle, PolicyContent, ReportBatch
from controller import enrollment, migrations, sites
from controller.actors import ConsoleActor
from controller.app import create_app
from controller.db import make_engine
from controller.settings import Settings
from tests.farmproc import free_port

SEGMENT = "127.61.0.0/24"
NOW = datetime(2026, 11, 1, tzinfo=UTC)
# Reports must be dated within the controller's window (report_max_age_days): recent polls.
POLLED = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
FAST_INITIAL_S, FAST_MAX_S = 0.01, 0.2


def fast_backoff(seed: int = 0) -> Backoff:
    return Backoff(initial_s=FAST_INITIAL_S, max_s=FAST_MAX_S, rng=random.Random(seed))


def make_batch(index: int = 0, observations: int = 2) -> ReportBatch:
    """Identities and observations of a few miners (the controller only files observations of
    machines it can place)."""
    return ReportBatch(
        batch_id=uuid.uuid4(),
        agent_clock=POLLED,
        sequence=0,
        identities=[
            IdentityRecord(
                ip=IPv4Address(f"127.61.0.{1 + k}"),
                observed_at=POLLED,
                serial=f"SN-UPLINK-{k:04d}",
                mac=f"02:00:00:00:00:{k:02x}",
                make="AntMiner",
                model="S19",
            )
            for k in range(observations)
        ],
        observations=[
            Observation(
                ip=IPv4Address(f"127.61.0.{1 + k}"),
                observed_at=POLLED + timedelta(seconds=index),
                reachable=True,
                is_mining=True,
                hashrate_ths=100.0 + index,
            )
            for k in range(observations)
        ],
    )


# --- servers -------------------------------------------------------------------------------------


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1:``port`` in a thread; stop and start at will."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.app = app
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on port {self.port} did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=15)
            assert not self._thread.is_alive(), "server did not stop"
        self._server = self._thread = None


@dataclass
class Controller:
    server: ServerThread
    engine: Engine

    @property
    def url(self) -> str:
        return self.server.url

    def token(self, segments: tuple[str, ...] = (SEGMENT,), site: str = "alpha") -> str:
        """A one-time enrollment token, made the way `asicfleet controller agent token` does."""
        actor = ConsoleActor(name="cli:test")
        with Session(self.engine, expire_on_commit=False) as session:
            if site not in sites.site_names(session).values():
                sites.create_site(session, actor, name=site, licence_number="KZ-TEST-1")
            issued = enrollment.create_token(
                session, actor, site_name=site, cidrs=list(segments), ttl=timedelta(hours=1)
            )
            session.commit()
            return issued.secret

    def ingested(self, agent_id: str) -> list[tuple[str, int]]:
        """(batch_id, sequence) of every batch the controller applied, in arrival order."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT batch_id, sequence FROM ingested_batch WHERE agent_id = :a "
                    "ORDER BY rowid"
                ),
                {"a": agent_id},
            ).all()
        return [(str(r[0]), int(r[1])) for r in rows]

    def events(self, kind: str) -> list[dict[str, Any]]:
        """The register events of ``kind`` the controller stored, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                text("SELECT severity, detail, data FROM event WHERE kind = :k ORDER BY id"),
                {"k": kind},
            ).all()
        return [
            {
                "severity": r[0],
                "detail": r[1],
                "data": r[2] if isinstance(r[2], dict) else json.loads(r[2]),
            }
            for r in rows
        ]


@pytest.fixture
def controller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Controller]:
    """The real controller app over a migrated SQLite file, served by uvicorn."""
    monkeypatch.delenv("ASICFLEET_CONFIG", raising=False)
    data_dir = tmp_path / "controller"
    data_dir.mkdir()
    url = f"sqlite:///{data_dir / 'controller.db'}"
    engine = make_engine(url)
    migrations.upgrade(engine)
    server = ServerThread(create_app(Settings(data_dir=data_dir, database_url=url), engine))
    server.start()
    try:
        yield Controller(server, engine)
    finally:
        server.stop()
        engine.dispose()


@dataclass
class Agent:
    agent_id: str
    uplink: Uplink
    outbox: Outbox


@pytest.fixture
async def agent(controller: Controller, tmp_path: Path) -> AsyncIterator[Agent]:
    """An agent enrolled with the real controller, config and secrets written to disk."""
    config_path = tmp_path / "agent" / "agent.toml"
    response = await enroll(controller.url, controller.token(), "agent-1", hostname="rack-7")
    apply_enrollment(config_path, controller.url, response)
    config = load_config(config_path)
    uplink = Uplink.from_config(config, load_secrets(config.secrets_file))
    uplink.backoff = fast_backoff(1)
    outbox = Outbox.from_config(config)
    try:
        yield Agent(response.agent_id, uplink, outbox)
    finally:
        await uplink.aclose()
        outbox.close()


# --- against the real controller -----------------------------------------------------------------


async def test_enrolled_agent_drains_its_outbox_in_order(
    controller: Controller, agent: Agent
) -> None:
    stored = [agent.outbox.put(make_batch(i)) for i in range(5)]
    report = await agent.uplink.drain(agent.outbox)
    assert report.error is None
    assert (report.delivered, report.duplicates, report.parked, report.remaining) == (5, 0, 0, 0)
    assert controller.ingested(agent.agent_id) == [(str(b.batch_id), b.sequence) for b in stored]
    assert agent.uplink.state.healthy and agent.uplink.state.last_success_at is not None


async def test_push_returns_the_controllers_ack_and_redelivery_is_a_duplicate(
    controller: Controller, agent: Agent
) -> None:
    batch = agent.outbox.put(make_batch())
    ack = await agent.uplink.push(batch)
    assert isinstance(ack, BatchAck)
    assert (ack.batch_id, ack.duplicate, ack.observations) == (batch.batch_id, False, 2)
    # The agent died before acking locally: the drain sends it again, the controller says so.
    report = await agent.uplink.drain(agent.outbox)
    assert (report.delivered, report.duplicates, report.remaining) == (1, 1, 0)
    assert controller.ingested(agent.agent_id) == [(str(batch.batch_id), batch.sequence)]


async def test_controller_down_then_back_delivers_everything_once_in_order(
    controller: Controller, agent: Agent
) -> None:
    first = [agent.outbox.put(make_batch(i)) for i in range(3)]
    assert (await agent.uplink.drain(agent.outbox)).delivered == 3

    controller.server.stop()
    during = [agent.outbox.put(make_batch(i)) for i in range(3, 10)]
    delays = []
    for attempt in range(1, 6):
        report = await agent.uplink.drain(agent.outbox)
        assert isinstance(report.error, ControllerUnreachable)
        assert report.delivered == 0 and report.remaining == 7, "batches stay in the outbox"
        assert report.retry_in_s is not None
        assert 0 <= report.retry_in_s <= min(FAST_MAX_S, FAST_INITIAL_S * 2 ** (attempt - 1))
        delays.append(report.retry_in_s)
    assert agent.uplink.state.consecutive_failures == 5
    assert "cannot reach" in (agent.uplink.state.last_error or "")

    controller.server.start()
    after = [agent.outbox.put(make_batch(i)) for i in range(10, 12)]
    report = await agent.uplink.drain(agent.outbox)
    assert report.error is None and (report.delivered, report.remaining) == (9, 0)
    assert agent.uplink.state.healthy
    everything = [(str(b.batch_id), b.sequence) for b in [*first, *during, *after]]
    assert controller.ingested(agent.agent_id) == everything


async def test_run_loop_backs_off_while_down_and_catches_up_when_back(
    controller: Controller, agent: Agent
) -> None:
    controller.server.stop()
    stored = [agent.outbox.put(make_batch(i)) for i in range(6)]
    stop, wake = asyncio.Event(), asyncio.Event()
    runner = asyncio.create_task(agent.uplink.run(agent.outbox, stop, wake=wake, idle_s=0.05))
    try:
        await _until(lambda: agent.uplink.state.consecutive_failures >= 3)
        assert agent.outbox.depth() == 6
        controller.server.start()
        await _until(lambda: agent.outbox.depth() == 0)
        late = agent.outbox.put(make_batch(99))
        wake.set()
        await _until(lambda: agent.outbox.depth() == 0)
    finally:
        stop.set()
        await asyncio.wait_for(runner, timeout=10)
    expected = [(str(b.batch_id), b.sequence) for b in [*stored, late]]
    assert controller.ingested(agent.agent_id) == expected


async def _until(condition: Any, limit_s: float = 20.0) -> None:
    """Poll ``condition`` (a bound, not a timing assertion)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_a_batch_another_agent_owns_is_parked_and_the_rest_goes_through(
    controller: Controller, agent: Agent, tmp_path: Path
) -> None:
    other = await enroll(controller.url, controller.token(("127.62.0.0/24",)), "agent-2")
    async with Uplink(controller.url, SecretStr(other.agent_secret)) as other_uplink:
        stolen = make_batch()
        await other_uplink.push(stolen)  # the other agent delivered this batch_id first

    clash = agent.outbox.put(stolen)
    good = agent.outbox.put(make_batch(1))
    report = await agent.uplink.drain(agent.outbox)
    assert report.error is None
    # The good batch, and the report of the parking queued behind it.
    assert (report.delivered, report.parked, report.remaining) == (2, 1, 0)
    [dead] = agent.outbox.dead_letters()
    assert dead.batch_id == clash.batch_id and dead.status_code == 409
    assert "another agent" in dead.reason
    delivered = controller.ingested(agent.agent_id)
    assert delivered[0] == (str(good.batch_id), good.sequence) and len(delivered) == 2
    [parked] = controller.events("batch_parked")
    assert parked["data"]["batch_id"] == str(clash.batch_id)
    assert parked["severity"] == "critical" and "another agent" in parked["detail"]


async def test_a_malformed_batch_is_rejected_with_the_field_named(agent: Agent) -> None:
    bad = ReportBatch.model_construct(
        batch_id=uuid.uuid4(), agent_clock=NOW, sequence=-1, contract_version="1.0"
    )
    with pytest.raises(RejectedBatch) as caught:
        await agent.uplink.push(bad)
    assert caught.value.status_code == 422
    assert "sequence" in str(caught.value)
    assert not caught.value.retryable


async def test_items_outside_the_segments_are_counted_not_retried(
    controller: Controller, agent: Agent
) -> None:
    batch = make_batch().model_copy(
        update={
            "observations": [
                Observation(ip=IPv4Address("127.99.0.1"), observed_at=NOW, reachable=False)
            ]
        }
    )
    agent.outbox.put(batch)
    report = await agent.uplink.drain(agent.outbox)
    assert (report.delivered, report.refused_items, report.remaining) == (1, 1, 0)


async def test_a_wrong_secret_is_unauthorized_and_backs_off_to_the_maximum(
    controller: Controller, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "afa_" + "not-the-real-one-" * 3
    with Outbox(tmp_path / "outbox.sqlite3") as outbox:
        outbox.put(make_batch())
        backoff = Backoff(initial_s=0.01, max_s=30.0, rng=random.Random(2))
        async with Uplink(controller.url, SecretStr(secret), backoff=backoff) as uplink:
            assert secret not in repr(uplink)
            report = await uplink.drain(outbox)
        assert isinstance(report.error, Unauthorized) and report.error.status_code == 401
        assert report.retry_in_s is not None and 15.0 <= report.retry_in_s <= 30.0
        assert outbox.depth() == 1, "a refused credential never costs a batch"
    assert secret not in caplog.text


async def test_enrollment_tokens_work_once(controller: Controller) -> None:
    token = controller.token()
    first = await enroll(controller.url, token, "agent-a")
    assert first.agent_secret.startswith("afa_")
    assert first.site == "alpha" and first.segments == [SEGMENT]
    with pytest.raises(Unauthorized, match=r"410.*already used"):
        await enroll(controller.url, token, "agent-b")
    with pytest.raises(Unauthorized, match="401"):
        await enroll(controller.url, "afe_" + "x" * 40, "agent-c")


async def test_enrolling_against_nothing_is_unreachable() -> None:
    with pytest.raises(ControllerUnreachable, match="cannot reach"):
        await enroll(f"http://127.0.0.1:{free_port()}", "afe_" + "x" * 40, "agent", timeout_s=2)


# --- faults on cue, from a scripted server -------------------------------------------------------


@dataclass
class Reply:
    status: int = 200
    body: bytes | None = None  # None: a correct BatchAck for the request
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    trickle: bool = False


class Scripted:
    """Answers each request with the next scripted :class:`Reply` and records what it got."""

    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.poison: dict[str, Reply] = {}  # batch_id -> its answer, every time
        self.clock_offset = timedelta(0)  # the controller's clock minus ours, for the ack
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.app = Starlette(routes=[Route("/{path:path}", self.handle, methods=["GET", "POST"])])

    async def handle(self, request: Request) -> Response:
        body = await request.body()
        self.requests.append((request.method, request.url.path, dict(request.headers), body))
        batch_id = json.loads(body).get("batch_id") if body else None
        if batch_id in self.poison:
            reply = self.poison[batch_id]
        else:
            reply = self.replies.pop(0) if self.replies else Reply()
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.trickle:

            async def drip() -> AsyncIterator[bytes]:
                for _ in range(500):
                    yield b" "
                    await asyncio.sleep(0.02)

            return StreamingResponse(drip(), media_type="application/json")
        content = reply.body
        if content is None:
            batch_id = json.loads(body)["batch_id"]
            ack = BatchAck(
                batch_id=batch_id,
                duplicate=False,
                observations=0,
                identities=0,
                events=0,
                received_at=datetime.now(UTC) + self.clock_offset,
            )
            content = ack.model_dump_json().encode()
        return Response(
            content, status_code=reply.status, headers=reply.headers, media_type="application/json"
        )


@pytest.fixture
def scripted() -> Iterator[tuple[Scripted, str]]:
    fake = Scripted()
    server = ServerThread(fake.app)
    server.start()
    try:
        yield fake, server.url
    finally:
        server.stop()


SECRET = SecretStr("afa_" + "scripted-secret-value-" * 2)


async def test_push_sends_the_bearer_secret_and_the_batch(scripted: tuple[Scripted, str]) -> None:
    fake, url = scripted
    async with Uplink(url, SECRET) as uplink:
        batch = make_batch()
        ack = await uplink.push(batch)
    assert ack.batch_id == batch.batch_id
    [(method, path, headers, body)] = fake.requests
    assert (method, path) == ("POST", "/api/v1/agent/reports")
    assert headers["authorization"] == f"Bearer {SECRET.get_secret_value()}"
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"].startswith("asicfleet-agent/")
    sent = ReportBatch.model_validate_json(body)
    assert sent.sent_at is not None  # when it was sent, so the controller can measure skew
    assert sent.model_copy(update={"sent_at": None}) == batch


@pytest.mark.parametrize(
    ("reply", "error", "retryable"),
    [
        (Reply(503, b'{"detail":"db down"}', {"Retry-After": "7"}), ControllerUnreachable, True),
        (Reply(429, b"{}"), ControllerUnreachable, True),
        (Reply(502, b"<html>bad gateway</html>"), ControllerUnreachable, True),
        (Reply(404, b'{"detail":"Not Found"}'), UplinkError, True),
        (Reply(403, b'{"detail":"requires an agent credential"}'), Unauthorized, True),
        (Reply(200, b"<html>captive portal</html>"), UplinkError, True),
        (Reply(200, b'{"batch_id":"not a uuid"}'), UplinkError, True),
        (Reply(400, b'{"detail":"bad"}'), RejectedBatch, False),
    ],
)
async def test_answers_are_classified_and_only_permanent_ones_park(
    scripted: tuple[Scripted, str], tmp_path: Path, reply: Reply, error: type, retryable: bool
) -> None:
    fake, url = scripted
    fake.replies.append(reply)
    with Outbox(tmp_path / "outbox.sqlite3") as outbox:
        batch = outbox.put(make_batch())
        async with Uplink(url, SECRET, backoff=fast_backoff()) as uplink:
            report = await uplink.drain(outbox)
        if retryable:
            assert isinstance(report.error, UplinkError) and type(report.error) is error
            assert report.error.retryable
            assert outbox.peek(5) == [batch] and report.parked == 0
        else:
            assert report.error is None and report.parked == 1
            assert outbox.depth() == 0 and outbox.dead_letters()[0].status_code == reply.status


async def test_a_redirect_is_reported_not_followed(
    scripted: tuple[Scripted, str], tmp_path: Path
) -> None:
    fake, url = scripted
    fake.replies.append(Reply(308, b"", {"Location": "https://controller.example/api/v1/x"}))
    with Outbox(tmp_path / "outbox.sqlite3") as outbox:
        batch = outbox.put(make_batch())
        async with Uplink(url, SECRET, backoff=fast_backoff()) as uplink:
            report = await uplink.drain(outbox)
        assert isinstance(report.error, UplinkError)
        assert "redirect to https://controller.example/api/v1/x" in str(report.error)
        assert outbox.peek(5) == [batch] and report.parked == 0
    assert len(fake.requests) == 1


async def test_a_mistyped_token_is_refused_before_sending_and_not_echoed(
    scripted: tuple[Scripted, str],
) -> None:
    fake, url = scripted
    with pytest.raises(UplinkError, match="enrollment: token: String should have at least") as e:
        await enroll(url, "afe_short", "agent")
    assert "afe_short" not in str(e.value)
    assert fake.requests == []


async def test_retry_after_is_honoured_up_to_the_cap(scripted: tuple[Scripted, str]) -> None:
    fake, url = scripted
    backoff = Backoff(initial_s=0.01, max_s=60.0, rng=random.Random(3))
    async with Uplink(url, SECRET, backoff=backoff) as uplink:
        for status, header, floor in ((503, "7", 7.0), (429, "999", 60.0)):
            fake.replies.append(Reply(status, b"{}", {"Retry-After": header}))
            with pytest.raises(ControllerUnreachable) as caught:
                await uplink.push(make_batch())
            assert caught.value.retry_after_s == float(header)
            assert floor <= backoff.failed(caught.value) <= 60.0


async def test_a_stalled_controller_times_out(scripted: tuple[Scripted, str]) -> None:
    fake, url = scripted
    fake.replies.append(Reply(delay_s=3.0))
    async with Uplink(url, SECRET, timeout_s=0.3) as uplink:
        with pytest.raises(ControllerUnreachable):
            await uplink.push(make_batch())


async def test_a_trickling_answer_hits_the_overall_deadline(
    scripted: tuple[Scripted, str],
) -> None:
    """Each byte arrives well within the read timeout; only the overall deadline ends it."""
    fake, url = scripted
    fake.replies.append(Reply(trickle=True))
    async with Uplink(url, SECRET, timeout_s=0.5) as uplink:
        with pytest.raises(ControllerUnreachable, match=r"no answer .* within 2 s"):
            await uplink.push(make_batch())


def _bundle() -> PolicyBundle:
    return PolicyBundle(
        version=3,
        issued_at=NOW,
        expires_at=NOW + timedelta(days=1),
        content=PolicyContent(site="alpha", poll_interval_s=30),
        signature="c2ln",
    )


async def test_pull_policy_returns_the_bundle_through_the_verifier_hook(
    scripted: tuple[Scripted, str],
) -> None:
    fake, url = scripted
    fake.replies += [Reply(body=_bundle().model_dump_json().encode())] * 2
    async with Uplink(url, SECRET) as uplink:
        assert await uplink.pull_policy() == _bundle()  # no verifier: raw, unverified
    seen: list[PolicyBundle] = []

    def refuse(bundle: PolicyBundle) -> PolicyBundle:
        seen.append(bundle)
        raise ValueError("bad signature")

    async with Uplink(url, SECRET, verify_policy=refuse) as uplink:
        with pytest.raises(ValueError, match="bad signature"):
            await uplink.pull_policy()
    assert seen == [_bundle()]
    assert [(m, p) for m, p, _, _ in fake.requests] == [("GET", "/api/v1/agent/policy")] * 2


# --- pure decisions ------------------------------------------------------------------------------


def test_backoff_is_full_jitter_under_an_exponential_ceiling() -> None:
    rng = random.Random(5)
    for failures, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (8, 128.0), (9, 200.0), (500, 200.0)]:
        samples = [backoff_delay(failures, initial_s=1.0, max_s=200.0, rng=rng) for _ in range(300)]
        assert all(0.0 <= s <= ceiling for s in samples)
        assert max(samples) > ceiling * 0.8 and min(samples) < ceiling * 0.2, "spread, not fixed"
    assert backoff_delay(0, initial_s=1.0, max_s=200.0, rng=rng) == 0.0


def test_backoff_resets_on_success() -> None:
    backoff = Backoff(initial_s=1.0, max_s=1000.0, rng=random.Random(6))
    for _ in range(10):
        backoff.failed(ControllerUnreachable("down"))
    backoff.succeeded()
    assert backoff.failed(ControllerUnreachable("down")) <= 1.0


@pytest.mark.parametrize(
    ("status", "batch_id", "kind", "retryable"),
    [
        (500, "b", ControllerUnreachable, True),
        (503, None, ControllerUnreachable, True),
        (408, "b", ControllerUnreachable, True),
        (429, "b", ControllerUnreachable, True),
        (401, "b", Unauthorized, True),
        (403, "b", Unauthorized, True),
        (404, "b", UplinkError, True),
        (405, "b", UplinkError, True),
        (400, "b", RejectedBatch, False),
        (409, "b", RejectedBatch, False),
        (413, "b", RejectedBatch, False),
        (422, "b", RejectedBatch, False),
        (422, None, UplinkError, False),
    ],
)
def test_classify(status: int, batch_id: str | None, kind: type, retryable: bool) -> None:
    error = classify(status, "why", "what", batch_id=batch_id)
    assert type(error) is kind and error.retryable is retryable and error.status_code == status
    assert str(error).startswith(f"what: controller answered {status}: why")


def test_retry_after_parsing() -> None:
    assert retry_after_s("120") == 120.0
    assert retry_after_s("Sun, 01 Nov 2026 00:01:00 GMT", now=NOW) == 60.0
    assert retry_after_s("Sat, 31 Oct 2026 00:00:00 GMT", now=NOW) == 0.0
    assert retry_after_s("soon") is None and retry_after_s(None) is None


# --- parking: a batch that can never be accepted -------------------------------------------------


def sent_ids(fake: Scripted) -> list[str]:
    return [json.loads(body)["batch_id"] for _, _, _, body in fake.requests]


async def test_a_batch_that_alone_fails_with_500_is_parked_after_strikes_and_the_queue_moves_on(
    scripted: tuple[Scripted, str], tmp_path: Path
) -> None:
    fake, url = scripted
    with Outbox(tmp_path / "outbox.sqlite3") as outbox:
        poison = outbox.put(make_batch(0))
        fake.poison[str(poison.batch_id)] = Reply(500, b'{"detail":"Internal Server Error"}')
        others = [outbox.put(make_batch(i)) for i in range(1, 6)]
        async with Uplink(url, SECRET, backoff=fast_backoff()) as uplink:
            reports = []
            while outbox.stats().dead_letters == 0:
                assert len(reports) < 10, "the poison batch was never parked"
                reports.append(await uplink.drain(outbox))
            # Each strike was proved by the batch behind being accepted, then backed off.
            assert [r.error is not None for r in reports] == [True, True, False]
            rest = await uplink.drain(outbox)
        assert rest.error is None and outbox.depth() == 0
        [dead] = outbox.dead_letters()
        assert dead.batch_id == poison.batch_id and dead.status_code == 500
        assert "3 times while later batches were accepted" in dead.reason
        assert ReportBatch.model_validate_json(dead.body) == poison  # nothing deleted
    delivered = sent_ids(fake)
    assert delivered.count(str(poison.batch_id)) == 3
    # Every other batch went through, in order, and then the report of the parking.
    accepted = [b for b in delivered if b != str(poison.batch_id)]
    assert accepted[:5] == [str(b.batch_id) for b in others]
    report = ReportBatch.model_validate_json(fake.requests[-1][3])
    [event] = report.events
    assert event.kind == "batch_parked" and event.data["batch_id"] == str(poison.batch_id)
    assert event.data["status_code"] == 500 and event.data["attempts"] == 3


@pytest.mark.parametrize("status", [500, 503])
async def test_a_controller_failing_everything_parks_nothing(
    scripted: tuple[Scripted, str], tmp_path: Path, status: int
) -> None:
    fake, url = scripted
    with Outbox(tmp_path / "outbox.sqlite3") as outbox:
        batches = [outbox.put(make_batch(i)) for i in range(3)]
        for batch in batches:
            fake.poison[str(batch.batch_id)] = Reply(status, b'{"detail":"database unavailable"}')
        async with Uplink(url, SECRET, backoff=fast_backoff()) as uplink:
            for _ in range(6):
                report = await uplink.drain(outbox)
                assert isinstance(report.error, ControllerUnreachable) and report.parked == 0
        assert outbox.peek(10) == batches and outbox.dead_letters() == []
        stats = outbox.stats()
        assert stats.head_attempts == 6 and "database unavailable" in (stats.head_last_error or "")


async def test_clock_skew_is_measured_from_the_ack_and_kept_in_the_outbox(
    scripted: tuple[Scripted, str], tmp_path: Path
) -> None:
    fake, url = scripted
    fake.clock_offset = -timedelta(seconds=45)  # the controller is 45 s behind us
    with Outbox(tmp_path / "outbox.sqlite3") as outbox:
        outbox.put(make_batch())
        async with Uplink(url, SECRET) as uplink:
            report = await uplink.drain(outbox)
            assert report.delivered == 1
            skew = uplink.state.clock_skew_s
        assert skew is not None and 40 < skew < 50
        assert outbox.stats().clock_skew_s == skew
