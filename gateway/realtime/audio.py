"""The audio a client appends: base64 decoded, G.711 expanded to PCM16, kept until it is committed as an item.

`input_audio_buffer.append` carries base64 audio in the session's format: PCM16 little-endian mono at 24 kHz
(`audio/pcm`), or G.711 mu-law or A-law at 8 kHz (`audio/pcmu`, `audio/pcma`), which is expanded to PCM16 at 8 kHz
here. At most 15 MiB of audio per event (OpenAI's limit). The buffer is bounded twice: by `realtime.max_buffer_s`
of uncommitted audio (an append past it is refused with an `error`), and in VAD mode it keeps nothing older than
the prefix padding while nobody speaks. Work per append is a table lookup or a copy: microseconds per 100 ms.
"""

from __future__ import annotations

import array
import base64
import binascii

from gateway.realtime.events import EventError
from gateway.realtime.settings import PCMA, PCMU

MAX_APPEND_BYTES = 15 * 1024 * 1024


def _ulaw(byte: int) -> int:
    u = ~byte & 0xFF
    magnitude = ((u & 0x0F) << 3) + 0x84
    magnitude <<= (u & 0x70) >> 4
    return (0x84 - magnitude) if u & 0x80 else (magnitude - 0x84)


def _alaw(byte: int) -> int:
    a = byte ^ 0x55
    t = (a & 0x0F) << 4
    segment = (a & 0x70) >> 4
    t = t + 8 if segment == 0 else (t + 0x108) << (segment - 1)
    return t if a & 0x80 else -t


_EXPAND = {PCMU: array.array("h", map(_ulaw, range(256))).tobytes(),
           PCMA: array.array("h", map(_alaw, range(256))).tobytes()}
"""Per G.711 format, the 16-bit sample of each byte value, as 512 bytes (ITU-T G.711's tables)."""


def decode_append(audio: object, fmt: str) -> bytes:
    """An append's audio as PCM16; an EventError for what is not base64 audio or is too large."""
    if not isinstance(audio, str):
        raise EventError("invalid_type", "'audio' must be a base64 string.", "audio")
    if len(audio) > (MAX_APPEND_BYTES + 2) // 3 * 4:
        raise EventError("invalid_value", "Audio too large: at most 15 MiB per input_audio_buffer.append.", "audio")
    try:
        raw = base64.b64decode(audio, validate=True)
    except (binascii.Error, ValueError):
        raise EventError("invalid_value", "'audio' is not valid base64.", "audio") from None
    table = _EXPAND.get(fmt)
    if table is None:
        return raw
    return b"".join(table[2 * b: 2 * b + 2] for b in raw)


class Buffer:
    """Uncommitted PCM16 audio at `rate`, and where it sits on the session's timeline."""

    def __init__(self, rate: int, max_seconds: float) -> None:
        self.rate = rate
        self.max_bytes = int(max_seconds * rate) * 2
        self.pcm = bytearray()
        self.start = 0
        """The buffer's first sample, counted from the session's first appended sample."""
        self._odd = b""

    @property
    def end(self) -> int:
        return self.start + len(self.pcm) // 2

    def ms(self, sample: int) -> int:
        return sample * 1000 // self.rate

    def add(self, pcm: bytes) -> bytes:
        """Append PCM16 (an odd byte waits for its pair); the whole samples added, or an EventError when the
        buffer would pass its bound."""
        data = self._odd + pcm
        whole = len(data) - len(data) % 2
        if len(self.pcm) + whole > self.max_bytes:
            raise EventError("input_audio_buffer_full", "The input audio buffer is full: commit or clear it "
                             f"(at most {self.max_bytes // 2 // self.rate} s of uncommitted audio).", "audio")
        self._odd = data[whole:]
        self.pcm += data[:whole]
        return data[:whole]

    def take(self, upto: int | None = None, since: int | None = None) -> tuple[int, bytes]:
        """Remove and return samples [since, upto) (default: all), dropping any before `since`: (first sample, pcm)."""
        upto = self.end if upto is None else min(max(upto, self.start), self.end)
        since = self.start if since is None else min(max(since, self.start), upto)
        cut = 2 * (upto - self.start)
        pcm = bytes(self.pcm[2 * (since - self.start): cut])
        del self.pcm[:cut]
        self.start = upto
        return since, pcm

    def drop_before(self, sample: int) -> None:
        """Forget audio before `sample` (VAD mode, while nobody speaks: only the prefix padding is kept)."""
        if sample > self.start:
            cut = min(2 * (sample - self.start), len(self.pcm))
            del self.pcm[:cut]
            self.start += cut // 2

    def clear(self) -> None:
        self.start = self.end
        self.pcm.clear()
