"""Rendering transcripts as OpenAI's json, text, verbose_json, srt and vtt (gateway.transcript_formats)."""

from __future__ import annotations

import itertools
import json
import re

import pytest
import srt
import webvtt
from openai.types.audio import Transcription, TranscriptionVerbose, Translation, TranslationVerbose

from gateway.languages import language_name
from gateway.transcript import Segment, Transcript, Word
from gateway.transcript_formats import Rendered, make_cues, render, segments


def whisper_words(text: str, start: float, step: float = 0.32) -> tuple[Word, ...]:
    """Whisper-style words (" Hello", " world.") at a steady pace from `start`."""
    toks = text.split()
    return tuple(Word(" " + tok, round(start + i * step, 2), round(start + i * step + step * 0.8, 2))
                 for i, tok in enumerate(toks))


SEG_TEXTS = [
    (0.0, 3.32, "The beach was a popular spot on a hot summer day."),
    (3.32, 6.1, "People were swimming in the ocean, building sandcastles,"),
    (6.1, 8.47, "and playing beach volleyball."),
]
WHISPER = Transcript(
    text=" ".join(t for _, _, t in SEG_TEXTS),
    language="en",
    duration=8.470000267028809,
    segments=tuple(
        Segment(s, e, " " + t, whisper_words(t, s, (e - s) / len(t.split())), avg_logprob=-0.286,
                no_speech_prob=0.0098, compression_ratio=1.236)
        for s, e, t in SEG_TEXTS
    ),
)

WORDS_TEXT = ("Good morning everyone. Welcome to the quarterly review where we will go over the numbers "
              "and talk about plans. Any questions before we start?")


def bare_words(text: str, start: float = 0.0, step: float = 0.3) -> list[Word]:
    return [Word(tok, round(start + i * step, 2), round(start + i * step + 0.25, 2))
            for i, tok in enumerate(text.split())]


def words_only() -> Transcript:
    words = bare_words(WORDS_TEXT)
    # a 1.5 s pause before "Any"
    i = next(k for k, w in enumerate(words) if w.word == "Any")
    words = words[:i] + [Word(w.word, w.start + 1.5, w.end + 1.5) for w in words[i:]]
    return Transcript(WORDS_TEXT, "en", words[-1].end + 0.5, words=tuple(words))


def body_json(r: Rendered) -> dict:
    assert r.content_type == "application/json"
    return json.loads(r.body)


def vtt_seconds(ts: str) -> float:
    h, m, s = ts.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


def check_srt(body: str, duration: float | None) -> list[srt.Subtitle]:
    subs = list(srt.parse(body))
    assert [s.index for s in subs] == list(range(1, len(subs) + 1))
    prev_end = 0.0
    for s in subs:
        start, end = s.start.total_seconds(), s.end.total_seconds()
        assert prev_end <= start < end
        assert duration is None or end <= duration + 0.0005
        assert s.content.strip() and len(s.content.split("\n")) <= 2
        prev_end = end
    return subs


def check_vtt(body: str, duration: float | None) -> list[webvtt.Caption]:
    assert body.startswith("WEBVTT\n\n")
    caps = webvtt.from_string(body).captions
    prev_end = 0.0
    for c in caps:
        start, end = vtt_seconds(c.start), vtt_seconds(c.end)
        assert prev_end <= start < end
        assert duration is None or end <= duration + 0.0005
        assert c.text.strip() and len(c.lines) <= 2
        prev_end = end
    return caps


def test_json_with_usage() -> None:
    r = render(WHISPER, "json")
    body = body_json(r)
    assert body == {"text": WHISPER.text, "usage": {"type": "duration", "seconds": 9}}
    assert Transcription.model_validate(body).text == WHISPER.text
    assert r.text == WHISPER.text


def test_json_usage_rounds_up_and_is_absent_without_duration() -> None:
    assert body_json(render(Transcript("Hi.", duration=3.0), "json"))["usage"]["seconds"] == 3
    assert body_json(render(Transcript("Hi.", duration=3.01), "json"))["usage"]["seconds"] == 4
    assert body_json(render(Transcript("Hi."), "json")) == {"text": "Hi."}


def test_translation_json_is_text_only() -> None:
    body = body_json(render(WHISPER, "json", task="translate"))
    assert body == {"text": WHISPER.text}
    Translation.model_validate(body)


def test_text() -> None:
    r = render(WHISPER, "text")
    assert r.content_type == "text/plain; charset=utf-8"
    assert r.body.decode() == WHISPER.text + "\n"


