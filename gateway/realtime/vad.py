"""Server VAD: where a turn of speech starts and ends in a session's audio, heard by WebRTC's voice-activity detector.

The same detector long uploads are cut with (gateway/audio/splitter.py; why WebRTC: its docstring). Audio arrives
at the session's rate and is resampled to 16 kHz (PyAV, tens of microseconds per 100 ms) into 30 ms frames.
A turn starts at the first of SPEECH_FRAMES speech frames in a row (a click is not a turn) and ends once
`silence_duration_ms` of silence followed it; `speech_started` reports its start minus `prefix_padding_ms`,
`speech_stopped` its end including the silence, both on the session's timeline in samples of the session's
rate, as OpenAI's `audio_start_ms`/`audio_end_ms` are. `threshold` picks the detector's aggressiveness as for
`chunking_strategy` (below 0.25: 1, below 0.5: 2, else 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import av
import webrtcvad

from gateway.audio.splitter import FRAME, RATE
from gateway.realtime.settings import TurnDetection

SPEECH_FRAMES = 3
"""Speech frames in a row that open a turn (90 ms)."""


@dataclass(frozen=True, slots=True)
class Started:
    sample: int
    """Where the turn's audio starts, its prefix padding included (session rate, from the session's start)."""


@dataclass(frozen=True, slots=True)
class Stopped:
    sample: int
    """Where the turn ends, its trailing silence included."""


class ServerVad:
    def __init__(self, turn: TurnDetection, rate: int, first_sample: int) -> None:
        self.turn, self.rate = turn, rate
        self.vad = webrtcvad.Vad(1 if turn.threshold < 0.25 else 2 if turn.threshold < 0.5 else 3)
        self.resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
        self.pending = bytearray()
        self.frame = first_sample * RATE // rate
        """The next 16 kHz frame's first sample on the session's timeline."""
        self.run = 0
        """Speech frames in a row (before a turn), or silent frames in a row (during one)."""
        self.in_turn = False

    def feed(self, pcm: bytes) -> list[Started | Stopped]:
        """Audio at the session's rate, just appended: the turn boundaries it completes, in order."""
        if pcm:
            frame = av.AudioFrame(format="s16", layout="mono", samples=len(pcm) // 2, align=1)
            frame.planes[0].update(pcm)
            frame.sample_rate = self.rate
            for out in self.resampler.resample(frame):
                self.pending += memoryview(out.planes[0])[: out.samples * 2]
        found: list[Started | Stopped] = []
        silence = max(1, -(-self.turn.silence_ms * RATE // (1000 * FRAME)))
        while len(self.pending) >= 2 * FRAME:
            speech = self.vad.is_speech(bytes(self.pending[: 2 * FRAME]), RATE)
            del self.pending[: 2 * FRAME]
            self.frame += FRAME
            if not self.in_turn:
                self.run = self.run + 1 if speech else 0
                if self.run >= SPEECH_FRAMES:
                    start = self.frame - self.run * FRAME - self.turn.prefix_padding_ms * RATE // 1000
                    found.append(Started(self._session(max(0, start))))
                    self.in_turn, self.run = True, 0
            else:
                self.run = 0 if speech else self.run + 1
                if self.run >= silence:
                    found.append(Stopped(self._session(self.frame)))
                    self.in_turn, self.run = False, 0
        return found

    def _session(self, sample_16k: int) -> int:
        return sample_16k * self.rate // RATE
