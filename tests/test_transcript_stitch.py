"""Stitching per-chunk transcripts onto the file's timeline (gateway.transcript_stitch), rendered in every format."""

from __future__ import annotations

import json
import math

import pytest
from openai.types.audio import Transcription, TranscriptionDiarized, TranscriptionVerbose

from gateway.transcript import Segment, Transcript, Word
from gateway.transcript_formats import FORMATS, render
from gateway.transcript_stitch import InOrder, chunk_spans, stitch, stitch_diarized
from tests.test_transcripts import bare_words, check_srt, check_vtt, vtt_seconds, whisper_words


def whisper_chunk(*sentences: tuple[float, float, str], language: str = "en", duration: float = 30.0) -> Transcript:
    """A Whisper-style chunk: segments with " word" words, times from the chunk's own start."""
    segs = tuple(Segment(s, e, " " + t, whisper_words(t, s, (e - s) / len(t.split()))) for s, e, t in sentences)
    return Transcript("".join(s.text for s in segs), language, duration, segs)


DURATION = 95.25
PARTS = [
    (0.0, whisper_chunk((0.5, 4.0, "The first chunk starts here."), (5.0, 29.5, "It ends, at a silence."))),
    (30.0, Transcript("", "en", 30.0)),  # heard nothing
    (60.0, whisper_chunk((0.2, 3.0, "Second, with punctuation!"), (3.5, 6.0, "And a question?"), duration=31.0)),
    (91.0, Transcript("Text only, no times.", "de")),  # a text-only engine without a duration
]
SENTENCES = ["The first chunk starts here.", "It ends, at a silence.", "Second, with punctuation!",
             "And a question?", "Text only, no times."]


@pytest.fixture
def stitched() -> Transcript:
    return stitch(PARTS, DURATION)


def verbose(t: Transcript, *granularities: str) -> dict:
    body = json.loads(render(t, "verbose_json", granularities=granularities or ("segment",)).body)
    TranscriptionVerbose.model_validate(body)
    return body


def test_text_joined_with_single_spaces_and_every_punctuation_kept(stitched: Transcript) -> None:
    assert stitched.text == " ".join(SENTENCES)
    body = json.loads(render(stitched, "json").body)
    assert Transcription.model_validate(body).text == " ".join(SENTENCES)
    assert render(stitched, "text").body.decode() == " ".join(SENTENCES) + "\n"
    ragged = stitch([(0.0, Transcript("  Hello   there. ")), (5.0, Transcript("\nGeneral  Kenobi!\n"))], 9.0)
    assert ragged.text == "Hello there. General Kenobi!"


def test_verbose_json_segments_on_the_file_timeline_ids_renumbered(stitched: Transcript) -> None:
    body = verbose(stitched, "segment", "word")
    segs = body["segments"]
    assert [s["id"] for s in segs] == list(range(5))
    assert [s["text"].strip() for s in segs] == SENTENCES
    assert [(s["start"], s["end"]) for s in segs[:4]] == [(0.5, 4.0), (5.0, 29.5), (60.2, 63.0), (63.5, 66.0)]
    # the text-only chunk is one segment over its own span, not the whole file
    assert (segs[4]["start"], segs[4]["end"]) == (91.0, DURATION)
    assert body["duration"] == DURATION and body["usage"] == {"type": "duration", "seconds": 96}
    assert body["language"] == "english"  # two chunks said "en", one "de"
    starts = [s["start"] for s in segs]
    assert starts == sorted(starts) and all(s["start"] <= s["end"] <= DURATION for s in segs)
    words = body["words"]
    assert [w["word"] for w in words] == " ".join(SENTENCES[:4]).split()
    times = [t for w in words for t in (w["start"], w["end"])]
    assert times == sorted(times) and words[0]["start"] == 0.5 and words[10]["start"] == 60.2


def test_every_format_renders_and_subtitles_parse_monotonic(stitched: Transcript) -> None:
    for fmt in FORMATS:
        assert render(stitched, fmt).text == stitched.text
    subs = check_srt(render(stitched, "srt").body.decode(), DURATION)
    caps = check_vtt(render(stitched, "vtt").body.decode(), DURATION)
    for cues in ([(s.start.total_seconds(), s.content) for s in subs],
                 [(vtt_seconds(c.start), c.text) for c in caps]):
        assert " ".join(" ".join(t.split()) for _, t in cues) == stitched.text
        assert [round(s, 3) for s, _ in cues] == [0.5, 5.0, 60.2, 63.5, 91.0]


def test_usage_is_the_files_seconds_and_duration_is_decoded(stitched: Transcript) -> None:
    assert stitched.duration == DURATION and stitched.decoded
    assert json.loads(render(stitched, "json").body)["usage"] == {"type": "duration", "seconds": 96}
    # the chunks' own durations (30 + 30 + 31 + none) never reach the bill
    assert json.loads(render(stitch(PARTS[:1], 12.0), "json").body)["usage"]["seconds"] == 12


