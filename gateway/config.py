"""The mapping table: YAML with ${ENV} interpolation, parsed once into frozen dataclasses.

`load_config(path)` is the only place that reads YAML or the environment. Every problem is
collected under its YAML path (`models.tts-1.routes[0].backend: unknown backend 'spaches'`)
and raised together as one ConfigError, so an operator fixes them all in one go.
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

from gateway.yaml_tree import YamlTree

TASKS = ("speech", "transcription")
DEFAULT_MAX_UPLOAD = 26_214_400
DEFAULT_MAX_AUDIO_SECONDS = 7_200.0
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


@dataclass(frozen=True, slots=True)
class Route:
    backend: str
    model: str


@dataclass(frozen=True, slots=True)
class Price:
    """USD prices for a public model; either may be zero."""

    per_million_characters: float = 0.0
    per_audio_minute: float = 0.0


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    task: str
    routes: tuple[Route, ...]
    owned_by: str = "gateway"
    price: Price | None = None
    """None: no cost is counted for this model."""


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


@dataclass(frozen=True, slots=True)
class Server:
    host: str = "127.0.0.1"
    port: int = 8080
    cors_origins: tuple[str, ...] = ()
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD
    spool_memory_bytes: int = 4_194_304
    """An upload up to this size stays in memory (4 MiB: two minutes of 16 kHz WAV; a 1 MiB upload costs
    no disk write, which measured 2 to 3 times the CPU); a larger one moves to an unnamed temporary file
    in `spool_dir`."""
    spool_memory_uploads: int = 16
    """Uploads held in memory at once; past it a new upload goes straight to disk, so the spools hold at
    most `spool_memory_bytes` x this (64 MiB by default) in memory."""
    spool_dir: str | None = None
    max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS
    """Longest upload to transcribe (2 hours; 25 MB of 32 kbit/s mp3 is under 2 hours): established
    from headers and packets before anything is decoded, and enforced again while decoding."""
    drain_delay_s: float = 5.0
    """After SIGTERM: /readyz fails at once, new connections are still accepted this long."""
    grace_s: float = 30.0
    """Then in-flight requests get up to this long to finish before the process exits."""
    reload_interval_s: float = 2.0
    """How often the config file is checked for changes (0: only on SIGHUP)."""
    # -- slow and hostile clients (gateway/connections.py, gateway/body.py, gateway/spool.py) --
    header_timeout_s: float = 15.0
    """A request head (request line and headers) must be complete this long after the connection
    opens or after its first byte arrives; a half-sent head is closed (slowloris)."""
    keepalive_timeout_s: float = 75.0
    """An idle keep-alive connection is closed after this long. Longer than the usual ingress and
    load balancer idle timeouts (nginx 60 s, ALB 60 s), so the proxy, not the gateway, closes first
    and never reuses a connection the gateway is closing."""
    body_timeout_s: float = 30.0
    """Longest wait between two reads of a request body; a stalled upload gets a 408 and is closed."""
    max_connections: int = 1024
    """Open client connections; beyond it a new one gets an immediate 503 and is closed."""
    max_form_parts: int = 64
    """Parts in one multipart form (OpenAI's transcription form has about 15 fields)."""
    max_part_header_bytes: int = 8192
    """Longest header line of one multipart part (at most 32 header lines per part)."""
    # -- audio work (gateway/audio/workers.py) --
    audio_workers: int = field(default_factory=lambda: (os.cpu_count() or 1) + 2)
    """Threads for decoding, measuring and transcoding audio and for spool writes (CPU count + 2: the
    FFmpeg work is CPU-bound, and two more cover spool writes waiting on the disk)."""
    audio_queue: int = 64
    """Audio jobs (a transcoded stream, a decoded or measured upload) admitted beyond `audio_workers`;
    past `audio_workers + audio_queue` a new one gets a 503 with Retry-After."""
    # -- backend health (gateway/health.py) --
    probe_interval_s: float = 10.0
    """Every backend is probed in the background this often (0: never; /readyz reports them unknown)."""
    probe_timeout_s: float = 2.0
    """A probe not answered within this long marks its backend down; independent of request timeouts."""


@dataclass(frozen=True, slots=True)
class Metrics:
    enabled: bool = True
    port: int | None = None
    """Serve /metrics on this port only (not on the API port), so the public ingress cannot reach it."""
    host: str | None = None
    """Listen address for the metrics port (default: server.host)."""


LEDGER_SINKS = ("file", "stdout", "off")


@dataclass(frozen=True, slots=True)
class Ledger:
    sink: str = "off"
    path: str = "var/usage.jsonl"
    max_bytes: int = 10_485_760
    """Rotate the file when it would grow past this size."""
    backups: int = 5
    """Rotated files kept (usage.jsonl.1 ... .N)."""


@dataclass(frozen=True, slots=True)
class Config:
    server: Server
    keys: tuple[Key, ...]
    backends: Mapping[str, Backend]
    models: Mapping[str, Model]
    voices: Mapping[str, Mapping[str, NativeVoice]]
    """public voice -> backend name -> native voice."""
    metrics: Metrics = Metrics()
    ledger: Ledger = Ledger()
    source: str = "<memory>"
    digest: str = ""

    @property
    def metered(self) -> bool:
        """Whether requests are metered at all: metrics or a ledger on."""
        return self.metrics.enabled or self.ledger.sink != "off"


def _server(p: YamlTree, node: dict[str, Any]) -> Server:
    path = "server"
    d = Server()
    return Server(
        host=p.str_(node, "host", path, d.host) or d.host,
        port=int(p.number(node, "port", path, d.port)),
        cors_origins=p.str_list(node.get("cors_origins"), f"{path}.cors_origins"),
        max_upload_bytes=int(p.number(node, "max_upload_bytes", path, d.max_upload_bytes, 1)),
        spool_memory_bytes=int(p.number(node, "spool_memory_bytes", path, d.spool_memory_bytes)),
        spool_memory_uploads=int(p.number(node, "spool_memory_uploads", path, d.spool_memory_uploads)),
        spool_dir=p.str_(node, "spool_dir", path),
        max_audio_seconds=p.number(node, "max_audio_seconds", path, d.max_audio_seconds, 1),
        drain_delay_s=p.number(node, "drain_delay_s", path, d.drain_delay_s),
        grace_s=p.number(node, "grace_s", path, d.grace_s),
        reload_interval_s=p.number(node, "reload_interval_s", path, d.reload_interval_s),
        header_timeout_s=p.number(node, "header_timeout_s", path, d.header_timeout_s, 0.01),
        keepalive_timeout_s=p.number(node, "keepalive_timeout_s", path, d.keepalive_timeout_s, 0.01),
        body_timeout_s=p.number(node, "body_timeout_s", path, d.body_timeout_s, 0.01),
        max_connections=int(p.number(node, "max_connections", path, d.max_connections, 1)),
        max_form_parts=int(p.number(node, "max_form_parts", path, d.max_form_parts, 1)),
        max_part_header_bytes=int(p.number(node, "max_part_header_bytes", path, d.max_part_header_bytes, 256)),
        audio_workers=d.audio_workers if node.get("audio_workers") is None
        else int(p.number(node, "audio_workers", path, d.audio_workers, 1)),
        audio_queue=int(p.number(node, "audio_queue", path, d.audio_queue)),
        probe_interval_s=p.number(node, "probe_interval_s", path, d.probe_interval_s),
        probe_timeout_s=p.number(node, "probe_timeout_s", path, d.probe_timeout_s, 0.01),
    )


def _metrics(p: YamlTree, node: dict[str, Any]) -> Metrics:
    port = node.get("port")
    return Metrics(
        enabled=p.bool_(node, "enabled", "metrics", True),
        port=None if port is None else int(p.number(node, "port", "metrics", 0, 1)),
        host=p.str_(node, "host", "metrics"),
    )


def _ledger(p: YamlTree, node: dict[str, Any]) -> Ledger:
    d = Ledger()
    sink = p.str_(node, "sink", "ledger", d.sink) or d.sink
    if sink not in LEDGER_SINKS:
        p.fail("ledger.sink", f"expected one of {', '.join(LEDGER_SINKS)}, got '{sink}'")
    return Ledger(
        sink=sink,
        path=p.str_(node, "path", "ledger", d.path) or d.path,
        max_bytes=int(p.number(node, "max_bytes", "ledger", d.max_bytes, 1)),
        backups=int(p.number(node, "backups", "ledger", d.backups, 0)),
    )


def _price(p: YamlTree, value: Any, path: str) -> Price | None:
    if value is None:
        return None
    node = p.mapping(value, path)
    for unknown in sorted(set(node) - {"per_million_characters", "per_audio_minute"}):
        p.fail(f"{path}.{unknown}", "unknown price (per_million_characters, per_audio_minute)")
    return Price(p.number(node, "per_million_characters", path, 0.0),
                 p.number(node, "per_audio_minute", path, 0.0))


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
        keys.append(Key(name, tenant, raw_digest, allowed))
    return tuple(keys)


_BACKEND_FIELDS = {"kind", "url", "api_key", "timeout_s", "connect_timeout_s", "max_connections"}


def _backends(p: YamlTree, value: Any, kinds: Collection[str] | None) -> dict[str, Backend]:
    backends: dict[str, Backend] = {}
    for name, raw in p.mapping(value, "backends").items():
        path = f"backends.{name}"
        node = p.mapping(raw, path)
        kind = p.str_(node, "kind", path, required=True) or ""
        if kind and kinds is not None and kind not in kinds:
            p.fail(f"{path}.kind", f"unknown kind '{kind}' (known: {', '.join(sorted(kinds))})")
        url = p.str_(node, "url", path)
        if url is not None and not re.match(r"^(https?|tcp|unix)://", url):
            p.fail(f"{path}.url", f"expected an http(s)://, tcp:// or unix:// URL, got {url!r}")
        default = Timeouts()
        timeouts = Timeouts(
            connect=p.number(node, "connect_timeout_s", path, default.connect, 0.001),
            read=p.number(node, "timeout_s", path, default.read, 0.001),
        )
        options = MappingProxyType({k: v for k, v in node.items() if k not in _BACKEND_FIELDS})
        backends[name] = Backend(name, kind, url.rstrip("/") if url else None,
                                 p.str_(node, "api_key", path) or None, timeouts, options,
                                 int(p.number(node, "max_connections", path, DEFAULT_MAX_CONNECTIONS, 1)))
    return backends


def _models(p: YamlTree, value: Any, backends: Mapping[str, Backend]) -> dict[str, Model]:
    models: dict[str, Model] = {}
    for name, raw in p.mapping(value, "models").items():
        path = f"models.{name}"
        node = p.mapping(raw, path)
        task = p.str_(node, "task", path, required=True) or ""
        if task and task not in TASKS:
            p.fail(f"{path}.task", f"expected one of {', '.join(TASKS)}, got '{task}'")
        raw_routes = node.get("routes")
        if not isinstance(raw_routes, list) or not raw_routes:
            p.fail(f"{path}.routes", "expected a non-empty list of {backend, model}")
            raw_routes = []
        routes: list[Route] = []
        for i, r in enumerate(raw_routes):
            rpath = f"{path}.routes[{i}]"
            rnode = p.mapping(r, rpath)
            backend = p.str_(rnode, "backend", rpath, required=True)
            if backend is not None and backend not in backends:
                p.fail(f"{rpath}.backend", f"unknown backend '{backend}'")
            model = p.str_(rnode, "model", rpath, name) or name
            if backend:
                routes.append(Route(backend, model))
        owned_by = p.str_(node, "owned_by", path, "gateway") or "gateway"
        models[name] = Model(name, task, tuple(routes), owned_by, _price(p, node.get("price"), f"{path}.price"))
    return models


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
                 environ: Mapping[str, str] | None = None) -> Config:
    """Parse YAML text into a Config, or raise ConfigError listing every problem by path."""
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
    for unknown in sorted(set(root) - {"server", "keys", "backends", "models", "voices", "metrics", "ledger"}):
        p.fail(unknown, "unknown section")
    server = _server(p, p.mapping(root.get("server"), "server"))
    backends = _backends(p, root.get("backends"), kinds)
    models = _models(p, root.get("models"), backends)
    voices = _voices(p, root.get("voices"), backends)
    keys = _keys(p, root.get("keys"), models)
    metrics = _metrics(p, p.mapping(root.get("metrics"), "metrics"))
    ledger = _ledger(p, p.mapping(root.get("ledger"), "ledger"))
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
        source=source,
        digest=hashlib.sha256(text.encode()).hexdigest()[:16],
    )


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


def load_config(path: str | Path, *, kinds: Collection[str] | None = None) -> Config:
    return parse_config(read_config_text(path), source=str(path), kinds=kinds)
