"""The eSpeak adapter driven directly: start to ready, time to first audio, throughput, CPU by process.

The figures in docs/backends.md ("eSpeak NG in a process of its own") come from this script, run from a
checkout of this branch and from one of the commit before it (`git archive <commit> gateway | tar -x -C DIR`,
then run it with DIR as the working directory), alternately. Not a test: nothing is asserted.

Run: .venv/bin/python tests/perf/espeak_isolation.py [--uvloop]
"""

from __future__ import annotations

import asyncio
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.getcwd())  # the checkout run from, not the installed one

from gateway.adapters import espeak
from gateway.adapters.base import SpeechJob
from gateway.config import Backend, NativeVoice

PASSAGE = ("Hello world, this is a test of the speech system. The weather today is sunny and warm. "
           "Please call me back when you get home. I would like to order a cup of coffee. "
           "We need more time to finish the work. My brother lives in a small house near the river.")
TEXT_300 = PASSAGE[:300]
TEXT_4000 = " ".join([PASSAGE] * 14)[:4000]
SMALL = "Hello there! This is a short sentence for speech."


async def once(adapter: Any, text: str) -> tuple[float, float, int]:
    """(seconds to the first chunk, seconds to the last, bytes) of one synthesis."""
    started = time.perf_counter()
    stream = await adapter.synthesize(SpeechJob("r", "tts-1", "espeak-ng", NativeVoice("en-us"), text, "pcm"))
    first, size = 0.0, 0
    async for chunk in stream.chunks:
        first = first or time.perf_counter() - started
        size += len(chunk)
    return first, time.perf_counter() - started, size


def cpu(adapter: Any) -> tuple[float, float]:
    """CPU seconds of this process and of the adapter's child, if it has one."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    child = 0.0
    process = getattr(adapter, "process", None)
    if process is not None:
        fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        child = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return me.ru_utime + me.ru_stime, child


async def main() -> None:
    started = time.perf_counter()
    adapter = espeak.EspeakAdapter(Backend(name="espeak", kind="espeak"), None)  # type: ignore[arg-type]
    assert await adapter.ready()
    ready = time.perf_counter() - started
    before = cpu(adapter)
    await once(adapter, SMALL)
    short = [await once(adapter, TEXT_300) for _ in range(20)]
    long = [await once(adapter, TEXT_4000) for _ in range(5)]
    small = [await once(adapter, SMALL) for _ in range(100)]
    started = time.perf_counter()
    await asyncio.gather(*(once(adapter, SMALL) for _ in range(100)))
    together = time.perf_counter() - started
    after = cpu(adapter)
    await adapter.aclose()
    med = statistics.median
    audio = long[0][2] / 2 / 22_050
    print(f"start to ready {ready * 1000:.0f} ms")
    print(f"300 chars: first chunk p50 {med(s[0] for s in short) * 1000:.2f} ms, "
          f"max {max(s[0] for s in short) * 1000:.2f} ms; total p50 {med(s[1] for s in short) * 1000:.1f} ms")
    print(f"4000 chars ({audio:.0f} s of audio): first chunk p50 {med(s[0] for s in long) * 1000:.2f} ms, "
          f"total p50 {med(s[1] for s in long) * 1000:.0f} ms = {audio / med(s[1] for s in long):.0f}x real time")
    print(f"{len(SMALL)} chars, one at a time: p50 {med(s[1] for s in small) * 1000:.2f} ms; "
          f"100 at once: {100 / together:.0f} requests/s")
    gateway, child = after[0] - before[0], after[1] - before[1]
    print(f"CPU for those requests: gateway process {gateway:.2f} s, child {child:.2f} s, "
          f"total {gateway + child:.2f} s")


if __name__ == "__main__":
    if "--uvloop" in sys.argv:
        import uvloop
        uvloop.run(main())
    else:
        asyncio.run(main())
