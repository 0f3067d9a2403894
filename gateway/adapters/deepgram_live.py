"""Deepgram's live transcription (`wss://<host>/v1/listen`): the exchange behind `DeepgramAdapter.transcribe_live`.

The socket is opened on the backend's own session (its pool, `Authorization: Token <key>`), with the query
`model`, `language` (when asked), `encoding=linear16&sample_rate=16000&channels=1`, `punctuate=true` and
`interim_results=false` (only final text: deltas are append-only). The upload is decoded to 16 kHz mono s16le on
the audio workers and sent as binary frames by a task of its own while the answers are read, then
`{"type": "Finalize"}` (flush what is pending) and `{"type": "CloseStream"}`. Each `Results` with `is_final: true`
yields its transcript (a span of words: gateway/adapters/live.py); the stream ends at `Metadata` (Deepgram's answer
to CloseStream) or at a normal close (1000) after it; `SpeechStarted`, `UtteranceEnd` and interim results are
skipped.

Failures, mapped like the HTTP adapter's: a refused upgrade by its status (401/403: the backend's credential
refused; 429 with Retry-After...); an `Error` message or any other close (Deepgram closes 1008 on undecodable
audio, 1011 on its own failures, with a `DATA-`/`NET-` reason) is the engine's error, its words redacted; a frame
that is not JSON, a malformed `Results`, a transcript that is not a string, a frame over MAX_FRAME_BYTES is a bad
answer; silence longer than `timeout_s` between frames, or a stream not over `timeout_s` after the audio was all
sent, is a timeout. Closing the iterator (or any failure) cancels the sending task and drops the connection
(aiohttp's `ClientWebSocketResponse._response`: a graceful close would wait for Deepgram to answer all the audio
already sent first).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import aclosing
from typing import Any

import aiohttp

from gateway.adapters.base import TranscriptionJob, upstream_errors
from gateway.adapters.engine_errors import complaint, error_for
from gateway.adapters.live import Pieces
from gateway.adapters.redact import redact
from gateway.audio.decode import PcmChunks
from gateway.config import Backend
from gateway.errors import GatewayError, Reason, UpstreamError, UpstreamTimeoutError

LIVE_RATE = 16_000
MAX_FRAME_BYTES = 1_048_576
"""A Results frame is a few kB (a second or two of words); anything near this is garbage."""
FINALIZE = json.dumps({"type": "Finalize"})
CLOSE_STREAM = json.dumps({"type": "CloseStream"})


def live_params(model: str, language: str | None) -> dict[str, str]:
    params = {"model": model, "encoding": "linear16", "sample_rate": str(LIVE_RATE), "channels": "1",
              "punctuate": "true", "interim_results": "false"}
    if language:
        params["language"] = language
    return params


async def listen_live(backend: Backend, http: aiohttp.ClientSession, url: str, headers: Mapping[str, str],
                      params: Mapping[str, str], job: TranscriptionJob) -> AsyncIterator[str]:
    """The job's transcript in pieces as Deepgram finalizes them (base.LiveTranscriber)."""
    await job.upload.measured()
    decoded = PcmChunks(job.upload.view(), sample_rate=LIVE_RATE, max_seconds=job.max_audio_seconds,
                        workers=job.upload.workers)
    ws: aiohttp.ClientWebSocketResponse | None = None
    sender: asyncio.Task[None] | None = None
    ended = False
    try:
        first = await anext(decoded)  # an undecodable upload is a 400 before the engine is contacted
        ws = await _open(backend, http, url, headers, params)
        sender = asyncio.ensure_future(_send(backend, ws, first, decoded))
        pieces = Pieces(backend, spans=True)
        async with aclosing(_finals(backend, ws, sender)) as finals:
            async for said in finals:
                if piece := pieces.piece(said):
                    yield piece
        ended = True
    finally:
        if sender is not None:
            sender.cancel()
            await asyncio.wait([sender])  # decoding stops before the upload's reader is closed
        await decoded.aclose()
        if ws is not None and ended:
            await ws.close()  # Deepgram closes after its Metadata: answered at once
        elif ws is not None:  # closed early or failed: drop the connection, not wait for audio already sent
            ws._response.close()  # aiohttp internal (no public abort), pinned by test_live_transcripts.py (aclose)


