"""What the HTTP engine doubles share: the recorded request, the server's lifecycle, the counting middleware.

`FakeHttpEngine` owns a `web.Application` and serves it on `127.0.0.1` (port 0) with an `AppRunner`
created with `handler_cancellation=True`, so a client that disconnects cancels the handler, as in
production. Its middleware records every request (`requests`, `last`; the handler finds it under
`RECORDED`), counts started, running and client-cancelled handlers (`started`, `active`, `cancelled`)
and hands the request to the subclass's `_answer`, where each double checks credentials and failure
modes in its engine's words before calling the route's handler. `mode` is checked against the subclass's `MODES`;
`fail_next` limits it to the next few requests.

`_write` writes pieces of a body as a chunked response, `chunk_delay` apart (the first
`first_chunk_delay` after the headers); `cut` closes the connection after what was written has had a
moment to reach the client (the "drop mid-stream" failure); `_send` does both for a whole body in
`chunk_size` pieces.

`canned` (a `Canned`) makes the transcription route of the doubles that support it (Deepgram, Azure, ElevenLabs)
answer exactly that recorded status, body and headers: a vendor's own published answer replayed
(tests/test_golden_cloud.py), after the double's credential check.

`peak` is the most requests the double had running at once (heads arrived, answers not yet over); with
`max_active` set, one request beyond it is answered 503 at once and counted in `over_capacity`, so the
double itself asserts a gateway's concurrency limit (an engine that serializes and sheds the rest).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from aiohttp import BodyPartReader, web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict

from tests.fakes.canned import Canned


@dataclass
class Recorded:
    """One request as the engine received it."""

    method: str
    path: str
    query: dict[str, str]
    headers: CIMultiDict[str]
    body: bytes = b""
    """Raw body of non-multipart requests."""
    json: Any = None
    form: list[tuple[str, str]] = field(default_factory=list)
    files: list[tuple[str, str, str, bytes]] = field(default_factory=list)
    """(name, filename, content_type, bytes) per file part."""
    arrived: float = field(default_factory=time.monotonic)
    """time.monotonic() when its head arrived: the gaps between a gateway's attempts (retry backoffs)."""

    def form_values(self, name: str) -> list[str]:
        return [v for k, v in self.form if k == name]

    def form_value(self, name: str) -> str | None:
        values = self.form_values(name)
        return values[0] if values else None


RECORDED = web.RequestKey("fake_engine_recorded", Recorded)


async def record(request: web.Request, path: str | None = None, *, parse_json: bool = True) -> Recorded:
    """The request as received (at `path`, by default `request.path`): multipart fields and files, or the
    raw body, and with `parse_json` an `application/json` body decoded (None if it is not JSON)."""
    rec = Recorded(request.method, request.path if path is None else path, dict(request.query),
                   CIMultiDict(request.headers))
    if request.content_type.startswith("multipart/"):
        async for part in await request.multipart():
            if not isinstance(part, BodyPartReader):
                continue
            data = bytes(await part.read(decode=False))
            if part.filename is not None:
                ctype = part.headers.get("Content-Type", "application/octet-stream")
                rec.files.append((part.name or "", part.filename, ctype, data))
            else:
                rec.form.append((part.name or "", data.decode(part.get_charset("utf-8"))))
    elif request.can_read_body:
        rec.body = await request.read()
        if parse_json and request.content_type == "application/json":
            try:
                rec.json = json.loads(rec.body)
            except ValueError:
                rec.json = None
    return rec


def chunks(body: bytes, size: int) -> list[bytes]:
    """`body` in pieces of `size` bytes (at least one byte)."""
    size = max(1, size)
    return [body[i : i + size] for i in range(0, len(body), size)]


async def cut(request: web.Request) -> None:
    """Let the written chunks reach the client, then cut the connection."""
    await asyncio.sleep(0.05)
    assert request.transport is not None
    request.transport.close()


TRANSCRIPT_TEXT = "Hello there. The quick brown fox jumps over the lazy dog."


