"""Decoding uploaded audio files (for the embedded and streaming transcription engines) into 16-bit
mono PCM, a bounded chunk at a time.

The upload is whatever a client sent as `file` (flac, mp3, mp4, mpeg, mpga, m4a, ogg, wav, webm):
FFmpeg sniffs the format from its bytes, not its name. Anything that is not decodable audio is the
client's fault, so every failure here is a 400 InvalidRequestError on `file`.

Memory is bounded by a chunk (CHUNK_SAMPLES of PCM), never by the file: `decode_chunks` yields PCM
as it is decoded, and stops with a 400 once more than `max_seconds` came out, whatever the headers
said (`gateway.audio.duration` refuses long uploads before this, from their headers and packets).
"""

from __future__ import annotations

import threading
from collections.abc import Generator, Iterator
from typing import BinaryIO

import av

from gateway.audio.workers import AudioWorkers
from gateway.errors import InvalidRequestError

MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 8_000, 192_000
"""Audio outside these rates is refused: "1 Hz audio" is how a tiny WAV claims to last days."""
MAX_CHANNELS = 8
CHUNK_SAMPLES = 16_384
"""PCM samples per chunk: about a second at 16 kHz, four Wyoming audio-chunk events."""
SLACK_SECONDS = 1.0
"""Decoded audio may exceed the measured duration by codec padding and resampler delay."""
OPEN_OPTIONS = {"analyzeduration": "0", "probesize": "65536"}
"""Every frame is read anyway, so FFmpeg need not analyze seconds of audio up front."""


def undecodable() -> InvalidRequestError:
    return InvalidRequestError("The audio file could not be decoded or its format is not supported.",
                               param="file", code="invalid_value")


def audio_too_long(max_seconds: float) -> InvalidRequestError:
    return InvalidRequestError(f"The audio file is longer than the maximum of {max_seconds:g} seconds.",
                               param="file", code="audio_too_long")


def check_format(sample_rate: int, channels: int) -> None:
    """A 400 on `file` for sample rates or channel counts no speech audio has."""
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise InvalidRequestError(f"The audio file's sample rate ({sample_rate} Hz) is outside the supported "
                                  f"{MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz.", param="file",
                                  code="unsupported_sample_rate")
    if not 1 <= channels <= MAX_CHANNELS:
        raise InvalidRequestError(f"The audio file has {channels} channels; at most {MAX_CHANNELS} are supported.",
                                  param="file", code="unsupported_channels")


def decode_chunks(file: BinaryIO, *, max_seconds: float, sample_rate: int = 16_000,
                  chunk_samples: int = CHUNK_SAMPLES) -> Generator[bytes, None, None]:
    """The upload as s16le mono at `sample_rate`, in chunks of `chunk_samples` (the last one shorter).
    Blocking: iterate it on a worker (PcmChunks, or an embedded engine's own thread). A damaged file
    yields what decodes; no audio at all, or more than `max_seconds` (plus SLACK_SECONDS) of it, is a 400."""
    chunk = chunk_samples * 2
    limit = int((max_seconds + SLACK_SECONDS) * sample_rate) * 2
    resampler: av.AudioResampler | None = None
    key: tuple[str, int, str] | None = None
    pending, total = bytearray(), 0

    def convert(frame: av.AudioFrame | None) -> None:
        nonlocal total
        for out in resampler.resample(frame) if resampler else ():
            pending.extend(memoryview(out.planes[0])[: out.samples * 2])
            total += out.samples * 2
        if total > limit:
            raise audio_too_long(max_seconds)

    try:
        for frame in frames(file):
            if key != (frame.format.name, frame.sample_rate, frame.layout.name):  # first, or changed
                convert(None)
                resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
                key = (frame.format.name, frame.sample_rate, frame.layout.name)
            frame.pts = None  # samples in order; timestamps of damaged files must not add or drop any
            convert(frame)
            while len(pending) >= chunk:
                yield bytes(pending[:chunk])
                del pending[:chunk]
        convert(None)
    except InvalidRequestError:
        raise
    except Exception as exc:  # whatever FFmpeg (or PyAV) makes of a hostile file, it is a bad upload
        raise undecodable() from exc
    if not total:
        raise undecodable()
    if pending:
        yield bytes(pending)


def frames(file: BinaryIO) -> Iterator[av.AudioFrame]:
    """The first audio stream's frames, from the start of `file`; damaged packets are skipped."""
    file.seek(0)
    seen: tuple[int, int] | None = None
    with av.open(file, "r", metadata_errors="ignore", options=OPEN_OPTIONS) as container:
        if not container.streams.audio:
            raise undecodable()
        stream = container.streams.audio[0]
        for packet in container.demux(stream):
            try:
                decoded = stream.codec_context.decode(packet)
            except av.InvalidDataError:
                continue
            for frame in decoded:
                if frame.samples and frame.sample_rate:
                    if seen != (frame.sample_rate, frame.layout.nb_channels):  # the stream may change midway
                        seen = (frame.sample_rate, frame.layout.nb_channels)
                        check_format(*seen)
                    yield frame


class PcmChunks:
    """`decode_chunks` for a coroutine: one job on the audio workers, each chunk decoded in a task of
    its own. The job is taken at the first chunk (a 503 when the workers are saturated); `aclose`
    waits for a chunk still being decoded (a few milliseconds), so the upload is not closed under
    FFmpeg, then gives the job back."""

    def __init__(self, file: BinaryIO, *, max_seconds: float, workers: AudioWorkers,
                 sample_rate: int = 16_000) -> None:
        self._chunks = decode_chunks(file, max_seconds=max_seconds, sample_rate=sample_rate)
        self._lock = threading.Lock()
        self._workers = workers
        self._admitted = False
        self.sample_rate = sample_rate
        self.bytes = 0
        """PCM bytes produced so far."""

    @property
    def seconds(self) -> float:
        return self.bytes / (2 * self.sample_rate)

    def __aiter__(self) -> PcmChunks:
        return self

    async def __anext__(self) -> bytes:
        if not self._admitted:
            self._workers.admit()
            self._admitted = True
        chunk = await self._workers.run(self._next)
        if chunk is None:
            raise StopAsyncIteration
        self.bytes += len(chunk)
        return chunk

    def _next(self) -> bytes | None:
        with self._lock:
            return next(self._chunks, None)

    def _close(self) -> None:
        with self._lock:
            self._chunks.close()

    async def aclose(self) -> None:
        try:
            await self._workers.finish(self._close)
        finally:
            if self._admitted:
                self._workers.release()
                self._admitted = False
