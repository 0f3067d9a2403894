"""The gateway's own OpenAPI 3.1 document, served at GET /openapi.json.

It describes what this gateway accepts and answers, built from the same constants the validators
use, so the two cannot drift: OpenAI's audio endpoints, the catalogue, health, and the one error
shape every failure has. The property-based tests (tests/test_fuzz.py) generate requests from it.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway import __version__
from gateway.audio.formats import CONTENT_TYPES, SPEECH_FORMATS
from gateway.realtime.secrets import DEFAULT_TTL_S, MAX_SESSION, TTL_RANGE
from gateway.validation import (
    GRANULARITIES,
    INCLUDES,
    MAX_TEXT,
    SPEED_RANGE,
    STREAM_FORMATS,
    TRANSCRIPT_FORMATS,
    TRANSCRIPTION_ONLY_FORMATS,
)

JSON = "application/json"
TEXT = "text/plain"
SSE = "text/event-stream"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _text(max_length: int = MAX_TEXT) -> dict[str, Any]:
    return {"type": "string", "maxLength": max_length}


ERROR = {"description": "Any failure, in OpenAI's error shape.", "content": {JSON: {"schema": _ref("Error")}}}
_HEADER = {"schema": {"type": "string"}}
LIMITED = {
    "description": "A limit (`rate_limit_exceeded`) or a budget (`insufficient_quota`) refused the request, before "
                   "any backend was called; or the backend's own rate limit. `x-ratelimit-{limit,remaining,reset}-"
                   "<unit>` headers are sent for units requests, characters, audio-seconds and speech-seconds.",
    "headers": {"Retry-After": {"schema": {"type": "integer", "minimum": 1}}, "retry-after-ms": _HEADER,
                "x-ratelimit-limit-requests": _HEADER, "x-ratelimit-remaining-requests": _HEADER,
                "x-ratelimit-reset-requests": _HEADER},
    "content": {JSON: {"schema": _ref("Error")}},
}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object", "required": ["error"], "additionalProperties": False,
        "properties": {"error": {
            "type": "object", "required": ["message", "type", "param", "code"], "additionalProperties": False,
            "properties": {"message": {"type": "string", "minLength": 1}, "type": {"type": "string"},
                           "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
    },
    "CreateSpeechRequest": {
        "type": "object", "required": ["model", "input", "voice"],
        "properties": {
            "model": {"type": "string", "minLength": 1},
            "input": {**_text(), "minLength": 1},
            "voice": {"oneOf": [{"type": "string", "minLength": 1},
                                {"type": "object", "required": ["id"], "additionalProperties": False,
                                 "properties": {"id": {"type": "string", "minLength": 1}}}]},
            "instructions": _text(),
            "response_format": {"type": "string", "enum": list(SPEECH_FORMATS), "default": "mp3"},
            "speed": {"type": "number", "minimum": SPEED_RANGE[0], "maximum": SPEED_RANGE[1], "default": 1.0},
            "stream_format": {"type": "string", "enum": list(STREAM_FORMATS), "default": "audio"},
        },
    },
    "Transcription": {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}},
    "Model": {
        "type": "object", "required": ["id", "object", "created", "owned_by"],
        "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
                       "owned_by": {"type": "string"}},
    },
    "ModelList": {"type": "object", "required": ["object", "data"],
                  "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _ref("Model")}}},
    "VoiceList": {"type": "object", "required": ["object", "data"],
                  "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {"type": "object"}}}},
    "CreateClientSecretRequest": {
        "type": "object", "additionalProperties": False,
        "properties": {
            "expires_after": {"type": "object", "additionalProperties": False, "properties": {
                "anchor": {"const": "created_at"},
                "seconds": {"type": "integer", "minimum": TTL_RANGE[0], "maximum": TTL_RANGE[1],
                            "default": DEFAULT_TTL_S}}},
            "session": {"type": "object", "required": ["type"], "properties": {
                "type": {"const": "transcription"},
                "audio": {"type": "object", "description": "As in `session.update`; "
                          "`audio.input.transcription.model`, if given, is the only model the secret may use."}},
                "description": f"Pinned for the sessions the secret opens; at most {MAX_SESSION} bytes as JSON."},
        },
    },
    "ClientSecret": {
        "type": "object", "required": ["value", "expires_at", "session"],
        "properties": {
            "value": {"type": "string", "pattern": "^ek_"}, "expires_at": {"type": "integer"},
            "session": {"type": "object", "required": ["type", "object", "id", "expires_at"], "properties": {
                "type": {"const": "transcription"}, "object": {"const": "realtime.transcription_session"},
                "id": {"type": "string"}, "expires_at": {"type": "integer"}}}},
    },
    "Status": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
}


def _upload(task: str) -> dict[str, Any]:
    formats = TRANSCRIPT_FORMATS + (TRANSCRIPTION_ONLY_FORMATS if task == "transcribe" else ())
    properties: dict[str, Any] = {
        "file": {"type": "string", "format": "binary"},
        "model": {"type": "string", "minLength": 1},
        "prompt": _text(),
        "response_format": {"type": "string", "enum": list(formats), "default": "json"},
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
    }
    if task == "transcribe":
        properties |= {
            "language": {"type": "string", "pattern": "^[A-Za-z]{2,3}$"},
            "timestamp_granularities[]": {"type": "array", "items": {"enum": list(GRANULARITIES)}},
            "include[]": {"type": "array", "items": {"enum": list(INCLUDES)}},
            "stream": {"type": "boolean"},
            "chunking_strategy": {"type": "string", "enum": ["auto"], "description": (
                "`auto`, or a server_vad object sent as bracket keys (`chunking_strategy[type]`=server_vad, "
                "`[prefix_padding_ms]`, `[silence_duration_ms]`, `[threshold]`) or as JSON text; forwarded to "
                "engines that cut audio themselves, emulated by the gateway for the others (docs/long-audio.md)")},
        }
    return {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": ["file", "model"], "properties": properties}}}}


def _operation(summary: str, ok: dict[str, Any], body: dict[str, Any] | None = None, *,
               public: bool = False, limited: bool = False) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "responses": {"200": ok, "default": ERROR}}
    if limited:
        operation["responses"]["429"] = LIMITED
    if body is not None:
        operation["requestBody"] = body
    if public:
        operation["security"] = []
    return operation


def _ok(description: str, content: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": content}


def _json(name: str) -> dict[str, Any]:
    return {JSON: {"schema": _ref(name)}}


_TRANSCRIPT = {JSON: {"schema": _ref("Transcription")}, TEXT: {"schema": {"type": "string"}},
               SSE: {"schema": {"type": "string"}}}
_AUDIO = {ctype: {"schema": {"type": "string", "format": "binary"}} for ctype in CONTENT_TYPES.values()}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "OpenAI-compatible audio gateway", "version": __version__},
    "security": [{"bearer": []}, {"apiKey": []}],
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
        "schemas": SCHEMAS,
    },
    "paths": {
        "/v1/audio/speech": {"post": _operation(
            "Text to speech, streamed as the engine produces it.",
            _ok("Audio, or speech SSE events.", {**_AUDIO, SSE: {"schema": {"type": "string"}}}),
            {"required": True, "content": _json("CreateSpeechRequest")}, limited=True)},
        "/v1/audio/transcriptions": {"post": _operation(
            "Speech to text.", _ok("The transcript in `response_format`.", _TRANSCRIPT), _upload("transcribe"),
            limited=True)},
        "/v1/audio/translations": {"post": _operation(
            "Speech to English text.", _ok("The translation in `response_format`.", _TRANSCRIPT),
            _upload("translate"), limited=True)},
        "/v1/realtime/client_secrets": {"post": _operation(
            "An ephemeral `ek_` token for realtime transcription sessions, bound to this key.",
            _ok("The token.", _json("ClientSecret")),
            {"required": True, "content": _json("CreateClientSecretRequest")})},
        "/v1/models": {"get": _operation("The models this key may use.", _ok("A list.", _json("ModelList")))},
        "/v1/models/{model}": {"get": {
            **_operation("One model.", _ok("The model.", _json("Model"))),
            "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]}},
        "/v1/audio/voices": {"get": _operation("The voice catalogue.", _ok("A list.", _json("VoiceList")))},
        "/healthz": {"get": _operation("Liveness.", _ok("Alive.", _json("Status")), public=True)},
        "/readyz": {"get": {**_operation("Readiness.", _ok("Ready.", _json("Status")), public=True),
                            "responses": {"200": _ok("Ready.", _json("Status")),
                                          "503": _ok("Not ready, or draining.", _json("Status"))}}},
        "/openapi.json": {"get": _operation("This document.", _ok("OpenAPI 3.1.", {JSON: {"schema": {
            "type": "object"}}}), public=True)},
    },
}


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(DOCUMENT)