class FakeHttpEngine:
    """The lifecycle, recording and counting of an engine double; subclasses add routes and `_answer`."""

    MODES: ClassVar[tuple[str, ...]] = ("ok",)
    url_path: ClassVar[str] = ""
    """Appended to `http://127.0.0.1:<port>` to make `url`."""

    def __init__(self, *, expected_api_key: str | None = None, transcript_text: str = TRANSCRIPT_TEXT,
                 chunk_size: int = 4096, chunk_delay: float = 0.0) -> None:
        self.expected_api_key = expected_api_key
        """The credential the engine accepts (each double reads it from its own header); None: any."""
        self.transcript_text = transcript_text
        """What the double hears in any upload (doubles with a fixed transcript of their own ignore it)."""
        self.retry_after: str | None = None
        """Retry-After of the double's 429 answer; None: the double's own default."""
        self.chunk_size = chunk_size
        self.chunk_delay = chunk_delay
        self.first_chunk_delay = 0.0
        """Seconds between a streamed answer's headers (sent at once) and its first piece."""
        self._mode = "ok"
        self.fail_next: int | None = None
        """None: every request is answered in `mode`. N: only the next N are; the one after them finds the
        double back in "ok" (a backend that recovers, for retries)."""
        self.hang_seconds = 3600.0
        self.canned: Canned | None = None
        """Set: the transcription route answers this instead of its own transcript (see the module docstring)."""
        self.requests: list[Recorded] = []
        self.finished: list[float] = []
        """time.monotonic() when each streamed answer (`_write`, `_send`) had its last piece written."""
        self.active = 0
        self.started = 0
        """Requests whose head arrived (`requests` has only those whose whole body arrived)."""
        self.cancelled = 0
        self.peak = 0
        self.max_active: int | None = None
        """Requests answered at once; one more gets a 503 (`over_capacity`). None: no limit."""
        self.over_capacity = 0
        self.port = 0
        self.url = ""
        self.app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, handler_cancellation=True, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{self.port}{self.url_path}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in self.MODES:
            raise ValueError(f"unknown mode {value!r}; expected one of {self.MODES}")
        self._mode = value

    @property
    def last(self) -> Recorded:
        """The most recent recorded request."""
        return self.requests[-1]

    def calls(self, path: str) -> int:
        """How many whole requests for `path` (e.g. "/v1/audio/speech") the double received."""
        return sum(r.path == path for r in self.requests)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.active += 1
        self.started += 1
        self.peak = max(self.peak, self.active)
        try:
            if self.max_active is not None and self.active > self.max_active:
                self.over_capacity += 1
                return web.Response(status=503, text="engine over capacity")
            request[RECORDED] = rec = await self._record(request)
            self.requests.append(rec)
            if self.fail_next is not None:
                if self.fail_next > 0:
                    self.fail_next -= 1
                else:
                    self._mode, self.fail_next = "ok", None
            return await self._answer(request, handler)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1

    async def _record(self, request: web.Request) -> Recorded:
        return await record(request)

    async def _answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The engine's checks (credentials, failure modes) before the route's handler."""
        return await handler(request)

    async def _hang(self) -> None:
        await asyncio.sleep(self.hang_seconds)

    async def _write(self, request: web.Request, headers: dict[str, str],
                      pieces: Iterable[bytes]) -> web.StreamResponse:
        """Prepare a chunked response and write `pieces`, `chunk_delay` apart (no end of body yet)."""
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)
        for i, piece in enumerate(pieces):
            if delay := self.chunk_delay if i else self.first_chunk_delay:
                await asyncio.sleep(delay)
            await resp.write(piece)
        self.finished.append(time.monotonic())
        return resp

    async def _send(self, request: web.Request, headers: dict[str, str], body: bytes) -> web.StreamResponse:
        """`body` in `chunk_size` pieces; in drop_midstream mode the first two, then the connection is cut."""
        pieces = chunks(body, self.chunk_size) or [b""]
        dropping = self.mode == "drop_midstream"
        if dropping:
            pieces = pieces[: max(1, min(2, len(pieces) - 1))] if len(pieces) > 1 else [body[: len(body) // 2]]
        resp = await self._write(request, headers, pieces)
        if dropping:
            await cut(request)
            return resp
        await resp.write_eof()
        return resp
