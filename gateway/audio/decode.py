"""Decoding uploaded audio files (for transcription engines and metering) into 16-bit mono PCM.

The upload is whatever a client sent as `file` (flac, mp3, mp4, mpeg, mpga, m4a, ogg, wav, webm):
FFmpeg sniffs the format from its bytes, not its name. Anything that is not decodable audio is the
client's fault, so every failure here is the same 400 InvalidRequestError on `file`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import av

from gateway.errors import InvalidRequestError


@dataclass(frozen=True, slots=True)
class DecodedAudio:
    pcm: bytes
    """Signed 16-bit little-endian mono samples at `sample_rate`."""
    sample_rate: int

    @property
    def duration(self) -> float:
        return len(self.pcm) / (2 * self.sample_rate)


def undecodable() -> InvalidRequestError:
    return InvalidRequestError(
        "The audio file could not be decoded or its format is not supported.",
        param="file",
        code="invalid_value",
    )


def decode_upload(
    file: BinaryIO, *, sample_rate: int = 16000, max_seconds: float | None = None
) -> DecodedAudio:
    """The whole upload (or its first `max_seconds`) as s16le mono at `sample_rate`. Blocking: call
    it from a thread. A damaged file yields what decodes; no audio at all is a 400."""
    limit = None if max_seconds is None else int(max_seconds * sample_rate) * 2
    resampler: av.AudioResampler | None = None
    key: tuple[str, int, str] | None = None
    pcm = bytearray()

    def convert(frame: av.AudioFrame | None) -> None:
        for out in resampler.resample(frame) if resampler else ():
            pcm.extend(memoryview(out.planes[0])[: out.samples * 2])

    try:
        for frame in _frames(file):
            if key != (frame.format.name, frame.sample_rate, frame.layout.name):  # first, or changed
                convert(None)
                resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
                key = (frame.format.name, frame.sample_rate, frame.layout.name)
            frame.pts = None  # samples in order; timestamps of damaged files must not add or drop any
            convert(frame)
            if limit is not None and len(pcm) >= limit:
                break
        else:
            convert(None)
    except InvalidRequestError:
        raise
    except Exception as exc:  # whatever FFmpeg (or PyAV) makes of a hostile file, it is a bad upload
        raise undecodable() from exc
    if not pcm:
        raise undecodable()
    return DecodedAudio(bytes(pcm if limit is None else pcm[:limit]), sample_rate)


async def decode_upload_async(
    file: BinaryIO, *, sample_rate: int = 16000, max_seconds: float | None = None
) -> DecodedAudio:
    """decode_upload in a worker thread."""
    return await asyncio.to_thread(decode_upload, file, sample_rate=sample_rate, max_seconds=max_seconds)


def probe_duration(file: BinaryIO) -> float:
    """Seconds of audio in the upload, counted by decoding it (container metadata can lie). Blocking."""
    seconds = 0.0
    try:
        for frame in _frames(file):
            seconds += frame.samples / frame.sample_rate
    except InvalidRequestError:
        raise
    except Exception as exc:
        raise undecodable() from exc
    if seconds <= 0:
        raise undecodable()
    return seconds


_OPEN_OPTIONS = {"analyzeduration": "0", "probesize": "65536"}


def _frames(file: BinaryIO) -> Iterator[av.AudioFrame]:
    """The first audio stream's frames, from the start of `file`; damaged packets are skipped."""
    file.seek(0)
    # Every frame is decoded below anyway, so FFmpeg need not analyze seconds of audio up front.
    with av.open(file, "r", metadata_errors="ignore", options=_OPEN_OPTIONS) as container:
        if not container.streams.audio:
            raise undecodable()
        stream = container.streams.audio[0]
        for packet in container.demux(stream):
            try:
                frames = stream.codec_context.decode(packet)
            except av.InvalidDataError:
                continue
            for frame in frames:
                if frame.samples and frame.sample_rate:
                    yield frame
