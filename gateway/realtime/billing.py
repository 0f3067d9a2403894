"""A realtime session under the traffic policy, and each of its items admitted, billed and recorded on its own.

- A session opening holds a slot of every `sessions` limit that applies to its key, tenant (gateway/policy/: the
  store every worker and replica shares) until it closes; past the limit it is refused (close 1013).
- An item is a transcription request of its own: admitted under the limits and budgets that apply to its model
  with its committed seconds (requests, audio_seconds, concurrent, budgets), before any backend is called; a
  refusal is the item's `failed` event, and the session goes on.
- An item is billed once, when its transcription completed (a failed or cancelled one costs nothing, and gives its
  reservations back): its committed seconds and its transcript's characters, the same metrics as an HTTP
  transcription, and a ledger record of its own (`endpoint: /v1/realtime`, the session's request id, `item`).
  Silence is billed as OpenAI bills it: what was committed, the silence inside a turn and its padding included;
  with server VAD the silence between turns is never committed, so never billed.
"""

from __future__ import annotations

import datetime

from aiohttp import web

from gateway.auth import Identity
from gateway.errors import RateLimitError
from gateway.ledger import UsageRecord
from gateway.policy.admission import Admission
from gateway.policy.demand import Demand, applicable
from gateway.realtime import PATH
from gateway.state import IDENTITY, LEDGER, METRICS, OUTCOME, REQUEST_ID, SHARED_STATE, TABLE
from gateway.usage import Bill

NOT_BILLED = Bill(0, 0.0, None, billable=False, completed=False)


async def admit(request: web.Request, identity: Identity, demand: Demand) -> Admission | None:
    """What `demand` took under the limits and budgets that apply (None: none apply), or the 429 that refused it."""
    config = request[TABLE].config
    applied = applicable(config, identity, demand) if config.policy.active else []
    if not applied:
        return None
    admission = Admission(request.app[SHARED_STATE], config, identity, demand, request.app.get(METRICS))
    try:
        await admission.take(applied)
    except RateLimitError:
        request[OUTCOME].rejected_by = admission.rejected_by  # the session's access-log line names it
        raise
    return admission


def bill_item(request: web.Request, item_id: str, model: str, backend: str, native_model: str, seconds: float,
              text: str) -> Bill:
    identity = request[IDENTITY]
    characters, seconds = len(text.strip()), round(seconds, 3)
    config = request[TABLE].config
    price = config.models[model].price if model in config.models else None
    cost = None if price is None else price.cost(characters, seconds)
    metrics = request.app.get(METRICS)
    if metrics is not None:
        metrics.characters.labels(identity.tenant, model).inc(characters)
        metrics.audio_seconds.labels(identity.tenant, model, PATH).inc(seconds)
        if cost is not None:
            metrics.cost.labels(identity.tenant, model).inc(cost)
    ledger = request.app.get(LEDGER)
    if ledger is not None:
        ledger.write(UsageRecord(
            request_id=request[REQUEST_ID], time=datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
            tenant=identity.tenant, key=identity.key_name, endpoint=PATH, model=model, backend=backend,
            native_model=native_model, voice=None, characters=characters, audio_seconds=seconds, cost_usd=cost,
            status=200, billable=True, completed=True, item=item_id))
    return Bill(characters, seconds, cost, billable=True, completed=True)
