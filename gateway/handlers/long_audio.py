"""Long audio: an upload split into chunks (gateway/chunking.py decides), transcribed in parallel, stitched back.

The splitter (gateway/audio/splitter.py) cuts the upload at silences on the audio workers, one chunk at a time.
Each chunk is spooled like an upload (gateway/spool.py: memory within the spool's budget, else an unnamed
temporary file) and sent as a request of its own through the model's routes (gateway/handlers/routing.py):
failover, retries, ejection and admission slots apply per chunk, and a chunk's slot is given back as soon as its
transcript is in hand. At most `long_audio.concurrency` chunks (and never more than the routes' summed
`max_concurrency`) are in flight per request; the next chunk is cut only when one of them is done, so a request
holds at most that many chunks in memory or on disk whatever the upload's length. A model's `deadline_s`
applies to each chunk. A chunk in which the VAD hears no speech at all (a file's silent tail, a long pause) is
not sent: Whisper-family engines make text up from silence, and it would cost a call for nothing.

The first chunk that fails on every route fails the request (its error is the client's); every other chunk in
flight is cancelled then, as when the client leaves. The transcripts are stitched on the original timeline
(gateway/transcript_stitch.py) and rendered like any other; `stream=true` sends each chunk's text as a
`transcript.text.delta` once it and every chunk before it are done. Billing: the whole decoded file's seconds,
once, whatever the chunks and retries; the ledger notes the chunk count.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import replace
from typing import Any

from aiohttp import web

from gateway.adapters.base import Passthrough, TranscriptionJob
from gateway.audio import splitter
from gateway.chunking import Cut, is_strategy_field
from gateway.deadlines import within_deadline
from gateway.errors import InvalidRequestError, Reason, UpstreamError
from gateway.handlers.routing import first_success
from gateway.models import Model
from gateway.spool import Upload
from gateway.state import METRICS, OUTCOME, REQUEST_ID, SPOOL_MEMORY, TABLE
from gateway.streaming import sse_event
from gateway.table import Candidate
from gateway.transcript import Transcript
from gateway.transcript_formats import full_text
from gateway.transcript_json import parse_transcript
from gateway.transcript_stitch import InOrder, stitch, stitch_diarized
from gateway.validation import TranscriptionRequest

CHUNK_FORMATS = {"json": "json", "text": "json", "verbose_json": "verbose_json", "srt": "verbose_json",
                 "vtt": "verbose_json", "diarized_json": "diarized_json"}
"""What each chunk is asked for, by the client's response_format: structure the gateway can stitch."""

Part = Transcript | dict[str, Any]
"""A chunk's transcript: a Transcript, or a `diarized_json` body."""
_SILENT: dict[str, Part] = {"json": Transcript(""), "verbose_json": Transcript(""),
                            "diarized_json": {"text": "", "segments": []}}
"""What a chunk that is all silence is heard as."""


async def transcribe_long(request: web.Request, req: TranscriptionRequest, upload: Upload,
                          candidates: list[Candidate], model: Model, cut: Cut,
                          job_for: Callable[[Candidate, Upload], TranscriptionJob]) -> Transcript | Passthrough:
    """The upload's transcript, stitched from its chunks': a Transcript the handler renders, a `diarized_json`
    body, or for `stream=true` an event stream."""
    config = request[TABLE].config
    seconds = request[OUTCOME].input_audio_seconds or 0.0
    if seconds / cut.max_seconds > config.long_audio.max_chunks:  # fewer chunks than this is impossible
        raise _too_many(config.long_audio.max_chunks, cut.max_seconds)
    chunks = _Chunks(request, req, upload, candidates, model, cut, job_for)
    if req.stream:
        return Passthrough("text/event-stream", chunks=_events(request, chunks))
    parts: dict[int, tuple[float, Part]] = {}
    async with contextlib.aclosing(chunks.completed()) as done:
        async for index, start, part in done:
            parts[index] = (start, part)
    ordered = [parts[i] for i in range(len(parts))]
    _count(request, len(ordered), chunks.end_s)
    if req.response_format == "diarized_json":
        known = [value for name, value in req.extra if name.removesuffix("[]") == "known_speaker_names"]
        body = stitch_diarized(ordered, chunks.end_s, known)  # type: ignore[arg-type]
        return Passthrough("application/json", body=json.dumps(body, ensure_ascii=False).encode())
    return await upload.workers.run(stitch, ordered, chunks.end_s)


async def _events(request: web.Request, chunks: _Chunks) -> AsyncIterator[bytes]:
    """OpenAI's transcription events: each chunk's text in file order as soon as it can go, then `done`."""
    in_order, texts = InOrder(request[TABLE].config.long_audio.max_chunks), []
    async with contextlib.aclosing(chunks.completed()) as done:
        async for index, _, part in done:
            for text in in_order.push(index, _text(part)):
                texts.append(text)
                yield sse_event({"type": "transcript.text.delta", "delta": text})
    _count(request, in_order.next, chunks.end_s)
    yield sse_event({"type": "transcript.text.done", "text": "".join(texts)})


def _count(request: web.Request, chunks: int, seconds: float) -> None:
    """Bill the whole decoded file once, and note the chunk count (ledger, metrics)."""
    outcome = request[OUTCOME]
    outcome.upload_decoded(seconds)
    outcome.chunks = chunks
    metrics = request.app.get(METRICS)
    if metrics is not None:
        metrics.chunks.labels(outcome.public_model or "").inc(chunks)


