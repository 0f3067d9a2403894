"""Connection-level protection: connection cap, header and keep-alive timeouts, HTTP parse errors.

`make_runner` is the only way the gateway (server.serve) and the tests build their AppRunner, so
both run these protections. It swaps aiohttp's Server for `GuardedServer`, whose connections are
`GuardedHandler`s:

- past `server.max_connections` open connections, a new one gets an immediate 503 in OpenAI's shape
  (`Retry-After`, `Connection: close`) from `_Refusal`, a bare protocol with no handler task;
- a request head must be complete `server.header_timeout_s` after the connection opens or after its
  first byte arrives (slowloris); idle keep-alive connections close after `server.keepalive_timeout_s`;
- each arrival of body bytes moves the body-gap deadline that `gateway.body.receiving` set;
- HTTP parse errors (bad request line or method, header lines too long or too many, control bytes,
  bad chunked framing) get an OpenAI-shaped 400/431 and one short log line naming only the
  exception class: aiohttp's own answer is text/plain and its log line quotes the client's bytes.

aiohttp internals relied on (each pinned by tests/test_connections.py::test_aiohttp_internals):
`AppRunner._make_server` and `BaseRunner._kwargs` (the runner's server and its arguments),
`Server._loop`, `Server._kwargs` (what Server.__call__ passes to RequestHandler), and
RequestHandler's `_request_count` (bumped per parsed head), `_waiter` (set while idle between
requests, as aiohttp's own keep-alive check reads it), `_messages` (parsed heads, `_ErrInfo` for parse
errors) and `_current_request`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11, RawRequestMessage
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from gateway.errors import GatewayError, HeadersTooLargeError, InvalidRequestError, ServiceUnavailableError
from gateway.settings import Server
from gateway.state import CONTINUED

log = logging.getLogger("gateway")



def awaits_continue(request: web.BaseRequest) -> bool:
    """The client asked for "100 Continue" and has not had it (so it may not have sent the body)."""
    return (request.version >= HttpVersion11 and not request.get(CONTINUED)
            and request.headers.get(hdrs.EXPECT, "").lower() == "100-continue")


def make_runner(app: web.Application, limits: Server, *, shutdown_timeout: float) -> web.AppRunner:
    """The AppRunner for the gateway's public port, with every protection below."""
    return GatewayRunner(app, limits, handler_cancellation=True, access_log=None, handle_signals=False,
                         shutdown_timeout=shutdown_timeout, keepalive_timeout=limits.keepalive_timeout_s)


