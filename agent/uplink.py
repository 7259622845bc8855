"""The uplink: the agent's only line to the controller, always opened by the agent.

Three conversations, each one HTTP request with a timeout:

- ``enroll``: trade a one-time token for the agent's own secret (``POST /api/v1/agents/enroll``);
- ``push``: deliver one report batch with the bearer secret (``POST /api/v1/agent/reports``);
- ``pull_policy``: fetch the policy bundle (``GET /api/v1/agent/policy``), handed to a verifier
  hook before anyone sees it (the signature check is wired in by the enforcement work). The
  ETag of the last accepted bundle goes back as ``If-None-Match``, so an unchanged bundle
  costs a ``304`` with no body; not once that bundle is in the last quarter of its lifetime,
  so a 304 can never keep the agent on a bundle until it expires.

``drain`` empties the outbox oldest-first and acknowledges each batch only after the controller
did, so a crash anywhere re-sends at worst a batch the controller already has (it answers with
``duplicate: true``). It stops at the first failure rather than skipping ahead, so batches are
never delivered out of order. Failures are classified once, in :func:`classify`:

- network errors, timeouts, 5xx, 408 and 429: retry with exponential backoff and full jitter;
- 401/403: our credential is refused; retry at the slowest pace only;
- 404/405: the URL is not a (compatible) controller; retry, since parking would empty the queue;
- any other 4xx for a batch: that batch is refused for good and parked in the dead-letter table.

A 500 (an internal error, not 502/503/504, which are a proxy or a controller saying it is
unavailable) may be the controller's fault or the batch's. The drain tells them apart by
trying the batch behind it once: if the controller accepts that one, the failing batch earned
a *strike* (it failed alone); after :data:`PARK_AFTER_STRIKES` strikes it is parked and the
queue moves on. If the batch behind fails too, or there is none yet, the controller itself is
unwell: plain backoff, no strike, nothing parked. Parking queues a ``batch_parked`` event for
the controller (see :mod:`agent.outbox`); nothing is deleted.

Each delivery carries ``sent_at``; the acknowledgement carries the controller's
``received_at``, from which the agent's clock skew is measured and kept in the outbox (shown
by ``asicfleet agent status``; the controller keeps its own measurement per agent).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import random
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import httpx
from pydantic import BaseModel, SecretStr, ValidationError

from agent.backoff import full_jitter
from agent.config import AgentConfig, AgentSecrets, describe_errors
from agent.errors import (
    AgentError,
    ControllerUnreachable,
    OutboxError,
    RejectedBatch,
    Unauthorized,
    UplinkError,
)
from agent.outbox import Outbox
from contract import BatchAck, EnrollmentRequest, EnrollmentResponse, PolicyBundle, ReportBatch

log = logging.getLogger(__name__)

AGENT_VERSION = "0.1.0"
USER_AGENT = f"asicfleet-agent/{AGENT_VERSION}"
ENROLL_PATH = "/api/v1/agents/enroll"
REPORTS_PATH = "/api/v1/agent/reports"
POLICY_PATH = "/api/v1/agent/policy"
PEEK_WINDOW = 16
PARK_AFTER_STRIKES = 3
SERVER_ERROR = 500

PolicyVerifier = Callable[[PolicyBundle], PolicyBundle]
"""Checks a bundle (signature, expiry, version) and returns it, or raises."""

M = TypeVar("M", bound=BaseModel)


# --- pure decisions ------------------------------------------------------------------------------


def backoff_delay(failures: int, *, initial_s: float, max_s: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(max, initial * 2^(n-1))].

    Full jitter spreads the retries of many agents after a controller outage instead of having
    them all come back in the same second.
    """
    return full_jitter(failures, initial_s, max_s, rng)


def classify(
    status: int,
    detail: str,
    what: str,
    *,
    batch_id: str | None = None,
    retry_after: float | None = None,
) -> UplinkError:
    """The error for a non-2xx answer; ``batch_id`` makes other 4xx a :class:`RejectedBatch`."""
    text = f"{what}: controller answered {status}" + (f": {detail}" if detail else "")
    if status in (401, 403):
        return Unauthorized(
            f"{text} (is this agent disabled, or its secret wrong? re-enroll if so)",
            status_code=status,
        )
    if status in (408, 429) or status >= 500:
        return ControllerUnreachable(text, status_code=status, retry_after_s=retry_after)
    if status in (404, 405):
        return UplinkError(
            f"{text} (is the URL an asicfleet controller of a compatible version?)",
            status_code=status,
            retryable=True,
        )
    if batch_id is not None and 400 <= status < 500:
        return RejectedBatch(text, batch_id=batch_id, status_code=status)
    return UplinkError(text, status_code=status, retryable=False)


