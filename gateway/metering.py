"""Prometheus metrics, declared once with bounded labels. What they count is recorded once per request
by `gateway.usage.record` (from `gateway.middleware.metering_middleware`).

Label values only ever come from bounded sets: configured model, backend and tenant names, the
gateway's own routes, status codes and the adapters' fixed failure reasons. A model or voice a
client invents never creates a time series.

In a worker of `serve --workers N` (PROMETHEUS_MULTIPROC_DIR set by its parent, gateway/supervisor.py),
prometheus_client keeps every value in a file per process, and /metrics answers from all of them:
counters and histograms summed over every worker that ever ran in this parent's life (a restarted
worker's counts stay, its replacement starts from zero) and `gateway_in_flight_requests` summed over
the live workers. The gauges that describe state rather than count work (`gateway_build_info`,
`gateway_config_info`, `gateway_backend_up`, `gateway_backend_ejected`) are the answering worker's own
view (`ProcessView`): every worker loads the same config and probes the same backends, so any one answers
for all (ejections are each worker's own: one that saw the failures ejects), and a series of a replaced
config or a dropped backend goes, which multiprocess files cannot do.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway import __version__
from gateway.errors import REASONS

if TYPE_CHECKING:
    from gateway.ejection import Ejections
    from gateway.engine_process import Engines, EngineView

ENDPOINTS = frozenset({"/v1/audio/speech", "/v1/audio/transcriptions", "/v1/audio/translations", "/v1/realtime",
                       "/v1/models", "/v1/models/{model}", "/openapi.json",
                       "/v1/audio/voices", "/healthz", "/readyz", "/metrics"})
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
STATE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
FIRST_BYTE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Every metric the gateway exports, in a registry of its own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.requests = Counter("gateway_requests", "Finished requests.",
                                ["endpoint", "model", "backend", "tenant", "code"], registry=r)
        self.duration = Histogram("gateway_request_duration_seconds", "Request latency, to the last byte.",
                                  ["endpoint", "model", "backend"], buckets=LATENCY_BUCKETS, registry=r)
        self.upstream = Histogram("gateway_upstream_duration_seconds",
                                  "Time for a backend to answer (first audio chunk, or the whole transcript).",
                                  ["backend", "endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.first_byte = Histogram("gateway_speech_first_byte_seconds", "Time to the first audio byte sent.",
                                    ["model"], buckets=FIRST_BYTE_BUCKETS, registry=r)
        self.characters = Counter("gateway_billable_characters", "Billable characters (speech input, "
                                  "transcript output).", ["tenant", "model"], registry=r)
        self.audio_seconds = Counter("gateway_billable_audio_seconds", "Billable seconds of audio (speech "
                                     "produced, transcription input).", ["tenant", "model", "endpoint"], registry=r)
        self.cost = Counter("gateway_cost_usd", "Billable cost in USD, for models with a price.",
                            ["tenant", "model"], registry=r)
        self.request_bytes = Counter("gateway_request_bytes", "Request body bytes received.", ["endpoint"],
                                     registry=r)
        self.response_bytes = Counter("gateway_response_bytes", "Response body bytes sent.", ["endpoint"],
                                      registry=r)
        self.chunks = Counter("gateway_transcription_chunks", "Chunks transcribed for uploads split into chunks "
                              "(gateway/handlers/long_audio.py).", ["model"], registry=r)
        self.in_flight = Gauge("gateway_in_flight_requests", "Requests being served.", ["endpoint"], registry=r,
                               multiprocess_mode="livesum")
        self.upstream_errors = Counter("gateway_upstream_errors", "Backend failures, by reason.",
                                       ["backend", "reason"], registry=r)
        self.config_reloads = Counter("gateway_config_reload", "Config reloads, by result (success, failure).",
                                      ["result"], registry=r)
        self.rejections = Counter("gateway_ratelimit_rejections", "Requests refused by a limit or budget "
                                  "(limit: level:measure/window, e.g. key:requests/minute, tenant:budget/month).",
                                  ["tenant", "limit"], registry=r)
        self.shadow_rejections = Counter("gateway_ratelimit_shadow_rejections", "Requests a shadow limit would "
                                         "have refused (it let them through).", ["tenant", "limit"], registry=r)
        self.budget_remaining = Gauge("gateway_budget_remaining", "What is left of a tenant's budget in its "
                                      "period, in the budget's unit.", ["tenant"], registry=r,
                                      multiprocess_mode="mostrecent")
        self.state_seconds = Histogram("gateway_state_operation_seconds", "Time of one state-store operation.",
                                       ["op"], buckets=STATE_BUCKETS, registry=r)
        self.state_errors = Counter("gateway_state_errors", "State-store operations that failed.", ["op"],
                                    registry=r)
        self.state_fallbacks = Counter("gateway_state_fallbacks", "Requests that met a failed state store, by "
                                       "feature (limits, budgets, backends) and what the policy did (memory, refused).",
                                       ["feature", "action"], registry=r)
        self.ejections = Counter("gateway_backend_ejections", "Times a backend was ejected (outlier ejection).",
                                 ["backend"], registry=r)
        self.backend_in_flight = Gauge("gateway_backend_in_flight", "Attempts in flight to a backend (a stream "
                                       "until its last byte).", ["backend"], registry=r,
                                       multiprocess_mode="livesum")
        self.queue_depth = Gauge("gateway_backend_queue_depth", "Requests waiting for a slot of a backend "
                                 "(max_concurrency).", ["backend"], registry=r, multiprocess_mode="livesum")
        self.queue_wait = Histogram("gateway_backend_queue_wait_seconds", "Time a request waited for a slot of a "
                                    "backend, by how it left the queue (admitted, timeout, left).",
                                    ["backend", "outcome"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_full = Counter("gateway_backend_queue_full", "Requests that found a backend's queue full.",
                                  ["backend"], registry=r)
        self.retries = Counter("gateway_backend_retries", "Attempts made after this backend failed or refused, "
                               "by why (a reason of gateway_upstream_errors_total, queue_full, queue_timeout): "
                               "on another route or, after a backoff, on the same.",
                               ["backend", "reason"], registry=r)
        self.view = ProcessView()
        if self.multiprocess:  # what /metrics exposes: every worker's files, not this process's registry
            self.registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.registry)
        self.registry.register(self.view)

    def config_loaded(self, digest: str) -> None:
        self.view.digest = digest

    def upstream_error(self, backend: str, reason: str) -> None:
        self.upstream_errors.labels(backend, reason if reason in REASONS else "other").inc()




class ProcessView(Collector):
    """This process's build, loaded config and last backend probes, as gauges computed at scrape time."""

    def __init__(self) -> None:
        self.digest: str | None = None
        self.backends: dict[str, bool] = {}
        """backend name -> up, as its last background probe found it (gateway/health.py)."""
        self.ejections: Ejections | None = None
        """This process's outlier ejections (gateway/ejection.py), for gateway_backend_ejected."""
        self.engines: Engines | EngineView | None = None
        """The supervised engines (gateway/engine_process.py), for gateway_backend_restarts_total: the owner's
        count (in `serve --workers N`, the parent's, as every worker reads it)."""

    def collect(self) -> Iterator[Metric]:
        build = GaugeMetricFamily("gateway_build_info", "The running gateway's version.", labels=["version"])
        build.add_metric([__version__], 1)
        config = GaugeMetricFamily("gateway_config_info", "1, labelled with the loaded config's hash.",
                                   labels=["digest"])
        if self.digest is not None:
            config.add_metric([self.digest], 1)
        up = GaugeMetricFamily("gateway_backend_up", "1 while a backend answers its background probe, else 0.",
                               labels=["backend"])
        for name, is_up in sorted(self.backends.items()):
            up.add_metric([name], 1 if is_up else 0)
        ejected = GaugeMetricFamily("gateway_backend_ejected", "1 while a backend is ejected (or waits for its "
                                    "trial request), else 0: this process's view.", labels=["backend"])
        for name, left in sorted((self.ejections.ejected() if self.ejections else {}).items()):
            ejected.add_metric([name], 0 if left is None else 1)
        restarts = CounterMetricFamily("gateway_backend_restarts", "Times a backend's supervised engine exited and "
                                       "was started again.", labels=["backend"])
        for name, count in sorted((self.engines.totals if self.engines else {}).items()):
            restarts.add_metric([name], count)
        return iter((build, config, up, ejected, restarts))


def endpoint_of(request: web.Request) -> str:
    resource = request.match_info.route.resource
    canonical = resource.canonical if resource is not None else ""
    return canonical if canonical in ENDPOINTS else "other"


def metrics_handler(metrics: Metrics) -> Any:
    return make_aiohttp_handler(metrics.registry)
