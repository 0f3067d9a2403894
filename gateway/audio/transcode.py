"""Transcoding an engine's audio stream into OpenAI's response formats, with speed change, as it arrives.

The PyAV work runs on the app's audio workers (audio/workers.py), a step at a time: each step reads
the engine's bytes that have arrived from a queue (as raw PCM, or as a non-seekable file for FFmpeg's
demuxer), runs them through a filter graph (24 kHz mono, atempo for speed, the encoder's sample
format) and muxes into a sink whose bytes go back to the event loop when the step ends. No thread
waits for an engine between steps, so a stream costs a worker only while it encodes. Input is bounded
(_PENDING chunks) and the next step starts only once the consumer took the last one's bytes, so a
slow client slows the engine's stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from fractions import Fraction
from typing import Any

import av

from gateway.audio.formats import OPENAI_PCM_RATE, SPEECH_FORMATS, AudioFormat
from gateway.audio.frames import DEMUXERS, PCM_SAMPLE_FORMATS, Reader, Stopped, bad_audio, frames
from gateway.audio.workers import AudioWorkers

MIN_SPEED, MAX_SPEED = 0.25, 4.0
_RATE = OPENAI_PCM_RATE
# response_format -> (muxer, encoder, muxer options, bit rate)
_OUTPUTS: dict[str, tuple[str, str, dict[str, str], int | None]] = {
    "mp3": ("mp3", "libmp3lame", {"id3v2_version": "0"}, 64_000),
    "opus": ("ogg", "libopus", {"page_duration": "200000"}, 32_000),  # 200 ms pages, not 1 s
    "aac": ("adts", "aac", {}, 64_000),
    "flac": ("flac", "flac", {"metadata_header_padding": "0", "fflags": "+bitexact"}, None),
    "wav": ("wav", "pcm_s16le", {"fflags": "+bitexact"}, None),  # 44-byte header, sizes 0xFFFFFFFF
    "pcm": ("s16le", "pcm_s16le", {}, None),
}
_PENDING = 16  # engine chunks waiting for a step




def encode(
    chunks: AsyncIterator[bytes], source: AudioFormat, response_format: str, speed: float = 1.0, *,
    workers: AudioWorkers,
) -> AsyncIterator[bytes]:
    """The engine's `chunks` (described by `source`) as OpenAI's `response_format`, `speed` times faster.

    Bytes already in the requested form pass through untouched. Errors raised by `chunks` reach the
    consumer unchanged; audio that cannot be decoded raises UpstreamError (reason bad_audio). No byte
    is produced before the first decoded frame. Closing the returned generator (or cancelling its
    consumer) waits for a step still running and closes `chunks`. A transcoded stream is one job on
    `workers`: when they are saturated, the first chunk's request raises ServiceUnavailableError.
    Bad arguments raise ValueError at once.
    """
    if response_format not in SPEECH_FORMATS:
        raise ValueError(f"unknown response_format {response_format!r}")
    if not MIN_SPEED <= speed <= MAX_SPEED:
        raise ValueError(f"speed must be within {MIN_SPEED}..{MAX_SPEED}")
    if source.container == "pcm":
        if source.sample_width not in PCM_SAMPLE_FORMATS or not source.sample_rate or source.channels < 1:
            raise ValueError(f"unsupported pcm source {source}")
    elif source.container not in DEMUXERS:
        raise ValueError(f"unsupported source container {source.container!r}")
    if speed == 1.0 and source.is_openai(response_format):
        return _passthrough(chunks)
    return _transcode(chunks, source, response_format, speed, workers)


async def _aclose(chunks: AsyncIterator[bytes]) -> None:
    if (aclose := getattr(chunks, "aclose", None)) is not None:
        await aclose()


async def _passthrough(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        await _aclose(chunks)


async def _transcode(
    chunks: AsyncIterator[bytes], source: AudioFormat, response_format: str, speed: float, workers: AudioWorkers
) -> AsyncIterator[bytes]:
    try:
        with workers.job():  # a 503 here, at the first chunk's request, is still before the first byte
            job = _Job(asyncio.get_running_loop(), source, response_format, speed)
            pump = asyncio.create_task(job.pump(chunks))
            try:
                while not job.done:
                    await job.arrived.wait()
                    job.arrived.clear()
                    try:
                        out = await workers.run(job.step)
                    except Exception:
                        if job.input_error is None:
                            raise
                        break  # the engine's own error wins over what we made of its end
                    if job.reader.ready():  # the step left input for the next one
                        job.arrived.set()
                    if out:
                        yield out
                if job.input_error is not None:  # after the audio that came before it, as a relay would
                    raise job.input_error
            finally:
                job.stop.set()
                job.reader.put(None)
                pump.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pump
                await workers.run(job.close)  # after any step still running; no task outlives the stream
    finally:
        await _aclose(chunks)


class _Sink:
    """Where the muxer writes; a step's bytes go to the event loop when it ends (`take`).

    Nothing goes out before the first frame is encoded (`armed`), so an engine that fails before
    producing audio fails before the response has a single byte.
    """

    def __init__(self, job: _Job) -> None:
        self._job = job
        self._buffer = bytearray()
        self.armed = False

    def write(self, data: bytes) -> int:
        if self._job.stop.is_set():
            raise Stopped
        self._buffer += data
        return len(data)

    def take(self) -> bytes:
        if not self.armed:
            return b""
        data, self._buffer = bytes(self._buffer), bytearray()
        return data


class _Encoder:
    """Filter graph (24 kHz mono, atempo, sample format) into the encoder and muxer of one response format."""

    def __init__(self, response_format: str, speed: float, sink: _Sink) -> None:
        muxer, codec, options, bit_rate = _OUTPUTS[response_format]
        self.container: Any = av.open(sink, "w", format=muxer, options=dict(options), buffer_size=4096)
        self.stream: Any = self.container.add_stream(codec, rate=_RATE)
        self.stream.codec_context.layout = "mono"
        if bit_rate:
            self.stream.codec_context.bit_rate = bit_rate
        self.container.start_encoding()
        self.speed = speed
        self.graph: av.filter.Graph | None = None
        self.graph_key: tuple[str, int, str] | None = None
        self.graph_samples = self.input_samples = self.output_samples = 0
        self.closed = False

    def push(self, frame: av.AudioFrame) -> None:
        key = (frame.format.name, frame.sample_rate, frame.layout.name)
        if self.graph is None or key != self.graph_key:  # first frame, or the input's format changed
            self._drain(final=True)
            self.graph, self.graph_key, self.graph_samples = self._graph(frame), key, 0
        frame.pts, frame.time_base = self.graph_samples, Fraction(1, frame.sample_rate)
        self.graph_samples += frame.samples
        self.input_samples += frame.samples
        self.graph.push(frame)
        self._drain()

    def finish(self) -> None:
        self._drain(final=True)
        self.container.mux(self.stream.encode(None))
        self.closed = True
        self.container.close()

    def abandon(self) -> None:
        self.closed = True
        with contextlib.suppress(Exception):
            self.container.close()

    def _graph(self, frame: av.AudioFrame) -> av.filter.Graph:
        graph = av.filter.Graph()
        rate, layout, channels = frame.sample_rate, frame.layout.name, frame.layout.nb_channels
        nodes = [
            graph.add_abuffer(
                format=frame.format.name,
                sample_rate=rate,
                layout=layout,
                channels=channels,
                time_base=Fraction(1, rate),
            ),
            graph.add("aformat", f"sample_rates={_RATE}:channel_layouts=mono"),
            *(graph.add("atempo", f"{step:.6f}") for step in _tempo_steps(self.speed)),
            graph.add("aformat", f"sample_fmts={self.stream.codec_context.format.name}"),
            graph.add("abuffersink"),
        ]
        graph.link_nodes(*nodes).configure()
        return graph

    def _drain(self, final: bool = False) -> None:
        if self.graph is None:
            return
        if final:
            self.graph.push(None)
        while True:
            try:
                out = self.graph.pull()
            except (BlockingIOError, EOFError):
                break
            out.pts, out.time_base = self.output_samples, Fraction(1, _RATE)
            self.output_samples += out.samples
            self.container.mux(self.stream.encode(out))
        if final:
            self.graph = None


def _tempo_steps(speed: float) -> list[float]:
    """atempo factors, each within 0.5..2.0, whose product is `speed` (none for 1.0)."""
    steps: list[float] = []
    while speed > 2.0:
        steps.append(2.0)
        speed /= 2.0
    while speed < 0.5:
        steps.append(0.5)
        speed /= 0.5
    return [*steps, speed] if abs(speed - 1.0) > 1e-9 else steps


class _Job:
    """One stream's state: the event loop feeds input (`pump`); its steps run on the audio workers,
    one at a time, each encoding what input has arrived and ending when it would wait for more."""

    def __init__(self, loop: asyncio.AbstractEventLoop, source: AudioFormat, fmt: str, speed: float) -> None:
        self.loop, self.source, self.fmt, self.speed = loop, source, fmt, speed
        self.stop = threading.Event()
        self.arrived = asyncio.Event()
        """Input (or its end, or the engine's error) arrived since the last step started."""
        self.in_credits = asyncio.Semaphore(_PENDING)
        self.input_error: BaseException | None = None
        self.done = False
        self.sink = _Sink(self)
        self.reader = Reader(self._taken)
        self._lock = threading.Lock()
        self._encoder: _Encoder | None = None
        self._frames: Iterator[av.AudioFrame | None] | None = None
        self._taken_in_step = 0

    async def pump(self, chunks: AsyncIterator[bytes]) -> None:
        try:
            async for chunk in chunks:
                if chunk:
                    await self.in_credits.acquire()
                    self.reader.put(bytes(chunk))
                    self.arrived.set()
        except BaseException as exc:
            if not self.stop.is_set():  # not our own cancellation: the engine's error, for the consumer as is
                self.input_error = exc
            if not isinstance(exc, Exception):
                raise
        finally:
            self.reader.put(None)
            self.arrived.set()

    def _taken(self) -> None:
        self._taken_in_step += 1
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.in_credits.release)

    def step(self) -> bytes:
        """Encode the input that has arrived (on a worker); the bytes ready to go out."""
        with self._lock:
            if self.done or self.stop.is_set():
                return b""
            try:
                self._step()
            except Stopped:
                self.done = True
            except av.FFmpegError as exc:
                self.done = True
                raise bad_audio() from exc
            except BaseException:  # bad_audio, or a bug: the consumer sees it
                self.done = True
                raise
            return self.sink.take()

    def _step(self) -> None:
        if self._encoder is None:
            self._encoder = _Encoder(self.fmt, self.speed, self.sink)
            self._frames = frames(self.reader, self.source)
        assert self._frames is not None
        self._taken_in_step = 0
        for frame in self._frames:
            if frame is None:  # starved: the next step resumes here
                return
            if self.stop.is_set():
                raise Stopped
            self._encoder.push(frame)
            self.sink.armed = True
            if self._taken_in_step >= _PENDING:  # a step's output stays bounded however fast the engine is
                return
        if self.input_error is not None:  # the input ended in the engine's error: no trailer
            self.done = True
            return
        if self._encoder.input_samples == 0 and self.source.container != "pcm":
            raise bad_audio()
        self._encoder.finish()
        self.sink.armed = True
        self.done = True

    def close(self) -> None:
        """Release FFmpeg's state (on a worker, once no step runs); an unfinished stream is abandoned."""
        with self._lock:
            if self._frames is not None:
                with contextlib.suppress(Exception):
                    self._frames.close()  # type: ignore[attr-defined]
            if self._encoder is not None and not self._encoder.closed:
                self._encoder.abandon()
