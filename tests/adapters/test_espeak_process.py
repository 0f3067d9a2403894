"""eSpeak NG (GPL-3.0-or-later) in its own process: never loaded into the gateway's, restarted when it dies,
retried with a backoff when it cannot start, and gone with the gateway even on SIGKILL."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import aiohttp
import pytest

from gateway.adapters import espeak, espeak_process
from gateway.adapters.base import SpeechJob
from gateway.adapters.espeak_process import PcmStream
from gateway.config import Backend, NativeVoice
from gateway.errors import Reason, UpstreamError

ROOT = Path(__file__).resolve().parents[2]
HTTP = cast(aiohttp.ClientSession, None)
TEXT = " ".join(["Hello world, this is a test of the speech system."] * 60)
pytestmark = pytest.mark.skipif(bool(espeak.unavailable_reason()), reason="eSpeak NG is not installed")


@pytest.fixture
async def tts() -> AsyncIterator[espeak.EspeakAdapter]:
    adapter = espeak.EspeakAdapter(Backend(name="espeak", kind="espeak"), HTTP)
    assert await adapter.ready()
    yield adapter
    await adapter.aclose()


def speech(text: str = TEXT) -> SpeechJob:
    return SpeechJob("req", "tts-1", "espeak-ng", NativeVoice("en-us"), text, "pcm", 1.0)


def pid_of(adapter: espeak.EspeakAdapter) -> int:
    assert adapter.process is not None and adapter.process.pid is not None
    return adapter.process.pid


def maps_espeak(pid: int | str) -> bool:
    return "libespeak-ng" in Path(f"/proc/{pid}/maps").read_text()


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for whoever adopted it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_the_library_is_mapped_in_the_child_only(tts: espeak.EspeakAdapter) -> None:
    stream = await tts.synthesize(speech("Hello."))
    assert b"".join([chunk async for chunk in stream.chunks])
    pid = pid_of(tts)
    assert maps_espeak(pid)
    assert not maps_espeak("self")
    assert "espeakng_loader" not in sys.modules or not maps_espeak("self")
    assert os.getpgid(pid) == pid and os.getsid(pid) == pid  # its own session: a terminal's ^C is the gateway's


async def test_requests_left_while_running_or_queued_are_stopped(tts: espeak.EspeakAdapter) -> None:
    """Three requests queue in the child; the second's client leaves while it waits, then the first's while it
    plays: the first stops early, the second is never synthesized, the third is whole."""
    alone = len(b"".join([chunk async for chunk in (await tts.synthesize(speech("The third one."))).chunks]))
    first, second, third = [await tts.synthesize(speech(text)) for text in (TEXT, TEXT, "The third one.")]
    playing, waiting = cast(PcmStream, first.chunks), cast(PcmStream, second.chunks)
    await anext(playing)
    await waiting.aclose()
    await playing.aclose()
    assert len(b"".join([chunk async for chunk in third.chunks])) == pytest.approx(alone, abs=2_205)  # 50 ms
    assert playing.ended.done() and waiting.ended.done()
    full = len(TEXT.split()) / 175 * 60 * 22_050 * 2  # bytes at eSpeak's 175 words per minute
    assert playing.produced < full / 4 and waiting.produced == 0, (playing.produced, full)


async def test_a_child_that_dies_fails_its_requests_and_is_started_again(tts: espeak.EspeakAdapter) -> None:
    first = pid_of(tts)
    stream = await tts.synthesize(speech())
    queued = await tts.synthesize(speech("Waiting for its turn."))
    await anext(stream.chunks)
    os.kill(first, signal.SIGKILL)
    for doomed in (stream, queued):
        with pytest.raises(UpstreamError) as caught:
            async for _ in doomed.chunks:
                pass
        assert caught.value.message == "Backend 'espeak' failed." and caught.value.reason == Reason.ENGINE
    again = await tts.synthesize(speech("Back again."))
    assert len(b"".join([chunk async for chunk in again.chunks])) > 20_000
    assert pid_of(tts) != first and not alive(first)


async def test_a_child_that_cannot_start_is_retried_after_a_growing_backoff(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Probed every 20 ms, a child that exits at once is started again only after 0.05 s, then 0.1 s."""
    starts = tmp_path / "starts"
    broken = tmp_path / "broken.py"
    broken.write_text(f"import sys, time\nopen({str(starts)!r}, 'a').write(f'{{time.time()}}\\n')\n"
                      "print('no library here', file=sys.stderr)\nsys.exit(3)\n")
    monkeypatch.setattr(espeak_process, "CHILD", broken)
    monkeypatch.setattr(espeak, "RESTART_BACKOFF_S", (0.05, 0.1))
    adapter = espeak.EspeakAdapter(Backend(name="espeak", kind="espeak"), HTTP)
    try:
        assert not await adapter.ready()
        for _ in range(20):  # within the backoff: no new process, the same 502
            with pytest.raises(UpstreamError) as caught:
                await adapter.synthesize(speech("hi"))
            assert caught.value.message == "Backend 'espeak' failed to start." and caught.value.reason == Reason.ENGINE
        deadline = time.monotonic() + 5
        while len(starts.read_text().split()) < 3:
            assert time.monotonic() < deadline
            assert not await adapter.ready()
            await asyncio.sleep(0.02)
        times = [float(t) for t in starts.read_text().split()]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert gaps[0] > 0.05 and gaps[1] > 0.1, gaps
    finally:
        await adapter.aclose()


async def test_after_aclose_the_child_is_gone_and_requests_are_refused(tts: espeak.EspeakAdapter) -> None:
    pid = pid_of(tts)
    stream = await tts.synthesize(speech())
    await anext(stream.chunks)
    await tts.aclose()
    with pytest.raises(UpstreamError) as caught:
        async for _ in stream.chunks:
            pass
    assert caught.value.message == "Backend 'espeak' is shut down." and caught.value.reason == Reason.CLOSED
    assert not alive(pid)
    with pytest.raises(UpstreamError, match="is shut down"):
        await tts.synthesize(speech("hi"))


def test_the_child_dies_with_a_gateway_killed_by_sigkill() -> None:
    """A gateway process (the adapter in a bare interpreter, on the gateway's event loop: uvloop when installed)
    SIGKILLed mid-synthesis leaves no eSpeak behind."""
    code = """if True:
        import asyncio, sys
        from gateway.adapters import espeak
        from gateway.adapters.base import SpeechJob
        from gateway.config import Backend, NativeVoice
        from gateway.event_loop import loop_factory, run

        async def main():
            adapter = espeak.EspeakAdapter(Backend(name="espeak", kind="espeak"), None)
            assert await adapter.ready()
            stream = await adapter.synthesize(SpeechJob("r", "tts-1", "e", NativeVoice("en-us"), "Hello. " * 500))
            await anext(stream.chunks)
            print(adapter.process.pid, flush=True)
            await asyncio.sleep(60)
        run(main(), loop_factory())
    """
    gateway = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert gateway.stdout is not None
        child = int(gateway.stdout.readline())
        assert alive(child)
    finally:
        gateway.kill()
        gateway.wait(10)
    deadline = time.monotonic() + 5
    while alive(child):
        assert time.monotonic() < deadline, "the eSpeak child outlived the gateway"
        time.sleep(0.01)
