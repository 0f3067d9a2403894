"""Golden responses of the cloud engines (Deepgram, Azure AI Speech, ElevenLabs): each vendor's own published
transcripts and error bodies (tests/fixtures/<kind>/, sources in each SOURCES.md) replayed by the engine's
double (`canned`) through the gateway, over real HTTP with the official SDK.

Every golden transcript is checked in every response format against its expected files
(`<name>.expected.<fmt>`, derived from the golden input by the normalization rules of gateway/transcript.py and
checked by eye: they are the contract), and all of them against the same normalization rules: words bare,
timings finite, ordered and within the duration. Every golden error body must come out as OpenAI's status,
type and code, with the vendor's message for a client error, and nothing of the credential or URL.

`GOLDEN_WRITE=1 pytest tests/test_golden_cloud.py` rewrites the expected files from what the gateway answers;
review the diff by eye before committing it.
"""

from __future__ import annotations

import json
import math
import os
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.adapters.test_azure_speech import config as azure_config
from tests.adapters.test_deepgram import config as deepgram_config
from tests.adapters.test_elevenlabs import config as elevenlabs_config
from tests.conftest import ENGINE_KEY, Gateway, ServerThread, sdk
from tests.fakes.azure_speech_engine import FakeAzureSpeech
from tests.fakes.canned import FIXTURES, Canned
from tests.fakes.deepgram_engine import FakeDeepgram, tone
from tests.fakes.elevenlabs_engine import FakeElevenLabs
from tests.fakes.engine import FakeHttpEngine
from tests.support import expect_error

pytestmark = pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")

FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
UPLOAD = tone(2.0, 16_000, "wav", "pcm_s16le")
WRITE = os.environ.get("GOLDEN_WRITE") == "1"


@dataclass(frozen=True)
class Kind:
    double: Callable[[], FakeHttpEngine]
    config: Callable[[str, Path], str]
    """The adapter tests' table (backends `deepgram`, `azure`, `eleven`; model whisper-1)."""


KINDS = {
    "deepgram": Kind(lambda: FakeDeepgram(expected_api_key=ENGINE_KEY), deepgram_config),
    "azure_speech": Kind(lambda: FakeAzureSpeech(expected_api_key=ENGINE_KEY), azure_config),
    "elevenlabs": Kind(lambda: FakeElevenLabs(expected_api_key=ENGINE_KEY), elevenlabs_config),
}
GOLDEN = [("deepgram", "bueller"), ("deepgram", "preamble"), ("azure_speech", "multichannel"),
          ("azure_speech", "preview_multichannel"), ("azure_speech", "diarization"), ("elevenlabs", "hello_world"),
          ("elevenlabs", "nicole")]
"""(kind, name): tests/fixtures/<kind>/<name>.json is the vendor's answer."""
UPLOAD_SECONDS = {"nicole": 15.0}
"""The upload's length where the answer does not say (Scribe's examples): as long as the vendor's audio, so that its
words fit; else 2 s."""


@dataclass(frozen=True)
class GoldenError:
    kind: str
    file: str
    status: int
    expected: tuple[int, str, str | None]
    """(OpenAI status, type, code) the client gets."""
    message: str
    """What the client's message must say (the vendor's words for a client error)."""
    headers: tuple[tuple[str, str], ...] = ()
    param: str | None = None


REFUSED = (502, "upstream_error", "bad_gateway")
REJECTED = (400, "invalid_request_error", None)
LIMITED = (429, "requests", "rate_limit_exceeded")
ERRORS = [
    GoldenError("deepgram", "openapi_example", 200, REFUSED,
                "Backend 'deepgram' answered with a malformed transcript."),
    GoldenError("deepgram", "error_400_invalid_json", 400, REJECTED,
                "Backend 'deepgram' rejected the request: Invalid JSON submitted."),
    GoldenError("deepgram", "error_400_bad_audio", 400, REJECTED,
                "Backend 'deepgram' rejected the request: Bad Request: failed to process audio: corrupt or "
                "unsupported data"),
    GoldenError("deepgram", "error_401", 401, REFUSED, "The gateway's credential for backend 'deepgram' was refused."),
    GoldenError("deepgram", "error_403", 403, REFUSED, "The gateway's credential for backend 'deepgram' was refused."),
    GoldenError("azure_speech", "error_400", 400, REJECTED,
                "Backend 'azure' rejected the request: Only \"Standard\" subscriptions for the region of the called "
                "service are valid."),
    GoldenError("azure_speech", "error_401", 401, REFUSED, "The gateway's credential for backend 'azure' was refused."),
    GoldenError("azure_speech", "error_429", 429, LIMITED, "Backend 'azure' is rate limiting the gateway",
                headers=(("Retry-After", "26"),)),
    GoldenError("elevenlabs", "error_401_quota", 401, REFUSED, "Backend 'eleven' has used up its ElevenLabs quota.",
                headers=(("server", "uvicorn"), ("x-trace-id", "b736e114506d20210112110b377c6f9b"),
                         ("x-region", "us-central1"), ("via", "1.1 google, 1.1 google"))),
    GoldenError("elevenlabs", "error_401_quota_2023", 401, REFUSED,
                "Backend 'eleven' has used up its ElevenLabs quota."),
    GoldenError("elevenlabs", "error_429", 429, LIMITED, "Backend 'eleven' is rate limiting the gateway"),
    GoldenError("elevenlabs", "error_422", 422, REJECTED, "Backend 'eleven' rejected the request: Field required",
                param="input"),
]


