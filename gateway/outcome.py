"""What one request did (route taken, bytes, audio produced), filled by handlers, read by the access log."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web

from gateway.audio.meter import AudioMeter


@dataclass(slots=True)
class Outcome:
    endpoint: str
    started: float = field(default_factory=time.monotonic)
    public_model: str | None = None
    backend: str | None = None
    native_model: str | None = None
    voice: str | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    input_chars: int = 0
    """Speech: characters (code points) of `input`."""
    input_audio_seconds: float | None = None
    """Transcription: seconds of uploaded audio, measured once from the decoded file."""
    output_audio_seconds: float = 0.0
    """Speech: seconds of audio delivered to the client."""
    output_text_chars: int = 0
    """Transcription: characters of transcript text returned."""
    first_byte_at: float | None = None
    status: int | None = None
    """The response's status, once a handler produced one (a later disconnect does not change it)."""
    completed: bool = False
    """The answer reached the client whole (for streams: the last chunk was written)."""
    client_gone: bool = False
    """The client went away while its answer was being sent (recorded as 499, as nginx does)."""
    failed_after_first_byte: str | None = None
    """Why a stream was cut after its status had been sent, if it was."""
    meter: AudioMeter | None = None
    """Speech: measures the audio that went out (set only while metering is on)."""

    def route(self, public_model: str, backend: str, native_model: str, voice: str | None = None) -> None:
        self.public_model, self.backend, self.native_model, self.voice = (
            public_model, backend, native_model, voice)

    def sent(self, response: web.StreamResponse) -> None:
        """Note the status, and the body bytes of a response not streamed by its handler (those are sent
        after the middlewares)."""
        self.status = 499 if self.client_gone else response.status
        if self.bytes_out == 0:
            body = response.body if isinstance(response, web.Response) else None
            self.bytes_out = response.body_length or (len(body) if isinstance(body, bytes) else 0)

    def mark_first_byte(self) -> None:
        if self.first_byte_at is None:
            self.first_byte_at = time.monotonic()
