"""The mapping table: YAML with ${ENV} interpolation, parsed once into frozen dataclasses.

`load_config(path)` is the only place that reads YAML or the environment. Every problem is
collected under its YAML path (`models.tts-1.routes[0].backend: unknown backend 'spaches'`)
and raised together as one ConfigError, so an operator fixes them all in one go. The process's
own sections (`server:`, `metrics:`, `ledger:`) are defined in gateway/settings.py, the `models:`
section in gateway/models.py.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from gateway.engine_process import EngineSpec, process_section
from gateway.models import Model, models_section
from gateway.placeholders import Placeholders
from gateway.policy import rules as policy_rules
from gateway.policy.rules import Policy, Rules
from gateway.settings import (
    CAPACITY_FIELDS,
    LIMIT_FIELDS,
    Capacity,
    Ledger,
    Limits,
    LongAudio,
    Metrics,
    Outlier,
    Realtime,
    Server,
    capacity_section,
    ledger_section,
    limits_section,
    long_audio_section,
    metrics_section,
    outlier_section,
    realtime_section,
    server_section,
)
from gateway.yaml_tree import YamlTree

DEFAULT_MAX_CONNECTIONS = 64


class ConfigError(Exception):
    """One or more problems in a config file, each prefixed by its YAML path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 5.0
    read: float = 120.0
    """Longest silence between two reads from the backend (not a cap on the whole call)."""
    first_byte: float | None = None
    """Speech: longest wait from the start of an attempt until its first audio chunk (`first_byte_timeout_s`),
    then the next route is tried (gateway/deadlines.py). None: off, only `read` applies. A backend that
    queues requests silently would otherwise hold a client for `read` seconds before any failover."""


@dataclass(frozen=True, slots=True)
class Backend:
    name: str
    kind: str
    url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    timeouts: Timeouts = Timeouts()
    options: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    """Kind-specific settings; each adapter reads and checks its own."""
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    """Connections open to this backend at once (its own pool); beyond it a request waits for one, for
    at most the backend's connect timeout."""
    process: EngineSpec | None = None
    """A local engine the gateway runs and keeps for this backend (gateway/engine_process.py)."""


@dataclass(frozen=True, slots=True)
class NativeVoice:
    """A backend's own voice: an id, and for engines with multi-speaker voices, a speaker."""

    id: str
    speaker: str | None = None


@dataclass(frozen=True, slots=True)
class Key:
    name: str
    tenant: str
    sha256: bytes = field(repr=False)
    models: frozenset[str] | None = None
    """Public models this key may use; None means all."""
    rules: Rules = field(default_factory=Rules)
    """Its own limits and budget (gateway/policy/)."""


@dataclass(frozen=True, slots=True)
class Config:
    server: Server
    keys: tuple[Key, ...]
    backends: Mapping[str, Backend]
    models: Mapping[str, Model]
    voices: Mapping[str, Mapping[str, NativeVoice]]
    """public voice -> backend name -> native voice."""
    metrics: Metrics = field(default_factory=Metrics)
    ledger: Ledger = field(default_factory=Ledger)
    policy: Policy = field(default_factory=Policy)
    """Limits, budgets and where they are counted (gateway/policy/)."""
    outlier: Mapping[str, Outlier] = field(default_factory=lambda: MappingProxyType({}))
    """backend name -> its outlier-ejection settings (`outlier:` overridden by `backends.<b>.outlier`); kept
    out of Backend so that changing them reloads without rebuilding the adapter."""
    capacity: Mapping[str, Capacity] = field(default_factory=lambda: MappingProxyType({}))
    """backend name -> its admission control (max_concurrency, max_queue, queue_timeout_s); likewise kept out of
    Backend."""
    limits: Mapping[str, Limits] = field(default_factory=lambda: MappingProxyType({}))
    """backend name -> what one request to it may carry as configured (max_audio_s, max_upload_bytes; the kind's
    own are the adapter's `Capabilities.limits`); likewise kept out of Backend."""
    long_audio: LongAudio = field(default_factory=LongAudio)
    """How uploads split into chunks are transcribed (gateway/chunking.py)."""
    realtime: Realtime = field(default_factory=Realtime)
    """Realtime transcription sessions (gateway/realtime/)."""
    source: str = "<memory>"
    digest: str = ""
    placeholders: Placeholders = field(default_factory=Placeholders, compare=False, repr=False)
    """The addresses `{port}` and `{socket}` got at this gateway's start; a reload parses with the same ones."""

    @property
    def metered(self) -> bool:
        """Whether requests are metered at all: metrics, a ledger or a traffic policy on."""
        return self.metrics.enabled or self.ledger.sink != "off" or self.policy.active


