"""faster-whisper inside the gateway (MIT): a CTranslate2 Whisper model, with real segments and word timings.

The model is a local directory (or one shipped in a Python package, `package:NAME/sub/dir`), never a
download. It loads once per adapter on a thread of its own (gateway.adapters.engine_thread), off the
event loop, and every request shares it. A request is one job on the app's audio workers
(gateway/audio/workers.py, a 503 when they are saturated): one task decodes the upload to 16 kHz mono
float32 and starts the transcription (VAD, features, language), then each segment is one more task,
so a cancelled request stops consuming the segment generator at the next segment and its thread goes
back to the pool. One transcription runs per backend at a time (CTranslate2 serializes a model's calls
anyway), so a backend holds one upload's decoded audio (64 kB a second, plus its features) at once;
the others wait holding their audio-worker slot.

Whether the model is multilingual is read from its vocabulary as the adapter is built (CTranslate2's own
rule: 51,865 tokens or more), so an English-only model's routes never claim translation.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import math
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import aiohttp

from gateway.adapters.base import (
    TRANSCRIPTION,
    TRANSLATION,
    AudioStream,
    Capabilities,
    SpeechJob,
    TranscriptionJob,
    check_options,
    transcribes_only,
)
from gateway.adapters.engine_thread import EngineThread
from gateway.adapters.pocketsphinx import is_english
from gateway.audio.decode import decode_chunks
from gateway.audio.silence import out_of_silence, silences
from gateway.config import Backend
from gateway.errors import GatewayError, Reason, UnsupportedError, UpstreamError
from gateway.languages import WHISPER_LANGUAGES, whisper_code
from gateway.transcript import Segment, Transcript, Word

log = logging.getLogger(__name__)
# faster-whisper's INFO lines (the audio's duration, what VAD removed) come twice per request, plain text among
# the JSON lines: its warnings are enough, the access log says the rest.
logging.getLogger("faster_whisper").setLevel(logging.WARNING)

SAMPLE_RATE = 16_000
MULTILINGUAL_VOCABULARY = 51_865
"""CTranslate2's test (whisper.cc): a vocabulary this large or larger is a multilingual model."""
COMPUTE_TYPES = frozenset({"default", "auto", "int8", "int8_float32", "int16", "float32"})
"""CTranslate2's compute types on a CPU (float16 and bfloat16 need a GPU)."""
MAX_CPU_THREADS, MAX_BEAM_SIZE = 256, 16
DEFAULTS: dict[str, Any] = {"compute_type": "int8", "cpu_threads": 0, "vad_filter": True, "beam_size": 1}
WORD_FORMATS = frozenset({"srt", "vtt"})
"""Formats whose cues are split inside a segment at word times, so words are asked for."""


def unavailable_reason() -> str | None:
    """Why this adapter cannot run here, or None when it can."""
    if importlib.util.find_spec("faster_whisper") is None:
        return "the 'faster-whisper' package is not installed (pip install 'openai-audio-gateway[embedded]')"
    return None