@pytest.fixture
def replay(servers: ServerThread, make_gateway: Callable[[str], Gateway],
           tmp_path: Path) -> Iterator[Callable[[str, Canned], tuple[openai.OpenAI, FakeHttpEngine, Gateway]]]:
    """(client, double, gateway) for a kind whose double answers `canned`."""
    started: list[FakeHttpEngine] = []

    def make(kind: str, canned: Canned) -> tuple[openai.OpenAI, FakeHttpEngine, Gateway]:
        engine = KINDS[kind].double()
        servers.run(engine.start())
        started.append(engine)
        engine.canned = canned
        gateway = make_gateway(KINDS[kind].config(engine.url, tmp_path / "spool"))
        return sdk(gateway), engine, gateway

    yield make
    for engine in started:
        servers.run(engine.stop())


def transcribe(client: openai.OpenAI, fmt: str, seconds: float = 2.0) -> bytes:
    extra: dict[str, Any] = {"timestamp_granularities": ["word", "segment"]} if fmt == "verbose_json" else {}
    upload = UPLOAD if seconds == 2.0 else tone(seconds, 16_000, "wav", "pcm_s16le")
    response = client.audio.transcriptions.with_raw_response.create(
        model="whisper-1", file=("clip.wav", upload, "audio/wav"), response_format=fmt, **extra)  # type: ignore[call-overload]
    assert response.status_code == 200
    return bytes(response.content)


def golden(kind: str, name: str) -> Canned:
    return Canned((FIXTURES / kind / f"{name}.json").read_bytes())


# -- transcripts -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("kind", "name"), GOLDEN)
def test_golden_transcript_in_every_format(replay: Any, kind: str, name: str, fmt: str) -> None:
    client, _, _ = replay(kind, golden(kind, name))
    body = transcribe(client, fmt, UPLOAD_SECONDS.get(name, 2.0))
    expected_file = FIXTURES / kind / f"{name}.expected.{fmt}"
    if WRITE:
        text = json.dumps(json.loads(body), indent=2, ensure_ascii=False) + "\n" if fmt.endswith("json") \
            else body.decode()
        expected_file.write_text(text)
        pytest.skip("expected file written")
    expected = expected_file.read_text()
    if fmt.endswith("json"):
        assert json.loads(body) == json.loads(expected)
    else:
        assert body.decode() == expected


def bare(word: str) -> bool:
    """OpenAI's word: no surrounding whitespace or punctuation (inner apostrophes and hyphens are kept)."""
    return bool(word) and not any(unicodedata.category(c).startswith("P") or c.isspace() for c in (word[0], word[-1]))


@pytest.mark.parametrize(("kind", "name"), GOLDEN)
def test_golden_transcript_is_normalized(replay: Any, kind: str, name: str) -> None:
    """The same rules for every engine: bare words, finite timings, ordered, within the audio's duration."""
    client, _, _ = replay(kind, golden(kind, name))
    seconds = UPLOAD_SECONDS.get(name, 2.0)
    verbose = json.loads(transcribe(client, "verbose_json", seconds))
    duration = verbose["duration"]
    assert math.isfinite(duration) and duration > 0
    words, segments = verbose["words"], verbose["segments"]
    assert words and segments
    for item in (*words, *segments):
        assert all(math.isfinite(item[k]) for k in ("start", "end")), item
        assert 0 <= item["start"] <= item["end"] <= duration, item
    assert [w["start"] for w in words] == sorted(w["start"] for w in words)
    assert [s["start"] for s in segments] == sorted(s["start"] for s in segments)
    assert all(bare(w["word"]) for w in words), [w["word"] for w in words if not bare(w["word"])]
    assert [s["id"] for s in segments] == list(range(len(segments)))
    text = json.loads(transcribe(client, "json", seconds))["text"]
    assert text == verbose["text"] and text == text.strip()


def test_both_azure_forms_read_alike(replay: Any) -> None:
    """Azure's documents disagree on the names of a phrase's times (`offsetMilliseconds` in the 2024-11-15
    documentation, `offset` in the 2024-05-15-preview one): both are read, as the same milliseconds."""
    client, _, _ = replay("azure_speech", golden("azure_speech", "multichannel"))
    ga = json.loads(transcribe(client, "verbose_json"))
    client, _, _ = replay("azure_speech", golden("azure_speech", "preview_multichannel"))
    preview = json.loads(transcribe(client, "verbose_json"))
    assert preview["duration"] == ga["duration"] == 185.079
    hello = {"word": "Hello", "start": 0.72, "end": 1.2}
    assert ga["words"][0] == preview["words"][0] == hello
    # the preview's answer lacks GA's phrase "Hi, Mary." (9.52 s): otherwise the same segments
    assert [s for s in ga["segments"] if s["start"] != 9.52] == \
        [s | {"id": s["id"] + (s["start"] > 9.52)} for s in preview["segments"]]


# -- errors ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ERRORS, ids=lambda c: f"{c.kind}-{c.file}")
def test_golden_error_body(replay: Any, case: GoldenError) -> None:
    headers = {"Content-Type": "application/json", **dict(case.headers)}
    canned = Canned((FIXTURES / case.kind / f"{case.file}.json").read_bytes(), case.status, headers)
    client, engine, _ = replay(case.kind, canned)
    with pytest.raises(openai.APIStatusError) as info:
        transcribe(client, "json")
    status, type_, code = case.expected
    secrets = (ENGINE_KEY, engine.url, f"127.0.0.1:{engine.port}")
    error = expect_error(info.value, status, type_, code, param=case.param, message=case.message, secrets=secrets)
    assert not any(secret in json.dumps(dict(info.value.response.headers)) for secret in secrets)
    if case.status in (401, 403):
        assert info.value.response.headers["x-should-retry"] == "false"
    if case.expected == REFUSED:
        assert error["message"] == case.message
    if case.expected == LIMITED:  # the vendor's Retry-After, else 1 s
        assert info.value.response.headers["Retry-After"] == dict(case.headers).get("Retry-After", "1")
