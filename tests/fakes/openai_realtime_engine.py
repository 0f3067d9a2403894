"""An OpenAI-compatible realtime transcription server (GA shapes, ../shared/research/realtime-transcription.md):
`GET /v1/realtime?intent=transcription` upgraded to a WebSocket, for the gateway's pass-through.

It checks `Authorization: Bearer <expected_api_key>` (else OpenAI's `invalid_api_key` error and close 3000),
sends `session.created`, echoes `session.update` as `session.updated` (model included), keeps appended audio,
and on `input_audio_buffer.commit` sends `committed`, `conversation.item.added`/`done`, a `delta` and `completed`
with `{type: duration, seconds}` (the committed audio rounded up) and `transcript` = `transcript_text`. Server VAD
is not emulated: the gateway's tests commit by hand. Every text frame received is recorded (`received`), with the
handshake's headers and query (`handshakes`); `close_after` closes the socket (1011) after that many frames.
"""

from __future__ import annotations

import base64
import itertools
import json
import math
from typing import Any

from aiohttp import WSMsgType, web

TRANSCRIPT = "Hello from the realtime engine."


class FakeOpenAIRealtime:
    def __init__(self, *, expected_api_key: str | None = None, transcript_text: str = TRANSCRIPT) -> None:
        self.expected_api_key, self.transcript_text = expected_api_key, transcript_text
        self.received: list[dict[str, Any]] = []
        self.handshakes: list[tuple[dict[str, str], dict[str, str]]] = []
        self.close_after: int | None = None
        self.open = 0
        self._ids = itertools.count(1)
        self.app = web.Application()
        self.app.router.add_get("/v1/realtime", self._session)
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, handler_cancellation=True, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/v1"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _event(self, type_: str, **fields: Any) -> str:
        return json.dumps({"type": type_, "event_id": f"event_fake{next(self._ids)}", **fields})

    async def _session(self, request: web.Request) -> web.WebSocketResponse:
        self.handshakes.append((dict(request.headers), dict(request.query)))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        if self.expected_api_key is not None and \
                request.headers.get("Authorization") != f"Bearer {self.expected_api_key}":
            await ws.send_str(self._event("error", error={"type": "invalid_request_error", "code": "invalid_api_key",
                                                          "message": "Incorrect API key provided.", "param": None,
                                                          "event_id": None}))
            await ws.close(code=3000, message=b"invalid_request_error.invalid_api_key")
            return ws
        self.open += 1
        session: dict[str, Any] = {
            "type": "transcription", "id": "sess_fake", "object": "realtime.transcription_session",
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}, "transcription": None,
                                "turn_detection": None}}}
        audio, previous = bytearray(), None
        try:
            await ws.send_str(self._event("session.created", session=session))
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                event = json.loads(msg.data)
                self.received.append(event)
                if self.close_after is not None and len(self.received) >= self.close_after:
                    await ws.close(code=1011, message=b"server_error")
                    break
                kind = event.get("type")
                if kind == "session.update":
                    session["audio"]["input"].update(event["session"].get("audio", {}).get("input", {}))
                    await ws.send_str(self._event("session.updated", session=session))
                elif kind == "input_audio_buffer.append":
                    audio += base64.b64decode(event["audio"])
                elif kind == "input_audio_buffer.commit":
                    item = f"item_fake{next(self._ids)}"
                    seconds = len(audio) / 2 / 24_000
                    audio.clear()
                    shown = {"id": item, "type": "message", "status": "completed", "role": "user",
                             "content": [{"type": "input_audio", "transcript": None}]}
                    for text in (self._event("input_audio_buffer.committed", item_id=item, previous_item_id=previous),
                                 self._event("conversation.item.added", previous_item_id=previous, item=shown),
                                 self._event("conversation.item.done", previous_item_id=previous, item=shown),
                                 self._event("conversation.item.input_audio_transcription.delta", item_id=item,
                                             content_index=0, delta=self.transcript_text),
                                 self._event("conversation.item.input_audio_transcription.completed", item_id=item,
                                             content_index=0, transcript=self.transcript_text,
                                             usage={"type": "duration", "seconds": math.ceil(seconds)})):
                        await ws.send_str(text)
                    previous = item
        finally:
            self.open -= 1
        return ws