def _keys(p: YamlTree, value: Any, model_names: Collection[str]) -> tuple[Key, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        p.fail("keys", "expected a list")
        return ()
    keys: list[Key] = []
    names: set[str] = set()
    for i, raw in enumerate(value):
        path = f"keys[{i}]"
        node = p.mapping(raw, path)
        name = p.str_(node, "name", path, required=True) or f"key{i}"
        tenant = p.str_(node, "tenant", path, name) or name
        if name in names:
            p.fail(f"{path}.name", f"duplicate key name '{name}'")
        names.add(name)
        secret, digest = p.str_(node, "key", path), p.str_(node, "sha256", path)
        if bool(secret) == bool(digest):
            p.fail(path, "give exactly one of 'key' (the key or ${ENV}) and 'sha256' (its hex digest)")
            continue
        if secret:
            raw_digest = hashlib.sha256(secret.encode()).digest()
        else:
            try:
                raw_digest = bytes.fromhex(digest or "")
            except ValueError:
                raw_digest = b""
            if len(raw_digest) != 32:
                p.fail(f"{path}.sha256", "expected 64 hex digits")
                continue
        models = node.get("models")
        allowed = frozenset(p.str_list(models, f"{path}.models")) if models is not None else None
        for model in sorted((allowed or frozenset()) - set(model_names)):
            p.fail(f"{path}.models", f"unknown model '{model}'")
        keys.append(Key(name, tenant, raw_digest, allowed, policy_rules.rules(p, node, path)))
    return tuple(keys)


_BACKEND_FIELDS = {"kind", "url", "api_key", "timeout_s", "connect_timeout_s", "first_byte_timeout_s",
                   "max_connections", "outlier", "process",
                   *CAPACITY_FIELDS, *LIMIT_FIELDS}


def _backends(p: YamlTree, value: Any, kinds: Collection[str] | None,
              placeholders: Placeholders) -> dict[str, Backend]:
    backends: dict[str, Backend] = {}
    for name, raw in p.mapping(value, "backends").items():
        path = f"backends.{name}"
        node = p.mapping(raw, path)
        kind = p.str_(node, "kind", path, required=True) or ""
        if kind and kinds is not None and kind not in kinds:
            p.fail(f"{path}.kind", f"unknown kind '{kind}' (known: {', '.join(sorted(kinds))})")
        url = p.str_(node, "url", path)
        if url is not None:
            url = placeholders.resolve(url, name, p.fail, f"{path}.url")
        if url is not None and not re.match(r"^(https?|tcp|unix)://", url):
            p.fail(f"{path}.url", f"expected an http(s)://, tcp:// or unix:// URL, got {url!r}")
        default = Timeouts()
        timeouts = Timeouts(
            connect=p.number(node, "connect_timeout_s", path, default.connect, 0.001),
            read=p.number(node, "timeout_s", path, default.read, 0.001),
            first_byte=p.seconds(node, "first_byte_timeout_s", path),
        )
        options = MappingProxyType({k: v for k, v in node.items() if k not in _BACKEND_FIELDS})
        backends[name] = Backend(name, kind, url.rstrip("/") if url else None,
                                 p.str_(node, "api_key", path) or None, timeouts, options,
                                 int(p.number(node, "max_connections", path, DEFAULT_MAX_CONNECTIONS, 1)),
                                 process_section(p, node.get("process"), f"{path}.process", name, placeholders))
    return backends


def _outlier(p: YamlTree, root: dict[str, Any], backends: Mapping[str, Backend]) -> dict[str, Outlier]:
    """Each backend's ejection settings: the `outlier:` defaults, overridden per backend (as Envoy's are per
    cluster)."""
    defaults = outlier_section(p, root.get("outlier"), "outlier")
    raw = root.get("backends") if isinstance(root.get("backends"), dict) else {}
    return {name: outlier_section(p, raw[name].get("outlier"), f"backends.{name}.outlier", defaults)
            if isinstance(raw.get(name), dict) else defaults for name in backends}


def _voices(p: YamlTree, value: Any, backends: Mapping[str, Backend]) -> dict[str, Mapping[str, NativeVoice]]:
    voices: dict[str, Mapping[str, NativeVoice]] = {}
    for name, raw in p.mapping(value, "voices").items():
        path = f"voices.{name}"
        per_backend: dict[str, NativeVoice] = {}
        for backend, native in p.mapping(raw, path).items():
            vpath = f"{path}.{backend}"
            if backend not in backends:
                p.fail(vpath, f"unknown backend '{backend}'")
            if isinstance(native, (str, int)) and not isinstance(native, bool):
                per_backend[backend] = NativeVoice(str(native))
            elif isinstance(native, dict):
                vnode = p.mapping(native, vpath)
                vid = p.str_(vnode, "name", vpath, required=True) or ""
                per_backend[backend] = NativeVoice(vid, p.str_(vnode, "speaker", vpath))
            else:
                p.fail(vpath, "expected a native voice id or {name, speaker}")
        voices[name] = MappingProxyType(per_backend)
    return voices


def parse_config(text: str, *, source: str = "<memory>", kinds: Collection[str] | None = None,
                 environ: Mapping[str, str] | None = None, placeholders: Placeholders | None = None) -> Config:
    """Parse YAML text into a Config, or raise ConfigError listing every problem by path. `placeholders`: the
    addresses already picked at this gateway's start (a reload's), else fresh ones."""
    placeholders = Placeholders() if placeholders is None else placeholders
    p = YamlTree(os.environ if environ is None else environ)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: not valid YAML: {exc}"]) from None
    except RecursionError:  # PyYAML composes recursively: a few hundred levels of [[[...
        raise ConfigError([f"{source}: not valid YAML: nested too deep"]) from None
    except ValueError as exc:  # an integer past Python's 4300-digit conversion limit
        raise ConfigError([f"{source}: not valid YAML: {exc}"]) from None
    root = p.mapping(p.interpolate(raw, ""), "")
    for unknown in sorted(set(root) - {"server", "keys", "backends", "models", "voices", "metrics", "ledger",
                                       "state", "limits", "tenants", "outlier", "long_audio",
                                       "realtime"}):
        p.fail(unknown, "unknown section")
    server = server_section(p, p.mapping(root.get("server"), "server"))
    backends = _backends(p, root.get("backends"), kinds, placeholders)
    models = models_section(p, root.get("models"), backends)
    voices = _voices(p, root.get("voices"), backends)
    keys = _keys(p, root.get("keys"), models)
    outlier = _outlier(p, root, backends)
    raw_backends = root.get("backends") if isinstance(root.get("backends"), dict) else {}
    capacity = {name: capacity_section(p, raw_backends[name], f"backends.{name}") for name in backends}
    limits = {name: limits_section(p, raw_backends[name], f"backends.{name}") for name in backends}
    metrics = metrics_section(p, p.mapping(root.get("metrics"), "metrics"))
    ledger = ledger_section(p, p.mapping(root.get("ledger"), "ledger"))
    long_audio = long_audio_section(p, p.mapping(root.get("long_audio"), "long_audio"))
    realtime = realtime_section(p, p.mapping(root.get("realtime"), "realtime"))
    policy = policy_rules.policy_section(p, root, models, any(k.rules.limits or k.rules.budget for k in keys)
                                         or any(m.limits for m in models.values()))
    for tenant in sorted(set(policy.tenants) - {k.tenant for k in keys}):
        p.fail(f"tenants.{tenant}", f"no key has tenant '{tenant}'")
    if p.problems:
        raise ConfigError(p.problems)
    return Config(
        server=server,
        keys=keys,
        backends=MappingProxyType(backends),
        models=MappingProxyType(models),
        voices=MappingProxyType(voices),
        metrics=metrics,
        ledger=ledger,
        policy=policy,
        outlier=MappingProxyType(outlier),
        capacity=MappingProxyType(capacity),
        limits=MappingProxyType(limits),
        source=source,
        digest=hashlib.sha256(text.encode()).hexdigest()[:16],
        placeholders=placeholders,
        long_audio=long_audio,
        realtime=realtime,
    )


def has_slots(config: Config) -> bool:
    """Whether some backend has a max_concurrency, counted in the state store (gateway/capacity.py)."""
    return any(capacity.max_concurrency for capacity in config.capacity.values())


def unservable(config: Config) -> list[str]:
    """Why a config that parses would still serve nobody: no keys (every request a 401) or no models
    (every request a 404), as an empty or truncated file gives. Refused by a reload and check-config."""
    problems = []
    if not config.keys:
        problems.append("keys: no gateway keys; every request would get a 401")
    if not config.models:
        problems.append("models: no models; every request would get a 404")
    return problems


def read_config_text(path: str | Path) -> str:
    """The file's text, or a ConfigError: it cannot be read, or it is not UTF-8."""
    path = Path(path)
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x})"]) from None


def load_config(path: str | Path, *, kinds: Collection[str] | None = None,
                placeholders: Placeholders | None = None) -> Config:
    return parse_config(read_config_text(path), source=str(path), kinds=kinds, placeholders=placeholders)
