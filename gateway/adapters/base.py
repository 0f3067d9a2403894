"""The one interface every backend adapter implements, the jobs it receives and what it returns.

An adapter translates an OpenAI-shaped job into its engine's native request, calls the engine,
maps the engine's failures onto `gateway.errors`, and streams the answer back. It declares what
its engine can do in `Capabilities`; the core does the rest itself (transcode, time-stretch,
render transcripts). Errors raised before an adapter returns (or before its stream yields its
first chunk) are ordinary OpenAI errors; see `gateway.streaming` for what happens after.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import aiohttp

from gateway.audio.formats import AudioFormat
from gateway.config import Backend, NativeVoice
from gateway.errors import Reason, UnsupportedError, UpstreamError, UpstreamTimeoutError
from gateway.settings import DEFAULT_MAX_AUDIO_SECONDS, Limits
from gateway.spool import Upload
from gateway.transcript import Transcript

SPEECH = "speech"
TRANSCRIPTION = "transcription"
TRANSLATION = "translation"


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What an engine does itself. The core consults this instead of isinstance checks."""

    tasks: frozenset[str]
    speech_formats: frozenset[str] = frozenset()
    """OpenAI response_formats the engine produces itself (bytes pass through untouched)."""
    native_speed: tuple[float, float] | None = None
    """The speed range the engine honours itself; outside it the gateway time-stretches."""
    speech_sse: bool = False
    """The engine speaks OpenAI's `stream_format: sse` itself."""
    transcript_formats: frozenset[str] = frozenset()
    """OpenAI transcript response_formats the engine answers in itself (bytes relayed as they are)."""
    languages: frozenset[str] | None = None
    """ISO-639-1 codes of the speech the engine understands; None for any."""
    word_timestamps: bool = False
    """The engine times each word itself. Claimed, never assumed: a route without it is never given a
    `timestamp_granularities[]=word` request (gateway/handlers/transcribe.py), whose times the gateway
    would otherwise have to make up."""
    english_translates: bool = True
    """An English-only transcriber serves translation too (see `can`); False where its engine refuses it
    (faster_whisper on an English-only model, which says so rather than pretend)."""
    limits: Limits = field(default_factory=Limits)
    """What one request to the engine may carry where the kind knows it (OpenAI's 25 MB); a backend's
    `max_audio_s`/`max_upload_bytes` override it. A longer upload is split (gateway/chunking.py)."""
    chunking_strategy: bool = False
    """The engine cuts long audio itself on OpenAI's `chunking_strategy`; elsewhere the gateway emulates it."""
    live_transcript: bool = False
    """The engine streams a transcript as it hears audio: `transcribe_live` yields it in pieces as they come
    (the realtime session's deltas) instead of one piece at the end."""
    realtime: bool = False
    """The engine serves OpenAI's realtime transcription WebSocket itself (`/realtime?intent=transcription`): a
    realtime session on a model routed to it is relayed there (gateway/realtime/passthrough.py)."""

    def speech_format(self, wanted: str) -> str:
        """The format to ask the engine for: `wanted` if it produces it, else one the core transcodes from (raw
        pcm where it has it or lists nothing, as the embedded engines do; else the least lossy it lists)."""
        if wanted in self.speech_formats:
            return wanted
        if not self.speech_formats or "pcm" in self.speech_formats:
            return "pcm"
        return next(f for f in ("wav", "flac", "mp3", "opus", "aac", *sorted(self.speech_formats))
                    if f in self.speech_formats)

    def can(self, task: str) -> bool:
        """An English-only transcriber serves translation too: what it hears is already English."""
        return task in self.tasks or (task == TRANSLATION and TRANSCRIPTION in self.tasks
                                      and self.languages == frozenset({"en"}) and self.english_translates)


