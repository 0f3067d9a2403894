"""gateway/audio/splitter.py: long uploads cut at silences into WAV chunks within a limit, sample-accurate on the
original timeline, in bounded memory; what the splitter refuses is a 400, never a crash. WebRTC's VAD hears a
tone as speech, so speech is built here from tones (figures on eSpeak's speech: the module docstring)."""

from __future__ import annotations

import io
import itertools
import tempfile
import tracemalloc
import wave
from typing import BinaryIO

import pytest

from gateway.audio.splitter import FRAME, PAD_S, RATE, Chunk, split
from gateway.errors import InvalidRequestError
from tests.support import wav_bytes
from tests.tones import tone

Layout = list[tuple[str, float]]
"""("tone" | "quiet", seconds) parts of a test file, in order."""


def pcm(layout: Layout, noise: int = 0) -> bytes:
    """16 kHz s16le: tones at 440 Hz and digital silence, with uniform noise of +-`noise` everywhere."""
    out = b"".join(tone(s, RATE) if kind == "tone" else bytes(2 * int(s * RATE)) for kind, s in layout)
    if noise:
        np = pytest.importorskip("numpy")  # comes with faster-whisper (the `embedded` extra)
        samples = np.frombuffer(out, np.int16).astype(np.int32)
        samples += np.random.default_rng(5).integers(-noise, noise, samples.size, endpoint=True, dtype=np.int32)
        out = np.clip(samples, -32768, 32767).astype(np.int16).tobytes()
    return out


def wav_file(data: bytes, rate: int = RATE) -> io.BytesIO:
    return io.BytesIO(wav_bytes(data, rate))


def quiet_spans(layout: Layout) -> list[tuple[int, int]]:
    """[start, end) samples of each silence in `layout`."""
    spans, at = [], 0
    for kind, s in layout:
        n = int(s * RATE)
        if kind == "quiet":
            spans.append((at, at + n))
        at += n
    return spans


def chunks_of(file: BinaryIO, **kw: float) -> list[Chunk]:
    return list(split(file, max_input_seconds=7200, **kw))


def body(chunk: Chunk) -> bytes:
    """The chunk's PCM, read back as a WAV file (which checks the header too)."""
    with wave.open(io.BytesIO(chunk.wav)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, RATE)
        return w.readframes(w.getnframes())


def assert_whole(chunks: list[Chunk], data: bytes) -> None:
    """Contiguous chunks from 0 to the end whose samples are the file's, each exactly where its offsets say."""
    assert chunks[0].start == 0 and chunks[-1].end == len(data) // 2
    for before, after in itertools.pairwise(chunks):
        assert before.end == after.start
    for chunk in chunks:
        assert body(chunk) == data[2 * chunk.start : 2 * chunk.end]


LAYOUT: Layout = [("quiet", 0.5)]
for i in range(14):  # 4-7 s of "speech", then 0.2 s (too short to cut in) or 0.6-1.4 s of silence
    LAYOUT += [("tone", 4 + i % 4), ("quiet", 0.2 if i % 3 == 2 else 0.6 + (i % 5) * 0.2)]


@pytest.mark.parametrize("noise", [0, 800], ids=["clean", "noisy"])
def test_every_cut_falls_in_a_silence_with_its_padding_and_no_chunk_exceeds_the_limit(noise: int) -> None:
    data = pcm(LAYOUT, noise)
    chunks = chunks_of(wav_file(data), max_seconds=15)
    assert_whole(chunks, data)
    assert len(chunks) >= 6 and not any(c.hard for c in chunks)
    spans = quiet_spans(LAYOUT)
    slack = FRAME  # the VAD may hear a tone's onset up to a frame (30 ms) late
    for chunk in chunks[:-1]:
        assert any(a + PAD_S * RATE - slack <= chunk.end <= b - PAD_S * RATE + slack for a, b in spans), chunk.end_s
        assert not any(b - a < 0.4 * RATE and a <= chunk.end <= b for a, b in spans)  # not the 0.2 s ones
    assert max(c.end - c.start for c in chunks) <= 15 * RATE
    assert sum(c.end - c.start for c in chunks) == len(data) // 2