class FasterWhisperAdapter:
    """Transcription (and translation, on a multilingual model) with faster-whisper. Options: `model`
    (required), `compute_type` (int8), `cpu_threads` (0: CTranslate2's default), `vad_filter` (true),
    `beam_size` (1)."""

    kind: ClassVar[str] = "faster_whisper"
    capabilities = Capabilities(tasks=frozenset({TRANSCRIPTION, TRANSLATION}), languages=WHISPER_LANGUAGES,
                                word_timestamps=True)

    def __init__(self, backend: Backend, http: aiohttp.ClientSession) -> None:
        reason = unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        check_options(backend, ("model", *DEFAULTS))
        self.backend = backend
        self.options = _options(backend)
        self.path = model_dir(backend.name, backend.options.get("model"))
        self.multilingual = _vocabulary_size(backend.name, self.path) >= MULTILINGUAL_VOCABULARY
        if not self.multilingual:
            self.capabilities = replace(type(self).capabilities, tasks=frozenset({TRANSCRIPTION}),
                                        languages=frozenset({"en"}), english_translates=False)
        self._turn = asyncio.Semaphore(1)
        self._jobs: set[threading.Event] = set()
        self._thread = EngineThread(backend, "whisper", self._load)

    def _load(self) -> Any:
        from faster_whisper import WhisperModel

        return WhisperModel(str(self.path), device="cpu", compute_type=self.options["compute_type"],
                            cpu_threads=self.options["cpu_threads"], local_files_only=True)

    async def ready(self) -> bool:
        return await self._thread.ready()

    async def transcribe(self, job: TranscriptionJob) -> Transcript:
        if job.task == "translate" and not self.multilingual:
            raise UnsupportedError(f"Backend '{self.backend.name}' cannot translate: its Whisper model is "
                                   "English-only (it transcribes English audio).",
                                   param="model", code="unsupported_task")
        language = self._language(job.language)
        model = await self._thread.loaded()
        if language is not None and language not in model.supported_languages:  # an older model: no "yue"
            raise UnsupportedError(f"Backend '{self.backend.name}' does not understand language '{job.language}'.",
                                   param="language", code="unsupported_language")
        await job.upload.measured()  # decoding waits for the measurement: a bomb is refused undecoded
        run = _Run(model, job, language, self.options)
        workers = job.upload.workers
        with workers.job():  # a 503 now when the audio workers are saturated
            async with self._turn:
                self._jobs.add(run.cancel)
                try:
                    info = await workers.run(run.start)
                    segments = []
                    while (segment := await workers.run(run.next)) is not None:
                        segments.append(segment)
                    if run.cancel.is_set():  # aclose stopped it: never a cut transcript as an answer
                        raise self._thread.error("is shut down", Reason.CLOSED)
                except GatewayError:
                    raise
                except Exception as exc:  # faster-whisper or CTranslate2 failed on this audio
                    log.error("backend %s: faster-whisper failed", self.backend.name, exc_info=exc)
                    raise UpstreamError(f"Backend '{self.backend.name}' failed.", reason=Reason.ENGINE) from None
                finally:
                    run.cancel.set()  # a decode or a segment still running stops at its next step
                    self._jobs.discard(run.cancel)
                    await workers.finish(run.close)  # the slot and the turn are given back once its thread is free
        return Transcript(
            text="".join(s.text for s in segments).strip(),
            language=info.language if self.multilingual else "en",
            duration=run.seconds,
            segments=tuple(segments),
            decoded=True,
        )

    def _language(self, language: str | None) -> str | None:
        """The Whisper code for the request's `language`; a 400 on `language` for one the model lacks."""
        if language is None:
            return None
        if not self.multilingual:
            if is_english(language):
                return "en"
            raise UnsupportedError(f"Backend '{self.backend.name}' only understands English, not '{language}'.",
                                   param="language", code="unsupported_language")
        code = whisper_code(language)
        if code is None:
            raise UnsupportedError(f"Backend '{self.backend.name}' does not understand language '{language}'.",
                                   param="language", code="unsupported_language")
        return code

    async def synthesize(self, job: SpeechJob) -> AudioStream:
        raise transcribes_only(self.backend)

    async def aclose(self) -> None:
        for cancel in list(self._jobs):
            cancel.set()
        await self._thread.aclose()


