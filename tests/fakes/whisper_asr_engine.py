"""A double of whisper-asr-webservice (ahmetoner/whisper-asr-webservice, 1.7.1+) on a real port.

`POST /asr` as app/webservice.py declares it: one multipart file field `audio_file`; the options as
query parameters `task`, `language`, `initial_prompt`, `encode`, `output`, `word_timestamps`,
`vad_filter`, checked the way FastAPI reports a bad value (422 `{"detail": [{type, loc, msg, input}]}`).
The upload is decoded (PyAV standing in for the server's ffmpeg; `encode=false` means raw s16le at
16 kHz) and the transcript's words are laid out over its duration. The answer is streamed as
`text/plain` whatever `output` is, with the `Asr-Engine` and `Content-Disposition` headers, in every
output (txt, vtt, srt, tsv, json) written like app/utils.py. `segment_style` picks the JSON shape of
`segments`: "object" (faster-whisper >= 1.1 dataclasses dumped with asdict, server 1.7.1+), "array"
(faster-whisper < 1.1 NamedTuples, server <= 1.6) or "openai_whisper" (openai-whisper's dicts).

Also `GET /openapi.json`, `/docs` and `/` (redirect to /docs), and `POST /detect-language`. Every
request is kept in `requests`; `mode` selects a failure (see MODES). With `blocks_while_busy`, GETs
wait while a transcription runs, as on the real server (its `async def asr` runs the model on the loop).
"""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any
from urllib.parse import quote

import av
from aiohttp import web
from aiohttp.typedefs import Handler

from tests.fakes.canned import Canned
from tests.fakes.engine import RECORDED, FakeHttpEngine, Recorded, cut, record

WHISPER_LANGUAGES = frozenset((
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur hr bg lt la "
    "mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si km sn yo so af oc ka be "
    "tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw su yue").split())
"""openai/whisper tokenizer.LANGUAGES: the `enum` of /asr's `language`."""
TRANSCRIPT = " Le renard brun rapide saute par-dessus le chien paresseux. Il fait beau aujourd'hui."
TRANSLATION = " The quick brown fox jumps over the lazy dog. It is sunny today."
MODES = ("ok", "500", "json_bug", "garbage", "hang", "drop", "drop_midstream")
GARBAGE = b"<html><body><h1>502 Bad Gateway</h1>\x00\xff nginx</body></html>"
_BOOLS = {"true": True, "1": True, "yes": True, "on": True, "t": True, "y": True,
          "false": False, "0": False, "no": False, "off": False, "f": False, "n": False}
_ENUMS = {"task": ("transcribe", "translate"), "output": ("txt", "vtt", "srt", "tsv", "json")}
_SEGMENT_KEYS = ("id", "seek", "start", "end", "text", "tokens", "avg_logprob", "compression_ratio",
                 "no_speech_prob", "words", "temperature")  # faster-whisper 1.1 dataclass field order
_LEGACY_KEYS = ("id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
                "compression_ratio", "no_speech_prob", "words")  # faster-whisper <= 1.0 NamedTuple order


def _literal(values: tuple[str, ...] | list[str]) -> str:
    quoted = [f"'{v}'" for v in values]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def _detail(type_: str, loc: list[str], msg: str, value: Any, **extra: Any) -> dict[str, Any]:
    return {"type": type_, "loc": loc, "msg": msg, "input": value, **extra}


def decoded_seconds(data: bytes) -> float:
    """Seconds of audio in `data` (raises when the file is not audio, like the server's ffmpeg)."""
    with av.open(io.BytesIO(data), "r") as container:
        stream = container.streams.audio[0]
        return sum(f.samples / f.sample_rate for f in container.decode(stream))


def format_timestamp(seconds: float, always_include_hours: bool = False, decimal_marker: str = ".") -> str:
    """faster_whisper.utils.format_timestamp."""
    ms = round(seconds * 1000.0)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    marker = f"{hours:02d}:" if always_include_hours or hours > 0 else ""
    return f"{marker}{minutes:02d}:{secs:02d}{decimal_marker}{ms:03d}"


