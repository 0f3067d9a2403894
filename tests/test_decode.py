"""gateway.audio.decode and .duration: every upload format OpenAI accepts, measured and decoded in chunks,
and the one 400 for everything that is not audio."""

from __future__ import annotations

import array
import io
import tempfile
import time
from fractions import Fraction
from typing import BinaryIO

import av
import pytest

from gateway.audio import duration
from gateway.audio.decode import CHUNK_SAMPLES, PcmChunks, decode_chunks
from gateway.audio.duration import upload_seconds
from gateway.audio.workers import AudioWorkers
from gateway.errors import InvalidRequestError
from tests.tones import tone


def audio_file(muxer: str, codec: str, *, seconds: float = 3.0, rate: int = 44_100, channels: int = 2,
               silent: bool = False) -> bytes:
    """A `muxer` file holding `seconds` of tone (or silence) encoded with `codec`."""
    data = tone(seconds, 24_000, channels=channels, amplitude=0 if silent else 8000)
    layout = "mono" if channels == 1 else "stereo"
    buf = io.BytesIO()
    with av.open(buf, "w", format=muxer) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = layout
        block, step = 2 * channels, 1024
        for start in range(0, len(data), step * block):
            piece = data[start : start + step * block]
            frame = av.AudioFrame(format="s16", layout=layout, samples=len(piece) // block)
            frame.planes[0].update(piece)
            frame.sample_rate, frame.pts, frame.time_base = 24_000, start // block, Fraction(1, 24_000)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buf.getvalue()


def video_only_webm() -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="webm") as out:
        stream = out.add_stream("libvpx", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(5):
            frame = av.VideoFrame(64, 64, "yuv420p")
            for plane in frame.planes:
                plane.update(bytes([i * 40]) * plane.buffer_size)
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buf.getvalue()


def decode(file: BinaryIO, sample_rate: int = 16_000, max_seconds: float = 7200) -> bytes:
    """All the chunks, checking each but the last is CHUNK_SAMPLES long."""
    chunks = list(decode_chunks(file, sample_rate=sample_rate, max_seconds=max_seconds))
    assert all(len(c) == CHUNK_SAMPLES * 2 for c in chunks[:-1]) and 0 < len(chunks[-1]) <= CHUNK_SAMPLES * 2
    return b"".join(chunks)


def seconds(pcm: bytes, sample_rate: int = 16_000) -> float:
    return len(pcm) / (2 * sample_rate)


def upload(data: bytes) -> BinaryIO:
    """Like the gateway's spool: a SpooledTemporaryFile, left positioned at its end."""
    file = tempfile.SpooledTemporaryFile(max_size=16_384)
    file.write(data)
    return file  # type: ignore[return-value]


UPLOADS = {  # what OpenAI accepts, by file extension
    "flac": ("flac", "flac", 44_100),
    "mp3": ("mp3", "libmp3lame", 44_100),
    "mpga": ("mp3", "libmp3lame", 22_050),
    "mpeg": ("mpeg", "mp2", 44_100),
    "mp4": ("mp4", "aac", 44_100),
    "m4a": ("ipod", "aac", 48_000),
    "ogg": ("ogg", "libopus", 48_000),
    "wav": ("wav", "pcm_s16le", 44_100),
    "webm": ("webm", "libopus", 48_000),
}


@pytest.mark.parametrize("extension", sorted(UPLOADS))
def test_every_accepted_format_decodes_to_16k_mono(extension: str) -> None:
    muxer, codec, rate = UPLOADS[extension]
    data = audio_file(muxer, codec, rate=rate)
    pcm = decode(upload(data))
    assert seconds(pcm) == pytest.approx(3.0, abs=0.1)
    assert max(array.array("h", pcm)) > 4000  # the tone survived the downmix
    assert upload_seconds(upload(data), 7200) == pytest.approx(3.0, abs=0.1)


async def test_async_chunks_and_other_rates() -> None:
    data = audio_file("wav", "pcm_s16le", rate=24_000, channels=1)
    workers = AudioWorkers(1, 0)
    chunks = PcmChunks(upload(data), sample_rate=24_000, max_seconds=10, workers=workers)
    pcm = b"".join([chunk async for chunk in chunks])
    assert pcm == tone(3.0, 24_000) and chunks.seconds == 3.0  # same rate and layout: untouched samples
    assert workers.admitted == 1  # one job for the whole decode
    await chunks.aclose()
    assert workers.admitted == 0
    await workers.aclose()
    assert seconds(decode(upload(data))) == pytest.approx(3.0, abs=0.01)


def test_decoding_stops_past_max_seconds() -> None:
    chunks = decode_chunks(upload(audio_file("flac", "flac", seconds=5.0)), max_seconds=2.0)
    decoded = 0
    with pytest.raises(InvalidRequestError) as caught:
        for chunk in chunks:
            decoded += len(chunk)
    assert (caught.value.param, caught.value.code) == ("file", "audio_too_long")
    assert "2 seconds" in caught.value.message
    assert seconds(bytes(decoded)) <= 2.0 + 1.0  # SLACK_SECONDS for codec padding


def test_short_file_and_silence_decode() -> None:
    short = decode(upload(audio_file("wav", "pcm_s16le", seconds=0.1, rate=16_000, channels=1)))
    assert seconds(short) == pytest.approx(0.1, abs=0.001)
    silence = decode(upload(audio_file("mp3", "libmp3lame", seconds=2.0, silent=True)))
    assert seconds(silence) == pytest.approx(2.0, abs=0.1)
    assert not any(array.array("h", silence))


def test_truncated_mp3_decodes_what_it_can() -> None:
    data = audio_file("mp3", "libmp3lame")
    assert seconds(decode(upload(data[: len(data) // 2]))) == pytest.approx(1.5, abs=0.2)


NOT_AUDIO = {
    "empty": b"",
    "text named .mp3": b"This is a text file, not an mp3.\n" * 40,
    "truncated header": audio_file("mp3", "libmp3lame")[:120],
    "truncated wav header": audio_file("wav", "pcm_s16le")[:30],
    "truncated m4a (no moov)": audio_file("ipod", "aac")[:20_000],
    "zeros": bytes(20_000),
    "json": b'{"file": "speech.wav"}',
}


@pytest.mark.parametrize("name", [*sorted(NOT_AUDIO), "video only"])
def test_anything_else_is_the_one_400(name: str) -> None:
    data = video_only_webm() if name == "video only" else NOT_AUDIO[name]
    for call in (decode, lambda file: upload_seconds(file, 7200)):
        with pytest.raises(InvalidRequestError) as caught:
            call(upload(data))
        error = caught.value
        assert type(error) is InvalidRequestError and error.status == 400
        assert (error.param, error.code) == ("file", "invalid_value")
        assert error.message == "The audio file could not be decoded or its format is not supported."


def test_mp3_is_measured_by_its_frame_headers_as_the_demuxer_would() -> None:
    """MP3 (also behind an ID3v2 tag) is counted by frame headers, a quarter of the CPU of demuxing it, to
    FFmpeg's figure; an ID3 tag in front of another format still goes to the demuxer."""
    mp3 = audio_file("mp3", "libmp3lame", seconds=20.0)
    tag = b"ID3\x04\x00\x00\x00\x00\x00\x20" + bytes(32)  # an empty ID3v2.4 tag of 32 bytes
    flac = audio_file("flac", "flac", seconds=3.0)
    demuxed = duration._demuxed_seconds(upload(mp3), 7200)
    for data in (mp3, tag + mp3):
        assert duration._mp3_seconds(upload(data), 7200) == pytest.approx(demuxed, abs=0.03)
        assert upload_seconds(upload(data), 7200) == pytest.approx(demuxed, abs=0.03)
    assert duration._mp3_seconds(upload(tag + flac), 7200) is None
    assert upload_seconds(upload(tag + flac), 7200) == pytest.approx(3.0, abs=0.1)
    assert upload_seconds(upload(mp3), 30) == pytest.approx(demuxed, abs=0.03)
    with pytest.raises(InvalidRequestError, match="maximum of 10 seconds"):
        upload_seconds(upload(mp3), 10)
    cost = {}
    for name, measure in (("frames", duration._mp3_seconds), ("demuxer", duration._demuxed_seconds)):
        started = time.process_time()
        for _ in range(5):
            measure(upload(mp3), 7200)
        cost[name] = time.process_time() - started
    assert cost["frames"] < cost["demuxer"] / 2, cost  # measured: about a quarter
