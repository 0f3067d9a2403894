"""The transcoder's input side, on the audio workers: an engine's byte stream as PyAV audio frames.

Raw PCM is cut into frames directly; plain PCM WAV is parsed here (FFmpeg's WAV demuxer reads 64 KiB
before its first frame, which would delay streaming); every other container goes to FFmpeg's demuxer
through a non-seekable, queue-fed file. The frames iterator yields None when it is about to need
input that has not arrived yet ("starved"): the transcoder then ends its task and resumes the same
iterator in the next one, so no worker thread waits for an engine between chunks.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator

import av

from gateway.audio.formats import AudioFormat
from gateway.errors import Reason, UpstreamError

DEMUXERS = {"mp3": "mp3", "opus": "ogg", "aac": "aac", "flac": "flac", "wav": "wav"}
PCM_SAMPLE_FORMATS = {1: "u8", 2: "s16", 4: "s32"}  # sample_width -> packed sample format; 8 bit unsigned
_WAV_SAMPLE_FORMATS = {(1, 8): "u8", (1, 16): "s16", (1, 32): "s32", (3, 32): "flt", (3, 64): "dbl"}
_FRAME_SAMPLES = 4800  # raw PCM is cut into frames of at most this many samples


def bad_audio() -> UpstreamError:
    return UpstreamError("Backend produced audio the gateway could not decode.", reason=Reason.BAD_AUDIO)


class Stopped(Exception):
    """The consumer went away or the input failed; the worker unwinds."""


class Reader:
    """Worker side of the input: the engine's chunks from a queue, also readable as a non-seekable file."""

    def __init__(self, taken: Callable[[], None]) -> None:
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._taken = taken
        self._buffer = b""
        self._eof = False

    def put(self, chunk: bytes | None) -> None:
        self._queue.put(chunk)

    def ready(self) -> bool:
        """Whether `chunk()` would answer without waiting."""
        return bool(self._buffer) or self._eof or not self._queue.empty()

    def chunk(self) -> bytes | None:
        """The next bytes (pushed-back ones first), blocking; None at the end of the input."""
        if self._buffer:
            data, self._buffer = self._buffer, b""
            return data
        if self._eof:
            return None
        data = self._queue.get()
        if data is None:
            self._eof = True
            return None
        self._taken()
        return data

    def unread(self, data: bytes) -> None:
        self._buffer = data + self._buffer

    def read(self, size: int = -1) -> bytes:
        data = self.chunk() or b""
        if 0 <= size < len(data):
            data, self._buffer = data[:size], data[size:]
        return data

    def read_exact(self, size: int) -> bytes:
        data = b""
        while len(data) < size and (more := self.read(size - len(data))):
            data += more
        return data


def frames(reader: Reader, source: AudioFormat) -> Iterator[av.AudioFrame | None]:
    if source.container == "pcm":
        assert source.sample_rate is not None
        sample_fmt = PCM_SAMPLE_FORMATS[source.sample_width]
        return _pcm_frames(reader, sample_fmt, source.channels, source.sample_rate)
    if source.container == "wav":
        return _wav_frames(reader)
    return _demuxed_frames(reader, DEMUXERS[source.container])


def _pcm_frames(
    reader: Reader, sample_fmt: str, channels: int, rate: int, limit: int | None = None
) -> Iterator[av.AudioFrame | None]:
    block = av.AudioFormat(sample_fmt).bytes * channels
    rest = b""
    while limit != 0:
        while not reader.ready():
            yield None
        if (chunk := reader.chunk()) is None:
            break
        if limit is not None:
            chunk, limit = chunk[:limit], limit - min(limit, len(chunk))
        data = rest + chunk
        usable = len(data) - len(data) % block
        for start in range(0, usable, _FRAME_SAMPLES * block):
            piece = data[start : min(usable, start + _FRAME_SAMPLES * block)]
            samples = len(piece) // block
            frame = av.AudioFrame(format=sample_fmt, layout=f"{channels}c", samples=samples, align=1)
            frame.planes[0].update(piece)
            frame.sample_rate = rate
            yield frame
        rest = data[usable:]


def _wav_frames(reader: Reader) -> Iterator[av.AudioFrame | None]:
    """Plain PCM WAV is read here (FFmpeg's demuxer wants 64 KiB before a frame); other WAV by FFmpeg."""
    consumed = head = reader.read_exact(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        raise bad_audio()
    spec: tuple[str, int, int] | None = None
    while len(consumed) < 1_048_576:
        chunk_head = reader.read_exact(8)
        consumed += chunk_head
        if len(chunk_head) < 8:
            raise bad_audio()
        size = int.from_bytes(chunk_head[4:], "little")
        if chunk_head[:4] == b"data":
            if spec is None:
                break
            return _pcm_frames(reader, *spec, limit=None if size in (0, 0xFFFFFFFF) else size)
        body = reader.read_exact(size + (size & 1))
        consumed += body
        if chunk_head[:4] == b"fmt " and len(body) >= 16:
            extensible = body[:2] == b"\xfe\xff" and len(body) >= 26
            tag = int.from_bytes(body[24:26] if extensible else body[:2], "little")
            channels, rate = int.from_bytes(body[2:4], "little"), int.from_bytes(body[4:8], "little")
            sample_fmt = _WAV_SAMPLE_FORMATS.get((tag, int.from_bytes(body[14:16], "little")))
            if not (sample_fmt and channels and rate):
                break
            spec = (sample_fmt, channels, rate)
    reader.unread(consumed)
    return _demuxed_frames(reader, "wav")


def _demuxed_frames(reader: Reader, demuxer: str) -> Iterator[av.AudioFrame | None]:
    """FFmpeg reads ahead of the packet it returns, so a packet can wait for the engine's next chunk
    (or its end) before it is decoded; a read FFmpeg makes mid-packet waits on its worker thread."""
    options = {"probesize": "32"}  # the demuxer's header is enough; don't wait for seconds of audio
    with av.open(reader, "r", format=demuxer, options=options, metadata_errors="ignore") as container:
        if not container.streams.audio:
            raise bad_audio()
        decoder = container.streams.audio[0].codec_context
        for packet in container.demux(container.streams.audio[0]):
            try:
                yield from decoder.decode(packet)
            except av.InvalidDataError:
                pass  # one damaged packet; no audio at all is caught by the caller
            while not reader.ready():  # the next packet may need input that has not arrived yet
                yield None