def test_empty_chunks_contribute_nothing() -> None:
    empty = Transcript("", "fr", 30.0, (Segment(0.0, 3.0, "  "),), (Word(" ", 1.0, 2.0),))
    t = stitch([(0.0, empty), (30.0, Transcript("Only me.", "en", 30.0)), (60.0, Transcript("   "))], 90.0)
    assert t.text == "Only me." and t.language == "en"
    assert [(s.start, s.end, s.text) for s in t.segments] == [(30.0, 60.0, "Only me.")]
    nothing = stitch([(0.0, Transcript("")), (10.0, Transcript(" "))], 20.0)
    assert nothing.text == "" and nothing.language is None and not nothing.segments
    assert verbose(nothing)["segments"] == [] and render(nothing, "srt").body == b""
    assert stitch([], 5.0).text == ""


def test_words_at_chunk_edges_are_clamped_to_their_chunk() -> None:
    """A word running past its chunk's end (padding overlapping the next chunk) or starting before 0 stays inside
    the chunk's span, so times never run backwards across the border; the last chunk stops at the file's end."""
    first = Transcript("edge word", "en", 12.0, words=(Word("edge", -0.4, 0.5), Word("word", 9.6, 11.5)))
    second = Transcript("next last", "en", 12.0, words=(Word("next", 0.0, 0.4), Word("last", 4.0, 9.0)))
    t = stitch([(0.0, first), (10.0, second)], 16.0)
    assert [(w.word, w.start, w.end) for w in t.words] == [
        ("edge", 0.0, 0.5), ("word", 9.6, 10.0), ("next", 10.0, 10.4), ("last", 14.0, 16.0)]
    words = verbose(t, "word")["words"]
    times = [x for w in words for x in (w["start"], w["end"])]
    assert times == sorted(times) and max(times) == 16.0


def test_words_out_of_order_within_a_chunk_are_ordered() -> None:
    words = tuple(reversed(bare_words("one two three", start=1.0)))
    t = stitch([(0.0, Transcript("x")), (5.0, Transcript("one two three", words=words))], 10.0)
    assert [w.word for w in t.words] == ["one", "two", "three"] and t.words[0].start == 6.0
    assert [s["text"] for s in verbose(t)["segments"]] == [" x", " one two three"]


def test_overlapping_chunks_are_clamped_to_the_next_offset() -> None:
    """A chunk whose transcript runs past the next chunk's offset (padding, or a backend's late timestamps)
    is cut at that offset: the next chunk owns the time from its offset on."""
    long = whisper_chunk((0.0, 8.0, "Long one."), (8.0, 14.0, "Past the cut."), duration=14.0)
    t = stitch([(0.0, long), (10.0, whisper_chunk((0.0, 2.0, "Next."), duration=5.0))], 15.0)
    assert [(s.start, s.end) for s in t.segments] == [(0.0, 8.0), (8.0, 10.0), (10.0, 12.0)]
    check_srt(render(t, "srt").body.decode(), 15.0)


@pytest.mark.parametrize("offsets, duration", [
    ([math.nan], 10.0), ([-1.0], 10.0), ([0.0, math.inf], 10.0), ([0.0, 5.0, 4.0], 10.0), ([True], 10.0),
    (["0"], 10.0), ([0.0], math.nan), ([0.0], -1.0), ([0.0], math.inf),
])
def test_hostile_offsets_and_durations_are_refused(offsets: list, duration: float) -> None:
    with pytest.raises(ValueError):
        stitch([(o, Transcript("hi")) for o in offsets], duration)
    with pytest.raises(ValueError):
        stitch_diarized([(o, {"text": "hi"}) for o in offsets], duration)


def test_offsets_past_the_end_and_equal_offsets_are_normalized() -> None:
    assert chunk_spans([0.0, 5.0, 5.0, 20.0], 10.0) == [(0.0, 5.0), (5.0, 5.0), (5.0, 10.0), (10.0, 10.0)]
    t = stitch([(0.0, Transcript("a", duration=5.0)), (12.0, Transcript("b", duration=3.0))], 10.0)
    assert [(s.start, s.end) for s in t.segments] == [(0.0, 5.0), (10.0, 10.0)]
    check_vtt(render(t, "vtt").body.decode(), 10.0)


def test_hostile_chunk_times_stay_on_the_timeline() -> None:
    """Times an adapter should have refused (NaN, infinite, negative) land inside the chunk's span."""
    seg = Segment(math.nan, math.inf, "weird", (Word("weird", -5.0, math.nan),))
    t = stitch([(0.0, Transcript("a", duration=2.0)), (2.0, Transcript("weird", segments=(seg,)))], 4.0)
    assert [(s.start, s.end) for s in t.segments] == [(0.0, 2.0), (2.0, 2.0)]
    assert [(w.start, w.end) for w in t.words] == [(2.0, 2.0)]
    body = verbose(t, "segment", "word")
    assert all(math.isfinite(x) for s in body["segments"] for x in (s["start"], s["end"]))