@pytest.mark.parametrize("granularities", [("segment",), ("word",), ("segment", "word"), ()])
def test_verbose_json_per_granularities(granularities: tuple[str, ...]) -> None:
    body = body_json(render(WHISPER, "verbose_json", granularities=granularities))
    v = TranscriptionVerbose.model_validate(body)
    assert body["task"] == "transcribe" and v.language == "english"
    assert v.duration == pytest.approx(8.47) and v.text == WHISPER.text
    assert body["usage"] == {"type": "duration", "seconds": 9}
    assert ("segments" in body) == ("segment" in granularities)
    assert ("words" in body) == ("word" in granularities)
    if "segment" in granularities:
        segs = body["segments"]
        assert [s["id"] for s in segs] == [0, 1, 2]
        assert all(len(s) == 10 for s in segs)
        assert segs[0]["text"] == " The beach was a popular spot on a hot summer day."
        assert [s["seek"] for s in segs] == [0, 332, 610]
        assert segs[1]["start"] == 3.32 and segs[2]["end"] == pytest.approx(8.47)
        assert segs[0]["avg_logprob"] == -0.286 and segs[0]["tokens"] == []
    if "word" in granularities:
        words = body["words"]
        assert len(words) == len(WHISPER.text.split())
        assert words[0]["word"] == "The" and words[-1]["word"] == "volleyball."
        assert all(w["start"] <= w["end"] <= 8.47 for w in words)


def test_verbose_translation() -> None:
    t = Transcript(WHISPER.text, "de", WHISPER.duration, WHISPER.segments)
    body = body_json(render(t, "verbose_json", task="translate", granularities=("word",)))
    v = TranslationVerbose.model_validate(body)
    assert body["task"] == "translate" and v.language == "english"
    assert v.segments and len(v.segments) == 3 and "words" not in body


def test_verbose_words_never_made_up_when_engine_gave_none() -> None:
    # the routes never send a text-only engine a request for words; if a word-timing engine gave none, none go out
    t = Transcript("Only text, no timings here.", "fr", 4.0)
    body = body_json(render(t, "verbose_json", granularities=("segment", "word")))
    v = TranscriptionVerbose.model_validate(body)
    assert v.language == "french" and v.words == []
    assert [(s.start, s.end) for s in v.segments or []] == [(0.0, 4.0)]


def test_words_grouped_into_segments() -> None:
    t = words_only()
    segs = segments(t)
    assert [s.text for s in segs] == [
        "Good morning everyone.",
        "Welcome to the quarterly review where we will go over the numbers and talk about plans.",
        "Any questions before we start?",
    ]
    assert segs[0].start == 0.0 and segs[-1].end == t.words[-1].end
    body = body_json(render(t, "verbose_json", granularities=("segment", "word")))
    TranscriptionVerbose.model_validate(body)
    assert len(body["segments"]) == 3 and len(body["words"]) == len(WORDS_TEXT.split())


def test_grouping_breaks_at_pause_and_length() -> None:
    # no punctuation at all: breaks come from the pause and from the 40-word / 15 s limits
    text = " ".join(f"w{i}" for i in range(100))
    words = bare_words(text, step=0.2)
    words[10] = Word("w10", words[10].start + 2.0, words[10].end + 2.0)  # pause before w10
    words[11:] = [Word(w.word, w.start + 2.0, w.end + 2.0) for w in words[11:]]
    segs = segments(Transcript(text, "en", 30.0, words=tuple(words)))
    assert segs[0].text == " ".join(f"w{i}" for i in range(10))
    assert all(len(s.words) <= 40 and s.end - s.start <= 15.5 for s in segs)
    assert " ".join(s.text for s in segs) == text


def test_text_only_makes_one_segment() -> None:
    t = Transcript("Just one line of text from an engine that gives no timings at all, so the whole "
                   "thing becomes a single segment.", "english", 5.5)
    body = body_json(render(t, "verbose_json"))
    TranscriptionVerbose.model_validate(body)
    assert [(s["start"], s["end"], s["text"]) for s in body["segments"]] == [(0.0, 5.5, " " + t.text)]
    subs = check_srt(render(t, "srt").body.decode(), 5.5)
    assert len(subs) == 2 and subs[0].start.total_seconds() == 0 and subs[-1].end.total_seconds() == 5.5
    assert 2.0 < subs[1].start.total_seconds() < 4.0  # split time spread by characters
    # no duration either: a length-based guess
    (seg,) = segments(Transcript(t.text))
    assert seg.start == 0.0 and seg.end > 1.0


def test_empty_transcript() -> None:
    t = Transcript("", None, 2.0)
    assert render(t, "srt").body == b""
    assert render(t, "vtt").body == b"WEBVTT\n\n"
    assert body_json(render(t, "json")) == {"text": "", "usage": {"type": "duration", "seconds": 2}}
    body = body_json(render(t, "verbose_json", granularities=("segment", "word")))
    v = TranscriptionVerbose.model_validate(body)
    assert v.segments == [] and v.words == [] and v.text == ""
    assert render(t, "text").text == ""


