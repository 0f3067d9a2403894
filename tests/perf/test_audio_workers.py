"""Benchmark: 32 concurrent 25 MB uploads through the gateway, against the same uploads sent straight
to the engine double in the same run: peak RSS and peak thread count of this process (the client,
and for the gateway rows the whole gateway). The spool writes past `spool_memory_bytes` run on the
audio workers and every attempt reads the upload through a view of its own, so the gateway adds a
bounded number of threads and no per-upload memory.

Run with: python -m pytest -s -p no:cacheprovider tests/perf/test_audio_workers.py
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

from gateway.state import AUDIO_WORKERS
from tests.conftest import DEMO_KEY, Gateway, ServerThread, engine_config
from tests.perf.perfkit import MB, LoopLag, RssSampler, environment, print_table
from tests.perf.test_proxy_overhead import _upload, engine_process, write_wav

__all__ = ["engine_process"]  # the fixture, imported for this module's tests

UPLOADS = 32
UPLOAD_BYTES = 25 * 1000 * 1000
MAX_RSS_GROWTH = 250 * MB


class ThreadPeak:
    """The most threads this process had at once while the block ran (sampled every 2 ms)."""

    def __init__(self) -> None:
        self.before = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="thread-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, threading.active_count() - 1)  # not counting the sampler

    def __enter__(self) -> ThreadPeak:
        self.before = self.peak = threading.active_count()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


async def _burst(url: str, path: Path, headers: dict[str, str] | None) -> list[tuple[float, int, str]]:
    return await asyncio.gather(*(_upload(url, path, headers) for _ in range(UPLOADS)))


def test_concurrent_large_uploads_are_bounded(servers: ServerThread, engine_process: str, tmp_path: Path,
                                              make_gateway: Callable[[str], Gateway]) -> None:
    config = engine_config(engine_process, tmp_path / "spool").replace(
        "max_upload_bytes: 2000000", f"max_upload_bytes: {UPLOAD_BYTES + MB}").replace(
        "timeout_s: 2", "timeout_s: 120")
    gateway = make_gateway(config)
    workers = gateway.app[AUDIO_WORKERS]
    path = tmp_path / "upload.wav"
    seconds = write_wav(path, UPLOAD_BYTES)
    direct_url, gateway_url = f"{engine_process}/audio/transcriptions", f"{gateway.base_url}/audio/transcriptions"
    auth = {"Authorization": f"Bearer {DEMO_KEY}"}
    rows, growth = [], {}
    for label, url, headers in (("direct", direct_url, None), ("gateway", gateway_url, auth)):
        asyncio.run(_upload(url, path, headers))  # warm up: threads, codecs, connections
        started = time.perf_counter()
        with LoopLag(servers.loop) as lag, RssSampler() as rss, ThreadPeak() as threads:
            results = asyncio.run(_burst(url, path, headers))
        elapsed = time.perf_counter() - started
        assert all(status == 200 for _, status, _ in results), [text for _, status, text in results if status != 200]
        growth[label] = rss.growth
        rows.append([label, elapsed * 1000, UPLOADS * UPLOAD_BYTES / MB / elapsed, rss.before / MB,
                     rss.growth / MB, threads.before, threads.peak, lag.max_ms])
    leftovers = list((tmp_path / "spool").iterdir())
    print_table(
        f"{UPLOADS} concurrent {UPLOAD_BYTES // 1_000_000} MB WAV uploads ({seconds:.0f} s of audio each), "
        f"transcription json; engine double in a separate process; audio_workers {workers.size}",
        ["path", "time ms", "MiB/s", "RSS before MiB", "peak RSS growth MiB", "threads before",
         "threads peak", "loop lag max ms"], rows,
        note="RSS and threads are this test process's: the client and (for 'gateway') the whole gateway.\n"
             f"Spool files left afterwards: {len(leftovers)}.\n{environment()}")
    assert not leftovers
    assert growth["gateway"] < MAX_RSS_GROWTH, f"RSS grew by {growth['gateway'] / MB:.1f} MiB"