def test_language_is_the_most_common_ties_to_the_first() -> None:
    def lang(*langs: str | None) -> str | None:
        return stitch([(float(i), Transcript("x", lang)) for i, lang in enumerate(langs)], 10.0).language
    assert lang("en", "de", "de") == "de"
    assert lang("de", "en", "en", "de") == "de"
    assert lang(None, "fr") == "fr" and lang(None, None) is None


def test_in_order_releases_deltas_in_file_order_as_chunks_complete() -> None:
    texts = ["First.", "", "  Third   part. ", "Fourth?", "Fifth!"]
    buf = InOrder(len(texts))
    released = [buf.push(i, texts[i]) for i in (3, 2, 0, 4, 1)]
    assert released == [[], [], ["First."], [], [" Third part.", " Fourth?", " Fifth!"]]
    assert buf.done
    whole = stitch([(float(i), Transcript(t)) for i, t in enumerate(texts)], 10.0).text
    assert "".join(d for r in released for d in r) == whole


def test_in_order_refuses_bad_indexes() -> None:
    buf = InOrder(2)
    assert buf.push(1, "b") == [] and not buf.done
    for bad in (1, 2, -1, True, "0"):
        with pytest.raises(ValueError):
            buf.push(bad, "x")  # type: ignore[arg-type]
    assert buf.push(0, "a") == ["a", " b"] and buf.done
    with pytest.raises(ValueError):
        buf.push(0, "a")
    with pytest.raises(ValueError):
        InOrder(-1)
    assert InOrder(0).done


def diarized(*segs: tuple[float, float, str, str]) -> dict:
    return {"task": "transcribe", "duration": 30.0, "text": "\n".join(f"{sp}: {t}" for _, _, sp, t in segs),
            "segments": [{"type": "transcript.text.segment", "id": f"seg_{i}", "start": s, "end": e,
                          "speaker": sp, "text": t} for i, (s, e, sp, t) in enumerate(segs)]}


def test_diarized_speakers_qualified_per_chunk_ids_renumbered() -> None:
    parts = [(0.0, diarized((0.0, 4.0, "A", "Hello."), (4.5, 9.0, "B", "Hi there."))),
             (30.0, {"text": "", "segments": []}),
             (60.0, diarized((1.0, 3.0, "A", "Back again."), (3.0, 35.0, "agent", "Sure.")))]
    body = stitch_diarized(parts, 80.0, known_speakers={"agent"})
    TranscriptionDiarized.model_validate(body)
    assert [(s["id"], s["speaker"], s["start"], s["end"]) for s in body["segments"]] == [
        ("seg_000", "1:A", 0.0, 4.0), ("seg_001", "1:B", 4.5, 9.0),
        ("seg_002", "3:A", 61.0, 63.0), ("seg_003", "agent", 63.0, 80.0)]
    assert body["text"] == "A: Hello.\nB: Hi there.\nA: Back again.\nagent: Sure."
    assert body["duration"] == 80.0 and body["usage"] == {"type": "duration", "seconds": 80}


def test_diarized_malformed_segments_are_left_out() -> None:
    junk = {"text": 5, "segments": [None, {"start": "1", "end": 2, "text": "x"}, {"start": 1.0, "end": 2.0},
                                    {"start": math.nan, "end": 1.0, "text": "nan"},
                                    {"start": 1.0, "end": 2.0, "text": " "},
                                    {"start": 1.0, "end": 2.0, "text": "kept", "speaker": 7}]}
    body = stitch_diarized([(0.0, junk), (5.0, {"segments": "no"}), (6.0, [])], 8.0)  # type: ignore[list-item]
    assert [(s["speaker"], s["text"]) for s in body["segments"]] == [("1:?", "kept")]
    assert body["text"] == ""
    TranscriptionDiarized.model_validate(body)


def test_words_from_segments_and_from_transcript_level_chunks_all_reach_the_words_list() -> None:
    seg_words = whisper_chunk((0.0, 2.0, "In segments."), duration=4.0)
    loose = Transcript("Loose words.", "en", 4.0, words=tuple(bare_words("Loose words.", start=0.5)))
    t = stitch([(0.0, seg_words), (4.0, loose)], 8.0)
    assert [(w.word.strip(), w.start) for w in t.words] == [("In", 0.0), ("segments.", 1.0), ("Loose", 4.5),
                                                           ("words.", 4.8)]
    assert [w["word"] for w in verbose(t, "word")["words"]] == ["In", "segments.", "Loose", "words."]
