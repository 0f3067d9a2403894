"""Typed per-request state shared by middlewares and handlers (aiohttp RequestKeys)."""

from __future__ import annotations

from aiohttp import web

from gateway.auth import Identity
from gateway.errors import GatewayError
from gateway.mapping import Table
from gateway.outcome import Outcome

REQUEST_ID = web.RequestKey("request_id", str)
IDENTITY = web.RequestKey("identity", Identity)
FAILURE = web.RequestKey("failure", GatewayError)
"""The error a request ended with, for the access log and metering."""
OUTCOME = web.RequestKey("outcome", Outcome)
PREPARED = web.RequestKey("prepared", web.StreamResponse)
"""The response whose status line went out (gateway.streaming): no other response may follow it."""
TABLE = web.RequestKey("table", Table)
"""The mapping-table snapshot this request started with (a reload does not change it)."""
