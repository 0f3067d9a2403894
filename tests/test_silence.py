"""gateway/audio/silence.py: clear silences found in decoded audio, and word times moved out of them (what the
faster_whisper kind does to Whisper's words; tests/test_default_config.py checks the result end to end)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.audio.silence import MIN_WORD_S, PULL_S, out_of_silence, silences
from gateway.transcript import Word

np = pytest.importorskip("numpy")  # comes with faster-whisper (the `embedded` extra), like the module uses it
RATE = 16_000


def audio(*parts: tuple[str, float], noise: float = 0.0) -> Any:
    """("tone" | "quiet", seconds) parts: a 220 Hz tone at half scale, or digital silence; optional noise."""
    rng = np.random.default_rng(7)
    chunks = []
    for kind, seconds in parts:
        t = np.arange(int(seconds * RATE)) / RATE
        chunks.append(0.5 * np.sin(2 * np.pi * 220 * t) if kind == "tone" else np.zeros_like(t))
    out = np.concatenate(chunks).astype(np.float32)
    return out + (noise * rng.standard_normal(out.size)).astype(np.float32) if noise else out


def test_silences_are_the_quiet_runs_long_enough() -> None:
    found = silences(audio(("quiet", 0.8), ("tone", 1.0), ("quiet", 0.1), ("tone", 1.0), ("quiet", 1.5)), RATE)
    assert found == [pytest.approx((0.0, 0.8), abs=0.021), pytest.approx((2.9, 4.4), abs=0.021)]  # not the 0.1 s


@pytest.mark.parametrize("noise", [0.05, 0.2])
def test_a_noisy_recording_has_no_clear_silence(noise: float) -> None:
    assert silences(audio(("quiet", 1.0), ("tone", 1.0), ("quiet", 1.0), noise=noise), RATE) == []


def test_empty_or_all_silent_audio_has_none() -> None:
    assert silences(np.zeros(0, np.float32), RATE) == []
    assert silences(np.zeros(RATE, np.float32), RATE) == []


QUIET = [(0.0, 0.8), (2.9, 4.4)]


@pytest.mark.parametrize(("word", "moved"), [
    (Word("early", 0.43, 1.0), Word("early", 0.8, 1.0)),      # starts in the leading silence
    (Word("late", 2.5, 3.6), Word("late", 2.5, 2.9)),          # ends in the gap
    (Word("both", 2.95, 4.6), Word("both", 4.4, 4.6)),         # starts in the gap: its end is outside it
    (Word("inside", 1.2, 1.5), Word("inside", 1.2, 1.5)),      # in speech: unchanged
    (Word("lost", 3.0, 3.5), Word("lost", 3.0, 3.5)),          # wholly in a silence: nothing to move it to
    (Word("over", 2.5, 4.6), Word("over", 2.5, 4.6)),          # spans the whole gap: unchanged
])
def test_words_move_out_of_silence(word: Word, moved: Word) -> None:
    assert out_of_silence(word, QUIET, previous_end=word.start) == moved  # right after the word before it


def test_a_word_keeps_its_minimum_length() -> None:
    word = Word("short", 0.5, 0.8 + MIN_WORD_S / 2)  # moving its start to 0.8 would leave less than MIN_WORD_S
    assert out_of_silence(word, QUIET, previous_end=0.5) == word


@pytest.mark.parametrize(("previous_end", "word", "moved"), [
    (2.9, Word("late", 4.6, 5.0), Word("late", 4.4, 5.0)),               # the first word after the gap
    (2.9, Word("later", 4.4 + PULL_S + 0.1, 5.5), Word("later", 4.4 + PULL_S + 0.1, 5.5)),  # too far to be
    (4.5, Word("second", 4.7, 5.0), Word("second", 4.7, 5.0)),           # a word came before it since the gap
    (0.0, Word("first", 1.0, 1.3), Word("first", 0.8, 1.3)),             # the first word of the file
])
def test_the_first_word_after_a_silence_starts_where_it_ends(previous_end: float, word: Word, moved: Word) -> None:
    assert out_of_silence(word, QUIET, previous_end) == moved