@dataclass(frozen=True, slots=True)
class SpeechJob:
    request_id: str
    public_model: str
    model: str
    voice: NativeVoice
    input: str
    response_format: str = "mp3"
    speed: float = 1.0
    stream_format: str = "audio"
    instructions: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Fields the client sent that the gateway does not know; forwarded by OpenAI-compatible adapters."""


@dataclass(frozen=True, slots=True)
class TranscriptionJob:
    request_id: str
    task: str  # "transcribe" or "translate"
    public_model: str
    model: str
    upload: Upload
    response_format: str = "json"
    language: str | None = None
    prompt: str | None = None
    temperature: float | None = None
    timestamp_granularities: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    stream: bool = False
    extra: tuple[tuple[str, str], ...] = ()
    """Form fields the gateway does not know, as (name, value); forwarded by OpenAI-compatible adapters."""
    max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS
    """server.max_audio_seconds: where adapters that decode the upload stop (its headers may lie)."""


@dataclass(slots=True)
class AudioStream:
    """Audio as the engine produces it. The core closes `chunks` (aclose) on every path."""

    format: AudioFormat
    chunks: AsyncIterator[bytes]
    speed_applied: bool = False
    """True when the engine already honoured job.speed."""
    sse: bool = False
    """True when `chunks` is already an OpenAI speech SSE event stream."""


@dataclass(frozen=True, slots=True)
class Passthrough:
    """An upstream answer already in the client's requested format, relayed as it is."""

    content_type: str
    body: bytes | None = None
    chunks: AsyncIterator[bytes] | None = None
    """An event stream, one whole SSE event per chunk (gateway.adapters.events)."""


class Adapter(Protocol):
    """One per engine API. Constructed once per configured backend, closed at shutdown. `http` is the
    backend's own connection pool (gateway.upstreams), closed after the adapter.

    Optional, for engines with a streaming dialect (see `LiveTranscriber`):
    `transcribe_live(job) -> AsyncIterator[str]`, the job's transcript in pieces as the engine sends them."""

    kind: ClassVar[str]
    capabilities: Capabilities
    """What this backend does itself: the kind's defaults, refined by the backend's options."""
    backend: Backend
    """What it was built from: a reload keeps the adapter while this is unchanged."""

    def __init__(self, backend: Backend, http: aiohttp.ClientSession) -> None: ...

    async def synthesize(self, job: SpeechJob) -> AudioStream: ...

    async def transcribe(self, job: TranscriptionJob) -> Transcript | Passthrough: ...

    async def ready(self) -> bool:
        """A cheap probe that never bills: can this backend serve right now?"""
        ...

    async def aclose(self) -> None: ...


class LiveTranscriber(Protocol):
    """An adapter whose engine streams its transcript (gateway/adapters/live.py; docs/backends.md "Live
    transcripts"). Kinds that have it: wyoming, deepgram.

    `transcribe_live(job)` is an async generator: the job's audio (`job.upload`, as for `transcribe`) sent in
    the engine's streaming dialect, yielding the text as the engine sends it. The pieces are append-only and
    concatenated are the item's transcript with its whitespace collapsed (`" ".join(text.split())`): the
    separating spaces are in the pieces, the first piece has no leading space, no piece is empty. Errors
    before the first piece are the usual GatewayErrors (the caller fails over on them); after it, the same
    errors are raised from the iterator. Closing the iterator (`aclose`) closes the engine connection at
    once: no task or socket is left behind."""

    def transcribe_live(self, job: TranscriptionJob) -> AsyncIterator[str]: ...


def transcribes_only(backend: Backend) -> UnsupportedError:
    """What a transcription-only engine's `synthesize` raises (routes never send it speech: its capabilities say
    so; this is the answer should one be configured anyway)."""
    return UnsupportedError(f"Backend '{backend.name}' cannot synthesize speech; it transcribes.", param="model",
                            code="unsupported_task")


def check_options(backend: Backend, known: Collection[str]) -> None:
    """Refuse YAML keys a kind does not know, by path (a typo must not be silently ignored)."""
    unknown = sorted(set(backend.options) - set(known))
    if unknown:
        listed = ", ".join(["url", "api_key", "timeout_s", "connect_timeout_s", "first_byte_timeout_s",
                            "max_connections", "process", *sorted(known)])
        raise ValueError(f"backends.{backend.name}.{unknown[0]}: unknown option for kind '{backend.kind}' "
                         f"(known: {listed})")


@contextmanager
def upstream_errors(backend: Backend) -> Iterator[None]:
    """Map transport failures talking to `backend` onto gateway errors, naming the backend only."""
    try:
        yield
    except (TimeoutError, aiohttp.ServerTimeoutError):
        raise UpstreamTimeoutError(
            f"Backend '{backend.name}' did not answer in time.", reason=Reason.TIMEOUT
        ) from None
    except aiohttp.ClientConnectorError:
        raise UpstreamError(f"Backend '{backend.name}' is unreachable.", reason=Reason.CONNECT) from None
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
        raise UpstreamError(
            f"Backend '{backend.name}' closed the connection unexpectedly.", reason=Reason.DISCONNECT
        ) from None
    except aiohttp.ClientError:
        raise UpstreamError(f"Backend '{backend.name}' failed.", reason=Reason.PROTOCOL) from None
