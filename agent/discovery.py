"""Discovery: find the miners in the configured segments and identify the new ones.

Two phases, each with its own bound on work in flight:

1. a TCP probe of every address on the miner ports (4028 RPC, 80 web) with a short connect
   timeout: ours, because a connect is all it takes to tell "something is there" and it costs a
   fraction of pyasic's identification (which opens four to six connections per address);
2. identification of the addresses that answered and are not known yet, through the driver
   factory (pyasic's factory, cross-checked), then a first identity read. Fewer of these run at
   once: pyasic's own 3 s factory timeouts fail when the event loop is saturated.

Nothing here scans outside the segments it was given: :func:`check_allowed` refuses any target
that is not inside one of them, and without a config the CLI allows loopback only.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, ip_network

from agent.drivers.base import Identity
from agent.drivers.factory import DriverFactory
from agent.errors import DriverError, ScanRefused

MINER_PORTS = (4028, 80)
PROBE_TIMEOUT_S = 1.0
IDENTIFY_CONCURRENCY = 32
LOOPBACK = IPv4Network("127.0.0.0/8")
MAX_SCAN_PREFIX = 16
"""A /16 (65,536 addresses) is the widest single scan: wider is not one LAN segment."""

Progress = Callable[[str, int, int], None]
"""``progress(phase, done, total)`` with phase ``"probe"`` or ``"identify"``."""


def parse_network(text: str) -> IPv4Network:
    """``10.1.0.0/24`` or a single address; a CIDR with host bits set is an error with a hint."""
    text = text.strip()
    try:
        network = ip_network(text)
    except ValueError:
        try:
            loose = ip_network(text, strict=False)
        except ValueError:
            raise ScanRefused(
                f"{text!r} is not an IPv4 address or CIDR such as 10.1.0.0/24"
            ) from None
        raise ScanRefused(f"{text!r} has host bits set; did you mean {loose}?") from None
    if not isinstance(network, IPv4Network):
        raise ScanRefused(f"{text}: only IPv4 segments are supported")
    return network


def check_allowed(network: IPv4Network, allowed: Sequence[IPv4Network]) -> None:
    """Refuse a target that is not entirely inside one allowed segment, or is too wide."""
    if network.prefixlen < MAX_SCAN_PREFIX:
        raise ScanRefused(
            f"{network} is wider than a /{MAX_SCAN_PREFIX}; scan one segment at a time"
        )
    if not any(network.subnet_of(segment) for segment in allowed):
        where = ", ".join(str(s) for s in allowed) or "nothing"
        raise ScanRefused(f"{network} is outside the allowed segments ({where}); refusing to scan")


def hosts(network: IPv4Network) -> Iterator[str]:
    """The addresses worth probing: every host of the network (a /32 is its one address)."""
    if network.prefixlen >= 31:
        yield from (str(a) for a in network)
    else:
        yield from (str(a) for a in network.hosts())


async def probe(
    ip: str, ports: Sequence[int] = MINER_PORTS, timeout_s: float = PROBE_TIMEOUT_S
) -> bool:
    """Whether anything accepts a TCP connection on one of ``ports`` within ``timeout_s``.

    The ports are tried concurrently and the first accepted connection wins; the connection is
    aborted at once (a miner needs no goodbye, and a blackholed one would never answer one).
    """

    async def one(port: int) -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                _, writer = await asyncio.open_connection(ip, port)
        except (OSError, TimeoutError):
            return False
        writer.transport.abort()
        return True

    tasks = [asyncio.create_task(one(port)) for port in ports]
    try:
        for finished in asyncio.as_completed(tasks):
            if await finished:
                return True
        return False
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass(frozen=True)
class ScanResult:
    """What one scan saw: who answered the probe, who was identified, who could not be."""

    networks: tuple[IPv4Network, ...]
    probed: int
    responded: frozenset[str]
    found: dict[str, Identity] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    duration_s: float = 0.0


class Discovery:
    """Scans allowed segments; identification goes through the shared :class:`DriverFactory`,
    so the drivers it creates are the ones the poll cycle then keeps using."""

    def __init__(
        self,
        factory: DriverFactory,
        allowed: Sequence[IPv4Network],
        *,
        concurrency: int = 128,
        identify_concurrency: int = IDENTIFY_CONCURRENCY,
        probe_timeout_s: float = PROBE_TIMEOUT_S,
        ports: Sequence[int] = MINER_PORTS,
    ) -> None:
        if concurrency < 1 or identify_concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.factory = factory
        self.allowed = tuple(allowed)
        self.concurrency = concurrency
        self.identify_concurrency = identify_concurrency
        self.probe_timeout_s = probe_timeout_s
        self.ports = tuple(ports)

    async def scan(
        self,
        networks: Sequence[IPv4Network],
        *,
        known: Collection[str] = (),
        progress: Progress | None = None,
    ) -> ScanResult:
        """Probe every host of ``networks`` (``concurrency`` at a time per network) and
        identify those that answered and are not in ``known``."""
        for network in networks:
            check_allowed(network, self.allowed)
        started = time.monotonic()
        targets = [list(hosts(n)) for n in networks]
        total = sum(len(t) for t in targets)
        done = 0
        responded: set[str] = set()

        def probed(ip: str, answered: bool) -> None:
            nonlocal done
            done += 1
            if answered:
                responded.add(ip)
            if progress is not None:
                progress("probe", done, total)

        await asyncio.gather(*(self._probe_all(t, probed) for t in targets))
        new = sorted((ip for ip in responded if ip not in known), key=IPv4Address)
        found, failed = await self.identify_all(new, progress=progress)
        return ScanResult(
            networks=tuple(networks),
            probed=total,
            responded=frozenset(responded),
            found=found,
            failed=failed,
            duration_s=time.monotonic() - started,
        )

    async def _probe_all(self, targets: list[str], done: Callable[[str, bool], None]) -> None:
        """A fixed pool of workers over one network's addresses (no task per address)."""
        queue = iter(targets)

        async def worker() -> None:
            for ip in queue:
                done(ip, await probe(ip, self.ports, self.probe_timeout_s))

        await asyncio.gather(*(worker() for _ in range(min(self.concurrency, len(targets)))))

    async def identify_all(
        self, ips: Sequence[str], *, progress: Progress | None = None
    ) -> tuple[dict[str, Identity], dict[str, str]]:
        """Identify ``ips`` (bounded) and read their identity; failures come back with why."""
        found: dict[str, Identity] = {}
        failed: dict[str, str] = {}
        queue = iter(ips)
        done = 0

        async def worker() -> None:
            nonlocal done
            for ip in queue:
                try:
                    found[ip] = await self.identify(ip)
                except DriverError as exc:
                    failed[ip] = f"{exc.kind}: {exc.reason}"
                done += 1
                if progress is not None:
                    progress("identify", done, len(ips))

        await asyncio.gather(*(worker() for _ in range(min(self.identify_concurrency, len(ips)))))
        return found, failed

    async def identify(self, ip: str) -> Identity:
        """A fresh driver for ``ip`` (any kept one is dropped) and its first identity read."""
        self.factory.forget(ip)
        try:
            driver = await self.factory.driver_for(ip)
            return await driver.identify()
        except DriverError:
            self.factory.forget(ip)
            raise
        except Exception as exc:  # a driver bug must not end the scan of everyone else
            self.factory.forget(ip)
            raise DriverError(f"identify: {type(exc).__name__}: {exc}"[:300], ip=ip) from exc
