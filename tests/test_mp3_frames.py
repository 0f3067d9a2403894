"""Counting MP3 audio by frame headers (used to bill mp3 output) agrees with FFmpeg's demuxer."""

from __future__ import annotations

import io

import av
import pytest

from gateway.audio.duration import encoded_seconds
from gateway.audio.mp3_frames import Mp3Clock
from tests.tones import tone


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
