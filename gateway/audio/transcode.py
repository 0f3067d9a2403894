"""Transcoding an engine's audio stream into OpenAI's response formats, with speed change, as it arrives.

One worker thread per stream does the PyAV work: it reads the input bytes from a queue (a blocking
file-like for the demuxer, or raw PCM), runs resample -> atempo -> format through an FFmpeg filter
graph, and muxes into a sink whose bytes are handed to the event loop as they appear. Both sides are
bounded, so a slow client slows the engine's stream instead of filling memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import av

from gateway.audio.formats import OPENAI_PCM_RATE, SPEECH_FORMATS, AudioFormat
from gateway.errors import UpstreamError

MIN_SPEED, MAX_SPEED = 0.25, 4.0
_PCM_SAMPLE_FORMATS = {1: "u8", 2: "s16", 4: "s32"}  # sample_width -> FFmpeg packed sample format
_WAV_SAMPLE_FORMATS = {(1, 8): "u8", (1, 16): "s16", (1, 32): "s32", (3, 32): "flt", (3, 64): "dbl"}
_DEMUXERS = {"mp3": "mp3", "opus": "ogg", "aac": "aac", "flac": "flac", "wav": "wav"}
_PENDING = 16  # chunks in flight on each side of the worker
_FRAME_SAMPLES = 4800  # raw PCM is cut into frames of at most this many samples
_SINK_FLUSH = 65_536


@dataclass(frozen=True, slots=True)
class _Output:
    muxer: str
    codec: str
    options: dict[str, str] = field(default_factory=dict)
    bit_rate: int | None = None


_OUTPUTS = {
    "mp3": _Output("mp3", "libmp3lame", {"id3v2_version": "0"}, 64_000),
    "opus": _Output("ogg", "libopus", {"page_duration": "200000"}, 32_000),
    "aac": _Output("adts", "aac", {}, 64_000),
    "flac": _Output("flac", "flac", {"metadata_header_padding": "0", "fflags": "+bitexact"}),
    "wav": _Output("wav", "pcm_s16le", {"fflags": "+bitexact"}),  # 44-byte header, sizes 0xFFFFFFFF
    "pcm": _Output("s16le", "pcm_s16le"),
}


def bad_audio() -> UpstreamError:
    return UpstreamError("Backend produced audio the gateway could not decode.", reason="bad_audio")


def duration_of_pcm(nbytes: int, fmt: AudioFormat) -> float:
    """Seconds of audio in `nbytes` of raw PCM described by `fmt`."""
    return nbytes / (fmt.sample_width * fmt.channels * (fmt.sample_rate or OPENAI_PCM_RATE))


def encode(
    chunks: AsyncIterator[bytes], source: AudioFormat, response_format: str, speed: float = 1.0
) -> AsyncIterator[bytes]:
    """The engine's `chunks` (described by `source`) as OpenAI's `response_format`, `speed` times faster.

    Bytes already in the requested form pass through untouched. Errors raised by `chunks` reach the
    consumer unchanged; audio that cannot be decoded raises UpstreamError (reason bad_audio). Closing
    the returned generator stops the worker and closes `chunks`.
    """
    if response_format not in SPEECH_FORMATS:
        raise ValueError(f"unknown response_format {response_format!r}")
    if not MIN_SPEED <= speed <= MAX_SPEED:
        raise ValueError(f"speed must be within {MIN_SPEED}..{MAX_SPEED}")
    if source.container == "pcm":
        if source.sample_width not in _PCM_SAMPLE_FORMATS or not source.sample_rate or source.channels < 1:
            raise ValueError(f"unsupported pcm source {source}")
    elif source.container not in _DEMUXERS:
        raise ValueError(f"unsupported source container {source.container!r}")
    if speed == 1.0 and source.is_openai(response_format):
        return _passthrough(chunks)
    return _transcode(chunks, source, response_format, speed)


async def _aclose(chunks: AsyncIterator[bytes]) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()


async def _passthrough(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        await _aclose(chunks)


async def _transcode(
    chunks: AsyncIterator[bytes], source: AudioFormat, response_format: str, speed: float
) -> AsyncIterator[bytes]:
    job = _Job(asyncio.get_running_loop(), source, response_format, speed)
    thread = threading.Thread(target=job.run, name=f"transcode-{response_format}", daemon=True)
    thread.start()
    pump = asyncio.create_task(job.pump(chunks))
    done = False
    try:
        while True:
            item = await job.out.get()
            if isinstance(item, _Done):
                done = True
                if job.input_error is not None:
                    raise job.input_error
                if item.error is not None:
                    raise item.error
                return
            job.out_credits.release()
            yield item
    finally:
        job.stop.set()
        job.inbox.put(None)
        pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pump
        while not done:  # the worker always ends with _Done; wait for it so no thread outlives us
            job.out_credits.release()
            done = isinstance(await job.out.get(), _Done)
        thread.join(timeout=1.0)
        await _aclose(chunks)


@dataclass(frozen=True, slots=True)
class _Done:
    error: BaseException | None = None


class _Stopped(Exception):
    """The consumer went away; the worker unwinds."""


class _Inbox:
    """Thread side of the input: chunks from the event loop, readable as a non-seekable file."""

    def __init__(self, taken: Callable[[], None], idle: Callable[[], None]) -> None:
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._taken, self._idle = taken, idle
        self._buffer = b""
        self._eof = False

    def put(self, chunk: bytes | None) -> None:
        self._queue.put(chunk)

    def chunk(self) -> bytes | None:
        """The next chunk (buffered bytes first), blocking; None at end of input."""
        if self._buffer:
            data, self._buffer = self._buffer, b""
            return data
        if self._eof:
            return None
        if self._queue.empty():
            self._idle()  # about to wait for the engine: hand out what we have
        data = self._queue.get()
        if data is None:
            self._eof = True
            return None
        self._taken()
        return data

    def unread(self, data: bytes) -> None:
        self._buffer = data + self._buffer

    def read(self, size: int = -1) -> bytes:
        data = self.chunk()
        if data is None:
            return b""
        if 0 <= size < len(data):
            data, self._buffer = data[:size], data[size:]
        return data

    def read_exact(self, size: int) -> bytes:
        parts, got = [], 0
        while got < size and (data := self.read(size - got)):
            parts.append(data)
            got += len(data)
        return b"".join(parts)


class _Sink:
    """Where the muxer writes; bytes go to the event loop when flushed, bounded by credits."""

    def __init__(self, job: _Job) -> None:
        self._job = job
        self._buffer = bytearray()

    def write(self, data: bytes) -> int:
        if self._job.stop.is_set():
            raise _Stopped
        self._buffer += data
        if len(self._buffer) >= _SINK_FLUSH:
            self.flush()
        return len(data)

    def flush(self) -> None:
        if not self._buffer or self._job.stop.is_set():
            return
        while not self._job.out_credits.acquire(timeout=0.05):
            if self._job.stop.is_set():
                raise _Stopped
        data, self._buffer = bytes(self._buffer), bytearray()
        self._job.post(data)


class _Job:
    def __init__(self, loop: asyncio.AbstractEventLoop, source: AudioFormat, fmt: str, speed: float) -> None:
        self.loop, self.source, self.fmt, self.speed = loop, source, fmt, speed
        self.stop = threading.Event()
        self.out: asyncio.Queue[bytes | _Done] = asyncio.Queue()
        self.out_credits = threading.Semaphore(_PENDING)
        self.in_credits = asyncio.Semaphore(_PENDING)
        self.input_error: BaseException | None = None
        self.sink = _Sink(self)
        self.inbox = _Inbox(self._taken, self._idle)

    # -- event loop side

    async def pump(self, chunks: AsyncIterator[bytes]) -> None:
        try:
            async for chunk in chunks:
                if chunk:
                    await self.in_credits.acquire()
                    self.inbox.put(bytes(chunk))
        except Exception as exc:  # the engine's error, for the consumer as is
            self.input_error = exc
            self.stop.set()
        finally:
            self.inbox.put(None)

    def post(self, item: bytes | _Done) -> None:
        with contextlib.suppress(RuntimeError):  # loop already closed: nobody is listening
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)

    # -- worker thread side

    def _taken(self) -> None:
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.in_credits.release)

    def _idle(self) -> None:
        self.sink.flush()

    def run(self) -> None:
        error: BaseException | None = None
        try:
            self._transcode()
        except _Stopped:
            pass
        except av.FFmpegError as exc:
            error = bad_audio()
            error.__cause__ = exc
        except BaseException as exc:  # a bug: let the consumer see it
            error = exc
        finally:
            self.post(_Done(None if self.stop.is_set() else error))

    def _transcode(self) -> None:
        encoder = _Encoder(self.fmt, self.speed, self.sink)
        try:
            for frame in self._frames():
                if self.stop.is_set():
                    raise _Stopped
                encoder.push(frame)
            if encoder.input_samples == 0 and self.source.container != "pcm":
                raise bad_audio()
            encoder.finish()
        except BaseException:
            encoder.abandon()
            raise
        self.sink.flush()

    def _frames(self) -> Iterator[av.AudioFrame]:
        src = self.source
        if src.container == "pcm":
            assert src.sample_rate is not None
            return self._pcm_frames(_PCM_SAMPLE_FORMATS[src.sample_width], src.channels, src.sample_rate)
        if src.container == "wav":
            return self._wav_frames()
        return self._container_frames(_DEMUXERS[src.container])

    def _pcm_frames(self, sample_fmt: str, channels: int, rate: int, limit: int | None = None) -> Iterator[av.AudioFrame]:
        block = av.AudioFormat(sample_fmt).bytes * channels
        layout = f"{channels}c"
        rest = b""
        while (chunk := self.inbox.chunk()) is not None:
            if limit is not None:
                chunk, limit = chunk[:limit], limit - min(limit, len(chunk))
            data = rest + chunk
            usable = len(data) - len(data) % block
            for start in range(0, usable, _FRAME_SAMPLES * block):
                piece = data[start : min(usable, start + _FRAME_SAMPLES * block)]
                frame = av.AudioFrame(format=sample_fmt, layout=layout, samples=len(piece) // block, align=1)
                frame.planes[0].update(piece)
                frame.sample_rate = rate
                yield frame
            rest = data[usable:]
            if limit == 0:
                return

    def _wav_frames(self) -> Iterator[av.AudioFrame]:
        """Plain PCM WAV is read here (FFmpeg's demuxer wants 64 KiB before its first frame); the rest by FFmpeg."""
        consumed = head = self.inbox.read_exact(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            raise bad_audio()
        spec: tuple[str, int, int] | None = None
        while len(consumed) < 1_048_576:
            chunk_head = self.inbox.read_exact(8)
            consumed += chunk_head
            if len(chunk_head) < 8:
                raise bad_audio()
            size = int.from_bytes(chunk_head[4:], "little")
            if chunk_head[:4] == b"data":
                if spec is None:
                    break
                limit = None if size in (0, 0xFFFFFFFF) else size
                return self._pcm_frames(*spec, limit=limit)
            body = self.inbox.read_exact(size + (size & 1))
            consumed += body
            if chunk_head[:4] == b"fmt " and len(body) >= 16:
                tag = int.from_bytes(body[20:22] if body[:2] == b"\xfe\xff" and len(body) >= 26 else body[:2], "little")
                channels, rate = int.from_bytes(body[2:4], "little"), int.from_bytes(body[4:8], "little")
                sample_fmt = _WAV_SAMPLE_FORMATS.get((tag, int.from_bytes(body[14:16], "little")))
                spec = (sample_fmt, channels, rate) if sample_fmt and channels and rate else None
                if spec is None:
                    break
        self.inbox.unread(consumed)
        return self._container_frames("wav")

    def _container_frames(self, demuxer: str) -> Iterator[av.AudioFrame]:
        with av.open(self.inbox, "r", format=demuxer, options={"probesize": "32"}, metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise bad_audio()
            stream = container.streams.audio[0]
            for packet in container.demux(stream):
                try:
                    frames = stream.codec_context.decode(packet)
                except av.InvalidDataError:
                    continue  # one damaged packet; no audio at all is caught by the caller
                yield from frames


class _Encoder:
    """Filter graph (resample, atempo, mono) and encoder/muxer for one response format."""

    def __init__(self, response_format: str, speed: float, sink: _Sink) -> None:
        spec = _OUTPUTS[response_format]
        self.container: Any = av.open(sink, "w", format=spec.muxer, options=dict(spec.options), buffer_size=4096)
        self.stream: Any = self.container.add_stream(spec.codec, rate=OPENAI_PCM_RATE)
        self.stream.codec_context.layout = "mono"
        if spec.bit_rate:
            self.stream.codec_context.bit_rate = spec.bit_rate
        self.container.start_encoding()
        self.speed = speed
        self.graph: av.filter.Graph | None = None
        self.graph_key: tuple[str, int, str] | None = None
        self.graph_samples = 0
        self.input_samples = 0
        self.output_samples = 0

    def push(self, frame: av.AudioFrame) -> None:
        key = (frame.format.name, frame.sample_rate, frame.layout.name)
        if key != self.graph_key:
            self._drain_graph(final=True)
            self.graph, self.graph_key, self.graph_samples = self._graph(frame), key, 0
        assert self.graph is not None
        frame.pts, frame.time_base = self.graph_samples, Fraction(1, frame.sample_rate)
        self.graph_samples += frame.samples
        self.input_samples += frame.samples
        self.graph.push(frame)
        self._drain_graph()

    def finish(self) -> None:
        self._drain_graph(final=True)
        self.container.mux(self.stream.encode(None))
        self.container.close()

    def abandon(self) -> None:
        with contextlib.suppress(Exception):
            self.container.close()

    def _graph(self, frame: av.AudioFrame) -> av.filter.Graph:
        graph = av.filter.Graph()
        nodes = [
            graph.add_abuffer(
                format=frame.format.name,
                sample_rate=frame.sample_rate,
                layout=frame.layout.name,
                channels=frame.layout.nb_channels,
                time_base=Fraction(1, frame.sample_rate),
            ),
            graph.add("aformat", f"sample_rates={OPENAI_PCM_RATE}:channel_layouts=mono"),
        ]
        nodes += [graph.add("atempo", f"{step:.6f}") for step in _tempo_steps(self.speed)]
        nodes.append(graph.add("aformat", f"sample_fmts={self.stream.codec_context.format.name}"))
        nodes.append(graph.add("abuffersink"))
        graph.link_nodes(*nodes).configure()
        return graph

    def _drain_graph(self, final: bool = False) -> None:
        if self.graph is None:
            return
        if final:
            self.graph.push(None)
        while True:
            try:
                out = self.graph.pull()
            except (BlockingIOError, EOFError):
                break
            out.pts, out.time_base = self.output_samples, Fraction(1, OPENAI_PCM_RATE)
            self.output_samples += out.samples
            self.container.mux(self.stream.encode(out))
        if final:
            self.graph = self.graph_key = None


def _tempo_steps(speed: float) -> list[float]:
    """atempo factors, each within 0.5..2.0, whose product is `speed` (none for 1.0)."""
    steps: list[float] = []
    while speed > 2.0:
        steps.append(2.0)
        speed /= 2.0
    while speed < 0.5:
        steps.append(0.5)
        speed /= 0.5
    if abs(speed - 1.0) > 1e-9:
        steps.append(speed)
    return steps
