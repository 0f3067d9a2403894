"""A double of an OpenAI-compatible transcription server that really listens: it hears tone bursts as words.

The long-audio tests (issue 15) need an engine whose transcript depends on the audio it was sent, so that a
gateway which splits a file, shifts times and stitches transcripts can be checked against where each word
really is. This one decodes whatever file arrives (PyAV, any format) to 16 kHz mono, finds the bursts (10 ms
windows whose RMS is over `THRESHOLD`; a gap of at least `GAP_S` separates two bursts), estimates each
burst's frequency from its zero crossings and names it: 300 + 50 k Hz is WORDS[k]. tests/long_audio_fixture.py
builds such files.

Endpoints, on a real port (the lifecycle, recording and counting are tests.fakes.engine.FakeHttpEngine's):
POST /v1/audio/transcriptions and /v1/audio/translations (multipart, OpenAI's fields; `json`, `text`, `srt`,
`vtt`, `verbose_json` with a segment per burst and, with `timestamp_granularities[]=word`, `words`;
`stream=true` on transcriptions: a delta per word, then done), GET /v1/models.

Every request is kept in `heard` as a `Listened`: duration, byte size, the RMS of its first and last
`PAD_S` (a gateway pads its cuts with silence: they must be quiet) and the form fields. `max_audio_s`: a longer
file is answered as OpenAI answers too-long audio (400 invalid_request_error, param "file") and counted in
`too_long`. `delay_s`: each answer waits that long (the fan-out benchmark). `mode`/`fail_next` (5xx, hang) and
`active`/`peak` are the base class's.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import wave
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
from aiohttp import web
from aiohttp.typedefs import Handler

from tests.fakes.engine import RECORDED, FakeHttpEngine

RATE = 16_000
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett", "kilo",
         "lima")
"""Twelve: at 900 and 950 Hz ("mike", "november") WebRTC's VAD hears tests/long_audio_fixture.py's bursts as
silence after faint noise (see there)."""
BASE_HZ, STEP_HZ = 300, 50
"""WORDS[k] is a burst of 300 + 50 k Hz (300-850 Hz)."""
WINDOW = RATE // 100
"""10 ms: the resolution of a burst's edges."""
THRESHOLD = 300.0
"""RMS (of s16 samples) over which a window is loud."""
GAP_S = 0.1
PAD_S = 0.2
FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
MODES = ("ok", "500", "503", "hang")
_MODE_ERRORS = {"500": (500, "The server had an error processing your request. Sorry about that!", "server_error"),
                "503": (503, "The engine is currently overloaded, please try again later.", "server_error")}


@dataclass(frozen=True, slots=True)
class Heard:
    """One burst: seconds from the start of the file it was heard in, its word and frequency."""

    start: float
    end: float
    word: str
    hz: float


@dataclass
class Listened:
    """One request as the double heard it."""

    path: str
    size: int
    """Bytes of the file part."""
    duration: float
    head_rms: float
    """RMS of the first PAD_S seconds (0.0 is digital silence)."""
    tail_rms: float
    bursts: list[Heard]
    form: list[tuple[str, str]]
    pcm: bytes | None = None
    """The decoded 16 kHz samples, with `keep_pcm` (to find a chunk in the original file)."""
    answered: int = 0
    """HTTP status of the answer."""

    @property
    def words(self) -> list[str]:
        return [b.word for b in self.bursts]


def decode(data: bytes) -> np.ndarray:
    """Any audio file as 16 kHz mono s16 samples (ValueError if it is not audio). A WAV file in that format
    (what a gateway's chunks are) is read as it is, in a hundredth of the time PyAV takes."""
    with contextlib.suppress(wave.Error, EOFError):
        with wave.open(io.BytesIO(data)) as w:
            if (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getcomptype()) == (1, 2, RATE, "NONE"):
                return np.frombuffer(w.readframes(w.getnframes()), "<i2")
    out: list[np.ndarray] = []
    try:
        with av.open(io.BytesIO(data)) as container:
            resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
            for frame in container.decode(container.streams.audio[0]):
                out.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(frame))
            out.extend(f.to_ndarray().reshape(-1) for f in resampler.resample(None))
    except (av.FFmpegError, IndexError) as exc:
        raise ValueError("not audio") from exc
    return np.concatenate(out) if out else np.zeros(0, np.int16)


def rms(samples: np.ndarray) -> float:
    return float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))) if samples.size else 0.0


def word_for(hz: float) -> str:
    k = round((hz - BASE_HZ) / STEP_HZ)
    return WORDS[k] if 0 <= k < len(WORDS) else f"unknown{round(hz)}"


def bursts(samples: np.ndarray) -> list[Heard]:
    """The tone bursts in 16 kHz samples, in order."""
    n = samples.size // WINDOW
    windows = samples[: n * WINDOW].astype(np.float64).reshape(n, WINDOW)
    loud = np.flatnonzero(np.sqrt((windows**2).mean(axis=1)) > THRESHOLD)
    if not loud.size:
        return []
    breaks = np.flatnonzero(np.diff(loud) > round(GAP_S * RATE / WINDOW))  # >= GAP_S of quiet windows between
    found = []
    for first, last in zip(loud[np.r_[0, breaks + 1]], loud[np.r_[breaks, loud.size - 1]], strict=True):
        part = samples[first * WINDOW : (last + 1) * WINDOW]
        signs = np.signbit(part)
        hz = np.count_nonzero(signs[1:] != signs[:-1]) / 2 / (part.size / RATE)
        found.append(Heard(first * WINDOW / RATE, (last + 1) * WINDOW / RATE, word_for(hz), hz))
    return found


