"""GET /v1/models, /v1/models/{model}, /v1/audio/voices, /healthz and /readyz."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from aiohttp import web

from gateway.errors import model_not_found
from gateway.models import Model
from gateway.state import DRAINING, EJECTIONS, ENGINES, HEALTH, IDENTITY, STARTED_AT, TABLE


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
    """Ready while the config is loaded and the gateway is not draining; answered from memory, never waiting
    on a backend. The body reports each backend's last background probe (gateway.health) and the models
    none of whose backends answered it: informative, not fatal (their requests fail over or get a 502), and
    the backends this process has ejected (gateway/ejection.py), with when their ejection ends. A backend whose
    supervised engine (gateway/engine_process.py) is not `running` (starting, restarting after an exit, past its
    ready_timeout_s) is down whatever its last probe said; `engines` tells each engine's state, restarts and
    last exit code."""
    table = request[TABLE]
    draining = request.app[DRAINING].is_set()
    state = request.app[HEALTH].state(table)
    engines = request.app[ENGINES].status() if ENGINES in request.app else {}
    for name, engine in engines.items():
        if name in state and engine.get("state") != "running":
            state[name] = ("down", state[name][1])
    down = {name for name, (status, _) in state.items() if status == "down"}
    unroutable = [m.name for m in table.config.models.values() if all(r.backend in down for r in m.routes)]
    body = {"status": "draining" if draining else "ready", "config": table.config.digest,
            "backends": {name: status for name, (status, _) in state.items()},
            "probe_age_s": {name: age for name, (_, age) in state.items()}, "unroutable_models": unroutable,
            "ejected_until": _ejected_until(request.app[EJECTIONS].ejected())}
    if engines:
        body["engines"] = engines
    return web.json_response(body, status=503 if draining else 200)


def _ejected_until(ejected: dict[str, float | None]) -> dict[str, str]:
    """backend -> the UTC time its ejection ends (ISO 8601; a past time: it waits for its trial request)."""
    now = time.time()
    return {name: datetime.fromtimestamp(now + left, UTC).isoformat(timespec="milliseconds")
            for name, left in ejected.items() if left is not None}
