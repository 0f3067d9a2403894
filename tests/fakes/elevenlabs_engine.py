"""A double of the ElevenLabs API (text to speech, Scribe speech to text, voices) on a real port.

It speaks the wire format of native-engines.md section 3: `POST /v1/text-to-speech/{voice_id}/stream`
with `output_format` in the query and `{text, model_id, voice_settings}` as JSON, answering real audio
in that format (a 300 Hz tone, `SECONDS_PER_CHAR` per character, divided by `voice_settings.speed`),
streamed in `chunk_size` pieces `chunk_delay` apart; `POST /v1/speech-to-text` (multipart `file` +
`model_id`, ...) answering Scribe's JSON with `word`, `spacing` and `audio_event` entries and the
duration of the decoded upload; `GET /v1/voices`. Auth is the `xi-api-key` header (checked against
`expected_api_key`), errors are `{"detail": {"status", "message"}}` or FastAPI's 422 `{"detail": [{loc, msg}]}`.

    async with FakeElevenLabs(expected_api_key="k") as engine:   # engine.url == "http://127.0.0.1:<port>"
        engine.mode = "429"

Every request is kept in `requests` (see tests.fakes.engine.Recorded); `finished` holds the
loop time at which each speech body was completely written.
"""

from __future__ import annotations

import array
import asyncio
import functools
import json
import math
import time
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from tests.fakes.audio import decoded_seconds, encode
from tests.fakes.engine import RECORDED, FakeHttpEngine, Recorded, chunks, cut, record

TONE_HZ = 300
SECONDS_PER_CHAR = 0.05
MIN_SECONDS = 0.5
SPEED_RANGE = (0.7, 1.2)
VOICES = ("21m00Tcm4TlvDq8ikWAM", "EXAVITQu4vr4xnSDxMaL", "a b/c")
OUTPUT_FORMATS = ("mp3_22050_32", "mp3_44100_128", "pcm_16000", "pcm_22050", "pcm_24000", "pcm_44100",
                  "wav_24000", "opus_48000_64", "ulaw_8000")
_ENCODERS = {"mp3": ("mp3", "libmp3lame"), "wav": ("wav", "pcm_s16le"), "opus": ("ogg", "libopus"),
             "ulaw": ("mulaw", "pcm_mulaw")}
_CONTENT_TYPES = {"mp3": "audio/mpeg", "pcm": "audio/pcm", "wav": "audio/wav", "opus": "audio/ogg",
                  "ulaw": "audio/basic"}
MODES = ("ok", "401", "quota", "429", "422", "400", "500", "garbage", "drop_midstream", "hang")
_DETAIL_ERRORS = {
    "401": (401, "invalid_api_key", "Invalid API key"),
    "quota": (401, "quota_exceeded", "This request exceeds your quota of 10000. You have 0 credits remaining, "
                                     "while 91 credits are required for this request."),
    "429": (429, "too_many_concurrent_requests", "Too many concurrent requests for your subscription."),
    "400": (400, "max_character_limit_exceeded", "Text is too long: at most 10000 characters for this model."),
    "500": (500, "internal_error", "An internal error occurred."),
}
WORDS = [("The", 0.10, 0.28), ("quick", 0.30, 0.55), ("brown", 0.58, 0.85), ("fox", 0.88, 1.10),
         ("jumps.", 1.12, 1.50), ("(laughter)", 1.60, 2.40), ("Then", 2.80, 3.00), ("it", 3.05, 3.15),
         ("sleeps.", 3.20, 3.70)]
TEXT = "The quick brown fox jumps. Then it sleeps."


@functools.lru_cache(maxsize=64)
def synth(output_format: str, seconds: float) -> bytes:
    """`seconds` of a mono tone, encoded as ElevenLabs' `output_format` (pcm_*: raw s16le at that rate)."""
    codec, rate_text, *_ = output_format.split("_")
    rate = int(rate_text)
    n = int(rate * seconds)
    raw = array.array("h", (int(8000 * math.sin(2 * math.pi * TONE_HZ * i / rate)) for i in range(n))).tobytes()
    if codec == "pcm":
        return raw
    container, encoder = _ENCODERS[codec]
    bit_rate = int(output_format.split("_")[2]) * 1000 if codec == "mp3" else None
    return encode(raw, rate, container, encoder, bit_rate=bit_rate)


def speech_seconds(text: str, speed: float = 1.0) -> float:
    return round(max(MIN_SECONDS, SECONDS_PER_CHAR * len(text)) / speed, 3)


def detail(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"detail": {"status": code, "message": message}}, status=status, headers=headers)


def validation(field: str, msg: str) -> web.Response:
    return web.json_response({"detail": [{"loc": ["body", field], "msg": msg, "type": "value_error"}]}, status=422)