async def _open(backend: Backend, http: aiohttp.ClientSession, url: str, headers: Mapping[str, str],
                params: Mapping[str, str]) -> aiohttp.ClientWebSocketResponse:
    """The upgraded socket: connect within connect_timeout_s, the upgrade's answer within timeout_s."""
    with upstream_errors(backend):
        try:
            async with asyncio.timeout(backend.timeouts.connect + backend.timeouts.read):
                return await http.ws_connect(url, params=params, headers=headers, max_msg_size=MAX_FRAME_BYTES,
                                             timeout=aiohttp.ClientWSTimeout(ws_close=backend.timeouts.connect))
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status < 400:  # a 2xx/3xx instead of 101: not a WebSocket server
                raise UpstreamError(f"Backend '{backend.name}' did not accept a WebSocket.",
                                    reason=Reason.PROTOCOL) from None
            raise error_for(backend, complaint(backend, exc.status, b"", exc.headers or {})) from None


async def _send(backend: Backend, ws: aiohttp.ClientWebSocketResponse, first: bytes, rest: PcmChunks) -> None:
    """The audio as binary frames (a decoded chunk each), then Finalize and CloseStream."""
    with upstream_errors(backend):
        audio = first
        while audio:
            async with asyncio.timeout(backend.timeouts.read):
                await ws.send_bytes(audio)
            audio = await anext(rest, b"")
        await ws.send_str(FINALIZE)
        await ws.send_str(CLOSE_STREAM)


async def _finals(backend: Backend, ws: aiohttp.ClientWebSocketResponse,
                  sender: asyncio.Task[None]) -> AsyncIterator[object]:
    """The transcript of each final `Results`, until the end; the sender's failure raised here too."""
    loop = asyncio.get_running_loop()
    read = backend.timeouts.read
    deadline: float | None = None  # once all the audio is sent: the end of the tail
    receive: asyncio.Future[aiohttp.WSMessage] | None = None
    try:
        while True:
            if sender.done() and (failed := sender.exception()) is not None:
                raise failed  # the audio could not be sent (or decoded): the engine would wait for it forever
            if receive is None:
                receive = asyncio.ensure_future(ws.receive())
            if deadline is None and sender.done():
                deadline = loop.time() + read
            wait = read if deadline is None else max(0.0, min(read, deadline - loop.time()))
            done, _ = await asyncio.wait({receive} if sender.done() else {receive, sender}, timeout=wait,
                                         return_when=asyncio.FIRST_COMPLETED)
            if receive not in done:
                if sender in done:
                    continue
                raise UpstreamTimeoutError(f"Backend '{backend.name}' did not answer in time.", reason=Reason.TIMEOUT)
            message, receive = receive.result(), None
            if message.type == aiohttp.WSMsgType.TEXT:
                kind, said = _read(backend, message.data)
                if kind == "Metadata":
                    return
                if kind == "Results":
                    yield said
            elif message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                if message.type == aiohttp.WSMsgType.CLOSE and message.data == aiohttp.WSCloseCode.OK \
                        and sender.done() and sender.exception() is None:
                    return  # closed normally after CloseStream, without Metadata
                raise _closed(backend, message)
            elif message.type == aiohttp.WSMsgType.ERROR:
                if isinstance(message.data, aiohttp.WebSocketError) \
                        and message.data.code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG:
                    raise _bad(backend)
                raise UpstreamError(f"Backend '{backend.name}' closed the connection unexpectedly.",
                                    reason=Reason.DISCONNECT)
    finally:
        if receive is not None:
            receive.cancel()
            await asyncio.wait([receive])


def _read(backend: Backend, text: str) -> tuple[str | None, object]:
    """(type, transcript of a final Results or None) of a text frame; an `Error` message raises."""
    try:
        frame: Any = json.loads(text)
        kind = frame.get("type")
        if kind == "Results" and frame.get("is_final") is True:
            return kind, frame["channel"]["alternatives"][0]["transcript"]
    except (ValueError, RecursionError, AttributeError, KeyError, IndexError, TypeError):
        raise _bad(backend) from None
    if kind == "Error":
        said = redact(backend, frame.get("description") or frame.get("message"))
        raise UpstreamError(f"Backend '{backend.name}' reported an error{f': {said}' if said else ''}",
                            reason=Reason.ENGINE)
    return (kind if kind == "Metadata" else None), None


def _closed(backend: Backend, message: aiohttp.WSMessage) -> GatewayError:
    """A close before the end: Deepgram's reason (`DATA-0000: ...`, `NET-0001: ...`) is the engine's error."""
    reason = redact(backend, message.extra) if message.type == aiohttp.WSMsgType.CLOSE else ""
    if not reason:
        return UpstreamError(f"Backend '{backend.name}' closed the connection unexpectedly.",
                             reason=Reason.DISCONNECT)
    return UpstreamError(f"Backend '{backend.name}' closed the stream: {reason}", reason=Reason.ENGINE)


def _bad(backend: Backend) -> UpstreamError:
    return UpstreamError(f"Backend '{backend.name}' sent a malformed live transcript.", reason=Reason.BAD_RESPONSE)