def _text(part: Part) -> str:
    if isinstance(part, Transcript):
        return full_text(part)
    text = part.get("text")
    return text if isinstance(text, str) else ""


def _too_many(limit: int, chunk_s: float) -> InvalidRequestError:
    return InvalidRequestError(f"The audio is too long: it would take more than {limit} chunks of at most "
                               f"{chunk_s:g} seconds for this model's backends.", param="file",
                               code="audio_too_long")


class _Chunks:
    """One request's chunks: cut, spooled, transcribed at most `concurrency` at a time, reported as done."""

    def __init__(self, request: web.Request, req: TranscriptionRequest, upload: Upload,
                 candidates: list[Candidate], model: Model, cut: Cut,
                 job_for: Callable[[Candidate, Upload], TranscriptionJob]) -> None:
        config = request[TABLE].config
        self.request, self.req, self.upload, self.candidates, self.model, self.cut = (
            request, req, upload, candidates, model, cut)
        self.job_for = job_for
        self.settings, self.server = config.long_audio, config.server
        caps = [config.capacity[c.route.backend].max_concurrency if c.route.backend in config.capacity else None
                for c in candidates]
        width = self.settings.concurrency if None in caps else min(self.settings.concurrency, sum(caps))  # type: ignore[arg-type]
        self.free = asyncio.Semaphore(width)
        self.results: asyncio.Queue[tuple[int, float, Part] | BaseException | None] = asyncio.Queue()
        self.tasks: set[asyncio.Task[None]] = set()
        self.count: int | None = None
        """How many chunks the upload made, once the splitter is done."""
        self.end_s = 0.0
        """The decoded file's length so far: its whole length once the splitter is done."""
        extra = req.extra if not cut.emulated else tuple((k, v) for k, v in req.extra if not is_strategy_field(k))
        fmt = CHUNK_FORMATS[req.response_format]
        granularities = req.timestamp_granularities or (("segment",) if fmt == "verbose_json" else ())
        self.changes: dict[str, Any] = {"response_format": fmt, "stream": False, "extra": extra,
                                        "timestamp_granularities": granularities}

    async def completed(self) -> AsyncIterator[tuple[int, float, Part]]:
        """(index, offset in the file, transcript) per chunk, as they complete; the first failure raised. Closing
        it cancels everything still running and waits for it (no chunk outlives the request)."""
        self._start(self._produce())
        received = 0
        try:
            while self.count is None or received < self.count:
                item = await self.results.get()
                if isinstance(item, BaseException):
                    raise item
                if item is not None:
                    received += 1
                    yield item
        finally:
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)

    def _start(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        """A task's failure goes to the consumer (a cancellation is the consumer's own doing)."""
        self.tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.results.put_nowait(exc)

    async def _produce(self) -> None:
        pieces = splitter.chunks(self.upload, max_input_seconds=self.server.max_audio_seconds,
                                 **self.cut.splitter_args())
        index = 0
        async with contextlib.aclosing(pieces):
            while True:
                await self.free.acquire()  # the next chunk is cut only when it can be sent
                chunk = await anext(pieces, None)
                if chunk is None:
                    self.free.release()
                    break
                if index == self.settings.max_chunks:
                    raise _too_many(self.settings.max_chunks, self.cut.max_seconds)
                self.end_s = chunk.end_s
                if chunk.speech:
                    self._start(self._one(index, chunk.start_s, chunk.end_s - chunk.start_s, chunk.wav))
                else:  # all silence to the VAD: heard as nothing, without an engine's call
                    self.results.put_nowait((index, chunk.start_s, _SILENT[self.changes["response_format"]]))
                    self.free.release()
                del chunk
                index += 1
        self.count = index
        self.results.put_nowait(None)  # wakes the consumer to see the count

    async def _one(self, index: int, start: float, seconds: float, wav: bytes) -> None:
        server = self.server
        upload = Upload(f"chunk-{index + 1}.wav", "audio/wav", self.upload.workers, self.request.app[SPOOL_MEMORY],
                        server.spool_memory_bytes, server.spool_dir)
        try:
            await upload.write(wav)
            del wav
            upload.measurement = measured = asyncio.get_running_loop().create_future()
            measured.set_result(seconds)

            async def attempt(candidate: Candidate) -> Part:
                answer = await candidate.adapter.transcribe(replace(self.job_for(candidate, upload), **self.changes))
                return _part(candidate, answer, self.changes["response_format"])

            part = await within_deadline(self.model, first_success(self.request, self.candidates, attempt,
                                                                   self.model, hold=False),
                                         self.request[REQUEST_ID])
            self.results.put_nowait((index, start, part))
        finally:
            upload.close()
            self.free.release()


def _part(candidate: Candidate, answer: Transcript | Passthrough, fmt: str) -> Part:
    """A chunk's answer as structure; a malformed one is its backend's failure (so the chunk fails over)."""
    if isinstance(answer, Transcript):
        return answer
    try:
        if answer.body is None:
            raise ValueError("no body")
        if fmt == "diarized_json":
            parsed = json.loads(answer.body)
            if not isinstance(parsed, dict):
                raise ValueError("not an object")
            return parsed
        return parse_transcript(answer.body)
    except (ValueError, RecursionError):
        raise UpstreamError(f"Backend '{candidate.route.backend}' answered a chunk with a malformed transcript.",
                            reason=Reason.BAD_RESPONSE) from None
