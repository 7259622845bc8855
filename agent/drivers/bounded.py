"""Reads from miners that really end: a byte cap per connection and a deadline that closes.

pyasic's own reads are unbounded: ``MinerFactory._socket_ping`` and ``send_api_command`` loop on
``data += d`` until the peer closes, httpx reads whole bodies, and on Python 3.11 an
``asyncio.wait_for`` whose inner read completes at the moment it is cancelled swallows the
cancellation. A peer that streams forever therefore keeps a task copying ever larger buffers
(a core busy, memory growing) long after our timeout gave up on it, and ``asyncio.run`` then
waits for that task at exit: ``asicfleet agent poll`` never returned.

:func:`run_bounded` runs a piece of driver work (pyasic's identification, a pyasic poll or
write) in a *sandbox*: every task the work creates, directly or through pyasic and httpx, and
every connection it opens are registered (a task factory and a ``create_connection`` hook on
the running loop, both keyed on a context variable, so other code on the loop is untouched).
Each connection gets a byte cap: past it the connection is aborted and the work is reported
as ``oversized``. At the deadline every connection is aborted (so a read loop sees EOF whether
or not it honours cancellation), every task is cancelled, and we wait for them to be gone:
no task outlives its miner's budget. Nothing in pyasic is edited.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from agent.errors import MalformedReply, Timeout

T = TypeVar("T")
log = logging.getLogger(__name__)

END_GRACE_S = 1.0
"""How long the sandbox's tasks get to finish once their sockets are aborted and they are
cancelled (they end within a few loop turns; this only bounds a pathological one)."""

_current: contextvars.ContextVar[Sandbox | None] = contextvars.ContextVar(
    "asicfleet_driver_sandbox", default=None
)
_INSTALLED = "_asicfleet_bounded_reads"


def _retrieve(task: asyncio.Task[Any]) -> None:
    """pyasic leaves the losers of its probe races unawaited; what they raised is the
    miner's fault, classified by the caller, not an "exception never retrieved" on stderr."""
    if not task.cancelled():
        task.exception()


def _abort(transport: asyncio.BaseTransport) -> None:
    """Drop a connection now (no flush, no goodbye): what ends a read loop at once."""
    if isinstance(transport, asyncio.Transport | asyncio.WriteTransport):
        transport.abort()
    else:
        transport.close()


class Sandbox:
    """The tasks and connections of one bounded piece of driver work (nested ones report to
    their parent too, so ending the outer one ends everything)."""

    def __init__(self, max_bytes: int, parent: Sandbox | None = None) -> None:
        self.max_bytes = max_bytes
        self.parent = parent
        self.tasks: set[asyncio.Task[Any]] = set()
        self.transports: set[asyncio.BaseTransport] = set()
        self.closed = False
        self.oversized_bytes: int | None = None
        self.tripped = asyncio.Event()

    def track_task(self, task: asyncio.Task[Any]) -> None:
        task.add_done_callback(_retrieve)
        box: Sandbox | None = self
        while box is not None:
            box.tasks.add(task)
            task.add_done_callback(box.tasks.discard)
            box = box.parent

    def track_transport(self, transport: asyncio.BaseTransport) -> None:
        box: Sandbox | None = self
        while box is not None:
            box.transports.add(transport)
            box = box.parent

    def forget_transport(self, transport: asyncio.BaseTransport) -> None:
        box: Sandbox | None = self
        while box is not None:
            box.transports.discard(transport)
            box = box.parent

    def oversized(self, seen: int) -> None:
        box: Sandbox | None = self
        while box is not None:
            if box.oversized_bytes is None:
                box.oversized_bytes = seen
            box.tripped.set()
            box = box.parent

    def alive(self) -> set[asyncio.Task[Any]]:
        """Tasks of this sandbox that have not finished."""
        return {t for t in self.tasks if not t.done()}

    async def end(self, grace_s: float = END_GRACE_S) -> None:
        """Abort every connection, cancel every task, and wait (bounded) until all are gone."""
        self.closed = True
        current = asyncio.current_task()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while True:
            for transport in list(self.transports):
                _abort(transport)
            pending = self.alive() - {current}
            if not pending:
                return
            for task in pending:
                task.cancel()
            remaining = deadline - loop.time()
            if remaining <= 0:
                names = sorted(t.get_name() for t in pending)
                log.warning("%d task(s) still running after abort: %s", len(pending), names)
                return
            await asyncio.wait(pending, timeout=min(remaining, 0.05))