def listen(data: bytes, path: str, form: list[tuple[str, str]], keep_pcm: bool) -> Listened:
    """Decode and hear one upload (blocking: run it in a thread)."""
    samples = decode(data)
    pad = int(PAD_S * RATE)
    return Listened(path, len(data), samples.size / RATE, rms(samples[:pad]), rms(samples[-pad:]),
                    bursts(samples), list(form), samples.tobytes() if keep_pcm else None)


def _error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None) -> web.Response:
    return web.json_response({"error": {"message": message, "type": type_, "param": param, "code": code}},
                             status=status)


def _stamp(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"


def _sse(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


def render(heard: Listened, fmt: str, task: str, with_words: bool) -> tuple[bytes, str]:
    """The transcript of `heard` in OpenAI's `fmt`: body and content type."""
    text = " ".join(heard.words)
    usage = {"type": "duration", "seconds": math.ceil(heard.duration)}
    if fmt == "json":
        return json.dumps({"text": text, "usage": usage}).encode(), "application/json"
    if fmt == "text":
        return text.encode(), "text/plain; charset=utf-8"
    if fmt in ("srt", "vtt"):
        sep = "," if fmt == "srt" else "."
        cues = [(f"{i + 1}\n" if fmt == "srt" else "") + f"{_stamp(b.start, sep)} --> {_stamp(b.end, sep)}\n{b.word}\n"
                for i, b in enumerate(heard.bursts)]
        return (("WEBVTT\n\n" if fmt == "vtt" else "") + "\n".join(cues)).encode(), "text/plain; charset=utf-8"
    segments = [{"id": i, "seek": 0, "start": b.start, "end": b.end, "text": f" {b.word}",
                 "tokens": [50364 + WORDS.index(b.word) if b.word in WORDS else 50363], "temperature": 0.0,
                 "avg_logprob": -0.1, "compression_ratio": 1.0, "no_speech_prob": 0.01}
                for i, b in enumerate(heard.bursts)]
    verbose: dict[str, Any] = {"task": task, "language": "english", "duration": round(heard.duration, 3),
                               "text": text, "segments": segments, "usage": usage}
    if with_words:
        verbose["words"] = [{"word": b.word, "start": b.start, "end": b.end} for b in heard.bursts]
    return json.dumps(verbose).encode(), "application/json"


class ToneTranscriber(FakeHttpEngine):
    MODES = MODES
    url_path = "/v1"

    def __init__(self, *, max_audio_s: float | None = None, delay_s: float = 0.0, keep_pcm: bool = False) -> None:
        super().__init__()
        self.max_audio_s = max_audio_s
        """Longest file answered; a longer one is OpenAI's 400 and counted in `too_long`. None: no limit."""
        self.delay_s = delay_s
        """Seconds each transcript waits before it is sent (an engine's processing time)."""
        self.keep_pcm = keep_pcm
        self.too_long = 0
        self.heard: list[Listened] = []
        self.models = ["whisper-1"]
        self.app.router.add_post("/v1/audio/transcriptions", self._transcriptions)
        self.app.router.add_post("/v1/audio/translations", self._translations)
        self.app.router.add_get("/v1/models", self._models)

    async def _answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.match_info.http_exception is not None:
            return _error(404, f"Invalid URL ({request.method} {request.path})", "invalid_request_error")
        if self.mode in _MODE_ERRORS:
            status, message, type_ = _MODE_ERRORS[self.mode]
            return _error(status, message, type_)
        if self.mode == "hang":
            await self._hang()
        return await handler(request)

    async def _transcriptions(self, request: web.Request) -> web.StreamResponse:
        return await self._transcribe(request, "transcribe")

    async def _translations(self, request: web.Request) -> web.StreamResponse:
        return await self._transcribe(request, "translate")

    async def _transcribe(self, request: web.Request, task: str) -> web.StreamResponse:
        rec = request[RECORDED]
        fmt = rec.form_value("response_format") or "json"
        files = [data for name, _, _, data in rec.files if name == "file"]
        if not files:
            return _error(400, "Missing required parameter: 'file'.", "invalid_request_error", "file")
        if fmt not in FORMATS:
            return _error(400, f"Invalid response_format {fmt!r}.", "invalid_request_error", "response_format")
        try:
            heard = await asyncio.to_thread(listen, files[0], rec.path, rec.form, self.keep_pcm)
        except ValueError:
            return _error(400, "Audio file might be corrupted or unsupported", "invalid_request_error", "file",
                          "invalid_value")
        self.heard.append(heard)
        if self.max_audio_s is not None and heard.duration > self.max_audio_s:
            self.too_long += 1
            heard.answered = 400
            return _error(400, f"audio duration {heard.duration:g} seconds is longer than {self.max_audio_s:g} "
                          "seconds which is the maximum for this model", "invalid_request_error", "file",
                          "invalid_value")
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        heard.answered = 200
        if task == "transcribe" and rec.form_value("stream") == "true":
            events = [_sse({"type": "transcript.text.delta", "delta": w if i == 0 else f" {w}"})
                      for i, w in enumerate(heard.words)]
            usage = {"type": "tokens", "input_tokens": math.ceil(heard.duration * 10),
                     "output_tokens": len(heard.words)}
            usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]
            events.append(_sse({"type": "transcript.text.done", "text": " ".join(heard.words), "usage": usage}))
            return await self._send(request, {"Content-Type": "text/event-stream"}, b"".join(events))
        body, ctype = render(heard, fmt, task, "word" in rec.form_values("timestamp_granularities[]"))
        return web.Response(body=body, headers={"Content-Type": ctype})

    async def _models(self, request: web.Request) -> web.StreamResponse:
        data = [{"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "tone-transcriber"}
                for m in self.models]
        return web.json_response({"object": "list", "data": data})
