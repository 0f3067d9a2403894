"""The process's own settings: the `server:`, `metrics:`, `ledger:` (and `outlier:`, `long_audio:`, `realtime:`)
sections of the config file, and a backend's admission settings and limits, each a frozen dataclass with
documented defaults, parsed with YAML-path errors. The mapping table itself (keys, backends, models, voices) is
gateway/config.py, which parses the whole file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from gateway.yaml_tree import YamlTree, shown

DEFAULT_MAX_UPLOAD = 26_214_400
DEFAULT_MAX_AUDIO_SECONDS = 7_200.0


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
class Outlier:
    """Outlier ejection of one backend (gateway/ejection.py); the defaults are Envoy's outlier detection's."""

    enabled: bool = True
    consecutive_failures: int = 5
    """Failures in a row (connect errors, timeouts, 5xx, garbage; not a 429, not the client's 4xx) that eject it."""
    base_ejection_s: float = 30.0
    """An ejection lasts this long times the number of times the backend was ejected..."""
    max_ejection_s: float = 300.0
    """...but never longer than this."""
    max_ejected_percent: float = 10.0
    """At most this share of a model's routes is skipped at once (at least one, never all of them)."""
    failure_percentage: float | None = 85.0
    """Also ejected when at least this percentage of its attempts within one window failed (Envoy's
    failure_percentage_threshold); None (`null` in YAML): this ratio detector is off. Envoy ships it
    enforced 0 % (off); here it is on, since a backend failing 9 requests in 10 never fails 5 in a row."""
    failure_percentage_request_volume: int = 50
    """...once the window holds at least this many attempts (Envoy's failure_percentage_request_volume),
    so that two failures of three requests eject nothing."""
    interval_s: float = 10.0
    """The ratio's window (Envoy's interval): the counts start afresh this long after a window began."""


_OUTLIER_FIELDS = ("enabled", "consecutive_failures", "base_ejection_s", "max_ejection_s", "max_ejected_percent",
                   "failure_percentage", "failure_percentage_request_volume", "interval_s")


def outlier_section(p: YamlTree, value: Any, path: str, d: Outlier = Outlier()) -> Outlier:
    """`outlier:` (the defaults for every backend) or `backends.<b>.outlier:` (its overrides of them)."""
    node = p.mapping(value, path)
    for unknown in sorted(set(node) - set(_OUTLIER_FIELDS)):
        p.fail(f"{path}.{unknown}", f"unknown setting ({', '.join(_OUTLIER_FIELDS)})")
    failures = p.number(node, "consecutive_failures", path, d.consecutive_failures, 1, 1_000_000)
    volume = p.number(node, "failure_percentage_request_volume", path, d.failure_percentage_request_volume, 1,
                      1_000_000)
    ratio: float | None = None
    if node.get("failure_percentage", d.failure_percentage) is not None:  # null: the ratio detector is off
        ratio = p.number(node, "failure_percentage", path, d.failure_percentage or 85.0)
        if not 0 < ratio <= 100:  # 0 would eject every backend that reaches the volume
            p.fail(f"{path}.failure_percentage", f"expected a number > 0 and <= 100 (null: off), got {shown(ratio)}")
    percent = p.number(node, "max_ejected_percent", path, d.max_ejected_percent, 0, 100)
    base = p.number(node, "base_ejection_s", path, d.base_ejection_s, 0.001, 86_400)
    cap = p.number(node, "max_ejection_s", path, d.max_ejection_s, 0.001, 86_400)
    interval = p.number(node, "interval_s", path, d.interval_s, 0.001, 86_400)
    if cap < base:
        p.fail(f"{path}.max_ejection_s", f"expected a number >= base_ejection_s ({shown(base)}), got {shown(cap)}")
    return Outlier(enabled=p.bool_(node, "enabled", path, d.enabled), consecutive_failures=int(failures),
                   base_ejection_s=base, max_ejection_s=max(cap, base),
                   max_ejected_percent=percent, failure_percentage=ratio,
                   failure_percentage_request_volume=int(volume), interval_s=interval)


@dataclass(frozen=True, slots=True)
class Capacity:
    """Admission control of one backend (gateway/capacity.py): `backends.<b>.max_concurrency`, `max_queue` and
    `queue_timeout_s`."""

    max_concurrency: int | None = None
    """Attempts in flight to the backend at once, from every process sharing the state store (`sqlite`: the
    workers of one host; `redis`: every replica) or from this process (`memory`); None: no limit, no queue."""
    max_queue: int = 100
    """Requests each process holds waiting for a slot; one more moves on to the next route, else gets a 429."""
    queue_timeout_s: float = 30.0
    """The longest a request waits in the queue; then it moves on to the next route, else gets a 503."""


CAPACITY_FIELDS = ("max_concurrency", "max_queue", "queue_timeout_s")


def capacity_section(p: YamlTree, node: dict[str, Any], path: str) -> Capacity:
    """A backend's admission settings, from its own entry."""
    d = Capacity()
    limit = node.get("max_concurrency")
    if limit is not None:
        limit = p.whole(node, "max_concurrency", path, 1, 1, 1_000_000)  # the default 1 once refused
    elif any(key in node for key in CAPACITY_FIELDS[1:]):
        p.fail(f"{path}.max_concurrency", "is required for a queue (max_queue, queue_timeout_s queue requests "
               "beyond it)")
    queue = p.whole(node, "max_queue", path, d.max_queue, 0, 1_000_000)
    return Capacity(limit, queue, p.number(node, "queue_timeout_s", path, d.queue_timeout_s, 0.001, 86_400))


@dataclass(frozen=True, slots=True)
class Limits:
    """What one request to a backend may carry (`backends.<b>.max_audio_s`, `max_upload_bytes`): a longer or larger
    upload is split at silences into chunks that fit (gateway/chunking.py). None: no limit known."""

    max_audio_s: float | None = None
    max_upload_bytes: int | None = None

    def over(self, other: Limits) -> Limits:
        """These limits, each falling back to `other`'s where unset (a backend's own over its kind's)."""
        return Limits(self.max_audio_s if self.max_audio_s is not None else other.max_audio_s,
                      self.max_upload_bytes if self.max_upload_bytes is not None else other.max_upload_bytes)


LIMIT_FIELDS = ("max_audio_s", "max_upload_bytes")


def limits_section(p: YamlTree, node: dict[str, Any], path: str) -> Limits:
    seconds = p.seconds(node, "max_audio_s", path, maximum=86_400)
    size = None
    if node.get("max_upload_bytes") is not None:
        size = p.whole(node, "max_upload_bytes", path, 1_048_576, 65_536, 2**40)  # a chunk must hold a cut's padding
    if seconds is not None and seconds < 1:
        p.fail(f"{path}.max_audio_s", f"expected at least 1 second (room for a cut's padding), got {shown(seconds)}")
    return Limits(seconds, size)


@dataclass(frozen=True, slots=True)
class LongAudio:
    """`long_audio:`: how an upload split into chunks is transcribed (gateway/handlers/long_audio.py)."""

    concurrency: int = 4
    """Chunks of one request transcribed at once (and never more than the backend's own max_concurrency)."""
    max_chunks: int = 400
    """The most chunks one request may make (two hours cut on average every 18 s); more is a 400 on `file`."""
    chunk_s: float = 30.0
    """Chunk length when a client's `chunking_strategy` is emulated on routes with no limit (Whisper's window)."""
    pad_s: float = 0.2
    """Silence kept on each side of a cut (gateway/audio/splitter.py)."""


def long_audio_section(p: YamlTree, node: dict[str, Any]) -> LongAudio:
    path, d = "long_audio", LongAudio()
    for unknown in sorted(set(node) - {"concurrency", "max_chunks", "chunk_s", "pad_s"}):
        p.fail(f"{path}.{unknown}", "unknown setting (concurrency, max_chunks, chunk_s, pad_s)")
    concurrency = p.whole(node, "concurrency", path, d.concurrency, 1, 256)
    chunks = p.whole(node, "max_chunks", path, d.max_chunks, 1, 100_000)
    pad = p.number(node, "pad_s", path, d.pad_s, 0, 5)
    chunk = p.number(node, "chunk_s", path, d.chunk_s, 1, 86_400)
    if chunk <= 2 * pad + 0.03:
        p.fail(f"{path}.chunk_s", f"expected more than twice pad_s ({shown(pad)}), got {shown(chunk)}")
    return LongAudio(concurrency, chunks, chunk, pad)


@dataclass(frozen=True, slots=True)
class Realtime:
    """`realtime:`: realtime transcription sessions (gateway/realtime/)."""

    max_session_s: float = 3600.0
    """A session is closed with 1001 this long after it opened (OpenAI's 60 minutes)."""
    max_buffer_s: float = 600.0
    """Uncommitted audio a session may hold (27 MiB of 24 kHz PCM16); an append past it is refused."""
    max_pending_items: int = 4
    """Items of one session being transcribed at once; a further commit waits (and the client with it)."""
    max_sessions: int = 32
    """Sessions open at once in this process; one more gets an `error` and close 1013 (try again later).
    With OpenAI's 15 MiB per append, one session's largest event takes about 21 MiB to read."""


def realtime_section(p: YamlTree, node: dict[str, Any]) -> Realtime:
    path, d = "realtime", Realtime()
    for unknown in sorted(set(node) - {"max_session_s", "max_buffer_s", "max_pending_items", "max_sessions"}):
        p.fail(f"{path}.{unknown}", "unknown setting (max_session_s, max_buffer_s, max_pending_items, max_sessions)")
    return Realtime(p.number(node, "max_session_s", path, d.max_session_s, 1, 86_400),
                    p.number(node, "max_buffer_s", path, d.max_buffer_s, 1, 3_600),
                    p.whole(node, "max_pending_items", path, d.max_pending_items, 1, 64),
                    p.whole(node, "max_sessions", path, d.max_sessions, 1, 100_000))


def server_section(p: YamlTree, node: dict[str, Any]) -> Server:
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


def metrics_section(p: YamlTree, node: dict[str, Any]) -> Metrics:
    port = node.get("port")
    return Metrics(
        enabled=p.bool_(node, "enabled", "metrics", True),
        port=None if port is None else int(p.number(node, "port", "metrics", 0, 1)),
        host=p.str_(node, "host", "metrics"),
    )


def ledger_section(p: YamlTree, node: dict[str, Any]) -> Ledger:
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
