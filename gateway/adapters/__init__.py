"""The explicit adapter registry, keyed by the YAML `kind`, and building adapters for a config.

Each entry names the adapter's module and class; a module is imported only when a config uses its
kind. A module may define `unavailable_reason() -> str | None` when its engine is an optional extra.
"""

from __future__ import annotations

import importlib
import logging

from gateway.adapters.base import Adapter
from gateway.adapters.unavailable import UnavailableAdapter
from gateway.config import Config, ConfigError
from gateway.upstreams import Upstreams

log = logging.getLogger("gateway.adapters")

ADAPTERS: dict[str, str] = {
    "openai": "gateway.adapters.openai:OpenAIAdapter",
    "espeak": "gateway.adapters.espeak:EspeakAdapter",
    "pocketsphinx": "gateway.adapters.pocketsphinx:PocketsphinxAdapter",
    "wyoming": "gateway.adapters.wyoming:WyomingAdapter",
    "whisper_asr": "gateway.adapters.whisper_asr:WhisperAsrAdapter",
    "elevenlabs": "gateway.adapters.elevenlabs:ElevenLabsAdapter",
    "deepgram": "gateway.adapters.deepgram:DeepgramAdapter",
    "azure_speech": "gateway.adapters.azure_speech:AzureSpeechAdapter",
}


def adapter_class(kind: str) -> type[Adapter]:
    module, _, name = ADAPTERS[kind].partition(":")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]


def unavailable_reason(kind: str) -> str | None:
    """Why `kind` cannot run on this install (its engine is an optional extra), or None."""
    module = importlib.import_module(ADAPTERS[kind].partition(":")[0])
    check = getattr(module, "unavailable_reason", None)
    return check() if check is not None else None


def unavailable_kinds(config: Config) -> dict[str, str]:
    """backends.<name>.kind -> why that kind cannot run on this install, for the kinds a config names."""
    found: dict[str, str] = {}
    for backend in config.backends.values():
        reason = unavailable_reason(backend.kind) if backend.kind in ADAPTERS else None
        if reason:
            found[f"backends.{backend.name}.kind"] = f"kind '{backend.kind}' is unavailable: {reason}"
    return found


async def build_adapters(config: Config, upstreams: Upstreams) -> dict[str, Adapter]:
    """One adapter per configured backend, each on a connection pool of its own (`upstreams`). A backend
    whose kind cannot run here gets a stand-in that fails its requests (and its readiness), so the rest of
    the table still serves. If any backend's options are invalid, the adapters already built are closed
    again and every problem is raised."""
    unavailable = unavailable_kinds(config)
    adapters: dict[str, Adapter] = {}
    problems: list[str] = []
    for name, backend in config.backends.items():
        why = unavailable.get(f"backends.{name}.kind")
        http = upstreams.open(backend)
        try:
            if why:
                log.error("backends.%s.kind: %s", name, why)
                adapters[name] = UnavailableAdapter(backend, http, why)
            else:
                adapters[name] = adapter_class(backend.kind)(backend, http)
        except ValueError as exc:
            problems.append(str(exc))
        finally:
            if name in adapters:
                upstreams.attach(adapters[name], http)
            else:
                await http.close()
    if problems:
        for adapter in adapters.values():
            await adapter.aclose()
            await upstreams.close(adapter)
        raise ConfigError(problems)
    return adapters
