"""Silences in decoded audio, and word times moved out of them (the faster_whisper kind's words).

Whisper's word times come from its attention (dynamic time warping over the decoder's cross-attention): the
first word after a pause tends to start early, inside the pause (at the start of the window or of the VAD
chunk, with its 0.4 s of padding), or up to 0.26 s late; the last word before a pause tends to end late, up to
0.7 s into it (measured on tiny.en with Piper's speech). Speech has no silence inside a word longer than a stop
consonant, so a word that starts or ends inside a clear silence is moved to its edge, as stable-ts does, and
the first word after a silence starts where the silence ends. Only clear silence counts: a run of frames far
quieter than the loud part of the recording. A noisy recording has none, and the engine's times stay as they
are."""

from __future__ import annotations

from typing import Any

from gateway.transcript import Word

FRAME_S = 0.02
"""Frame length: a frame is silent when its peak is below the threshold."""
MIN_SILENCE_S = 0.2
"""Shortest silence that counts: longer than any stop consonant's closure inside a word."""
RELATIVE = 0.03
"""Threshold: this fraction (about -30 dB) of the 99th-percentile frame peak, the loud part of the speech."""
MIN_WORD_S = 0.05
"""A word is never made shorter than this by the move."""
PULL_S = 0.5
"""Whisper's first word after a pause may also start late (up to 0.26 s measured): as far as this, it is moved
back to where the speech starts."""


def silences(audio: Any, rate: int) -> list[tuple[float, float]]:
    """(start, end) in seconds of each clear silence of at least MIN_SILENCE_S in mono float audio (numpy)."""
    import numpy as np

    size = int(rate * FRAME_S)
    count = len(audio) // size
    if count == 0:
        return []
    peaks = np.abs(audio[: count * size]).reshape(count, size).max(axis=1)
    loud = float(np.percentile(peaks, 99))
    if loud <= 0:
        return []
    quiet = np.concatenate(([False], peaks < RELATIVE * loud, [False]))
    edges = np.flatnonzero(quiet[1:] != quiet[:-1])
    runs = edges.reshape(-1, 2)
    min_frames = MIN_SILENCE_S / FRAME_S
    return [(float(a * FRAME_S), float(b * FRAME_S)) for a, b in runs if b - a >= min_frames]


def out_of_silence(word: Word, quiet: list[tuple[float, float]], previous_end: float) -> Word:
    """`word` with a start inside a silence moved to its end, and an end inside one moved to its start, as long
    as MIN_WORD_S of the word is left. The first word after a silence (`previous_end`: where the word before it
    ends) that starts up to PULL_S after it starts where the silence ends: the speech there is nobody else's."""
    start, end = word.start, word.end
    for a, b in quiet:
        if a <= start < b and b <= end - MIN_WORD_S:
            start = b
        elif previous_end <= a and b < start <= b + PULL_S:
            start = b
        if a < end <= b and a >= start + MIN_WORD_S:
            end = a
    if (start, end) == (word.start, word.end):
        return word
    return Word(word.word, round(start, 3), round(end, 3))
