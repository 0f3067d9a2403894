"""Audio formats: what OpenAI clients may ask for, their content types, and how an engine's output is described."""

from __future__ import annotations

from dataclasses import dataclass

SPEECH_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")

CONTENT_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}

OPENAI_PCM_RATE = 24_000
"""OpenAI's `pcm` is raw 16-bit signed little-endian mono at 24 kHz, without a header."""


@dataclass(frozen=True, slots=True)
class AudioFormat:
    """What an engine's bytes are. `container` is one of SPEECH_FORMATS; for `pcm` the
    sample rate, width (bytes per sample, signed little-endian) and channels say how to read it."""

    container: str
    sample_rate: int | None = None
    channels: int = 1
    sample_width: int = 2

    def is_openai(self, response_format: str) -> bool:
        """True when these bytes are already exactly what OpenAI sends for `response_format`."""
        if self.container != response_format:
            return False
        if response_format == "pcm":
            return self.sample_rate == OPENAI_PCM_RATE and self.channels == 1 and self.sample_width == 2
        return True


def pcm(sample_rate: int, channels: int = 1, sample_width: int = 2) -> AudioFormat:
    return AudioFormat("pcm", sample_rate, channels, sample_width)
