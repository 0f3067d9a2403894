"""PocketSphinx inside the gateway: US-English speech to text, with word and segment timings.

The upload is decoded to 16 kHz mono PCM a second at a time (`gateway.audio.decode`) on one
dedicated worker thread, fed as it comes to PocketSphinx's voice-activity endpointer, and each
utterance is recognized by one Decoder that lives on that thread (model loaded once, per adapter).
So a request holds about a second of PCM plus the open utterance, never the whole upload, and
uploads are decoded one at a time.

The Cython binding holds the GIL inside every call: `Decoder()` for ~0.2 s (once, as the adapter is
built, so at startup), `process_raw` for as long as the audio it is given. So the worker feeds the
decoder `CHUNK_BYTES` (0.1 s of audio, ~10-40 ms of CPU) at a time, the event loop gets the GIL back
between chunks, and the second "fwdflat" pass, which runs in one piece at the end of an utterance,
is off by default. More worker threads would not decode faster (the GIL serializes them), hence
one. A cancelled request stops its decode at the next chunk.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import threading
from collections.abc import Generator, Mapping
from contextlib import closing
from dataclasses import replace
from typing import Any, ClassVar

import aiohttp

from gateway.adapters.base import (
    TRANSCRIPTION,
    AudioStream,
    Capabilities,
    SpeechJob,
    TranscriptionJob,
    check_options,
    transcribes_only,
)
from gateway.adapters.engine_thread import EngineThread
from gateway.audio.decode import decode_chunks
from gateway.config import Backend
from gateway.errors import Reason, UnsupportedError, UpstreamError
from gateway.transcript import Segment, Transcript, Word

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
CHUNK_BYTES = 3_200
"""0.1 s of 16-bit audio per process_raw call: the longest the event loop waits for the GIL."""
MAX_UTTERANCE_S = 30.0
"""Utterances are cut here even without a pause, to bound the search's memory and end-of-utterance work."""
SEGMENT_GAP_S = 0.5
DEFAULT_DECODER: Mapping[str, Any] = {"loglevel": "FATAL", "fwdflat": False}
_CUSTOM_MODEL = frozenset({"hmm", "lm", "dict", "jsgf", "kws", "keyphrase"})
"""Decoder settings that replace the bundled US-English models: the backend then claims no language."""
_FILLER = re.compile(r"<.*>|\[.*\]|\+\+.*\+\+")
_ALTERNATE = re.compile(r"\(\d+\)$")


def unavailable_reason() -> str | None:
    """Why this adapter cannot run here, or None when it can."""
    if importlib.util.find_spec("pocketsphinx") is None:
        return "the 'pocketsphinx' package is not installed (pip install 'openai-audio-gateway[embedded-lite]')"
    return None


def is_english(language: str | None) -> bool:
    """True for no language, "en", "en-US", "english" and the like."""
    code = (language or "en").strip().lower().replace("_", "-")
    return code in ("", "en", "english") or code.startswith("en-")


