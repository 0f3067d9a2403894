"""The gateway's error tree, its OpenAI-shaped body, and the one middleware that renders it.

    GatewayError                    500 server_error
    ├── InvalidRequestError         400 invalid_request_error   (a field, a body, an audio file)
    │   └── UnsupportedError        400 invalid_request_error   (this route cannot do what was asked)
    ├── AuthenticationError         401 invalid_request_error   (missing key; code invalid_api_key when wrong)
    ├── PermissionDeniedError       403 invalid_request_error   (key may not use this model)
    ├── NotFoundError               404 invalid_request_error   (unknown model or URL)
    ├── MethodNotAllowedError       405 invalid_request_error
    ├── RequestTimeoutError         408 invalid_request_error   (request body stalled past body_timeout_s)
    ├── PayloadTooLargeError        413 invalid_request_error
    ├── ExpectationFailedError      417 invalid_request_error   (an Expect other than 100-continue)
    ├── RateLimitError              429 requests                (Retry-After)
    │   └── QuotaExceededError      429 insufficient_quota      (a budget is spent; x-should-retry: false)
    ├── HeadersTooLargeError        431 invalid_request_error   (a request line or header over the limits)
    ├── UpstreamError               502 upstream_error          (backend refused, failed or spoke garbage)
    │   └── UpstreamTimeoutError    504 upstream_error
    └── ServiceUnavailableError     503 server_error            (too many connections; Retry-After)

Each class fixes status, type and code; an instance carries message and param, and a `reason` for logs
and metrics: a `Reason` below when a backend failed, else the error's code. Our code raises
these and never aiohttp's HTTPExceptions; `gateway.middleware.error_middleware` renders them,
reshapes aiohttp's own (router 404/405, oversized bodies) with `from_http_exception`, and turns
anything else into a 500 that names the request id only.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any, ClassVar

from aiohttp import web


class Reason(StrEnum):
    """Why a backend call failed: the access log's `error`, and the only values of the `reason` label of
    `gateway_upstream_errors_total` (Envoy's response flags play this part). A client's own error is
    named by its OpenAI `code` instead."""

    CONNECT = "connect"                        # the backend could not be reached
    TIMEOUT = "timeout"                        # the backend went silent past its timeout_s
    DISCONNECT = "disconnect"                  # the backend closed the connection mid-answer
    PROTOCOL = "protocol"                      # the backend's answer broke the wire protocol
    BAD_RESPONSE = "bad_response"              # an answer that is not what was asked (garbage, oversized)
    BAD_AUDIO = "bad_audio"                    # audio the gateway could not transcode
    BACKEND_AUTH = "backend_auth"              # the backend refused the gateway's credential
    BACKEND_RATE_LIMIT = "backend_rate_limit"  # the backend's 429
    BACKEND_REJECTED = "backend_rejected"      # the backend's 400/422: the request, as the backend saw it
    BACKEND_TIMEOUT = "backend_timeout"        # the backend's own 408/504
    BACKEND_NOT_FOUND = "backend_not_found"    # the configured native model or path is not there
    BACKEND_4XX = "backend_4xx"                # any other 4xx of the backend
    BACKEND_5XX = "backend_5xx"                # the backend's 5xx
    UNAVAILABLE_KIND = "unavailable_kind"      # the backend's kind is not installed (an extra is missing)
    ENGINE = "engine"                          # an embedded engine failed
    CLOSED = "closed"                          # the adapter was closed (shutdown, or retired by a reload)


REASONS = frozenset(Reason)
"""For membership tests of a plain string (`"x" in Reason` is an error on Python 3.11)."""


RETRIABLE_4XX = frozenset({408, 409, 429})
"""The 4xx statuses OpenAI's SDKs retry; every other 4xx says `x-should-retry: false` explicitly."""


class GatewayError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
        reason: str | None = None,
        should_retry: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code  # type: ignore[misc]
        self.retry_after = retry_after
        self.should_retry = should_retry
        """Overrides the SDK's retry decision (x-should-retry), e.g. False for a 502 no retry can fix."""
        self.reason = reason or self.code or type(self).__name__

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after else {}
        should_retry = self.should_retry
        if should_retry is None and 400 <= self.status < 500 and self.status not in RETRIABLE_4XX:
            should_retry = False  # the client's own error: the same request fails the same way again
        if should_retry is not None:
            headers["x-should-retry"] = "true" if should_retry else "false"
        return headers

    def response(self) -> web.Response:
        return web.Response(
            status=self.status,
            body=json.dumps(self.body()).encode(),
            content_type="application/json",
            headers=self.headers(),
        )


class InvalidRequestError(GatewayError):
    status = 400
    type = "invalid_request_error"


class UnsupportedError(InvalidRequestError):
    """The route's backend cannot do what was asked (e.g. translation on an engine that cannot)."""


class AuthenticationError(GatewayError):
    status = 401
    type = "invalid_request_error"


class PermissionDeniedError(GatewayError):
    status = 403
    type = "invalid_request_error"


class NotFoundError(GatewayError):
    status = 404
    type = "invalid_request_error"


class MethodNotAllowedError(GatewayError):
    status = 405
    type = "invalid_request_error"


class RequestTimeoutError(GatewayError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLargeError(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class ExpectationFailedError(GatewayError):
    status = 417
    type = "invalid_request_error"


class HeadersTooLargeError(GatewayError):
    status = 431
    type = "invalid_request_error"


class RateLimitError(GatewayError):
    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: int | None = 1, **kw: Any) -> None:
        super().__init__(message, retry_after=max(1, retry_after or 1), **kw)


class QuotaExceededError(RateLimitError):
    """A budget is spent: no retry helps before its period ends, so the SDKs are told not to retry."""

    type = "insufficient_quota"
    code = "insufficient_quota"

    def __init__(self, message: str, *, retry_after: int | None = 1, **kw: Any) -> None:
        super().__init__(message, retry_after=retry_after, should_retry=False, **kw)


class UpstreamError(GatewayError):
    status = 502
    type = "upstream_error"
    code = "bad_gateway"


class UpstreamTimeoutError(UpstreamError):
    status = 504
    code = "upstream_timeout"


class ServiceUnavailableError(GatewayError):
    status = 503
    code = "service_unavailable"

    def __init__(self, message: str, *, retry_after: int | None = 1, **kw: Any) -> None:
        super().__init__(message, retry_after=max(1, retry_after or 1), **kw)


def model_not_found(model: str) -> NotFoundError:
    return NotFoundError(
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def from_http_exception(exc: web.HTTPException, request: web.Request) -> GatewayError:
    """aiohttp's own errors (router, body limits) in our tree."""
    if isinstance(exc, web.HTTPNotFound):
        return NotFoundError(f"Invalid URL ({request.method} {request.path})")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return MethodNotAllowedError(f"Method {request.method} is not allowed for {request.path}")
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return PayloadTooLargeError(exc.text or "Request entity too large")
    if isinstance(exc, web.HTTPForbidden):  # e.g. a refused CORS preflight: keep the 403 and its reason
        return PermissionDeniedError(exc.text or "Forbidden")
    if exc.status >= 500:
        return GatewayError("The server had an error processing your request.")
    return InvalidRequestError(exc.reason)