class FakeElevenLabs(FakeHttpEngine):
    MODES = MODES

    def __init__(self, *, expected_api_key: str | None = None, chunk_size: int = 4096,
                 chunk_delay: float = 0.0) -> None:
        super().__init__(expected_api_key=expected_api_key, chunk_size=chunk_size, chunk_delay=chunk_delay)
        self.sent: list[bytes] = []
        """The audio of each speech answer, whole."""
        self.finished: list[float] = []
        """time.monotonic() when each speech answer was completely written."""
        self.app.router.add_post("/v1/text-to-speech/{voice_id:.+}/stream", self._speech)
        self.app.router.add_post("/v1/speech-to-text", self._speech_to_text)
        self.app.router.add_get("/v1/voices", self._voices)

    async def _record(self, request: web.Request) -> Recorded:
        """The raw path: voice ids stay percent-encoded."""
        return await record(request, request.raw_path.split("?")[0])

    async def _answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        key = request.headers.get("xi-api-key")
        if self.expected_api_key is not None and key != self.expected_api_key:
            return detail(401, "invalid_api_key", "Invalid API key" if key else "Missing xi-api-key header")
        if request.match_info.http_exception is not None:
            return web.json_response({"detail": "Not Found"}, status=404)
        if self.mode in _DETAIL_ERRORS:
            status, code, message = _DETAIL_ERRORS[self.mode]
            headers = {"Retry-After": self.retry_after} if self.mode == "429" and self.retry_after else None
            return detail(status, code, message, headers)
        if self.mode == "422":
            return validation("text" if request.path.endswith("/stream") else "file", "Field required")
        if self.mode == "hang":
            await self._hang()
        return await handler(request)

    async def _speech(self, request: web.Request) -> web.StreamResponse:
        rec = request[RECORDED]
        voice_id = request.match_info["voice_id"]
        body = rec.json if isinstance(rec.json, dict) else None
        fmt = request.query.get("output_format", "mp3_44100_128")
        if body is None or not isinstance(body.get("text"), str) or not body["text"]:
            return validation("text", "Field required")
        if fmt not in OUTPUT_FORMATS:
            return validation("output_format", f"Input should be one of {', '.join(OUTPUT_FORMATS)}")
        if voice_id not in VOICES:
            return detail(400, "voice_not_found", f"A voice with the voice_id {voice_id} was not found.")
        speed = (body.get("voice_settings") or {}).get("speed", 1.0)
        if not SPEED_RANGE[0] <= speed <= SPEED_RANGE[1]:
            return validation("speed", "Input should be between 0.7 and 1.2")
        if self.mode == "garbage":
            return web.json_response({"detail": {"status": "ok", "message": "not audio"}})
        audio = await asyncio.to_thread(synth, fmt, speech_seconds(body["text"], speed))
        self.sent.append(audio)
        pieces = chunks(audio, self.chunk_size)
        if self.mode == "drop_midstream":
            pieces = pieces[: max(1, len(pieces) // 2)]
        resp = await self._write(request, {"Content-Type": _CONTENT_TYPES[fmt.split("_")[0]]}, pieces)
        if self.mode == "drop_midstream":
            await cut(request)
            return resp
        await resp.write_eof()
        self.finished.append(time.monotonic())
        return resp

    async def _speech_to_text(self, request: web.Request) -> web.StreamResponse:
        rec = request[RECORDED]
        if self.canned is not None:
            return self.canned.response()
        if not rec.form_value("model_id"):
            return validation("model_id", "Field required")
        files = [data for name, _, _, data in rec.files if name == "file"]
        if not files:
            return validation("file", "Field required")
        if rec.form_value("model_id") not in ("scribe_v1", "scribe_v2"):
            return detail(400, "invalid_model", "Model not supported for speech to text.")
        try:
            duration = await asyncio.to_thread(decoded_seconds, files[0])
        except ValueError:
            return detail(400, "invalid_content", "The audio could not be decoded.")
        tag_events = rec.form_value("tag_audio_events") != "false"
        entries: list[dict[str, Any]] = []
        for i, (text, start, end) in enumerate(WORDS):
            kind = "audio_event" if text.startswith("(") else "word"
            if kind == "audio_event" and not tag_events:
                continue
            if entries:
                gap_start = entries[-1]["end"]
                entries.append({"text": " ", "start": gap_start, "end": start, "type": "spacing",
                                "speaker_id": "speaker_0", "logprob": 0.0})
            entries.append({"text": text, "start": start, "end": end, "type": kind, "speaker_id": "speaker_0",
                            "logprob": -0.05 * (i + 1)})
        text = TEXT if not tag_events else TEXT.replace("jumps. ", "jumps. (laughter) ")
        answer = {"language_code": "eng", "language_probability": 0.98, "text": text, "words": entries,
                  "transcription_id": f"tr_{len(self.requests)}", "audio_duration_secs": round(duration, 3)}
        if self.mode == "garbage":
            return web.Response(body=b"<html><body>502 Bad Gateway</body></html>", content_type="text/html")
        if self.mode == "drop_midstream":  # half the JSON, then the connection is cut
            data = json.dumps(answer).encode()
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            await resp.prepare(request)
            await resp.write(data[: len(data) // 2])
            await cut(request)
            return resp
        response = web.Response(body=json.dumps(answer).encode(), content_type="application/json")
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            response.enable_compression()  # as ElevenLabs' front end may, for a client that accepts it
        return response

    async def _voices(self, request: web.Request) -> web.StreamResponse:
        voices = [{"voice_id": v, "name": f"voice {i}", "category": "premade"} for i, v in enumerate(VOICES)]
        return web.json_response({"voices": voices, "has_more": False, "total_count": len(voices)})
