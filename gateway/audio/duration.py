"""How long an upload is, established cheaply and before anything is decoded, so an audio bomb (a few
KB that decode to hours) is refused for the price of reading its headers.

In order of cost:

1. plain PCM WAV: its `fmt ` chunk, and the bytes from the data chunk to the end of the file, whatever
   the data chunk's length field says (4 GiB claimed in a 1 KB file, or 1 s claimed in a minute: no
   trust in either direction; a metadata chunk after the data, rare and a few hundred bytes, counts);
   `header_seconds` does only this, cheap enough for the event loop;
2. MP3 (a Layer III frame header first, after any ID3v2 tags): its frame headers (`mp3_frames`), a
   quarter of the CPU of demuxing it;
3. anything else: FFmpeg's demuxer, summing the packets' durations without decoding them (FLAC
   block sizes, Opus TOC bytes, MP3 frame headers), stopping as soon as the sum passes the limit;
   a codec whose frames all have one size (AAC, MP3) counts at least that per packet, whatever the
   container's timestamps (MP4, WebM) say;
4. packets without a duration: the decoded frames' sample counts, discarded as they come.

Containers' duration fields (FLAC STREAMINFO, Xing headers, Ogg granules) are never read. The
decoder (`gateway.audio.decode`) stops at the limit again, for streams whose packets lie low.
`encoded_seconds` measures the audio the gateway sent (speech output) by packets the same way.
Blocking (but `header_seconds` on an upload in memory): call these from a worker thread.
"""

from __future__ import annotations

import os
from typing import BinaryIO

import av

from gateway.audio.decode import OPEN_OPTIONS, audio_too_long, check_format, frames, undecodable
from gateway.audio.frames import DEMUXERS
from gateway.audio.mp3_frames import Mp3Clock, starts_with_frame
from gateway.errors import InvalidRequestError

PACKETS_PER_SECOND = 200
"""Work bound: an upload may have at most this many packets per second of `max_seconds` (Opus at
10 ms frames has 100), so measuring a file of 2.5 ms packets cannot take seconds of CPU."""
_WAV_FORMATS = {1: (8, 16, 24, 32), 3: (32, 64)}  # format tag -> bits per sample FFmpeg reads as plain PCM
_WAV_HEADER_BYTES = 65_536
_MP3_READ_BYTES = 1_048_576
_MP3_TAGS = 4
"""ID3v2 tags looked past for the first frame (a tagger's own, then the encoder's)."""


def upload_seconds(file: BinaryIO, max_seconds: float) -> float:
    """Seconds of audio in the upload; a 400 on `file` if it is not audio, is out of bounds or is
    longer than `max_seconds`."""
    seconds = _wav_seconds(file)
    if seconds is None:
        seconds = _mp3_seconds(file, max_seconds)
    return _checked(_demuxed_seconds(file, max_seconds) if seconds is None else seconds, max_seconds)


def header_seconds(file: BinaryIO, max_seconds: float) -> float | None:
    """`upload_seconds` of a plain PCM WAV, from its header (a few microseconds: the one measurement that
    may run on the event loop, cheaper there than a thread hand-off); None for anything FFmpeg must read."""
    seconds = _wav_seconds(file)
    return None if seconds is None else _checked(seconds, max_seconds)


def _checked(seconds: float, max_seconds: float) -> float:
    if seconds <= 0:
        raise undecodable()
    if seconds > max_seconds:
        raise audio_too_long(max_seconds)
    return seconds


def _wav_seconds(file: BinaryIO) -> float | None:
    """Plain PCM WAV by its header and the bytes present; None for anything else (FFmpeg measures it)."""
    file.seek(0)
    head = file.read(_WAV_HEADER_BYTES)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None
    size = file.seek(0, os.SEEK_END)
    offset, fmt = 12, None
    while offset + 8 <= len(head):
        chunk, length = head[offset:offset + 4], int.from_bytes(head[offset + 4:offset + 8], "little")
        body = head[offset + 8:offset + 8 + length]
        if chunk == b"fmt " and len(body) >= 16:
            tag = int.from_bytes(body[24:26] if body[:2] == b"\xfe\xff" and len(body) >= 26 else body[:2], "little")
            channels, rate = int.from_bytes(body[2:4], "little"), int.from_bytes(body[4:8], "little")
            bits = int.from_bytes(body[14:16], "little")
            fmt = (channels, rate, bits) if bits in _WAV_FORMATS.get(tag, ()) else None
            if fmt is None:
                return None
        elif chunk == b"data":
            if fmt is None:
                return None
            channels, rate, bits = fmt
            check_format(rate, channels)
            return (size - offset - 8) // (channels * bits // 8) / rate  # the bytes there, whatever `length` says
        offset += 8 + length + (length & 1)
    return None


