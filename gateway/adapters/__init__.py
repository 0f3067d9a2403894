"""The explicit adapter registry, keyed by the YAML `kind`, and building adapters for a config.

Each entry names the adapter's module and class; a module is imported only when a config uses its
kind. A module may define `unavailable_reason() -> str | None` when its engine is an optional extra.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping

from gateway.adapters.base import Adapter
from gateway.adapters.unavailable import UnavailableAdapter
from gateway.config import Config, ConfigError
from gateway.upstreams import Upstreams

log = logging.getLogger("gateway.adapters")

ADAPTERS: dict[str, str] = {
    "openai": "gateway.adapters.openai:OpenAIAdapter",
    "espeak": "gateway.adapters.espeak:EspeakAdapter",
    "pocketsphinx": "gateway.adapters.pocketsphinx:PocketsphinxAdapter",
    "faster_whisper": "gateway.adapters.faster_whisper:FasterWhisperAdapter",
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


async def build_adapters(config: Config, upstreams: Upstreams,
                         reuse: Mapping[str, Adapter] | None = None) -> dict[str, Adapter]:
    """One adapter per configured backend, each on a connection pool of its own (`upstreams`, closed with
    it). An adapter in `reuse` (the serving table's) whose backend is unchanged is kept, with its loaded
    model, its threads, its caches and its pool; a reload rebuilds only what changed. A backend whose
    kind cannot run here gets a stand-in that fails its requests (and its readiness), so the rest of
    the table still serves. If any backend cannot be built, whatever its constructor raised, the
    adapters built here are closed again (not the reused ones) and every problem is raised by path."""
    unavailable = unavailable_kinds(config)
    adapters: dict[str, Adapter] = {}
    built: list[Adapter] = []
    problems: list[str] = []
    for name, backend in config.backends.items():
        kept = (reuse or {}).get(name)
        if kept is not None and kept.backend == backend:
            adapters[name] = kept
            continue
        why = unavailable.get(f"backends.{name}.kind")
        http = upstreams.open(backend)
        try:
            adapter = UnavailableAdapter(backend, http, why) if why else adapter_class(backend.kind)(backend, http)
        except ValueError as exc:  # the adapter's own check of its options, already by path
            problems.append(str(exc))
            await http.close()
            continue
        except Exception as exc:  # anything else an option can provoke (a non-string key: TypeError)
            problems.append(f"backends.{name}: cannot build a '{backend.kind}' backend: {type(exc).__name__}: {exc}")
            await http.close()
            continue
        upstreams.attach(adapter, http)
        if why:
            log.error("backends.%s.kind: %s", name, why)
        adapters[name] = adapter
        built.append(adapter)
    if problems:
        for adapter in built:
            await adapter.aclose()
            await upstreams.close(adapter)
        raise ConfigError(problems)
    return adapters
