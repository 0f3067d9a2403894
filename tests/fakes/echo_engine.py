"""A hostile engine double: it fails every request and echoes back what a backend must never let reach a client.

Any method on any path (so one double stands in for every HTTP engine kind) answers `status` with a body in
`shape` and headers that repeat, as careless or compromised engines and proxies do: the credential the
gateway sent (every credential header it knows, whole: "Bearer <key>", the bare key), the URL it was
called on (scheme, host:port, path and query), the Host header, a foreign bearer token and an `sk-` key, a
long hex token, and control characters. `retry_after` is sent as the Retry-After header as it is. `text`
replaces the echo with a plain message and `param` names the field the shapes that can name one blame;
`answer` (bytes) makes it answer 200 `answer_type` with exactly those bytes instead (a hostile transcript),
`answer_repeat` times over as a chunked body (a stream that goes on and on).

    async with EchoEngine() as engine:   # engine.url == "http://127.0.0.1:<port>"
        engine.status, engine.shape = 422, "fastapi_list"
"""

from __future__ import annotations

from typing import Any, ClassVar

from aiohttp import web
from aiohttp.typedefs import Handler

from tests.fakes.engine import FakeHttpEngine

FOREIGN_BEARER = "Bearer eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LXBheWxvYWQ.QkFEU0lH"
SK_KEY = "sk-proj-Xk3v9QeLr2Tz8WmN4pYb"
HEX_TOKEN = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
CREDENTIAL_HEADERS = ("Authorization", "xi-api-key", "Ocp-Apim-Subscription-Key", "X-Api-Key")
SHAPES = ("openai", "openai_text", "fastapi_text", "fastapi_list", "fastapi_message", "fastapi_error",
          "elevenlabs", "deepgram", "azure", "plain")


class EchoEngine(FakeHttpEngine):
    MODES: ClassVar[tuple[str, ...]] = ("ok",)

    def __init__(self) -> None:
        super().__init__()
        self.status = 400
        self.shape = "openai"
        self.retry_after: str | None = None
        self.text: str | None = None
        self.param = "language"
        self.answer: bytes | None = None
        self.answer_type = "application/json"
        self.answer_repeat = 1
        self.echoed_last = ""
        """The hostile text of the last failure, as sent (so a test can check the double did echo)."""
        self.app.router.add_route("*", "/{tail:.*}", self._fail)

    async def _answer(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        return await self._fail(request)

    def echoed(self, request: web.Request) -> str:
        """Everything sensitive this request carried, and some more, in one sentence."""
        sent = "; ".join(f"{name}: {request.headers[name]}" for name in CREDENTIAL_HEADERS if name in request.headers)
        bare = " ".join(request.headers[name].split()[-1] for name in CREDENTIAL_HEADERS if name in request.headers)
        return (f"Request to {request.url} (host {request.host}) refused. You sent {sent}; key {bare}. "
                f"Upstream said: Authorization: {FOREIGN_BEARER}, api-key={SK_KEY}, token={HEX_TOKEN}\x00\x1b[31m"
                f" retry at {request.url.with_query({'key': bare})}")

    async def _fail(self, request: web.Request) -> web.StreamResponse:
        if self.answer is not None and self.answer_repeat > 1:
            resp = await self._write(request, {"Content-Type": self.answer_type},
                                     (self.answer for _ in range(self.answer_repeat)))
            await resp.write_eof()
            return resp
        if self.answer is not None:
            return web.Response(body=self.answer, content_type=self.answer_type)
        text = self.echoed_last = self.text or self.echoed(request)
        headers = {"X-Debug-Upstream": str(request.url), "WWW-Authenticate": f'Bearer realm="{request.host}"',
                   "X-Echo-Credential": " ".join(request.headers.get(n, "") for n in CREDENTIAL_HEADERS).strip()}
        if self.retry_after is not None:
            headers["Retry-After"] = self.retry_after
        if self.shape == "plain":
            return web.Response(status=self.status, text=text, headers=headers)
        return web.json_response(_body(self.shape, text, self.param), status=self.status, headers=headers)


def _body(shape: str, text: str, param: str) -> Any:
    """`text` as the message of an error body in `shape`, naming `param` where the shape can name a field."""
    return {
        "openai": {"error": {"message": text, "type": "invalid_request_error", "param": param, "code": None}},
        "openai_text": {"error": text},
        "fastapi_text": {"detail": text},
        "fastapi_list": {"detail": [{"type": "value_error", "loc": ["query", param], "msg": text,
                                     "input": text}]},
        "fastapi_message": {"detail": {"message": text}},
        "fastapi_error": {"detail": {"error": {"message": text, "param": param}}},
        "elevenlabs": {"detail": {"status": "invalid_request", "message": text}},
        "deepgram": {"err_code": "Bad Request", "err_msg": text, "request_id": "0d3e5b4a"},
        "azure": {"error": {"code": "InvalidRequest", "message": text, "innererror": {"message": text}}},
    }[shape]