class PocketsphinxAdapter:
    """Transcription with PocketSphinx's US-English model. Backend option `decoder`: a mapping of
    PocketSphinx config parameters (hmm, lm, dict, fwdflat, beam, ...) over DEFAULT_DECODER."""

    kind: ClassVar[str] = "pocketsphinx"
    capabilities = Capabilities(
        tasks=frozenset({TRANSCRIPTION}),
        languages=frozenset({"en"}),
        word_timestamps=True,
    )

    def __init__(self, backend: Backend, http: aiohttp.ClientSession) -> None:
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        from pocketsphinx import Config

        check_options(backend, ("decoder",))
        options = backend.options.get("decoder") or {}
        if not isinstance(options, Mapping):
            raise ValueError(f"backends.{backend.name}.decoder: expected a mapping of PocketSphinx settings")
        try:
            self._config = Config(**{**DEFAULT_DECODER, **options})
        except (KeyError, ValueError) as exc:
            raise ValueError(f"backends.{backend.name}.decoder: {exc}") from None
        self.backend = backend
        if _CUSTOM_MODEL & set(options):  # another acoustic or language model may hear another language
            self.capabilities = replace(type(self).capabilities, languages=None)
        self._jobs: set[threading.Event] = set()
        self._decoder: Any = None
        self._thread = EngineThread(backend, "sphinx", self._load)

    def _load(self) -> None:
        from pocketsphinx import Decoder

        self._decoder = Decoder(self._config)
        self._cmn = self._decoder.get_cmn()
        self._frame_rate = float(self._config["frate"])

    async def ready(self) -> bool:
        return await self._thread.ready()

    async def transcribe(self, job: TranscriptionJob) -> Transcript:
        english_only = self.capabilities.languages == frozenset({"en"})
        if job.task == "translate" and not (english_only and is_english(job.language)):
            raise UnsupportedError(
                f"Backend '{self.backend.name}' cannot translate; it only transcribes English audio.",
                param="model", code="unsupported_task")
        if english_only and not is_english(job.language):
            raise UnsupportedError(
                f"Backend '{self.backend.name}' only understands English, not '{job.language}'.",
                param="language", code="unsupported_language")
        await self._thread.loaded()
        await job.upload.measured()  # decoding waits for the measurement: a bomb is refused undecoded
        chunks = decode_chunks(job.upload.view(), sample_rate=SAMPLE_RATE, max_seconds=job.max_audio_seconds)
        cancel = threading.Event()
        self._jobs.add(cancel)
        try:
            utterances, duration = await self._thread.submit(self._recognize, chunks, cancel)
        except RuntimeError as exc:  # PocketSphinx refused the audio
            log.error("backend %s: PocketSphinx failed", self.backend.name, exc_info=exc)
            raise UpstreamError(f"Backend '{self.backend.name}' failed.", reason=Reason.ENGINE) from None
        finally:
            cancel.set()  # also stops a decode whose caller was cancelled
            self._jobs.discard(cancel)
        segments = tuple(s for words in utterances for s in _segments(words))
        return Transcript(
            text=" ".join(s.text for s in segments),
            language="en" if self.capabilities.languages == frozenset({"en"}) else job.language,
            duration=duration,
            segments=segments,
            words=tuple(w for s in segments for w in s.words),
            decoded=True,
        )

    def _recognize(self, chunks: Generator[bytes, None, None],
                   cancel: threading.Event) -> tuple[list[list[Word]], float]:
        """Worker thread: the words of each utterance, timed from the start of the audio, and its length."""
        from pocketsphinx import Endpointer

        decoder, endpointer = self._decoder, Endpointer(sample_rate=SAMPLE_RATE)
        decoder.set_cmn(self._cmn)  # the same audio always gives the same words
        utterances: list[list[Word]] = []
        pending = bytearray()
        start: float | None = None  # of the open utterance
        resume: float | None = None  # where the next one starts when an utterance was cut at the limit
        fed = 0  # bytes of the open utterance given to the decoder
        step, limit = endpointer.frame_bytes, int(MAX_UTTERANCE_S * SAMPLE_RATE) * 2
        total = 0
        try:
            with closing(_frames(chunks, step)) as frames:
                for frame, last in frames:
                    if cancel.is_set():
                        break
                    total += len(frame)
                    speech = endpointer.end_stream(frame) if last else endpointer.process(frame)
                    if speech is None:
                        continue
                    if start is None:
                        decoder.start_utt()
                        start, resume, fed = endpointer.speech_start if resume is None else resume, None, 0
                    pending += speech
                    if len(pending) >= CHUNK_BYTES:
                        decoder.process_raw(bytes(pending))
                        fed += len(pending)
                        pending.clear()
                    if not endpointer.in_speech or fed >= limit:
                        if endpointer.in_speech:
                            resume = start + (fed + len(pending)) / (2 * SAMPLE_RATE)
                        utterances.append(self._end_utterance(pending, start))
                        start = None
        finally:
            if start is not None:  # the audio ended (or the caller left) mid-utterance
                utterances.append(self._end_utterance(pending, start))
        return utterances, total / (2 * SAMPLE_RATE)

    def _end_utterance(self, pending: bytearray, start: float) -> list[Word]:
        if pending:
            self._decoder.process_raw(bytes(pending))
            pending.clear()
        self._decoder.end_utt()
        rate = self._frame_rate  # frames per second; end_frame is inclusive
        return [Word(_ALTERNATE.sub("", seg.word), round(start + seg.start_frame / rate, 3),
                     round(start + (seg.end_frame + 1) / rate, 3))
                for seg in self._decoder.seg() if not _FILLER.fullmatch(seg.word)]

    async def synthesize(self, job: SpeechJob) -> AudioStream:
        raise transcribes_only(self.backend)

    async def aclose(self) -> None:
        for cancel in list(self._jobs):
            cancel.set()
        await self._thread.aclose()
        self._decoder = None


def _frames(chunks: Generator[bytes, None, None], step: int) -> Generator[tuple[bytes, bool], None, None]:
    """The endpointer's frames of `step` bytes from PCM chunks, each with whether it is the last
    (which may be shorter: end_stream also flushes the endpointer's window)."""
    pending = b""
    with closing(chunks):
        for chunk in chunks:
            pending += chunk
            usable = (len(pending) - 1) // step * step  # keep the latest frame back: it may be the last
            for offset in range(0, usable, step):
                yield pending[offset:offset + step], False
            pending = pending[usable:]
    if pending:
        yield pending, True


def _segments(words: list[Word]) -> list[Segment]:
    """An utterance's words as segments, split where the speaker paused longer than SEGMENT_GAP_S."""
    groups: list[list[Word]] = []
    for word in words:
        if groups and word.start - groups[-1][-1].end <= SEGMENT_GAP_S:
            groups[-1].append(word)
        else:
            groups.append([word])
    return [Segment(g[0].start, g[-1].end, " ".join(w.word for w in g), tuple(g)) for g in groups]