def test_srt_and_vtt() -> None:
    srt_body = render(WHISPER, "srt")
    assert srt_body.content_type == "text/plain; charset=utf-8"
    subs = check_srt(srt_body.body.decode(), WHISPER.duration)
    assert len(subs) == 3
    assert srt_body.body.decode().startswith("1\n00:00:00,000 --> 00:00:03,320\nThe beach was a popular")
    caps = check_vtt(render(WHISPER, "vtt").body.decode(), WHISPER.duration)
    assert [c.text.replace("\n", " ") for c in caps] == [t for _, _, t in SEG_TEXTS]
    assert caps[1].start == "00:00:03.320"


def test_long_segment_split_into_cues_by_word_times() -> None:
    text = ("This is a deliberately long segment that keeps going well past what a viewer can read "
            "comfortably in two subtitle lines, so the renderer must split it into several cues.")
    words = whisper_words(text, 1.0, 0.4)
    t = Transcript(text, "en", 20.0, (Segment(1.0, words[-1].end, text, words),))
    subs = check_srt(render(t, "srt").body.decode(), 20.0)
    assert len(subs) >= 3
    assert all(len(line) <= 42 for s in subs for line in s.content.split("\n"))
    assert " ".join(s.content.replace("\n", " ") for s in subs) == text
    # each later cue starts when its first word is spoken
    for s in subs[1:]:
        first = s.content.split()[0]
        assert any(abs(w.start - s.start.total_seconds()) < 0.001 for w in words if w.word.strip() == first)
    check_vtt(render(t, "vtt").body.decode(), 20.0)


def test_cue_times_repaired_and_clamped() -> None:
    # overlapping segments, a zero-length one, and one running past the end of the audio
    t = Transcript("", "en", 6.0, (
        Segment(0.0, 2.5, "First."), Segment(2.0, 2.0, "Second."), Segment(2.4, 5.0, "Third."),
        Segment(5.5, 7.5, "Fourth."), Segment(6.5, 8.0, "Past the end."),
    ))
    cues = make_cues(t)
    assert all(s < e <= 6000 for s, e, _ in cues)
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(cues))
    assert "Past the end." in cues[-1][2]
    check_srt(render(t, "srt").body.decode(), 6.0)
    check_vtt(render(t, "vtt").body.decode(), 6.0)
    body = body_json(render(t, "verbose_json"))
    TranscriptionVerbose.model_validate(body)
    assert all(0 <= s["start"] <= s["end"] <= 6.0 for s in body["segments"])


def test_unicode() -> None:
    segs = (Segment(0.0, 2.0, "Grüße aus München — ça va?"), Segment(2.0, 4.5, "日本語のテキストです。"),
            Segment(4.5, 6.0, "Fish & chips <3"))
    t = Transcript("Grüße aus München — ça va? 日本語のテキストです。 Fish & chips <3", "ja", 6.0, segs)
    body = body_json(render(t, "verbose_json"))
    assert TranscriptionVerbose.model_validate(body).language == "japanese"
    assert body["segments"][1]["text"] == " 日本語のテキストです。"
    assert "日本語" in render(t, "json").body.decode()  # UTF-8, not \u escapes
    assert render(t, "text").body.decode("utf-8") == t.text + "\n"
    assert [s.content for s in check_srt(render(t, "srt").body.decode(), 6.0)][2] == "Fish & chips <3"
    vtt_body = render(t, "vtt").body.decode()
    assert "Fish &amp; chips &lt;3" in vtt_body
    assert check_vtt(vtt_body, 6.0)[0].text == "Grüße aus München — ça va?"


@pytest.mark.parametrize(("given", "name"), [
    ("en", "english"), ("EN", "english"), ("pt-BR", "portuguese"), ("zh_Hans", "chinese"),
    ("yue", "cantonese"), ("haw", "hawaiian"), ("jv", "javanese"), ("ht", "haitian creole"),
    ("English", "english"), ("german", "german"), (None, "english"), ("", "english"), ("klingon", "klingon"),
])
def test_language_name(given: str | None, name: str) -> None:
    assert language_name(given) == name


def test_unknown_format_or_task() -> None:
    with pytest.raises(ValueError):
        render(WHISPER, "diarized_json")
    with pytest.raises(ValueError):
        render(WHISPER, "xml")
    with pytest.raises(ValueError):
        render(WHISPER, "json", task="summarise")


def test_rendered_text_is_what_is_returned() -> None:
    t = Transcript("  padded text  ", "en", 1.0)
    for fmt in ("json", "text", "srt", "vtt", "verbose_json"):
        assert render(t, fmt).text == "padded text"
    assert re.fullmatch(r"1\n00:00:00,000 --> 00:00:01,000\npadded text\n\n", render(t, "srt").body.decode())