def revalidate(bundle: PolicyBundle, now: datetime) -> bool:
    """Whether a held bundle may be kept on a ``304``: only while more than a quarter of its
    lifetime is left; after that the agent asks for the bundle itself (re-signed)."""
    lifetime = bundle.expires_at - bundle.issued_at
    return bundle.expires_at - now > lifetime / 4


def retry_after_s(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), if it parses."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


@dataclass
class Backoff:
    """How long to wait before the next attempt, given what just failed."""

    initial_s: float = 1.0
    max_s: float = 300.0
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0

    def failed(self, error: AgentError) -> float:
        self.failures += 1
        if isinstance(error, Unauthorized):
            # A refused credential will not fix itself in a second: go straight to the slowest
            # pace (jittered in its upper half so a fleet of agents does not retry in step).
            return self.rng.uniform(self.max_s / 2, self.max_s)
        delay = backoff_delay(
            self.failures, initial_s=self.initial_s, max_s=self.max_s, rng=self.rng
        )
        hint = getattr(error, "retry_after_s", None)
        if hint is not None:
            delay = max(delay, min(float(hint), self.max_s))
        return delay

    def succeeded(self) -> None:
        self.failures = 0


@dataclass(frozen=True)
class DrainReport:
    """What one :meth:`Uplink.drain` did."""

    delivered: int = 0
    duplicates: int = 0
    parked: int = 0
    refused_items: int = 0
    remaining: int | None = 0
    error: AgentError | None = None
    retry_in_s: float | None = None


@dataclass
class _Tally:
    handled: int = 0
    delivered: int = 0
    duplicates: int = 0
    parked: int = 0
    refused_items: int = 0


@dataclass
class UplinkState:
    """For ``asicfleet agent status``: is the controller reachable, and since when not."""

    last_success_at: datetime | None = None
    last_failure_at: datetime | None = None
    last_error: str | None = None
    consecutive_failures: int = 0
    next_attempt_at: datetime | None = None
    clock_skew_s: float | None = None  # this host's clock minus the controller's
    clock_checked_at: datetime | None = None

    @property
    def healthy(self) -> bool:
        return self.consecutive_failures == 0


# --- I/O -----------------------------------------------------------------------------------------


def ssl_verify(ca_path: Path | None) -> ssl.SSLContext | bool:
    """TLS trust for the controller: a private CA bundle if configured, else the system store."""
    if ca_path is None:
        return True
    try:
        return ssl.create_default_context(cafile=str(ca_path))
    except (OSError, ssl.SSLError) as exc:
        raise UplinkError(f"{ca_path}: cannot load the controller CA: {exc}") from None


def _client(
    base_url: str,
    *,
    timeout_s: float,
    verify: ssl.SSLContext | bool,
    transport: httpx.AsyncBaseTransport | None,
) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=httpx.Timeout(timeout_s),
        verify=verify,
        transport=transport,
        headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
        follow_redirects=False,  # a redirect is reported, never followed with our secret
    )


