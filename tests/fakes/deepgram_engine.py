"""A double of Deepgram's API (`POST /v1/listen`, `POST /v1/speak`, `GET /v1/projects`, and the live
`/v1/listen` WebSocket: see `_listen_live`, `LiveSession`) on a real port.

It speaks the wire format of /work/shared/research/native-engines.md section 4: `Authorization: Token`,
raw audio bodies for /v1/listen with options in the query, JSON `{"text"}` for /v1/speak with the
audio format in `encoding`/`container`/`sample_rate` (checked against the format combinations, so an
adapter asking for an impossible one gets Deepgram's 400), errors as `{"err_code", "err_msg",
"request_id"}` (or `{"category", "message"}`).

Speech is real audio: a 440 Hz tone of `SECONDS_PER_CHAR` per character, encoded with PyAV as the
query asks (mp3 and aac at 22.05 kHz, Ogg Opus at 48 kHz, FLAC and linear16 at `sample_rate`),
streamed in `chunk_size` pieces with `chunk_delay` between them. Transcripts are `transcript_text`
spread over the uploaded audio's real (decoded) duration. `mode` selects a failure (see MODES).
"""

from __future__ import annotations

import array
import asyncio
import functools
import hashlib
import json
import math
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict

from tests.fakes.audio import decoded_seconds, encode
from tests.fakes.engine import RECORDED, FakeHttpEngine, Recorded

SECONDS_PER_CHAR = 0.06
MIN_SECONDS = 0.5
MAX_CHARS = 2000
MODES = ("ok", "401", "403", "429", "400", "400_category", "500", "garbage", "hang", "drop_midstream",
         "live_close_error", "live_error_message", "live_drop", "live_not_json", "live_bad_transcript", "live_huge",
         "live_silent", "live_chatter")
"""The live_* modes fail a `/v1/listen` WebSocket after `fail_after` final Results (the HTTP modes refuse its
upgrade): a close 1011 with a NET-0000 reason / an `Error` message then that close / the connection cut / a
text frame that is not JSON / a Results whose transcript is a number / a 2 MB Results / silence (no Metadata,
no close) / empty final Results every 20 ms, forever."""
LIVE_SECOND = 32_000
"""Bytes of one second of the 16 kHz mono linear16 the adapter sends."""
GARBAGE = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
# encoding -> (allowed containers (first: default), allowed sample rates (first: default) or None if fixed,
#              fixed rate, muxer, codec, content type)
COMBOS: dict[str, tuple[tuple[str, ...], tuple[int, ...], str, str, str]] = {
    "linear16": (("wav", "none"), (24_000, 8000, 16_000, 32_000, 48_000), "wav", "pcm_s16le", "audio/wav"),
    "mp3": (("none",), (22_050,), "mp3", "libmp3lame", "audio/mpeg"),
    "opus": (("ogg",), (48_000,), "ogg", "libopus", "audio/ogg"),
    "aac": (("none",), (22_050,), "adts", "aac", "audio/aac"),
    "flac": (("none",), (48_000, 8000, 16_000, 22_050, 24_000, 32_000), "flac", "flac", "audio/flac"),
}
REQUEST_ID = web.RequestKey("deepgram_request_id", str)


def speech_seconds(text: str) -> float:
    return round(max(MIN_SECONDS, SECONDS_PER_CHAR * len(text)), 2)


@functools.lru_cache(maxsize=8)
def _second(rate: int) -> bytes:
    """One second of a 440 Hz tone (a whole number of periods, so seconds join without a click)."""
    return array.array("h", (int(8000 * math.sin(2 * math.pi * 440 * i / rate)) for i in range(rate))).tobytes()


@functools.lru_cache(maxsize=64)
def tone(seconds: float, rate: int, muxer: str, codec: str) -> bytes:
    """`seconds` of a 440 Hz tone at `rate`, mono, as `muxer`/`codec` ('raw' for headerless s16le)."""
    n = int(rate * seconds)
    raw = (_second(rate) * math.ceil(seconds))[: n * 2]
    if muxer == "raw":
        return raw
    return encode(raw, rate, muxer, codec, frame_samples=960)


def _error(status: int, code: str, message: str, request_id: str, headers: dict[str, str] | None = None,
           category: bool = False) -> web.Response:
    body = ({"category": code, "message": message, "details": message, "request_id": request_id} if category
            else {"err_code": code, "err_msg": message, "request_id": request_id})
    return web.json_response(body, status=status, headers=headers)