class FakeWhisperAsr(FakeHttpEngine):
    MODES = MODES

    def __init__(self, *, transcript: str = TRANSCRIPT, translation: str = TRANSLATION,
                 detected_language: str = "fr", segment_style: str = "object") -> None:
        super().__init__()
        self.transcript = transcript
        self.translation = translation
        self.detected_language = detected_language
        self.segment_style = segment_style
        self.canned: Canned | None = None
        """A recorded answer (tests/fakes/canned.py) /asr gives once its query and upload are checked."""
        self.languages = set(WHISPER_LANGUAGES)
        self.asr_engine = "faster_whisper"
        self.delay = 0.0
        self.blocks_while_busy = False
        self._busy = asyncio.Lock()
        self.app.router.add_post("/asr", self._asr)
        self.app.router.add_post("/detect-language", self._detect_language)
        self.app.router.add_get("/openapi.json", self._openapi)
        self.app.router.add_get("/docs", self._docs)
        self.app.router.add_get("/", self._index)

    @property
    def asr_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.path == "/asr"]

    # -- plumbing ------------------------------------------------------------------------------

    async def _record(self, request: web.Request) -> Recorded:
        return await record(request, parse_json=False)

    async def _answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.match_info.http_exception is not None:
            return web.json_response({"detail": "Not Found"}, status=404)
        return await handler(request)

    def _validate(self, rec: Recorded) -> list[dict[str, Any]]:
        """FastAPI's errors for the query and the body, in declaration order."""
        errors = []
        q = rec.query
        for name, allowed in (("task", _ENUMS["task"]), ("language", sorted(self.languages))):
            if name in q and q[name] not in allowed:
                errors.append(_detail("literal_error", ["query", name], f"Input should be {_literal(allowed)}",
                                      q[name], ctx={"expected": _literal(allowed)}))
        if not any(name == "audio_file" for name, *_ in rec.files):
            errors.append(_detail("missing", ["body", "audio_file"], "Field required", None))
        for name in ("encode", "vad_filter", "word_timestamps"):
            if name in q and q[name].lower() not in _BOOLS:
                errors.append(_detail("bool_parsing", ["query", name],
                                      "Input should be a valid boolean, unable to interpret input", q[name]))
        if "output" in q and q["output"] not in _ENUMS["output"]:
            allowed = _ENUMS["output"]
            errors.append(_detail("literal_error", ["query", "output"], f"Input should be {_literal(allowed)}",
                                  q["output"], ctx={"expected": _literal(allowed)}))
        return errors

    # -- endpoints -----------------------------------------------------------------------------

    async def _asr(self, request: web.Request) -> web.StreamResponse:
        rec = request[RECORDED]
        errors = self._validate(rec)
        if errors:
            return web.json_response({"detail": errors}, status=422)
        async with self._busy:
            if self.mode == "hang":
                await self._hang()
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.mode == "drop":
                assert request.transport is not None
                request.transport.close()
                return web.Response()
            if self.mode in ("500", "json_bug"):  # json_bug: server 1.7.0 failing to dump faster-whisper 1.1 segments
                return web.Response(status=500, text="Internal Server Error")
            if self.canned is not None:
                return self.canned.response()
            q = rec.query
            data = next(d for name, _, _, d in rec.files if name == "audio_file")
            try:
                seconds = (await asyncio.to_thread(decoded_seconds, data)
                           if _BOOLS[q.get("encode", "true").lower()] else len(data) / 32_000)
            except Exception:  # load_audio's RuntimeError("Failed to load audio: ...") is a plain 500
                return web.Response(status=500, text="Internal Server Error")
            output = q.get("output", "txt")
            result = self.result(q.get("task", "transcribe"), q.get("language"), seconds,
                                 _BOOLS[q.get("word_timestamps", "false").lower()])
            body = GARBAGE if self.mode == "garbage" else self.write(result, output).encode()
            filename = next(f for name, f, _, _ in rec.files if name == "audio_file")
            response = web.StreamResponse(headers={
                "Content-Type": "text/plain; charset=utf-8", "Asr-Engine": self.asr_engine,
                "Content-Disposition": f'attachment; filename="{quote(filename)}.{output}"'})
            await response.prepare(request)
            if self.mode == "drop_midstream":
                await response.write(body[: len(body) // 2])
                await cut(request)
                return response
            await response.write(body)
            await response.write_eof()
            return response

    def result(self, task: str, language: str | None, seconds: float, word_timestamps: bool) -> dict[str, Any]:
        """The engine's result: {"language", "segments", "text"}, segments as faster-whisper Segment fields."""
        text = self.translation if task == "translate" else self.transcript
        tokens = text.split()
        slot = seconds / max(1, len(tokens))
        words = [{"start": round(i * slot, 2), "end": round((i + 0.85) * slot, 2), "word": " " + w,
                  "probability": 0.93} for i, w in enumerate(tokens)]
        segments, group = [], []
        for i, word in enumerate(words):
            group.append(word)
            if word["word"].endswith((".", "?", "!")) or i == len(words) - 1:
                segments.append({
                    "id": len(segments) + 1, "seek": int(group[0]["start"] // 30) * 3000,
                    "start": group[0]["start"], "end": group[-1]["end"],
                    "text": "".join(w["word"] for w in group),
                    "tokens": [50364 + 17 * len(segments) + j for j in range(len(group) + 2)],
                    "avg_logprob": -0.21, "compression_ratio": 1.31, "no_speech_prob": 0.012,
                    "words": list(group) if word_timestamps else None, "temperature": 0.0})
                group = []
        return {"language": language or self.detected_language, "segments": segments,
                "text": "".join(s["text"] for s in segments)}

    def write(self, result: dict[str, Any], output: str) -> str:
        """app/utils.py's writers."""
        segments = result["segments"]
        if output == "json":
            return json.dumps({**result, "segments": [self._dump(s) for s in segments]})
        if output == "vtt":
            return "WEBVTT\n\n" + "".join(f"{format_timestamp(s['start'])} --> {format_timestamp(s['end'])}\n"
                                         f"{s['text'].strip().replace('-->', '->')}\n\n" for s in segments)
        if output == "srt":
            return "".join(f"{i}\n{format_timestamp(s['start'], True, ',')} --> "
                           f"{format_timestamp(s['end'], True, ',')}\n{s['text'].strip().replace('-->', '->')}\n\n"
                           for i, s in enumerate(segments, 1))
        if output == "tsv":
            return "start\tend\ttext\n" + "".join(f"{round(1000 * s['start'])}\t{round(1000 * s['end'])}\t"
                                                  f"{s['text'].strip()}\n" for s in segments)
        return "".join(s["text"].strip() + "\n" for s in segments)

    def _dump(self, segment: dict[str, Any]) -> Any:
        if self.segment_style == "array":
            words = segment["words"]
            legacy = {**segment, "words": None if words is None else
                      [[w["start"], w["end"], w["word"], w["probability"]] for w in words]}
            return [legacy[k] for k in _LEGACY_KEYS]
        if self.segment_style == "openai_whisper":  # dicts, ids from 0, words only when asked for
            out = {k: segment[k] for k in _LEGACY_KEYS if k != "words"}
            out["id"] -= 1
            if segment["words"] is not None:
                out["words"] = [{"word": w["word"], "start": w["start"], "end": w["end"],
                                 "probability": w["probability"]} for w in segment["words"]]
            return out
        return {k: segment[k] for k in _SEGMENT_KEYS}

    async def _detect_language(self, request: web.Request) -> web.StreamResponse:
        if not any(name == "audio_file" for name, *_ in request[RECORDED].files):
            return web.json_response({"detail": [_detail("missing", ["body", "audio_file"], "Field required",
                                                         None)]}, status=422)
        return web.json_response({"detected_language": "french", "language_code": self.detected_language,
                                  "confidence": 0.97})

    async def _openapi(self, request: web.Request) -> web.StreamResponse:
        if self.blocks_while_busy:
            async with self._busy:
                pass
        if self.mode == "500":
            return web.Response(status=500, text="Internal Server Error")
        languages = sorted(WHISPER_LANGUAGES)
        query = [{"name": "task", "in": "query", "schema": {"type": "string", "default": "transcribe",
                                                             "enum": list(_ENUMS["task"])}},
                 {"name": "language", "in": "query", "schema": {"type": "string", "enum": languages}},
                 {"name": "initial_prompt", "in": "query", "schema": {"type": "string"}},
                 {"name": "encode", "in": "query", "schema": {"type": "boolean", "default": True}},
                 {"name": "output", "in": "query", "schema": {"type": "string", "default": "txt",
                                                               "enum": list(_ENUMS["output"])}}]
        return web.json_response({"openapi": "3.1.0", "info": {"title": "Whisper Asr Webservice", "version": "1.8.2"},
                                  "paths": {"/asr": {"post": {"parameters": query}},
                                            "/detect-language": {"post": {}}}})

    async def _docs(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text="<!DOCTYPE html><title>Whisper Asr Webservice - Swagger UI</title>",
                            content_type="text/html")

    async def _index(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPTemporaryRedirect("/docs")
