"""The explicit adapter registry, keyed by the YAML `kind`, and building adapters for a config."""

from __future__ import annotations

import logging
from collections.abc import Callable

import aiohttp

from gateway.adapters import espeak, pocketsphinx
from gateway.adapters.base import Adapter
from gateway.adapters.espeak import EspeakAdapter
from gateway.adapters.openai import OpenAIAdapter
from gateway.adapters.pocketsphinx import PocketsphinxAdapter
from gateway.adapters.unavailable import UnavailableAdapter
from gateway.config import Config, ConfigError

log = logging.getLogger("gateway.adapters")

ADAPTERS: dict[str, type[Adapter]] = {
    "openai": OpenAIAdapter,
    "espeak": EspeakAdapter,
    "pocketsphinx": PocketsphinxAdapter,
}

UNAVAILABLE: dict[str, Callable[[], str | None]] = {
    "espeak": espeak.unavailable_reason,
    "pocketsphinx": pocketsphinx.unavailable_reason,
}
"""Kinds whose engine is an optional extra: each gives why it cannot run here, or None."""


def unavailable_kinds(config: Config) -> dict[str, str]:
    """backends.<name>.kind -> why that kind cannot run on this install, for the kinds a config names."""
    found: dict[str, str] = {}
    for backend in config.backends.values():
        check = UNAVAILABLE.get(backend.kind)
        reason = check() if check else None
        if reason:
            found[f"backends.{backend.name}.kind"] = f"kind '{backend.kind}' is unavailable: {reason}"
    return found


def build_adapters(config: Config, http: aiohttp.ClientSession) -> dict[str, Adapter]:
    """One adapter per configured backend. A backend whose kind cannot run here gets a stand-in that
    fails its requests (and its readiness), so the rest of the table still serves."""
    unavailable = unavailable_kinds(config)
    adapters: dict[str, Adapter] = {}
    problems: list[str] = []
    for name, backend in config.backends.items():
        why = unavailable.get(f"backends.{name}.kind")
        if why:
            log.error("backends.%s.kind: %s", name, why)
            adapters[name] = UnavailableAdapter(backend, http, why)
            continue
        try:
            adapters[name] = ADAPTERS[backend.kind](backend, http)
        except ValueError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError(problems)
    return adapters