@dataclass
class LiveSession:
    """One `/v1/listen` WebSocket as the double saw it."""

    query: dict[str, str]
    headers: CIMultiDict[str]
    audio: bytearray = field(default_factory=bytearray)
    texts: list[str] = field(default_factory=list)
    """The client's text messages (Finalize, CloseStream, KeepAlive...)."""
    sent: list[dict[str, Any]] = field(default_factory=list)
    """Every JSON message the double sent."""
    finished: bool = False
    """The double ended the stream itself (Metadata and close 1000, or a failure mode)."""
    ended: bool = False
    """The handler is over (the client left, or the double ended it)."""


class FakeDeepgram(FakeHttpEngine):
    MODES = MODES

    def __init__(self, *, expected_api_key: str | None = None, chunk_size: int = 4096,
                 chunk_delay: float = 0.0) -> None:
        super().__init__(expected_api_key=expected_api_key, chunk_size=chunk_size, chunk_delay=chunk_delay)
        self.sent: list[bytes] = []
        """The audio body of each /v1/speak answer, as sent."""
        self.live: list[LiveSession] = []
        self.fail_after = 1
        """Final Results a live_* mode sends before it fails."""
        self.interims = False
        """Send an interim (is_final false) Results before each final, even unasked (interim_results=false)."""
        self.app.router.add_post("/v1/listen", self._listen)
        self.app.router.add_get("/v1/listen", self._listen_live)
        self.app.router.add_post("/v1/speak", self._speak)
        self.app.router.add_get("/v1/projects", self._projects)

    async def _record(self, request: web.Request) -> Recorded:
        """The raw body whatever its type (/v1/listen takes the audio itself); JSON decoded."""
        request[REQUEST_ID] = str(uuid.uuid4())
        body = await request.read() if request.can_read_body else b""
        rec = Recorded(request.method, request.path, dict(request.query), CIMultiDict(request.headers), body)
        if request.content_type == "application/json":
            rec.json = json.loads(body) if body else None
        return rec

    async def _answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = request[REQUEST_ID]
        if self.expected_api_key is not None and request.headers.get("Authorization") != \
                f"Token {self.expected_api_key}":
            return _error(401, "INVALID_AUTH", "Invalid credentials.", rid)
        if self.mode == "401":
            return _error(401, "INVALID_AUTH", "Invalid credentials.", rid)
        if self.mode == "403":
            return _error(403, "INSUFFICIENT_PERMISSIONS", "Project does not have access to the requested model.",
                          rid)
        if self.mode == "429":
            return _error(429, "TOO_MANY_REQUESTS", "Too many requests. Please try again later.", rid,
                          headers={"Retry-After": self.retry_after or "7"})
        if self.mode == "400":
            return _error(400, "Bad Request", "Invalid query parameter (fake mode 400).", rid)
        if self.mode == "400_category":
            return _error(400, "INVALID_JSON", "Invalid JSON submitted (fake mode 400_category).", rid,
                          category=True)
        if self.mode == "500":
            return _error(500, "INTERNAL_SERVER_ERROR", "Something went wrong.", rid)
        if self.mode == "garbage":
            return web.Response(body=GARBAGE, content_type="text/html")
        if self.mode == "hang":
            await self._hang()
        return await handler(request)

    async def _send_body(self, request: web.Request, content_type: str, body: bytes) -> web.StreamResponse:
        return await self._send(request, {"Content-Type": content_type, "dg-request-id": request[REQUEST_ID]}, body)

    async def _speak(self, request: web.Request) -> web.StreamResponse:
        rec, rid, q = request[RECORDED], request[REQUEST_ID], request.query
        text = rec.json.get("text") if isinstance(rec.json, dict) else None
        if not isinstance(text, str) or not text.strip():
            return _error(400, "INVALID_JSON", "Request body must be JSON with a 'text' field.", rid, category=True)
        if len(text) > MAX_CHARS:
            return _error(413, "PAYLOAD_TOO_LARGE", f"Text exceeds the {MAX_CHARS} character limit.", rid)
        if not q.get("model", "aura-asteria-en").startswith("aura-"):
            return _error(400, "Bad Request", f"No such model: {q['model']}", rid)
        encoding = q.get("encoding", "linear16")
        if encoding not in COMBOS:
            return _error(400, "Bad Request", f"Unsupported encoding: {encoding}", rid)
        containers, rates, muxer, codec, ctype = COMBOS[encoding]
        container = q.get("container", containers[0])
        rate = q.get("sample_rate", str(rates[0]))
        if container not in containers or ("container" in q and containers == ("none",)):
            return _error(400, "Bad Request", f"container={container} is not valid for encoding={encoding}", rid)
        if not rate.isdigit() or int(rate) not in rates or ("sample_rate" in q and len(rates) == 1):
            return _error(400, "Bad Request", f"sample_rate={rate} is not valid for encoding={encoding}", rid)
        if container == "none" and encoding == "linear16":
            muxer, ctype = "raw", "application/octet-stream"
        audio = await asyncio.to_thread(tone, speech_seconds(text), int(rate), muxer, codec)
        self.sent.append(audio)
        return await self._send_body(request, ctype, audio)

    async def _listen(self, request: web.Request) -> web.StreamResponse:
        rec, rid, q = request[RECORDED], request[REQUEST_ID], request.query
        if request.content_type.startswith(("multipart/", "application/json")) or not rec.body:
            return _error(400, "Bad Request", "failed to process audio: corrupt or unsupported data", rid)
        try:
            duration = await asyncio.to_thread(decoded_seconds, rec.body)
        except ValueError:
            return _error(400, "Bad Request", "failed to process audio: corrupt or unsupported data", rid)
        body = json.dumps(self.result(q, rec.body, duration, rid)).encode()
        return await self._send_body(request, "application/json", body)

    def result(self, q: Any, audio: bytes, duration: float, rid: str) -> dict[str, Any]:
        """A /v1/listen answer for `transcript_text` spread evenly over `duration` seconds."""
        punctuate = q.get("punctuate") == "true" or q.get("smart_format") == "true"
        raw = self.transcript_text.split()
        step = duration / max(1, len(raw))
        words = [{"word": re.sub(r"[^\w']", "", w).lower(), "start": round(i * step, 3),
                  "end": round((i + 0.8) * step, 3), "confidence": 0.98,
                  **({"punctuated_word": w} if punctuate else {})} for i, w in enumerate(raw)]
        transcript = " ".join(w.get("punctuated_word", w["word"]) for w in words)
        channel: dict[str, Any] = {"alternatives": [{"transcript": transcript, "confidence": 0.98, "words": words}]}
        if q.get("detect_language") == "true":
            channel.update(detected_language="en", language_confidence=0.99)
        results: dict[str, Any] = {"channels": [channel]}
        if q.get("utterances") == "true":
            utterances, group = [], []
            for i, w in enumerate(words):
                group.append(w)
                if raw[i][-1] in ".!?" or i == len(words) - 1:
                    utterances.append({"start": group[0]["start"], "end": group[-1]["end"], "confidence": 0.98,
                                       "channel": 0, "transcript": " ".join(g.get("punctuated_word", g["word"])
                                                                            for g in group),
                                       "words": group, "speaker": 0, "id": str(uuid.uuid4())})
                    group = []
            results["utterances"] = utterances
        metadata = {"transaction_key": "deprecated", "request_id": rid, "sha256": hashlib.sha256(audio).hexdigest(),
                    "created": "2026-01-01T00:00:00.000Z", "duration": round(duration, 3), "channels": 1,
                    "models": ["30089e05-99d1-4376-b32e-c263170674af"],
                    "model_info": {"30089e05-99d1-4376-b32e-c263170674af": {
                        "name": "general-nova-3", "version": "2025-01-01.0", "arch": "nova-3"}}}
        return {"metadata": metadata, "results": results}

    # -- live (/v1/listen over WebSocket) -------------------------------------------------------------------

    async def _listen_live(self, request: web.Request) -> web.StreamResponse:
        """Deepgram's streaming STT: a word of `transcript_text` heard per second of audio received, sent as a
        final Results (interim_results=false); on Finalize the rest (`from_finalize`); on CloseStream the
        Metadata and a normal close."""
        ws = web.WebSocketResponse()
        if not ws.can_prepare(request).ok:
            return _error(400, "Bad Request", "WebSocket upgrade expected.", request[REQUEST_ID])
        await ws.prepare(request)
        live = LiveSession(dict(request.query), CIMultiDict(request.headers))
        self.live.append(live)
        words, heard, finals = self.transcript_text.split(), 0, 0
        try:
            async for message in ws:
                if message.type == web.WSMsgType.BINARY:
                    live.audio += message.data
                    while len(live.audio) >= (heard + 1) * LIVE_SECOND and heard < len(words):
                        heard += 1
                        if not await self._final(request, ws, live, words[heard - 1:heard], finals, False):
                            return ws
                        finals += 1
                    continue
                live.texts.append(message.data)
                kind = json.loads(message.data).get("type")
                if kind == "Finalize" and heard < len(words):
                    heard, rest = len(words), words[heard:]
                    if not await self._final(request, ws, live, rest, finals, True):
                        return ws
                    finals += 1
                elif kind == "CloseStream":
                    if self.mode == "live_chatter":
                        while True:
                            await self._send_live(ws, live, self._results(live, [], True, True))
                            await asyncio.sleep(0.02)
                    if self.mode == "live_silent":
                        await self._hang()
                    await self._send_live(ws, live, self._metadata(live, request[REQUEST_ID]))
                    live.finished = True
                    await ws.close()
        finally:
            live.ended = True
        return ws

    async def _final(self, request: web.Request, ws: web.WebSocketResponse, live: LiveSession, words: list[str],
                     finals: int, from_finalize: bool) -> bool:
        """A final Results for `words` (after an interim one when asked); False when a failure mode ended it."""
        if self.mode.startswith("live_") and self.mode not in ("live_silent", "live_chatter") \
                and finals == self.fail_after:
            live.finished = True
            if self.mode == "live_error_message":
                await self._send_live(ws, live, {"type": "Error", "variant": "INTERNAL_SERVER_ERROR",
                                                 "description": "Model nova-9 is not available for this key "
                                                                f"{self.expected_api_key}", "message": "bad model"})
            if self.mode in ("live_close_error", "live_error_message"):
                await ws.close(code=1011, message=b"NET-0000: The service has encountered an internal error.")
            elif self.mode == "live_drop":
                await asyncio.sleep(0.2)  # the finals sent so far reach the client (which reads them first)
                assert request.transport is not None
                request.transport.close()
            elif self.mode == "live_not_json":
                await ws.send_str("<html>502 Bad Gateway</html>")
            elif self.mode == "live_huge":
                frame = self._results(live, words, True, from_finalize)
                frame["channel"]["alternatives"][0]["transcript"] = "la " * 700_000
                await self._send_live(ws, live, frame)
            elif self.mode == "live_bad_transcript":
                frame = self._results(live, words, True, from_finalize)
                frame["channel"]["alternatives"][0]["transcript"] = 42
                await self._send_live(ws, live, frame)
            return False
        if self.chunk_delay:
            await asyncio.sleep(self.chunk_delay)
        if self.interims or live.query.get("interim_results") == "true":
            await self._send_live(ws, live, self._results(live, [w.lower() for w in words], False, False))
        await self._send_live(ws, live, self._results(live, words, True, from_finalize))
        return True

    async def _send_live(self, ws: web.WebSocketResponse, live: LiveSession, frame: dict[str, Any]) -> None:
        live.sent.append(frame)
        await ws.send_str(json.dumps(frame))

    def _results(self, live: LiveSession, words: list[str], final: bool, from_finalize: bool) -> dict[str, Any]:
        """Deepgram's `Results` shape (realtime-transcription.md section 5) for `words`."""
        start = round(max(0.0, len(live.audio) / LIVE_SECOND - 1), 3)
        timed = [{"word": re.sub(r"[^\w']", "", w).lower(), "start": start, "end": start + 0.8, "confidence": 0.98,
                  "punctuated_word": w} for w in words]
        return {"type": "Results", "channel_index": [0, 1], "duration": 1.0, "start": start, "is_final": final,
                "speech_final": from_finalize, "from_finalize": from_finalize,
                "channel": {"alternatives": [{"transcript": " ".join(words), "confidence": 0.98, "languages": [],
                                              "words": timed}]},
                "metadata": {"request_id": str(uuid.uuid4()), "model_uuid": "30089e05-99d1-4376-b32e-c263170674af",
                             "model_info": {"name": "general-nova-3", "version": "2025-01-01.0", "arch": "nova-3"}}}

    def _metadata(self, live: LiveSession, rid: str) -> dict[str, Any]:
        return {"type": "Metadata", "transaction_key": "deprecated", "request_id": rid,
                "sha256": hashlib.sha256(live.audio).hexdigest(), "created": "2026-01-01T00:00:00.000Z",
                "duration": round(len(live.audio) / LIVE_SECOND, 3), "channels": 1,
                "models": ["30089e05-99d1-4376-b32e-c263170674af"],
                "model_info": {"30089e05-99d1-4376-b32e-c263170674af": {
                    "name": "general-nova-3", "version": "2025-01-01.0", "arch": "nova-3"}}}

    async def _projects(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"projects": [{"project_id": "3d0d2b28-8b83-4b1d-9b6e-2b2f7e0c6f11",
                                                "name": "Gateway tests"}]})
