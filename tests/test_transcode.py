"""gateway.audio.transcode: formats, speed, pass-through, streaming, cleanup and errors, on PyAV-made audio."""

from __future__ import annotations

import array
import asyncio
import functools
import io
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from fractions import Fraction

import av
import pytest

from gateway.audio.formats import AudioFormat, pcm
from gateway.audio.transcode import encode as encode_on
from gateway.audio.workers import AudioWorkers
from gateway.errors import UpstreamError, UpstreamTimeoutError
from tests.tones import tone


def container(pcm_bytes: bytes, rate: int, channels: int, muxer: str, codec: str, out_rate: int | None = None) -> bytes:
    """`pcm_bytes` (s16le) encoded with `codec` into a `muxer` file."""
    buf = io.BytesIO()
    layout = "mono" if channels == 1 else "stereo"
    with av.open(buf, "w", format=muxer) as out:
        stream = out.add_stream(codec, rate=out_rate or rate)
        stream.layout = layout
        block, step = 2 * channels, 1024
        for start in range(0, len(pcm_bytes), step * block):
            piece = pcm_bytes[start : start + step * block]
            frame = av.AudioFrame(format="s16", layout=layout, samples=len(piece) // block)
            frame.planes[0].update(piece)
            frame.sample_rate, frame.pts, frame.time_base = rate, start // block, Fraction(1, rate)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buf.getvalue()


SOURCES = {  # AudioFormat container -> (muxer, codec, rate)
    "wav": ("wav", "pcm_s16le", 22_050),
    "mp3": ("mp3", "libmp3lame", 44_100),
    "opus": ("ogg", "libopus", 48_000),
    "aac": ("adts", "aac", 24_000),
    "flac": ("flac", "flac", 16_000),
}


@dataclass
class Feed:
    """An engine stream double: `data` in `parts` chunks, `delay` apart; records how far it got."""

    data: bytes
    parts: int = 20
    delay: float = 0.0
    error: BaseException | None = None
    yielded: int = 0
    finished_at: float | None = None
    closed: bool = False
    chunks: list[bytes] = field(default_factory=list)

    async def __call__(self) -> AsyncIterator[bytes]:
        size = max(1, -(-len(self.data) // self.parts))
        try:
            for start in range(0, len(self.data), size):
                await asyncio.sleep(self.delay)
                self.chunks.append(self.data[start : start + size])
                self.yielded += 1
                yield self.chunks[-1]
            if self.error is not None:
                raise self.error
            self.finished_at = time.perf_counter()
        finally:
            self.closed = True


async def assert_stopped_reading(feed: Feed) -> None:
    """The input is no longer read (closing it is its owner's, gateway.streaming.Stages)."""
    yielded = feed.yielded
    await asyncio.sleep(0.05)
    assert feed.yielded == yielded and feed.finished_at is None


async def collect(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


def probe(data: bytes) -> tuple[str, str, int, int, float]:
    """(container, codec, codec sample rate, channels, seconds decoded) of a complete file."""
    with av.open(io.BytesIO(data)) as file:
        stream = file.streams.audio[0]
        seconds = sum(frame.samples / frame.sample_rate for frame in file.decode(stream))
        ctx = stream.codec_context
        return file.format.name, ctx.name, ctx.sample_rate, ctx.channels, seconds


WORKERS = AudioWorkers(2, 16)
encode = functools.partial(encode_on, workers=WORKERS)


def transcode_threads() -> list[str]:
    """What a finished stream must not leave behind: a thread of its own, or its job on the pool."""
    return [t.name for t in threading.enumerate() if t.name.startswith("transcode-")] + ["job"] * WORKERS.admitted


@pytest.mark.parametrize(
    ("response_format", "container_name", "codecs"),
    [
        ("mp3", "mp3", {"mp3", "mp3float"}),
        ("opus", "ogg", {"opus", "libopus"}),
        ("aac", "aac", {"aac"}),
        ("flac", "flac", {"flac"}),
        ("wav", "wav", {"pcm_s16le"}),
    ],
)
async def test_each_container_format_is_what_openai_names(response_format: str, container_name: str,
                                                          codecs: set[str]) -> None:
    out = await collect(encode(Feed(tone(3, 16_000, channels=2))(), pcm(16_000, channels=2), response_format))
    name, codec, rate, channels, seconds = probe(out)
    assert (name, channels) == (container_name, 1) and codec in codecs
    assert rate == (48_000 if response_format == "opus" else 24_000)  # FFmpeg decodes Opus at 48 kHz
    assert seconds == pytest.approx(3.0, rel=0.1)
    if response_format == "wav":
        assert out[:4] == b"RIFF" and out[36:40] == b"data" and len(out) == 44 + 3 * 24_000 * 2


async def test_pcm_is_raw_s16le_mono_24k() -> None:
    out = await collect(encode(Feed(tone(3, 44_100, channels=2))(), pcm(44_100, channels=2), "pcm"))
    assert len(out) % 2 == 0
    assert len(out) / (2 * 24_000) == pytest.approx(3.0, rel=0.01)
    assert max(array.array("h", out)) > 6000  # the tone, not silence


async def test_pcm_to_wav_keeps_samples_exactly_across_odd_chunk_boundaries() -> None:
    source = tone(1)
    out = await collect(encode(Feed(source, parts=37)(), pcm(24_000), "wav"))
    assert out[44:] == source


@pytest.mark.parametrize("source_name", sorted(SOURCES))
async def test_container_sources_decode(source_name: str) -> None:
    muxer, codec, rate = SOURCES[source_name]
    data = container(tone(3), 24_000, 1, muxer, codec, out_rate=rate)
    out = await collect(encode(Feed(data)(), AudioFormat(source_name), "pcm"))
    assert len(out) / (2 * 24_000) == pytest.approx(3.0, rel=0.1)


async def test_wide_pcm_and_non_pcm_wav_sources() -> None:
    s32 = array.array("i", (v << 16 for v in array.array("h", tone(2, 8_000, channels=2)))).tobytes()
    out = await collect(encode(Feed(s32)(), pcm(8_000, channels=2, sample_width=4), "pcm"))
    assert len(out) / (2 * 24_000) == pytest.approx(2.0, rel=0.02)
    wav24 = container(tone(2), 24_000, 1, "wav", "pcm_s24le")  # not read by our WAV parser: FFmpeg's
    out = await collect(encode(Feed(wav24)(), AudioFormat("wav"), "pcm"))
    assert len(out) / (2 * 24_000) == pytest.approx(2.0, rel=0.02)


@pytest.mark.parametrize(("speed", "response_format"), [(2.0, "wav"), (0.5, "wav"), (4.0, "mp3"), (0.25, "opus"),
                                                        (1.5, "pcm")])
async def test_speed_scales_duration(speed: float, response_format: str) -> None:
    out = await collect(encode(Feed(tone(4))(), pcm(24_000), response_format, speed))
    seconds = len(out) / 48_000 if response_format == "pcm" else probe(out)[4]
    assert seconds == pytest.approx(4.0 / speed, rel=0.1)


@pytest.mark.parametrize(("source", "response_format", "data"), [
    (pcm(24_000), "pcm", tone(1)),
    (AudioFormat("mp3"), "mp3", container(tone(1), 24_000, 1, "mp3", "libmp3lame")),
])
async def test_pass_through_is_byte_identical(source: AudioFormat, response_format: str, data: bytes) -> None:
    feed = Feed(data, parts=7)
    received = [chunk async for chunk in encode(feed(), source, response_format)]
    assert received == feed.chunks and b"".join(received) == data
    assert feed.closed
    assert not transcode_threads()


@pytest.mark.parametrize(("source_name", "response_format"), [("pcm", "mp3"), ("pcm", "opus"), ("pcm", "aac"),
                                                              ("pcm", "wav"), ("mp3", "pcm"), ("wav", "flac")])
async def test_audio_comes_out_while_input_still_flows(source_name: str, response_format: str) -> None:
    audio = tone(5)
    data = audio if source_name == "pcm" else container(audio, 24_000, 1, *SOURCES[source_name][:2])
    feed = Feed(data, parts=20, delay=0.03)  # 30 ms apart: a loaded machine still encodes within the gaps
    source = pcm(24_000) if source_name == "pcm" else AudioFormat(source_name)
    started = time.perf_counter()
    first_at, first_input, early, total = 0.0, 0, 0, 0
    async for chunk in encode(feed(), source, response_format):
        if not total:
            first_at, first_input = time.perf_counter() - started, feed.yielded
        total += len(chunk)
        early += len(chunk) if feed.finished_at is None else 0
    assert feed.finished_at is not None
    assert first_input <= 5 and early > total / 2, (first_input, early, total)
    print(f"{source_name}->{response_format}: first bytes after {first_at * 1000:.0f} ms (input chunk "
          f"{first_input}/20), {early}/{total} bytes before the input ended "
          f"({(feed.finished_at - started) * 1000:.0f} ms)")


async def test_aclose_mid_stream_stops_the_worker_and_the_reading() -> None:
    before = threading.active_count()
    feed = Feed(tone(10), parts=100, delay=0.005)
    stream = encode(feed(), pcm(24_000), "mp3")
    for _ in range(3):
        await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]
    await assert_stopped_reading(feed)
    assert not transcode_threads() and threading.active_count() == before


async def test_cancelled_consumer_stops_the_worker_and_the_reading() -> None:
    before = threading.active_count()
    feed = Feed(tone(10), parts=100, delay=0.01)
    got: list[bytes] = []

    async def consume() -> None:
        async for chunk in encode(feed(), pcm(24_000), "opus"):
            got.append(chunk)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.15)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert got
    await assert_stopped_reading(feed)
    assert not transcode_threads() and threading.active_count() == before


async def test_slow_consumer_holds_back_the_input() -> None:
    feed = Feed(tone(20), parts=200)
    stream = encode(feed(), pcm(24_000), "wav")
    await anext(stream)
    await asyncio.sleep(0.3)
    assert feed.yielded < 60, feed.yielded  # bounded queues, not the whole stream in memory
    await stream.aclose()  # type: ignore[attr-defined]
    await assert_stopped_reading(feed)


@pytest.mark.parametrize("after_chunks", [0, 3])
async def test_input_errors_reach_the_consumer_unchanged(after_chunks: int) -> None:
    error = UpstreamTimeoutError("Backend 'x' timed out.")
    feed = Feed(tone(2)[: after_chunks * 4800], parts=max(after_chunks, 1), error=error)
    received = []
    with pytest.raises(UpstreamTimeoutError) as caught:
        async for chunk in encode(feed(), pcm(24_000), "mp3"):
            received.append(chunk)
    assert caught.value is error
    if after_chunks == 0:
        assert received == []  # nothing was sent before the failure: the handler can still fail over
    assert feed.closed and not transcode_threads()


@pytest.mark.parametrize("source_name", sorted(SOURCES))
async def test_undecodable_source_is_an_upstream_error(source_name: str) -> None:
    with pytest.raises(UpstreamError) as caught:
        await collect(encode(Feed(b"<html>502 Bad Gateway</html>\n" * 300, parts=4)(), AudioFormat(source_name),
                             "pcm"))
    assert caught.value.reason == "bad_audio" and caught.value.status == 502
    assert caught.value.message == "Backend produced audio the gateway could not decode."
    assert not transcode_threads()


async def test_bad_arguments_are_refused_at_once() -> None:
    with pytest.raises(ValueError):
        encode(Feed(b"")(), pcm(24_000), "ogg")
    with pytest.raises(ValueError):
        encode(Feed(b"")(), pcm(24_000), "mp3", speed=4.5)
    with pytest.raises(ValueError):
        encode(Feed(b"")(), pcm(24_000, sample_width=3), "mp3")
