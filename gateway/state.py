"""Every key of the gateway's shared state, in one place: per app (AppKey) and per request (RequestKey).

The types are imported for type checkers only, so that any module can import its keys from here
without an import cycle.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from gateway.audio.workers import AudioWorkers
    from gateway.auth import Identity
    from gateway.balance import InFlight
    from gateway.capacity import Gates, Slot
    from gateway.config import Config
    from gateway.ejection import Ejections
    from gateway.engine_process import Engines, EngineView
    from gateway.errors import GatewayError
    from gateway.health import Health
    from gateway.ledger import LedgerWriter
    from gateway.metering import Metrics
    from gateway.policy.admission import Admission
    from gateway.policy.shared import SharedState
    from gateway.reload import Reloader
    from gateway.spool import SpoolMemory
    from gateway.table import Table, TableHolder
    from gateway.usage import Outcome
    from gateway.worker_link import WorkerLink

# -- per app (gateway.lifecycle sets most of them up) ---------------------------------------------------------

CONFIG: web.AppKey[Config] = web.AppKey("config")
"""The config the app was built with (the first snapshot's)."""
TABLES: web.AppKey[TableHolder] = web.AppKey("tables")
"""The current mapping-table snapshot, swapped whole by a reload."""
DRAINING: web.AppKey[asyncio.Event] = web.AppKey("draining")
STARTED_AT: web.AppKey[float] = web.AppKey("started_at")
METERING: web.AppKey[bool] = web.AppKey("metering")
"""Whether requests are metered at all (metrics or a ledger on)."""
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
LEDGER: web.AppKey[LedgerWriter] = web.AppKey("ledger")
AUDIO_WORKERS: web.AppKey[AudioWorkers] = web.AppKey("audio_workers")
SPOOL_MEMORY: web.AppKey[SpoolMemory] = web.AppKey("spool_memory")
REALTIME_SESSIONS: web.AppKey[set[str]] = web.AppKey("realtime_sessions")
"""The ids of the realtime sessions open in this process (gateway/realtime/), at most realtime.max_sessions."""
"""How many uploads are held in memory now, of server.spool_memory_uploads."""
HEALTH: web.AppKey[Health] = web.AppKey("health")
EJECTIONS: web.AppKey[Ejections] = web.AppKey("ejections")
"""Outlier ejection of failing backends, fed by every attempt and probe (gateway/ejection.py); per process."""
IN_FLIGHT: web.AppKey[InFlight] = web.AppKey("in_flight")
"""Attempts in flight per backend from this process, for least_busy balancing (gateway/balance.py)."""
GATES: web.AppKey[Gates] = web.AppKey("gates")
"""Admission control per backend: max_concurrency slots and queues (gateway/capacity.py)."""
RELOADER: web.AppKey[Reloader] = web.AppKey("reloader")
SHARED_STATE: web.AppKey[SharedState] = web.AppKey("shared_state")
"""The state store limits and budgets are counted in, behind its failure policy (gateway/policy/shared.py)."""
ENGINES: web.AppKey[Engines | EngineView] = web.AppKey("engines")
"""The supervised engines (gateway/engine_process.py); in a worker of `serve --workers N`, its parent's, as read."""
WORKER: web.AppKey[WorkerLink] = web.AppKey("worker")
"""Set in a worker of `serve --workers N`: its inherited sockets and its channel to the parent."""

# -- per request -----------------------------------------------------------------------------------------------

REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id")
IDENTITY: web.RequestKey[Identity] = web.RequestKey("identity")
FAILURE: web.RequestKey[GatewayError] = web.RequestKey("failure")
"""The error a request ended with, for the access log and metering."""
OUTCOME: web.RequestKey[Outcome] = web.RequestKey("outcome")
PREPARED: web.RequestKey[web.StreamResponse] = web.RequestKey("prepared")
"""The response whose status line went out (gateway.streaming): no other response may follow it."""
TABLE: web.RequestKey[Table] = web.RequestKey("table")
"""The mapping-table snapshot this request started with (a reload does not change it)."""
HELD: web.RequestKey[list[tuple[str, Slot]]] = web.RequestKey("held")
"""Backends whose attempt answered this request, with its slot: in flight until it is over (gateway/balance.py)."""
ADMISSION: web.RequestKey[Admission] = web.RequestKey("admission")
"""What the traffic policy took for this request (gateway/policy/admission.py), given back when it is over."""
RATE_HEADERS: web.RequestKey[dict[str, str]] = web.RequestKey("rate_headers")
"""x-ratelimit-* (and on a refusal retry-after-ms) headers, added to the response on prepare."""
CONTINUED: web.RequestKey[bool] = web.RequestKey("continued")
"""Set by gateway.body once "100 Continue" has been written for this request."""