def _mp3_seconds(file: BinaryIO, max_seconds: float) -> float | None:
    """An MP3 (a Layer III frame header first, after any ID3v2 tags) by its frame headers, up to just past
    `max_seconds`: a quarter of the CPU of demuxing it. None for anything else, or no frame (FFmpeg decides)."""
    start = 0
    for _ in range(_MP3_TAGS + 1):  # ID3v2 tags, skipped as Mp3Clock skips them
        file.seek(start)
        head = file.read(10)
        if head[:3] != b"ID3" or len(head) < 10:
            break
        start += 10 + (head[6] << 21 | head[7] << 14 | head[8] << 7 | head[9])
    if not starts_with_frame(head):
        return None
    file.seek(0)
    clock = Mp3Clock()
    while (chunk := file.read(_MP3_READ_BYTES)) and clock.seconds <= max_seconds:
        clock.feed(chunk)
    return clock.seconds or None


def _demuxed_seconds(file: BinaryIO, max_seconds: float) -> float:
    """The first audio stream's packet durations, summed until they pass `max_seconds`."""
    file.seek(0)
    budget = max(1_000, int(max_seconds * PACKETS_PER_SECOND))
    try:
        with av.open(file, "r", metadata_errors="ignore", options=OPEN_OPTIONS) as container:
            if not container.streams.audio:
                raise undecodable()
            stream = container.streams.audio[0]
            rate, channels = stream.codec_context.sample_rate, stream.codec_context.channels
            if rate and channels:  # else not in the headers: `frames` checks the decoded ones
                check_format(rate, channels)
            if not stream.time_base:
                return _frame_clock(file, max_seconds)
            ticks, limit = 0, max_seconds / stream.time_base
            frame_ticks = int(stream.codec_context.frame_size / rate / stream.time_base) if rate else 0
            for count, packet in enumerate(container.demux(stream)):
                if not packet.size:
                    continue  # the demuxer's end-of-stream marker
                if count > budget:
                    raise InvalidRequestError(f"The audio file has more than {budget} packets, too many to measure.",
                                              param="file", code="invalid_value")
                if not packet.duration:
                    return _frame_clock(file, max_seconds)
                ticks += max(packet.duration, frame_ticks)
                if ticks > limit:
                    break
            return float(ticks * stream.time_base)
    except InvalidRequestError:
        raise
    except Exception as exc:  # whatever FFmpeg (or PyAV) makes of a hostile file, it is a bad upload
        raise undecodable() from exc


def _frame_clock(file: BinaryIO, max_seconds: float) -> float:
    """Seconds counted from decoded frames (discarded as they come), up to just past `max_seconds`."""
    seconds = 0.0
    for frame in frames(file):
        seconds += frame.samples / frame.sample_rate
        if seconds > max_seconds:
            break
    return seconds


def encoded_seconds(file: BinaryIO, response_format: str) -> float:
    """Duration of (possibly truncated) encoded audio in an OpenAI format, from its packets' durations."""
    file.seek(0)
    try:
        with av.open(file, "r", format=DEMUXERS[response_format], metadata_errors="ignore",
                     options={"analyzeduration": "0", "probesize": "32768"}) as container:
            if not container.streams.audio:
                return 0.0
            stream = container.streams.audio[0]
            ticks = sum(packet.duration or 0 for packet in container.demux(stream))  # ints: no Fractions
            return float(ticks * stream.time_base) if stream.time_base else 0.0
    except (av.FFmpegError, ValueError, OSError):
        return 0.0
