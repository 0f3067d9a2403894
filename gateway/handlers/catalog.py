"""GET /v1/models, /v1/models/{model}, /v1/audio/voices, /healthz and /readyz."""

from __future__ import annotations

import asyncio

from aiohttp import web

from gateway.config import Model
from gateway.errors import model_not_found
from gateway.lifecycle import DRAINING, STARTED_AT
from gateway.metering import METRICS
from gateway.state import IDENTITY, TABLE


async def models(request: web.Request) -> web.Response:
    """The public models this key may use, in OpenAI's list shape."""
    identity = request[IDENTITY]
    data = [_model(request, m) for m in request[TABLE].config.models.values() if identity.may_use(m.name)]
    return web.json_response({"object": "list", "data": data})


async def model(request: web.Request) -> web.Response:
    """One model, as `models` lists it; unknown, or not for this key, is OpenAI's 404."""
    name = request.match_info["model"]
    found = request[TABLE].config.models.get(name)
    if found is None or not request[IDENTITY].may_use(name):
        raise model_not_found(name)
    return web.json_response(_model(request, found))


def _model(request: web.Request, model: Model) -> dict[str, object]:
    return {"id": model.name, "object": "model", "created": int(request.app[STARTED_AT]), "owned_by": model.owned_by}


async def voices(request: web.Request) -> web.Response:
    """The configured voice catalogue: public name, backend, native voice id (and speaker)."""
    return web.json_response({"object": "list", "data": request[TABLE].public_voices()})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready while not draining and every model has at least one route whose backend answers."""
    table = request[TABLE]
    if request.app[DRAINING].is_set():
        return web.json_response({"status": "draining"}, status=503)
    names = list(table.adapters)
    states = await asyncio.gather(*(table.adapters[n].ready() for n in names))
    backends = dict(zip(names, states, strict=True))
    metrics = request.app.get(METRICS)
    if metrics is not None:
        for name, up in backends.items():
            metrics.backend_up.labels(name).set(1 if up else 0)
    unroutable = [m.name for m in table.config.models.values() if not any(backends[r.backend] for r in m.routes)]
    ready = not unroutable
    body = {"status": "ready" if ready else "unready", "config": table.config.digest,
            "backends": {n: "up" if up else "down" for n, up in backends.items()}, "unroutable_models": unroutable}
    return web.json_response(body, status=200 if ready else 503)
