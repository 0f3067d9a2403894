"""gateway/transcript.py `normalize`: every engine's transcript as OpenAI's (issue 18): bare words, finite ordered
times within the audio, segments in order, texts untouched. Examples from the engines' own shapes, then a
property-based test over random punctuation, whitespace and timing edge cases."""

from __future__ import annotations

import math
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.transcript import Segment, Transcript, Word, bare, normalize


@pytest.mark.parametrize(("said", "bare_word"), [
    ("We,", "We"),  # Deepgram's punctuated_word
    (" Americans,", "Americans"),  # Whisper's words lead with a space
    ("afternoon.", "afternoon"), ("help?", "help"),  # Azure's
    ("don't", "don't"), ("well-known", "well-known"), ("aujourd'hui", "aujourd'hui"),  # inner marks stay
    ("«Bonjour»", "Bonjour"), ("¿Qué?", "Qué"), ("\u201cquoted\u201d", "quoted"), ("(aside)", "aside"),
    ("$5", "$5"), ("C++", "C++"), ("50%", "50"), ("東京。", "東京"),
    ("\u2014", ""), ("...", ""), ("  ", ""), ("\u200b", ""),
])
def test_a_word_is_bare_as_openais_are(said: str, bare_word: str) -> None:
    assert bare(said) == bare_word


def test_times_are_finite_ordered_and_within_the_audio() -> None:
    nan, inf = math.nan, math.inf
    words = (Word("late.", 2.0, 2.5), Word("  first", 0.2, 0.4), Word("—", 0.5, 0.6), Word("nan", nan, 1.1),
             Word("backwards", 1.5, 1.2), Word("past", 2.8, 9.0), Word("neg", -1.0, 0.1), Word("inf", 1.0, inf))
    seg = Segment(3.5, 4.0, " Second segment. ", (Word("Second", 3.5, 3.7),))
    t = normalize(Transcript("First, late. Second.", "en", 3.0, (seg, Segment(0.0, 2.5, "First, late.")), words))
    assert [(w.word, w.start, w.end) for w in t.words] == [
        ("neg", 0.0, 0.1), ("first", 0.2, 0.4), ("inf", 1.0, 1.0), ("nan", 1.1, 1.1), ("backwards", 1.5, 1.5),
        ("late", 2.0, 2.5), ("past", 2.8, 3.0)]
    assert [(s.start, s.end, s.text) for s in t.segments] == [(0.0, 2.5, "First, late."),
                                                             (3.0, 3.0, "Second segment.")]
    assert t.segments[1].words == (Word("Second", 3.0, 3.0),)
    assert t.text == "First, late. Second." and t.language == "en"


def test_without_a_duration_times_are_not_capped() -> None:
    t = normalize(Transcript("x", words=(Word("x", 5.0, 7.5),)))
    assert t.words == (Word("x", 5.0, 7.5),)


PUNCT = "".join(chr(c) for c in range(0x2000, 0x2070) if unicodedata.category(chr(c))[0] in "PZ") \
    + ".,;:!?\"'()¿¡«» \t\n"
"""Punctuation and spaces an engine may put around a word (general punctuation, spaces, ASCII, Spanish, French)."""
times = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 50))


@settings(max_examples=300, deadline=None)
@given(words=st.lists(st.tuples(st.text(alphabet=PUNCT, max_size=3), st.text(max_size=6),
                                st.text(alphabet=PUNCT, max_size=3), times, times), max_size=12),
       duration=st.one_of(st.none(), st.floats(0, 100)))
def test_any_engine_output_comes_out_sane(words: list[tuple[str, str, str, float, float]],
                                          duration: float | None) -> None:
    t = normalize(Transcript("text", duration=duration,
                             words=tuple(Word(lead + core + tail, s, e) for lead, core, tail, s, e in words),
                             segments=(Segment(math.nan, -1.0, "a"), Segment(7.0, 3.0, "b"))))
    limit = math.inf if duration is None else duration
    for w in t.words:
        assert w.word and w.word == w.word.strip() and w.word == bare(w.word)
        assert math.isfinite(w.start) and math.isfinite(w.end) and 0 <= w.start <= w.end <= limit
    assert [w.start for w in t.words] == sorted(w.start for w in t.words)
    for s in t.segments:
        assert math.isfinite(s.start) and 0 <= s.start <= s.end <= limit
    assert [s.start for s in t.segments] == sorted(s.start for s in t.segments)
