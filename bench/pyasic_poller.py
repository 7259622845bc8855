"""Plain pyasic against the simulated farm: how fast, and what the simulator costs.

Run:  .venv/bin/python -m bench.pyasic_poller [--sizes 1000,10000] [--concurrency 500]

For each farm size it starts ``asicfleet sim run`` as a separate process tree, then in
this process uses unmodified pyasic 0.79.0 the way a simple poller would:

1. identify every miner (``pyasic.get_miner``),
2. one poll cycle with ``get_data(include=[...])`` (the fields a 60 s cycle needs),
3. one poll cycle with full ``get_data()``.

It prints miners per second for each step, the CPU seconds spent by the client and by
the simulator during the step (psutil, whole process trees), the simulator's share of
all CPU used, and the ratios between steps measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psutil

POLL_FIELDS = ["pools", "hashrate", "wattage", "is_mining", "hashboards", "mac", "serial_number"]


@dataclass
class StepResult:
    name: str
    miners: int
    ok: int
    wall_s: float
    client_cpu_s: float
    sim_cpu_s: float

    @property
    def rate(self) -> float:
        return self.ok / self.wall_s if self.wall_s else 0.0

    @property
    def sim_share(self) -> float:
        total = self.client_cpu_s + self.sim_cpu_s
        return self.sim_cpu_s / total if total else 0.0


def tree_cpu(process: psutil.Process) -> float:
    total = 0.0
    for proc in [process, *process.children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_farm(miners: int, subnet: str) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "asicfleet",
        "sim",
        "run",
        "--miners",
        str(miners),
        "--subnet",
        subnet,
        "--seed",
        "7",
        "--control-port",
        str(port),
    ]
    process = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"}
    )
    assert process.stdout is not None
    banner = ""
    for line in process.stdout:
        banner += line
        if line.startswith("Ctrl-C"):
            break
    else:
        raise SystemExit(f"simulator failed to start: {banner}")
    return process, banner.splitlines()[0]


async def run_step(
    name: str,
    items: list[Any],
    work: Callable[[Any], Awaitable[bool]],
    concurrency: int,
    sim: psutil.Process,
) -> StepResult:
    me = psutil.Process()
    semaphore = asyncio.Semaphore(concurrency)

    async def bounded(item: Any) -> bool:
        async with semaphore:
            try:
                return await asyncio.wait_for(work(item), timeout=30)
            except Exception:
                return False

    client_before, sim_before = tree_cpu(me), tree_cpu(sim)
    started = time.perf_counter()
    results = await asyncio.gather(*(bounded(item) for item in items))
    wall = time.perf_counter() - started
    return StepResult(
        name=name,
        miners=len(items),
        ok=sum(results),
        wall_s=wall,
        client_cpu_s=tree_cpu(me) - client_before,
        sim_cpu_s=tree_cpu(sim) - sim_before,
    )


async def bench_size(
    size: int, subnet: str, concurrency: int, identify_concurrency: int
) -> list[StepResult]:
    import pyasic
    from pyasic import settings

    settings.update("network_scan_semaphore", concurrency)
    process, banner = start_farm(size, subnet)
    print(f"  {banner}", flush=True)
    sim = psutil.Process(process.pid)
    try:
        import ipaddress

        network = ipaddress.ip_network(subnet)
        ips = [str(ip) for ip in list(network.hosts())[:size]]
        miners: dict[str, Any] = {}

        async def identify(ip: str) -> bool:
            miner = await pyasic.get_miner(ip)
            if miner is None:
                return False
            miners[ip] = miner
            return True

        async def poll_subset(miner: Any) -> bool:
            data = await miner.get_data(include=POLL_FIELDS)
            return data.hashrate is not None

        async def poll_full(miner: Any) -> bool:
            data = await miner.get_data()
            return data.hashrate is not None

        results = [await run_step("identify", ips, identify, identify_concurrency, sim)]
        found = list(miners.values())
        results.append(await run_step("poll subset", found, poll_subset, concurrency, sim))
        results.append(await run_step("poll full", found, poll_full, concurrency, sim))
        return results
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--sizes", default="1000,10000", help="farm sizes, comma-separated")
    parser.add_argument("--concurrency", type=int, default=200, help="polls in flight")
    parser.add_argument(
        "--identify-concurrency",
        type=int,
        default=50,
        help="identifications in flight (pyasic's 3 s factory timeout fails them all when the "
        "client's event loop is saturated, e.g. 500 at once)",
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    sizes = [int(s) for s in args.sizes.split(",") if s]
    print(
        f"pyasic poller vs asicfleet simulator; {os.cpu_count()} cores; "
        f"concurrency {args.concurrency} (identify {args.identify_concurrency})"
    )
    header = (
        f"{'miners':>7} {'step':<12} {'ok':>6} {'wall s':>8} {'miners/s':>9} "
        f"{'client cpu':>10} {'sim cpu':>8} {'sim share':>9}"
    )
    per_size: dict[int, dict[str, StepResult]] = {}
    for index, size in enumerate(sizes):
        print(f"farm of {size}:", flush=True)
        subnet = f"127.{60 + index}.0.0/16"
        rows = asyncio.run(bench_size(size, subnet, args.concurrency, args.identify_concurrency))
        per_size[size] = {r.name: r for r in rows}
        print(header)
        for row in rows:
            print(
                f"{row.miners:>7} {row.name:<12} {row.ok:>6} {row.wall_s:>8.2f} "
                f"{row.rate:>9.1f} {row.client_cpu_s:>10.2f} {row.sim_cpu_s:>8.2f} "
                f"{row.sim_share:>8.0%}"
            )
        full, subset = per_size[size]["poll full"], per_size[size]["poll subset"]
        if full.rate:
            print(f"  ratio poll subset / poll full (miners/s): {subset.rate / full.rate:.2f}x")
    if len(sizes) > 1:
        first, last = per_size[sizes[0]], per_size[sizes[-1]]
        for name in ("identify", "poll subset", "poll full"):
            if first[name].rate:
                print(
                    f"  {name}: {sizes[-1]} vs {sizes[0]} miners/s ratio "
                    f"{last[name].rate / first[name].rate:.2f}x"
                )


if __name__ == "__main__":
    main()
