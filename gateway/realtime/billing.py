"""A realtime item billed on its own: the seconds of audio committed as the item, and its transcript's characters.

An item is billed once, when its transcription completed (a failed or cancelled one costs nothing), with a ledger
record of its own (`endpoint: /v1/realtime`, the session's request id, the item's id) and the same metrics as an
HTTP transcription. Silence is billed as OpenAI bills it: what was committed, the silence inside a turn and its
padding included; with server VAD, the silence between turns is never committed, so never billed.
"""

from __future__ import annotations

import datetime

from aiohttp import web

from gateway.ledger import UsageRecord
from gateway.realtime import PATH
from gateway.state import IDENTITY, LEDGER, METRICS, REQUEST_ID, TABLE

ENDPOINT = PATH


def bill_item(request: web.Request, item_id: str, model: str, backend: str, native_model: str, seconds: float,
              text: str) -> None:
    identity = request[IDENTITY]
    characters, seconds = len(text.strip()), round(seconds, 3)
    config = request[TABLE].config
    price = config.models[model].price if model in config.models else None
    cost = None if price is None else price.cost(characters, seconds)
    metrics = request.app.get(METRICS)
    if metrics is not None:
        metrics.characters.labels(identity.tenant, model).inc(characters)
        metrics.audio_seconds.labels(identity.tenant, model, ENDPOINT).inc(seconds)
        if cost is not None:
            metrics.cost.labels(identity.tenant, model).inc(cost)
    ledger = request.app.get(LEDGER)
    if ledger is not None:
        ledger.write(UsageRecord(
            request_id=request[REQUEST_ID], time=datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds"),
            tenant=identity.tenant, key=identity.key_name, endpoint=ENDPOINT, model=model, backend=backend,
            native_model=native_model, voice=None, characters=characters, audio_seconds=seconds, cost_usd=cost,
            status=200, billable=True, completed=True, item=item_id))
