"""Stands in for a backend whose engine is not installed here, so the rest of the config still serves."""

from __future__ import annotations

from typing import ClassVar, NoReturn

import aiohttp

from gateway.adapters.base import (
    SPEECH,
    TRANSCRIPTION,
    TRANSLATION,
    Capabilities,
    SpeechJob,
    TranscriptionJob,
)
from gateway.config import Backend
from gateway.errors import Reason, UpstreamError


class UnavailableAdapter:
    kind: ClassVar[str] = "unavailable"
    capabilities = Capabilities(tasks=frozenset({SPEECH, TRANSCRIPTION, TRANSLATION}), word_timestamps=True)
    """Claims everything, so that its requests get its own error (the engine is not installed) rather than
    one about a capability the real engine might well have."""

    def __init__(self, backend: Backend, http: aiohttp.ClientSession, reason: str = "") -> None:
        self.backend = backend
        self.reason = reason

    def _fail(self) -> NoReturn:
        raise UpstreamError(f"Backend '{self.backend.name}' cannot run on this gateway: its engine "
                            "is not installed.", reason=Reason.UNAVAILABLE_KIND, should_retry=False)

    async def synthesize(self, job: SpeechJob) -> NoReturn:
        self._fail()

    async def transcribe(self, job: TranscriptionJob) -> NoReturn:
        self._fail()

    async def ready(self) -> bool:
        return False

    async def aclose(self) -> None:
        return None