class _Run:
    """One request's transcription, stepped on the audio workers; `close` may run while nothing else does."""

    def __init__(self, model: Any, job: TranscriptionJob, language: str | None, options: dict[str, Any]) -> None:
        self.model, self.job, self.language, self.options = model, job, language, options
        self.cancel = threading.Event()
        self.seconds = 0.0
        self.silences: list[tuple[float, float]] = []
        """Clear silences in the audio, when words are asked for (gateway/audio/silence.py)."""
        self.previous_end = 0.0
        """Where the last word handed out ends."""
        self._segments: Iterator[Any] | None = None
        self._lock = threading.Lock()

    def start(self) -> Any:
        """Decode the upload and start the transcription; the engine's TranscriptionInfo."""
        import numpy as np

        job = self.job
        pcm = bytearray()
        with self._lock:
            chunks = decode_chunks(job.upload.view(), sample_rate=SAMPLE_RATE, max_seconds=job.max_audio_seconds)
            try:
                for chunk in chunks:
                    if self.cancel.is_set():
                        return None
                    pcm += chunk
            finally:
                chunks.close()
            self.seconds = len(pcm) / (2 * SAMPLE_RATE)
            audio = np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768.0
            del pcm
            words = "word" in job.timestamp_granularities or job.response_format in WORD_FORMATS
            self.silences = silences(audio, SAMPLE_RATE) if words else []
            temperature = job.temperature if job.temperature else (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
            segments, info = self.model.transcribe(
                audio, language=self.language, task=job.task, beam_size=self.options["beam_size"],
                temperature=temperature, initial_prompt=job.prompt or None, word_timestamps=words,
                vad_filter=self.options["vad_filter"])
            self._segments = iter(segments)
            return info

    def next(self) -> Segment | None:
        """The next segment, or None at the end (or once cancelled)."""
        with self._lock:
            if self.cancel.is_set() or self._segments is None:
                return None
            found = next(self._segments, None)
            if found is None:
                return None
            segment = _segment(found, self.silences, self.previous_end)
            self.previous_end = segment.words[-1].end if segment.words else self.previous_end
            return segment

    def close(self) -> None:
        with self._lock:
            close = getattr(self._segments, "close", None)
            if close is not None:
                close()
            self._segments = None


def _segment(s: Any, quiet: list[tuple[float, float]], previous_end: float) -> Segment:
    """The engine's segment, its words moved out of the clear silences around them (gateway/audio/silence.py)."""
    words: list[Word] = []
    for w in s.words or ():
        if w.word.strip():  # as Whisper says it (" Americans,"): gateway.transcript.normalize makes it bare
            words.append(out_of_silence(Word(w.word, round(w.start, 3), round(w.end, 3)), quiet, previous_end))
            previous_end = words[-1].end
    return Segment(round(s.start, 3), round(s.end, 3), s.text, tuple(words), avg_logprob=_finite(s.avg_logprob),
                   no_speech_prob=_finite(s.no_speech_prob), temperature=_finite(s.temperature),
                   compression_ratio=_finite(s.compression_ratio))


def _finite(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else 0.0


def model_dir(backend: str, value: Any) -> Path:
    """The model's directory: a path, or `package:NAME/sub/dir` inside an installed package (found by its
    import spec, so the package's code never runs). A ValueError by YAML path when it is not there: a
    missing model is never downloaded."""
    where = f"backends.{backend}.model"
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: expected a CTranslate2 Whisper model directory, or 'package:NAME/sub/dir'")
    candidates = [Path(value).expanduser()]
    if value.startswith("package:"):
        package, _, sub = value.removeprefix("package:").partition("/")
        parts = [p for p in sub.split("/") if p]
        if not package.isidentifier() or any(p in (".", "..") for p in parts):
            raise ValueError(f"{where}: '{value}' is not 'package:NAME/sub/dir' (a package name, a path inside it)")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"{where}: package '{package}' is not installed")
        candidates = [Path(root, *parts) for root in spec.submodule_search_locations]
    for path in candidates:
        try:
            if (path / "model.bin").is_file():
                return path
        except (OSError, ValueError):  # a name too long, a NUL byte: not a model either
            pass
    raise ValueError(f"{where}: no CTranslate2 Whisper model in '{value}' (no model.bin there; "
                     "models are never downloaded)")


def _vocabulary_size(backend: str, path: Path) -> int:
    """Tokens in the model's vocabulary (vocabulary.txt, one a line, or vocabulary.json, a list): a few
    hundred kilobytes read once, as the adapter is built."""
    try:
        if (path / "vocabulary.txt").is_file():
            return (path / "vocabulary.txt").read_bytes().count(b"\n")
        return len(json.loads((path / "vocabulary.json").read_bytes()))
    except (OSError, ValueError, TypeError):
        raise ValueError(f"backends.{backend}.model: no readable vocabulary (vocabulary.txt or vocabulary.json) "
                         f"in '{path}'") from None


def _options(backend: Backend) -> dict[str, Any]:
    """The engine options over DEFAULTS, each checked by YAML path."""
    where, given = f"backends.{backend.name}", backend.options
    options = {**DEFAULTS, **{k: v for k, v in given.items() if k in DEFAULTS and v is not None}}
    if not isinstance(options["compute_type"], str) or options["compute_type"] not in COMPUTE_TYPES:
        raise ValueError(f"{where}.compute_type: expected one of {', '.join(sorted(COMPUTE_TYPES))}")
    for key, low, high in (("cpu_threads", 0, MAX_CPU_THREADS), ("beam_size", 1, MAX_BEAM_SIZE)):
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{where}.{key}: expected a whole number from {low} to {high}")
    if not isinstance(options["vad_filter"], bool):
        raise ValueError(f"{where}.vad_filter: expected true or false")
    return options