def test_a_chunk_of_silence_alone_says_so() -> None:
    """A pause longer than the limit and a silent tail make chunks with no speech (long audio does not send them)."""
    layout: Layout = [("tone", 4), ("quiet", 12), ("tone", 3), ("quiet", 9)]
    chunks = chunks_of(wav_file(pcm(layout)), max_seconds=6)
    tones = [(0.0, 4.0), (16.0, 19.0)]
    assert [c.speech for c in chunks] == [any(a < c.end_s and c.start_s < b for a, b in tones) for c in chunks]
    assert [c.speech for c in chunks] == [True, False, False, True, False, False]


def test_a_byte_limit_counts_the_wav_header() -> None:
    data = pcm(LAYOUT[:9])
    chunks = chunks_of(wav_file(data), max_seconds=600, max_bytes=200_000)  # 6.25 s of PCM
    assert_whole(chunks, data)
    assert max(len(c.wav) for c in chunks) <= 200_000 and len(chunks) >= 3


def test_audio_with_no_silence_gets_hard_cuts_exactly_at_the_limit() -> None:
    data = pcm([("tone", 25.0)])
    chunks = chunks_of(wav_file(data), max_seconds=10)
    limit = 10 * RATE // FRAME * FRAME  # every cut is on a 30 ms VAD frame
    assert [(c.start, c.end, c.hard) for c in chunks] == [
        (0, limit, True), (limit, 2 * limit, True), (2 * limit, 25 * RATE, False)]
    assert_whole(chunks, data)


def test_offsets_are_on_the_original_timeline_whatever_the_source_rate() -> None:
    """A 44.1 kHz stereo-free upload is resampled once, as a stream: chunks still add up to the whole."""
    source = b"".join(tone(s, 44_100) if k == "tone" else bytes(2 * int(s * 44_100)) for k, s in LAYOUT[:7])
    chunks = chunks_of(wav_file(source, 44_100), max_seconds=8)
    total = sum(c.end - c.start for c in chunks)
    assert abs(total - len(source) // 2 * RATE / 44_100) < 0.01 * RATE
    assert all(c.end - c.start <= 8 * RATE for c in chunks) and len(chunks) >= 3


def test_memory_stays_at_one_chunk_on_a_ten_minute_file() -> None:
    minute = pcm([("tone", 9.0), ("quiet", 1.0)] * 6)
    with tempfile.TemporaryFile() as file:
        with wave.open(file, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(RATE)
            for _ in range(10):
                w.writeframes(minute)
        file.seek(0)
        tracemalloc.start()
        try:
            count = seconds = 0
            for chunk in split(file, max_seconds=30, max_input_seconds=7200):
                count, seconds = count + 1, seconds + (chunk.end - chunk.start) / RATE
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert seconds == 600 and count == 21  # cut 0.21 s before each 30 s mark: the padding before the tone
    assert peak < 4 * 30 * RATE * 2, peak  # a few copies of one 30 s chunk (0.96 MB); the file's PCM is 19.2 MB


@pytest.mark.parametrize("content", [b"", b"RIFF\x00\x00\x00\x00WAVEfmt garbage" * 40, bytes(range(256)) * 64],
                         ids=["empty", "corrupt-wav", "noise-bytes"])
def test_what_is_not_audio_is_a_400_on_file(content: bytes) -> None:
    with pytest.raises(InvalidRequestError) as info:
        chunks_of(io.BytesIO(content), max_seconds=10)
    assert (info.value.status, info.value.param) == (400, "file")


def test_a_file_over_the_input_limit_is_a_400() -> None:
    with pytest.raises(InvalidRequestError) as info:
        list(split(wav_file(pcm([("tone", 5.0)])), max_seconds=2, max_input_seconds=2))
    assert info.value.code == "audio_too_long"


@pytest.mark.parametrize("limits", [{"max_seconds": 0.3}, {"max_seconds": 0.0}, {"max_seconds": float("nan")},
                                    {"max_seconds": -1.0}, {"max_seconds": 10, "max_bytes": 10_000},
                                    {"max_seconds": 10, "max_bytes": 20}, {"max_seconds": 10, "pad_s": 6.0},
                                    {"max_seconds": 10, "pad_s": float("inf")}])
def test_a_limit_with_no_room_for_the_padding_is_a_400_before_decoding(limits: dict[str, float]) -> None:
    with pytest.raises(InvalidRequestError) as info:
        split(io.BytesIO(b"never read"), max_input_seconds=60, **limits).__next__()
    assert (info.value.status, info.value.param, info.value.code) == (400, "chunking_strategy", "invalid_value")
