"""Small tools shared by the benchmarks: a load generator, percentiles, tables, event-loop lag and RSS probes.

The load generator runs on its own event loop in the test's thread (`asyncio.run`), while the servers
under test run on the `servers` loop thread, so both share one process (and one GIL) exactly as in
the baseline: a figure is only ever compared with one measured the same way, in the same run.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import platform
import re
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

MB = 1024 * 1024


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (nearest rank on the sorted values)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], note: str = "") -> None:
    """A plain fixed-width table on stdout (run pytest with -s to see it)."""
    cells = [[str(h) for h in headers], *[[_fmt(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    def render(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    out = [f"\n== {title} ==", render(cells[0]), "  ".join("-" * w for w in widths)]
    out += [render(row) for row in cells[1:]]
    if note:
        out.extend(f"  {n}" for n in note.strip().splitlines())
    print("\n".join(out), flush=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def environment() -> str:
    """One line to read the figures by: CPUs, load average (other work on the machine skews them), versions."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"cpus={os.cpu_count()} loadavg=[{load}] python={platform.python_version()} "
            f"aiohttp={aiohttp.__version__}")


# -- load generation --------------------------------------------------------------------------------


@dataclass
class LoadResult:
    requests: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    bytes_in: int = 0
    cpu_seconds: float = 0.0
    """CPU time of this whole process (every thread: client, servers, workers) during the run."""

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else float("nan")

    @property
    def cpu_ms_per_request(self) -> float:
        """Steadier than req/s when other work shares the machine."""
        return self.cpu_seconds / self.requests * 1000 if self.requests else float("nan")

    @property
    def p50_ms(self) -> float:
        return pct(self.latencies, 50) * 1000

    @property
    def p95_ms(self) -> float:
        return pct(self.latencies, 95) * 1000

    @property
    def p99_ms(self) -> float:
        return pct(self.latencies, 99) * 1000


RequestFactory = Callable[[aiohttp.ClientSession], Any]
"""Returns the (not yet awaited) `session.post(...)` context manager for one request."""


async def _load(send: RequestFactory, total: int, concurrency: int) -> LoadResult:
    counter = itertools.count()
    result = LoadResult(total, 0.0)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def worker() -> None:
            while next(counter) < total:
                started = time.perf_counter()
                async with send(session) as response:
                    body = await response.read()
                    if response.status != 200:
                        result.errors += 1
                result.latencies.append(time.perf_counter() - started)
                result.bytes_in += len(body)

        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.seconds = time.perf_counter() - started
        result.cpu_seconds = time.process_time() - cpu
    return result


def run_load(send: RequestFactory, total: int, concurrency: int, warmup: int = 0) -> LoadResult:
    """`total` requests from `concurrency` clients (one keep-alive connection each), after `warmup`."""
    if warmup:
        asyncio.run(_load(send, warmup, concurrency))
    return asyncio.run(_load(send, total, concurrency))


# -- event-loop lag ---------------------------------------------------------------------------------


class LoopLag:
    """Samples how late a 5 ms timer fires on `loop` (the servers' loop): a blocked loop shows as lag.

    Lag includes waiting for the GIL behind other threads of this process (the load generator, worker
    threads), so a few ms are normal under load; tens of ms mean something held the loop or the GIL.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float = 0.005) -> None:
        self.loop = loop
        self.interval = interval
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(self.interval)
            self.samples.append(max(0.0, time.perf_counter() - started - self.interval))

    def __enter__(self) -> LoopLag:
        async def start() -> None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            if self._task is not None:
                self._task.cancel()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)

    @property
    def max_ms(self) -> float:
        return max(self.samples, default=float("nan")) * 1000

    @property
    def p99_ms(self) -> float:
        return pct(self.samples, 99) * 1000


# -- memory -------------------------------------------------------------------------------------------


def _status_kb(field_name: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field_name}:\s+(\d+) kB", f.read(), re.M)
    return int(match.group(1)) if match else 0


def rss_bytes() -> int:
    return _status_kb("VmRSS") * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM (the kernel's peak-RSS mark) to the current RSS; False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    return _status_kb("VmHWM") * 1024


class RssSampler:
    """Samples this process's RSS every `interval` seconds on a thread, keeping the maximum; also resets
    and reads the kernel's peak mark (VmHWM), which catches a spike between two samples."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.before = 0
        self.max_sampled = 0
        self.samples = 0
        self.hwm: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._hwm_ok = False

    def _run(self) -> None:
        while not self._stop.is_set():
            self.max_sampled = max(self.max_sampled, rss_bytes())
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.before = self.max_sampled = rss_bytes()
        self._hwm_ok = reset_peak_rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.max_sampled = max(self.max_sampled, rss_bytes())
        self.hwm = peak_rss_bytes() if self._hwm_ok else None

    @property
    def growth_sampled(self) -> int:
        return self.max_sampled - self.before

    @property
    def growth_hwm(self) -> int | None:
        return None if self.hwm is None else self.hwm - self.before

    @property
    def growth(self) -> int:
        """The larger of the two measures of peak growth."""
        return max(self.growth_sampled, self.growth_hwm or 0)
