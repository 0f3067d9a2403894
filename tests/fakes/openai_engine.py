"""A double of an OpenAI-compatible speech server (speaches, Kokoro-FastAPI, LocalAI) on a real port.

Modeled on aiohttp's ``examples/fake_server.py``: it owns a ``web.Application`` and serves it on
``127.0.0.1`` (port 0) with an ``AppRunner`` created with ``handler_cancellation=True``, so a client
that disconnects cancels the handler, as in production (that lifecycle, the recording and the counting
are tests.fakes.engine.FakeHttpEngine's). Use it as an async context manager:

    async with FakeOpenAIEngine() as engine:   # engine.url == "http://127.0.0.1:<port>/v1"
        engine.mode = "429"

Speech answers are real audio (a 375 Hz tone made with PyAV, ``SECONDS_PER_CHAR`` per input
character, at least ``MIN_SECONDS``), streamed in ``chunk_size`` pieces with ``chunk_delay`` between
them. Transcriptions answer ``transcript_text`` in every OpenAI response format. Every request is
kept in ``requests``; ``active``/``cancelled`` count running and client-cancelled handlers. ``mode``
selects a failure (see ``MODES``); ``expected_api_key`` turns on bearer-key checking.
"""

from __future__ import annotations

import array
import asyncio
import base64
import functools
import json
import math
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from tests.fakes.audio import encode
from tests.fakes.canned import Canned
from tests.fakes.engine import RECORDED, FakeHttpEngine, chunks, cut

RATE = 24_000
TONE_HZ = 375  # 64 samples per period at 24 kHz, so one period can be tiled
SECONDS_PER_CHAR = 0.06
MIN_SECONDS = 0.5
WORD_SECONDS = 0.4
CONTENT_TYPES = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac",
                 "flac": "audio/flac", "wav": "audio/wav", "pcm": "audio/pcm"}
_ENCODERS = {"mp3": ("mp3", "libmp3lame"), "opus": ("ogg", "libopus"), "aac": ("adts", "aac"),
             "flac": ("flac", "flac"), "wav": ("wav", "pcm_s16le")}
TRANSCRIPT_FORMATS = ("json", "text", "srt", "vtt", "verbose_json", "diarized_json")
MODES = ("ok", "500", "garbage", "hang", "401", "429", "400", "drop_midstream")
GARBAGE = b"<html><body><h1>502 Bad Gateway</h1>\x00\xff not what you asked for</body></html>"
_MODE_ERRORS: dict[str, tuple[int, str, str, str | None]] = {
    "500": (500, "The server had an error processing your request. Sorry about that!", "server_error", None),
    "401": (401, "Incorrect API key provided: sk-fa***ke.", "invalid_request_error", "invalid_api_key"),
    "429": (429, "Rate limit reached. Please try again in 7s.", "requests", "rate_limit_exceeded"),
    "400": (400, "Invalid value for the request (fake engine mode 400).", "invalid_request_error", None),
}
REQUEST_ID = web.RequestKey("fake_engine_request_id", str)
_PARAM_400 = {"/v1/audio/speech": "input", "/v1/audio/transcriptions": "file",
              "/v1/audio/translations": "file"}




