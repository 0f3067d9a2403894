"""build_app(config): the whole request pipeline on one screen.

A request passes, in order:
  1. request_id_middleware  (middleware.py)  adopt or mint x-request-id
  2. table_middleware       (table.py)       pin the mapping-table snapshot for the whole request
  3. access_log_middleware  (middleware.py)  one JSON line when it finishes, also on disconnect
  4. policy_middleware      (policy/)        when it is over, settle what its limits and budgets took
  5. metering_middleware    (middleware.py)  bill it once (usage.py): metrics and one usage-ledger record
  6. error_middleware       (middleware.py)  anything raised inside becomes an OpenAI error body
  7. auth_middleware        (middleware.py)  /v1 only: gateway key -> tenant identity
  8. the handler            (handlers/)      validate -> resolve model -> admit under limits and budgets
                                             (policy/admission.py) -> adapter -> relay or render
     adapters/              native engine calls, errors mapped at that boundary
     streaming.py           relays chunks; the "after the first byte" rule
     audio/                 decoding, transcoding, speed, output metering (on audio/workers.py)
     transcript_formats.py  rendering transcripts in every OpenAI format
The x-request-id and x-ratelimit-* headers are added to every response on prepare (on_response_prepare), so
streamed responses carry them too.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp_cors
from aiohttp import web

from gateway.body import JSON_BODY_LIMIT, defer_continue
from gateway.config import Config
from gateway.handlers import catalog, speech, transcribe
from gateway.health import health_ctx
from gateway.lifecycle import (
    backends_ctx,
    engines_ctx,
    init_state,
    ledger_ctx,
    metrics_port_ctx,
    shared_state_ctx,
    workers_ctx,
)
from gateway.metering import metrics_handler
from gateway.middleware import (
    access_log_middleware,
    add_request_id_header,
    auth_middleware,
    error_middleware,
    metering_middleware,
    request_id_middleware,
)
from gateway.openapi import openapi_json
from gateway.policy.admission import add_rate_headers, policy_middleware
from gateway.realtime import PATH as REALTIME_PATH
from gateway.realtime import secrets
from gateway.realtime.endpoint import realtime
from gateway.reload import reload_ctx
from gateway.state import METRICS
from gateway.table import table_middleware


def build_app(config: Config) -> web.Application:
    app = web.Application(
        middlewares=[
            request_id_middleware,  # first, so even a 500 from a later stage carries x-request-id
            table_middleware,       # the snapshot every later stage reads
            access_log_middleware,  # sees the final status and byte counts
            policy_middleware,      # gives back what limits and budgets took, after metering measured it
            *([metering_middleware] if config.metered else []),  # bills and records the final outcome, once
            error_middleware,       # everything inside becomes OpenAI JSON
            auth_middleware,        # last before the handler; /v1 only
        ],
        client_max_size=JSON_BODY_LIMIT,
    )
    init_state(app, config)
    app.cleanup_ctx.append(workers_ctx)
    app.cleanup_ctx.append(shared_state_ctx)
    app.cleanup_ctx.append(backends_ctx)
    app.cleanup_ctx.append(engines_ctx)  # after the backends: probed by their adapters; stopped first
    app.cleanup_ctx.append(health_ctx)  # after the backends: it probes their adapters
    if Path(config.source).is_file():
        app.cleanup_ctx.append(reload_ctx)
    if config.ledger.sink != "off":
        app.cleanup_ctx.append(ledger_ctx)
    if config.metrics.enabled and config.metrics.port is not None:
        app.cleanup_ctx.append(metrics_port_ctx)
    elif config.metrics.enabled:
        app.router.add_get("/metrics", metrics_handler(app[METRICS]))
    app.on_response_prepare.append(add_request_id_header)
    app.on_response_prepare.append(add_rate_headers)
    routes = app.add_routes([  # "100 Continue" only once auth and Content-Length passed (gateway/body.py)
        web.post("/v1/audio/speech", speech.speech, expect_handler=defer_continue),
        web.post("/v1/audio/transcriptions", transcribe.transcriptions, expect_handler=defer_continue),
        web.post("/v1/audio/translations", transcribe.translations, expect_handler=defer_continue),
        web.post("/v1/realtime/client_secrets", secrets.client_secrets, expect_handler=defer_continue),
        web.get("/v1/models", catalog.models),
        web.get("/v1/models/{model:.+}", catalog.model),  # public model names may contain '/'
        web.get("/v1/audio/voices", catalog.voices),
        web.get("/healthz", catalog.healthz),
        web.get("/readyz", catalog.readyz),
        web.get("/openapi.json", openapi_json),
    ])
    app.router.add_get(REALTIME_PATH, realtime)  # a WebSocket: no CORS (browsers do not apply it to WebSockets)
    if config.server.cors_origins:
        options = aiohttp_cors.ResourceOptions(allow_headers="*", expose_headers=("x-request-id",),
                                               allow_methods=["GET", "POST"])
        cors = aiohttp_cors.setup(app, defaults={origin: options for origin in config.server.cors_origins})
        for route in routes:
            if route.resource is not None and route.resource.canonical.startswith("/v1/"):
                cors.add(route)
    return app