class GatewayRunner(web.AppRunner):
    def __init__(self, app: web.Application, limits: Server, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.limits = limits

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # runs the app's startup; its Server is only a template
        return GuardedServer(plain.request_handler, request_factory=plain.request_factory, limits=self.limits,
                             loop=asyncio.get_running_loop(), **self._kwargs)


class GuardedServer(web.Server):
    """aiohttp's Server, counting open connections and refusing those past the cap."""

    def __init__(self, handler: Any, *, limits: Server, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.limits = limits
        self.open = 0

    def __call__(self) -> asyncio.Protocol:  # type: ignore[override]
        # Counted here, not in connection_made: asyncio accepts a whole backlog batch before any
        # connection_made runs, so counting later would let a burst overshoot the cap.
        if self.open >= self.limits.max_connections:
            return _Refusal(self._loop)
        self.open += 1
        return GuardedHandler(self, limits=self.limits, loop=self._loop, **self._kwargs)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self.open -= 1
        super().connection_lost(handler, exc)


class GuardedHandler(RequestHandler):
    """aiohttp's per-connection protocol, with the header timeout, the body-gap clock and OpenAI errors."""

    __slots__ = ("_body_deadline", "_close_after", "_head_timer", "limits")

    def __init__(self, manager: web.Server, *, limits: Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.limits = limits
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_deadline: asyncio.Timeout | None = None
        self._close_after: web.BaseRequest | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        heads = self._request_count
        super().data_received(data)
        if self._request_count != heads:
            self._disarm_head_timer()
            self._fail_body_on_parse_error()
        elif data and self._waiter is not None and self._head_timer is None:
            self._arm_head_timer()  # the first bytes of the next head on a keep-alive connection
        if self._body_deadline is not None and data:
            self._body_deadline.reschedule(self._loop.time() + self.limits.body_timeout_s)

    def watch_body(self, deadline: asyncio.Timeout | None) -> None:
        """`gateway.body.receiving`'s deadline, moved on by every arrival of body bytes (None: stop)."""
        self._body_deadline = deadline

    def close_after(self, request: web.BaseRequest) -> None:
        """Close the connection once the answer to `request` is written (its body is unusable)."""
        self._close_after = request

    async def finish_response(self, request: web.BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        close = self._close_after is request or (awaits_continue(request) and not request.content.is_eof())
        if close and not resp.prepared:
            resp.force_close()  # says Connection: close
        result = await super().finish_response(request, resp, start_time)
        if close:
            self.force_close()  # no lingering read of a body that will not come or cannot be framed
        return result

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's answer to what never reached the app (parse errors mostly), in OpenAI's shape.
        The log line names the exception class only: aiohttp's messages quote the client's bytes."""
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        err = http_error(status, exc)
        if err.status >= 500:  # a gateway bug outside the middlewares: the traceback goes to the log
            log.error("unhandled error outside the request pipeline", exc_info=exc)
        else:
            log.info("rejected a malformed HTTP request (%d, %s)", err.status, type(exc).__name__)
        resp = web.Response(status=err.status, body=json.dumps(err.body()).encode(),
                            content_type="application/json", headers=err.headers())
        resp.headers["x-request-id"] = f"req_{uuid.uuid4().hex}"
        resp.force_close()
        return resp

    def _fail_body_on_parse_error(self) -> None:
        """aiohttp queues a parse error met inside a body (bad chunk framing) as the next "request" and
        leaves the body's reader waiting for ever; fail that reader so the handler answers now."""
        request = self._current_request
        if request is not None and any(not isinstance(m, RawRequestMessage) for m, _ in self._messages):
            request.content.set_exception(RequestPayloadError("malformed request body"))

    def _arm_head_timer(self) -> None:
        self._head_timer = self._loop.call_later(self.limits.header_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._waiter is not None and not self._waiter.done():  # idle, the head still incomplete
            log.debug("closed a connection whose request head was not complete within %.1f s",
                      self.limits.header_timeout_s)
            self.force_close()


def http_error(status: int, exc: BaseException | None) -> GatewayError:
    """The OpenAI error for what aiohttp's handle_error was given; never the client's bytes."""
    if isinstance(exc, LineTooLong) or (isinstance(exc, BadHttpMessage) and "Too many headers" in exc.message):
        return HeadersTooLargeError("The request line or a header is too long, or there are too many headers.")
    if status < 500:
        return InvalidRequestError("The HTTP request could not be parsed.")
    return GatewayError("The server had an error processing your request.")


class _Refusal(asyncio.Protocol):
    """A connection past `max_connections`: the 503 goes out at once, then the socket closes.
    What the client sends meanwhile is discarded (for up to a second), so its request does not
    turn our close into a reset that could destroy the answer before the client reads it."""

    LINGER_S = 1.0

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        err = ServiceUnavailableError("The gateway has too many open connections; retry shortly.",
                                      code="too_many_connections")
        body = json.dumps(err.body()).encode()
        transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\nRetry-After: %d\r\nConnection: close\r\nx-request-id: req_%s\r\n\r\n"
                        % (len(body), err.retry_after or 1, uuid.uuid4().hex.encode()) + body)
        if transport.can_write_eof():
            transport.write_eof()
        self._timer = self._loop.call_later(self.LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the client finished too: close now

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