async def _send(
    client: httpx.AsyncClient,
    method: str,
    path: str,
    *,
    what: str,
    deadline_s: float,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """One request under an overall deadline (httpx's timeouts are per phase, so a peer
    trickling bytes could otherwise hold a request open indefinitely)."""
    if body is not None:
        headers = {**(headers or {}), "Content-Type": "application/json"}
    try:
        async with asyncio.timeout(deadline_s):
            return await client.request(method, path, content=body, headers=headers)
    except TimeoutError:
        raise ControllerUnreachable(
            f"{what}: no answer from {client.base_url} within {deadline_s:g} s"
        ) from None
    except httpx.HTTPError as exc:
        reason = str(exc) or type(exc).__name__
        raise ControllerUnreachable(f"{what}: cannot reach {client.base_url}: {reason}") from exc


def _detail(response: httpx.Response) -> str:
    """The controller's ``detail`` (FastAPI style), short and on one line."""
    try:
        payload = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return response.text[:200].replace("\n", " ").strip()
    detail = payload.get("detail", payload) if isinstance(payload, dict) else payload
    if isinstance(detail, list):  # FastAPI validation errors
        parts = []
        for item in detail[:3]:
            if isinstance(item, dict):
                loc = ".".join(str(p) for p in item.get("loc", []) if p != "body")
                parts.append(f"{loc}: {item.get('msg', '')}".strip(": "))
        detail = "; ".join(parts)
    return str(detail)[:500].replace("\n", " ")


def _error(response: httpx.Response, what: str, batch_id: str | None = None) -> UplinkError:
    detail = _detail(response)
    if response.is_redirect:
        location = response.headers.get("Location", "?")
        detail = f"redirect to {location} (not followed: point controller.url there)"
    return classify(
        response.status_code,
        detail,
        what,
        batch_id=batch_id,
        retry_after=retry_after_s(response.headers.get("Retry-After")),
    )


def _parse(model: type[M], response: httpx.Response, what: str) -> M:
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise UplinkError(
            f"{what}: controller answered {response.status_code} with no valid "
            f"{model.__name__} ({where}: {first['msg']})",
            status_code=response.status_code,
            retryable=True,
        ) from None


async def enroll(
    controller_url: str,
    token: str,
    agent_name: str,
    *,
    agent_version: str = AGENT_VERSION,
    hostname: str | None = None,
    timeout_s: float = 15.0,
    ca_path: Path | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> EnrollmentResponse:
    """Trade a one-time enrollment token for this agent's credentials.

    Not retried: if the controller consumed the token but the answer was lost, a retry would
    only be told the token is spent. Store the response with ``config.apply_enrollment``.
    """
    what = "enrollment"
    try:
        request = EnrollmentRequest(
            token=token,
            agent_name=agent_name,
            agent_version=agent_version,
            hostname=socket.gethostname() if hostname is None else hostname,
        )
    except ValidationError as exc:
        raise UplinkError(f"{what}: {describe_errors(exc)}") from None
    verify = ssl_verify(ca_path)
    async with _client(
        controller_url, timeout_s=timeout_s, verify=verify, transport=transport
    ) as client:
        response = await _send(
            client,
            "POST",
            ENROLL_PATH,
            what=what,
            deadline_s=timeout_s * 4,
            body=request.model_dump_json().encode(),
        )
    if response.status_code in (401, 410):
        raise Unauthorized(
            f"{what}: controller refused the token ({response.status_code}: {_detail(response)})",
            status_code=response.status_code,
        )
    if not response.is_success:
        raise _error(response, what)
    return _parse(EnrollmentResponse, response, what)


class Uplink:
    """The agent's authenticated connection to the controller. Use as an async context manager
    (or call :meth:`aclose`); one instance per process."""

    def __init__(
        self,
        controller_url: str,
        agent_secret: SecretStr,
        *,
        timeout_s: float = 15.0,
        ca_path: Path | None = None,
        backoff: Backoff | None = None,
        verify_policy: PolicyVerifier | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.controller_url = controller_url
        self._secret = agent_secret
        self._deadline_s = timeout_s * 4
        self._client = _client(
            controller_url, timeout_s=timeout_s, verify=ssl_verify(ca_path), transport=transport
        )
        self.backoff = backoff or Backoff()
        self.verify_policy = verify_policy
        self.state = UplinkState()
        self.park_after_strikes = PARK_AFTER_STRIKES
        self._drain_lock = asyncio.Lock()
        self._policy: tuple[str, PolicyBundle] | None = None  # (ETag, the bundle accepted)

    @classmethod
    def from_config(
        cls,
        config: AgentConfig,
        secrets: AgentSecrets,
        *,
        verify_policy: PolicyVerifier | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> Uplink:
        if secrets.agent_secret is None:
            raise UplinkError(
                f"{config.secrets_file}: no agent_secret: run `asicfleet agent enroll` first"
            )
        return cls(
            config.controller.url,
            secrets.agent_secret,
            timeout_s=config.uplink.timeout_s,
            ca_path=config.controller.ca_path,
            backoff=Backoff(config.uplink.backoff_initial_s, config.uplink.backoff_max_s),
            verify_policy=verify_policy,
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"Uplink({self.controller_url!r})"

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __aenter__(self) -> Uplink:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _call(
        self,
        method: str,
        path: str,
        what: str,
        body: bytes | None = None,
        extra_headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        headers = {
            **(extra_headers or {}),
            "Authorization": f"Bearer {self._secret.get_secret_value()}",
        }
        return await _send(
            self._client,
            method,
            path,
            what=what,
            deadline_s=self._deadline_s,
            body=body,
            headers=headers,
        )

    async def push(self, batch: ReportBatch) -> BatchAck:
        """Deliver one batch; the controller's acknowledgement, or a typed :class:`UplinkError`."""
        key = str(batch.batch_id)
        what = f"batch {key} (sequence {batch.sequence})"
        sent = datetime.now(UTC)
        body = batch.model_copy(update={"sent_at": sent}).model_dump_json().encode()
        response = await self._call("POST", REPORTS_PATH, what, body)
        back = datetime.now(UTC)
        if not response.is_success:
            raise _error(response, what, batch_id=key)
        ack = _parse(BatchAck, response, what)
        if ack.batch_id != batch.batch_id:
            raise UplinkError(
                f"{what}: controller acknowledged batch {ack.batch_id} instead",
                status_code=response.status_code,
                retryable=True,
            )
        if ack.received_at is not None and not ack.duplicate:
            # The controller read its clock between our send and its answer: the midpoint.
            midpoint = sent + (back - sent) / 2
            self.state.clock_skew_s = round((midpoint - ack.received_at).total_seconds(), 3)
            self.state.clock_checked_at = back
        return ack

    async def pull_policy(self) -> PolicyBundle:
        """The controller's current policy bundle, passed through ``verify_policy`` if set.

        Without a verifier the bundle is UNVERIFIED: callers must not enforce it.
        """
        what = "policy pull"
        held = self._policy
        conditional = held is not None and revalidate(held[1], datetime.now(UTC))
        extra = {"If-None-Match": held[0]} if held is not None and conditional else None
        response = await self._call("GET", POLICY_PATH, what, extra_headers=extra)
        if response.status_code == 304 and held is not None and conditional:
            return held[1]  # verified when it arrived; still current, says the controller
        if not response.is_success:
            raise _error(response, what)
        bundle = _parse(PolicyBundle, response, what)
        accepted = self.verify_policy(bundle) if self.verify_policy is not None else bundle
        etag = response.headers.get("ETag")
        self._policy = (etag, accepted) if etag else None
        return accepted

    async def drain(self, outbox: Outbox, *, max_batches: int | None = None) -> DrainReport:
        """Push pending batches oldest-first until the outbox is empty or something fails.

        Each batch is acknowledged in the outbox only after the controller acknowledged it. A
        batch the controller refuses for good is parked with the reason and the drain goes on;
        any other failure stops the drain (order is kept) and sets the backoff delay, which is
        returned as ``retry_in_s`` (:meth:`run` waits it out).
        """
        async with self._drain_lock:
            tally = _Tally()
            error: AgentError | None = None
            retry_in: float | None = None
            measured = self.state.clock_checked_at
            try:
                while max_batches is None or tally.handled < max_batches:
                    window = PEEK_WINDOW if max_batches is None else max_batches - tally.handled
                    batches = await asyncio.to_thread(outbox.peek, min(window, PEEK_WINDOW))
                    if not batches:
                        break
                    for batch in batches:
                        tally.handled += 1
                        try:
                            await self._deliver(outbox, batch, tally)
                        except ControllerUnreachable as exc:
                            if exc.status_code != SERVER_ERROR:
                                await self._note_failure(outbox, batch, exc)
                                raise
                            if not await self._strike_out(outbox, batch, exc, tally):
                                raise
                            break  # parked: the queue changed, look again
            except (UplinkError, OutboxError) as exc:
                error = exc
                retry_in = self._failed(exc)
            checked = self.state.clock_checked_at
            if checked is not None and checked != measured and self.state.clock_skew_s is not None:
                with contextlib.suppress(OutboxError):
                    await asyncio.to_thread(outbox.record_clock, self.state.clock_skew_s, checked)
            try:
                remaining: int | None = await asyncio.to_thread(outbox.depth)
            except OutboxError:
                remaining = None
            return DrainReport(
                delivered=tally.delivered,
                duplicates=tally.duplicates,
                parked=tally.parked,
                refused_items=tally.refused_items,
                remaining=remaining,
                error=error,
                retry_in_s=retry_in,
            )

    async def _deliver(self, outbox: Outbox, batch: ReportBatch, tally: _Tally) -> None:
        """Push one batch: acknowledged, or parked when refused for good; else raise."""
        try:
            ack = await self.push(batch)
        except RejectedBatch as exc:
            log.error("uplink: parking %s", exc)
            await self._note_failure(outbox, batch, exc)
            await asyncio.to_thread(outbox.park, batch.batch_id, str(exc), exc.status_code)
            tally.parked += 1
            return
        await asyncio.to_thread(outbox.ack, batch.batch_id)
        self._succeeded()
        tally.delivered += 1
        tally.duplicates += ack.duplicate
        if ack.refused:
            tally.refused_items += len(ack.refused)
            log.warning(
                "uplink: controller refused %d item(s) of batch %s, e.g. %s",
                len(ack.refused),
                batch.batch_id,
                ack.refused[0],
            )

    async def _note_failure(self, outbox: Outbox, batch: ReportBatch, exc: UplinkError) -> None:
        """Count a failed attempt on the batch (for ``agent status``); never a strike."""
        with contextlib.suppress(OutboxError):
            await asyncio.to_thread(outbox.failed, batch.batch_id, str(exc))

    async def _strike_out(
        self, outbox: Outbox, batch: ReportBatch, exc: ControllerUnreachable, tally: _Tally
    ) -> bool:
        """After a 500 on ``batch``: try the batch behind it. True if ``batch`` was parked
        (the caller goes on draining); False if the controller looks unwell (back off)."""
        pending = await asyncio.to_thread(outbox.peek, 2)
        behind = [b for b in pending if b.batch_id != batch.batch_id][:1]
        if not behind:
            await self._note_failure(outbox, batch, exc)
            return False
        probe = behind[0]
        try:
            await self._deliver(outbox, probe, tally)
        except UplinkError:
            await self._note_failure(outbox, batch, exc)
            return False
        # The controller works, and refused this batch alone.
        strikes = await asyncio.to_thread(outbox.failed, batch.batch_id, str(exc), strike=True)
        log.warning(
            "uplink: %s while batch %s behind it was accepted (strike %d of %d)",
            exc,
            probe.batch_id,
            strikes,
            self.park_after_strikes,
        )
        if strikes < self.park_after_strikes:
            return False
        reason = (
            f"{exc} ({strikes} times while later batches were accepted: the batch itself "
            "fails on the controller)"
        )
        log.error("uplink: parking batch %s: %s", batch.batch_id, reason)
        await asyncio.to_thread(outbox.park, batch.batch_id, reason, exc.status_code)
        tally.parked += 1
        return True

    async def run(
        self,
        outbox: Outbox,
        stop: asyncio.Event,
        *,
        wake: asyncio.Event | None = None,
        idle_s: float = 5.0,
    ) -> None:
        """Drain until ``stop`` is set: after a failure wait out the backoff (a ``wake`` does not
        cut it short), otherwise wait for ``wake`` (a new batch) or ``idle_s``."""
        while not stop.is_set():
            report = await self.drain(outbox)
            if report.error is not None:
                await _wait(stop, None, report.retry_in_s or 0.0)
            else:
                await _wait(stop, wake, idle_s)
                if wake is not None:
                    wake.clear()

    def _succeeded(self) -> None:
        if self.state.consecutive_failures:
            log.info(
                "uplink: controller %s reachable again after %d failed attempt(s)",
                self.controller_url,
                self.state.consecutive_failures,
            )
        self.backoff.succeeded()
        self.state.consecutive_failures = 0
        self.state.last_success_at = datetime.now(UTC)
        self.state.next_attempt_at = None

    def _failed(self, error: AgentError) -> float:
        delay = self.backoff.failed(error)
        now = datetime.now(UTC)
        if self.state.consecutive_failures == 0:
            log.warning("uplink: %s; reports stay in the outbox and are retried", error)
        else:
            log.debug("uplink: still failing (%d): %s", self.state.consecutive_failures + 1, error)
        self.state.consecutive_failures += 1
        self.state.last_failure_at = now
        self.state.last_error = str(error)
        self.state.next_attempt_at = datetime.fromtimestamp(now.timestamp() + delay, UTC)
        return delay


async def _wait(stop: asyncio.Event, wake: asyncio.Event | None, timeout_s: float) -> None:
    """Sleep up to ``timeout_s``, returning early when ``stop`` (or ``wake``) is set."""
    events = [stop] if wake is None else [stop, wake]
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waiters:
            task.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