@functools.lru_cache(maxsize=64)
def synth(response_format: str, seconds: float) -> bytes:
    """A mono 24 kHz tone of `seconds`, encoded as OpenAI's `response_format` (pcm: raw s16le)."""
    n = int(RATE * seconds)
    p = RATE // TONE_HZ
    period = array.array("h", (int(8000 * math.sin(2 * math.pi * i / p)) for i in range(p))).tobytes()
    raw = (period * (n // p + 1))[: n * 2]
    if response_format == "pcm":
        return raw
    container, codec = _ENCODERS[response_format]
    return encode(raw, RATE, container, codec)


def speech_seconds(text: str) -> float:
    return round(max(MIN_SECONDS, SECONDS_PER_CHAR * len(text)), 2)


def _sse(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


def _error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
           headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def _invalid(message: str, param: str) -> web.Response:
    return _error(400, message, "invalid_request_error", param)


def _stamp(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"


class FakeOpenAIEngine(FakeHttpEngine):
    MODES = MODES
    url_path = "/v1"

    def __init__(self, *, transcript_text: str = "The quick brown fox jumps over the lazy dog.",
                 expected_api_key: str | None = None, chunk_size: int = 4096,
                 chunk_delay: float = 0.0) -> None:
        super().__init__(chunk_size=chunk_size, chunk_delay=chunk_delay)
        self.transcript_text = transcript_text
        self.canned: Canned | None = None
        """A recorded answer (tests/fakes/canned.py) to every transcription or translation whose form passes."""
        self.expected_api_key = expected_api_key
        self.drop_after_chunks = 2
        self.models = ["tts-1", "whisper-1"]
        self.ignores_stream = False
        """Answer `stream=true` with a finished transcript, as OpenAI does for whisper-1."""
        self.sse_crlf = False
        """End SSE lines with CRLF, which the SSE spec allows as well as LF."""
        self.reply_delay = 0.0
        """A whole answer (a transcript) waits this long before it is sent."""
        # -- a server that speaks part of OpenAI's API (gateway/adapters/openai_capabilities.py) --
        self.speech_formats: tuple[str, ...] = tuple(CONTENT_TYPES)
        """Speech formats it produces; any other is a 400, as Kokoro-FastAPI refuses a format it lacks."""
        self.sse_formats: tuple[str, ...] | None = None
        """Formats it streams as SSE (None: all); for the others `stream_format` is ignored and raw audio
        answered (Kokoro-FastAPI, openedai-speech: none; vLLM: pcm and wav)."""
        self.transcript_formats: tuple[str, ...] = TRANSCRIPT_FORMATS
        """Transcript formats it answers; any other is a 400 (faster-whisper-server: json, verbose_json)."""
        self.model_field = "model"
        """The form or JSON field it reads the model from; without it, a 400 (faster-whisper-server: model_name)."""
        self.app.router.add_post("/v1/audio/speech", self._speech)
        self.app.router.add_post("/v1/audio/transcriptions", self._transcriptions)
        self.app.router.add_post("/v1/audio/translations", self._translations)
        self.app.router.add_get("/v1/models", self._models)
        self.app.on_response_prepare.append(self._stamp_request_id)

    # -- plumbing ------------------------------------------------------------------------------

    async def _answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        request[REQUEST_ID] = f"req_fake_{len(self.requests)}"
        key = self.expected_api_key
        auth = request.headers.get("Authorization")
        if key is not None and auth != f"Bearer {key}":
            message, code = ("You didn't provide an API key.", None) if auth is None else (
                "Incorrect API key provided.", "invalid_api_key")
            return _error(401, message, "invalid_request_error", code=code)
        if request.match_info.http_exception is not None:
            return _error(404, f"Invalid URL ({request.method} {request.path})", "invalid_request_error")
        if self.mode in _MODE_ERRORS:
            status, message, type_, code = _MODE_ERRORS[self.mode]
            param = _PARAM_400.get(request.path) if self.mode == "400" else None
            headers = {"Retry-After": self.retry_after or "7"} if self.mode == "429" else None
            return _error(status, message, type_, param, code, headers)
        if self.mode == "hang":
            await self._hang()
        return await handler(request)

    async def _stamp_request_id(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers.setdefault("x-request-id", request.get(REQUEST_ID, "req_fake_0"))

    async def _stream(self, request: web.Request, ctype: str, pieces: list[bytes]) -> web.StreamResponse:
        """Send `pieces` as a chunked body; in drop_midstream mode send a few, then cut the connection."""
        dropping = self.mode == "drop_midstream"
        if dropping:
            if len(pieces) < 2:
                whole = b"".join(pieces)
                pieces = [whole[: len(whole) // 2], whole[len(whole) // 2 :]]
            pieces = pieces[: max(1, min(self.drop_after_chunks, len(pieces) - 1))]
        resp = await self._write(request, {"Content-Type": ctype}, pieces)
        if dropping:
            await cut(request)
            return resp
        await resp.write_eof()
        return resp

    async def _reply(self, request: web.Request, body: bytes, content_type: str) -> web.StreamResponse:
        if self.reply_delay:
            await asyncio.sleep(self.reply_delay)
        if self.mode == "drop_midstream":
            return await self._stream(request, content_type, [body])
        return web.Response(body=body, headers={"Content-Type": content_type})

    # -- endpoints -----------------------------------------------------------------------------

    async def _speech(self, request: web.Request) -> web.StreamResponse:
        rec = request[RECORDED]
        body = rec.json if isinstance(rec.json, dict) else {}
        text, fmt = body.get("input"), body.get("response_format") or "mp3"
        if not isinstance(text, str) or not text:
            return _invalid("Missing required parameter: 'input'.", "input")
        if fmt not in CONTENT_TYPES or fmt not in self.speech_formats:
            return _invalid(f"Invalid response_format {fmt!r}.", "response_format")
        if not body.get(self.model_field):
            return _invalid(f"Missing required parameter: {self.model_field!r}.", self.model_field)
        if self.mode == "garbage":
            return web.Response(body=GARBAGE, content_type="text/html")
        seconds = speech_seconds(text)
        audio = await asyncio.to_thread(synth, fmt, seconds)
        pieces = chunks(audio, self.chunk_size)
        streams = CONTENT_TYPES if self.sse_formats is None else self.sse_formats
        if body.get("stream_format") != "sse" or fmt not in streams:
            return await self._stream(request, CONTENT_TYPES[fmt], pieces)
        events = [_sse({"type": "speech.audio.delta", "audio": base64.b64encode(c).decode()}) for c in pieces]
        n_in, n_out = max(1, len(text) // 4), math.ceil(seconds * 50)
        usage = {"input_tokens": n_in, "output_tokens": n_out, "total_tokens": n_in + n_out}
        events.append(_sse({"type": "speech.audio.done", "usage": usage}))
        return await self._stream(request, "text/event-stream", events)

    async def _transcriptions(self, request: web.Request) -> web.StreamResponse:
        return await self._transcribe(request, "transcribe")

    async def _translations(self, request: web.Request) -> web.StreamResponse:
        return await self._transcribe(request, "translate")

    async def _transcribe(self, request: web.Request, task: str) -> web.StreamResponse:
        rec = request[RECORDED]
        fmt = rec.form_value("response_format") or "json"
        if not any(name == "file" for name, *_ in rec.files):
            return _invalid("Missing required parameter: 'file'.", "file")
        if fmt not in TRANSCRIPT_FORMATS or fmt not in self.transcript_formats:
            return _invalid(f"Invalid response_format {fmt!r}.", "response_format")
        if not rec.form_value(self.model_field):
            return _invalid(f"Missing required parameter: {self.model_field!r}.", self.model_field)
        if self.canned is not None:
            return self.canned.response()
        if self.mode == "garbage":  # claims JSON for the json formats, but is not
            ctype = "application/json" if "json" in fmt else "text/html"
            return web.Response(body=GARBAGE, content_type=ctype)
        text = self.transcript_text
        words = [(w, round(i * WORD_SECONDS, 3), round((i + 0.9) * WORD_SECONDS, 3))
                 for i, w in enumerate(text.split())]
        if task == "transcribe" and rec.form_value("stream") == "true" and not self.ignores_stream:
            events = [_sse({"type": "transcript.text.delta", "delta": w if i == 0 else f" {w}"})
                      for i, (w, _, _) in enumerate(words)]
            usage = {"type": "tokens", "input_tokens": 20, "output_tokens": len(words),
                     "total_tokens": 20 + len(words)}
            events.append(_sse({"type": "transcript.text.done", "text": text, "usage": usage}))
            if self.sse_crlf:
                events = [e.replace(b"\n", b"\r\n") for e in events]
            return await self._stream(request, "text/event-stream", events)
        segments: list[dict[str, Any]] = []
        group: list[tuple[str, float, float]] = []
        for i, word in enumerate(words):
            group.append(word)
            if word[0][-1] in ".!?" or i == len(words) - 1:
                segments.append({
                    "id": len(segments), "seek": 0, "start": group[0][1], "end": group[-1][2],
                    "text": " " + " ".join(w for w, _, _ in group),
                    "tokens": [50364 + j for j in range(len(group))], "temperature": 0.0,
                    "avg_logprob": -0.25, "compression_ratio": 1.2, "no_speech_prob": 0.01})
                group = []
        if fmt == "json":
            return await self._reply(request, json.dumps({"text": text}).encode(), "application/json")
        if fmt == "diarized_json":  # OpenAI's shape (gpt-4o-transcribe-diarize): sentences, speakers A, B, A, ...
            turns = [{"type": "transcript.text.segment", "id": f"seg_{i:03d}", "start": s["start"], "end": s["end"],
                      "text": s["text"].strip(), "speaker": "AB"[i % 2]} for i, s in enumerate(segments)]
            body = {"task": "transcribe", "duration": round(len(words) * WORD_SECONDS, 3), "text": text,
                    "segments": turns, "usage": {"type": "duration", "seconds": 1}}
            return await self._reply(request, json.dumps(body).encode(), "application/json")
        if fmt == "text":
            return await self._reply(request, text.encode(), "text/plain; charset=utf-8")
        if fmt in ("srt", "vtt"):
            sep = "," if fmt == "srt" else "."
            cues = [(f"{s['id'] + 1}\n" if fmt == "srt" else "")
                    + f"{_stamp(s['start'], sep)} --> {_stamp(s['end'], sep)}\n{s['text'].strip()}\n"
                    for s in segments]
            out = ("WEBVTT\n\n" if fmt == "vtt" else "") + "\n".join(cues)
            return await self._reply(request, out.encode(), "text/plain; charset=utf-8")
        verbose: dict[str, Any] = {"task": task, "language": "english",
                                   "duration": round(len(words) * WORD_SECONDS, 3), "text": text,
                                   "segments": segments}
        if "word" in rec.form_values("timestamp_granularities[]"):
            verbose["words"] = [{"word": w, "start": s, "end": e} for w, s, e in words]
        return await self._reply(request, json.dumps(verbose).encode(), "application/json")

    async def _models(self, request: web.Request) -> web.StreamResponse:
        if self.mode == "garbage":
            return web.Response(body=GARBAGE, content_type="text/html")
        data = [{"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "fake-engine"}
                for m in self.models]
        body = json.dumps({"object": "list", "data": data}).encode()
        return await self._reply(request, body, "application/json")
