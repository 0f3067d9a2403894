"""Counting MP3 audio by frame headers (used to bill mp3 output) agrees with FFmpeg's demuxer."""

from __future__ import annotations

import io
import time

import av
import pytest

from gateway.audio.duration import encoded_seconds
from gateway.audio.mp3_frames import Mp3Clock
from tests.tones import tone

MB = 1024 * 1024


def mp3(rate: int, bit_rate: int, seconds: float = 2.3, id3: bool = False) -> bytes:
    samples = tone(seconds, rate)
    frame = av.AudioFrame(format="s16", layout="mono", samples=len(samples) // 2)
    frame.planes[0].update(samples)
    frame.sample_rate = rate
    out = io.BytesIO()
    with av.open(out, "w", format="mp3", options={} if id3 else {"id3v2_version": "0"}) as container:
        stream = container.add_stream("libmp3lame", rate=rate)
        stream.bit_rate = bit_rate
        stream.layout = "mono"
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return out.getvalue()


def counted(data: bytes, chunk: int) -> float:
    clock = Mp3Clock()
    for i in range(0, len(data), chunk):
        clock.feed(data[i:i + chunk])
    return clock.seconds


@pytest.mark.parametrize(("rate", "bit_rate"), [(44_100, 128_000), (48_000, 192_000), (24_000, 64_000),
                                                (22_050, 32_000), (16_000, 24_000), (8_000, 16_000)])
@pytest.mark.parametrize("chunk", [1, 997, 65_536])
def test_whole_streams_match_the_demuxer(rate: int, bit_rate: int, chunk: int) -> None:
    data = mp3(rate, bit_rate, id3=(chunk == 997))  # an ID3v2 tag split across chunks, too
    assert counted(data, chunk) == pytest.approx(encoded_seconds(io.BytesIO(data), "mp3"), abs=1e-9)
    assert counted(data, chunk) == pytest.approx(2.3, abs=0.15)


def test_a_cut_stream_counts_only_whole_frames() -> None:
    data = mp3(24_000, 64_000)
    half = data[: len(data) // 2]
    frame = 576 / 24_000
    assert encoded_seconds(io.BytesIO(half), "mp3") - frame - 1e-9 <= counted(half, 4096) <= \
        encoded_seconds(io.BytesIO(half), "mp3")


def test_garbage_is_skipped_and_counts_nothing() -> None:
    assert counted(b"\x00\xff\xfe not audio " * 100, 64) == 0.0
    data = mp3(22_050, 32_000)
    assert counted(b"junk" + data, 500) == pytest.approx(counted(data, 500))


def test_a_stream_split_in_two_at_every_offset_counts_the_same() -> None:
    data = b"junk" + mp3(24_000, 64_000, seconds=0.3, id3=True)
    whole = counted(data, len(data))
    assert whole == pytest.approx(encoded_seconds(io.BytesIO(data), "mp3"), abs=1e-9)
    for cut in range(1, len(data)):
        clock = Mp3Clock()
        clock.feed(data[:cut])
        clock.feed(data[cut:])
        assert clock.seconds == whole, cut


def cpu_per_megabyte(data: bytes) -> float:
    """This process's CPU seconds to count 1 MB of `data` repeated, fed in 8 KiB chunks (best of three)."""
    data = (data * (MB // len(data) + 1))[:MB]
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        counted(data, 8192)
        best = min(best, time.process_time() - started)
    return best


@pytest.mark.parametrize("junk", [b"\xff", b"\xff\x00", b"\xff\xfb", b"\x00", bytes(range(256))],
                         ids=["all-ff", "ff-00", "ff-fb", "zeros", "every-byte"])
def test_junk_labelled_mpeg_costs_no_more_than_a_few_times_real_mp3(junk: bytes) -> None:
    """Resynchronizing is a regex scan in C, not a Python step per byte (which cost 30-80 times real MP3)."""
    real = cpu_per_megabyte(mp3(24_000, 64_000, seconds=10))
    assert counted(junk * 4096, 8192) == 0.0
    assert cpu_per_megabyte(junk) < 4 * real, (cpu_per_megabyte(junk), real)