class _Capped(asyncio.Protocol):
    """Counts what a connection receives; aborts it past the cap. Delegates everything else."""

    def __init__(self, inner: asyncio.BaseProtocol, sandbox: Sandbox) -> None:
        self.inner = inner
        self._sandbox = sandbox
        self._seen = 0
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._sandbox.track_transport(transport)
        if self._sandbox.closed:
            _abort(transport)
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._seen += len(data)
        if self._seen > self._sandbox.max_bytes:
            self._sandbox.oversized(self._seen)
            if self._transport is not None:
                _abort(self._transport)
            return
        assert isinstance(self.inner, asyncio.Protocol)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        assert isinstance(self.inner, asyncio.Protocol)
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._sandbox.forget_transport(self._transport)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


def install(loop: asyncio.AbstractEventLoop) -> None:
    """Hook the loop once: tasks and connections made inside a sandbox are registered with it
    (outside any sandbox both hooks pass straight through)."""
    installed = getattr(loop, _INSTALLED, None)
    if installed is not None and installed is loop.get_task_factory():
        return  # (if someone replaced our task factory since, hook it again on top of theirs)
    previous_factory = loop.get_task_factory()

    def task_factory(
        loop: asyncio.AbstractEventLoop,
        coro: Coroutine[Any, Any, Any],
        context: contextvars.Context | None = None,
    ) -> asyncio.Future[Any]:
        task: asyncio.Future[Any]
        if previous_factory is not None and context is None:
            task = previous_factory(loop, coro)  # the legacy signature, as asyncio calls it
        elif previous_factory is not None:
            task = previous_factory(loop, coro, context=context)  # type: ignore[call-arg]
        else:
            task = asyncio.Task(coro, loop=loop, context=context)
        sandbox = context.get(_current) if context is not None else _current.get()
        if sandbox is not None and isinstance(task, asyncio.Task):
            sandbox.track_task(task)
        return task

    original = loop.create_connection

    async def create_connection(
        protocol_factory: Callable[[], asyncio.BaseProtocol], *args: Any, **kwargs: Any
    ) -> tuple[asyncio.BaseTransport, asyncio.BaseProtocol]:
        sandbox = _current.get()
        if sandbox is None:
            return await original(protocol_factory, *args, **kwargs)
        if sandbox.closed:
            raise ConnectionAbortedError("the miner's time budget is spent")

        def capped() -> asyncio.BaseProtocol:
            inner = protocol_factory()
            if isinstance(inner, asyncio.BufferedProtocol):
                return inner  # not used by pyasic or httpx; the deadline still applies
            return _Capped(inner, sandbox)

        transport, protocol = await original(capped, *args, **kwargs)
        if isinstance(protocol, _Capped):
            protocol = protocol.inner
        else:
            sandbox.track_transport(transport)
        if sandbox.closed:
            _abort(transport)
            raise ConnectionAbortedError("the miner's time budget is spent")
        return transport, protocol

    loop.set_task_factory(task_factory)  # type: ignore[arg-type]
    if installed is None:
        setattr(loop, "create_connection", create_connection)  # noqa: B010 (instance, not class)
    setattr(loop, _INSTALLED, task_factory)


async def run_bounded(
    call: Callable[[], Awaitable[T]],
    *,
    ip: str,
    what: str,
    timeout_s: float,
    max_bytes: int,
) -> T:
    """``await call()`` with a byte cap per connection and a deadline that ends it: raises
    :class:`MalformedReply` (``oversized``) past the cap, :class:`Timeout` at the deadline, and
    in every case returns only after all the work's tasks and connections are gone."""
    loop = asyncio.get_running_loop()
    install(loop)
    sandbox = Sandbox(max_bytes, parent=_current.get())
    token = _current.set(sandbox)
    try:

        async def run() -> T:
            return await call()

        task = asyncio.create_task(run(), name=f"bounded {what} {ip}")
        sandbox.track_task(task)
    finally:
        _current.reset(token)
    tripped = asyncio.create_task(sandbox.tripped.wait(), name=f"bounded {what} {ip} cap")
    try:
        await asyncio.wait({task, tripped}, timeout=timeout_s, return_when="FIRST_COMPLETED")
    except asyncio.CancelledError:  # the caller's own budget ended: end ours too, then go
        sandbox.track_task(tripped)
        await sandbox.end()
        raise
    tripped.cancel()
    await asyncio.wait({tripped})
    finished = task.done() and not sandbox.tripped.is_set()
    await sandbox.end()
    if sandbox.oversized_bytes is not None:
        raise MalformedReply(
            f"{what}: reply larger than {max_bytes} bytes (oversized); connection closed",
            ip=ip,
        )
    if not finished:
        raise Timeout(f"{what}: no complete answer within {timeout_s:g} s", ip=ip)
    return task.result()
