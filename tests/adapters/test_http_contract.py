"""The contract every HTTP engine adapter keeps, written once and run over the ENGINES table: a refused
credential is a 502 not to be retried, a rate limit is a 429 with Retry-After, a rejected request is a 400
with the engine's message, a 5xx, garbage or a dropped transcript is a 502 naming no internals, a hanging
engine is a 504 once the backend's timeout is waited out (its handler cancelled), a drop mid-audio breaks
the client's stream, and readiness is one probe that never bills. Each engine's own file keeps only what
is its wire format's; a new HTTP engine joins the contract with one row here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from tests.adapters.common import (
    expect_bad_gateway,
    expect_rate_limited,
    expect_refused_credential,
    expect_rejected,
    expect_timeout,
    serve,
    speech_until_cut,
)
from tests.adapters.test_azure_speech import config as azure_config
from tests.adapters.test_deepgram import config as deepgram_config
from tests.adapters.test_elevenlabs import config as elevenlabs_config
from tests.adapters.test_whisper_asr import config as whisper_config
from tests.conftest import ENGINE_KEY, Gateway, ServerThread, sdk
from tests.fakes.azure_speech_engine import FakeAzureSpeech
from tests.fakes.deepgram_engine import FakeDeepgram, tone
from tests.fakes.elevenlabs_engine import FakeElevenLabs
from tests.fakes.engine import FakeHttpEngine
from tests.fakes.whisper_asr_engine import FakeWhisperAsr
from tests.support import assert_settled, probe_backends, quick_timeouts

pytestmark = pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
SENTENCE = "Hello from the gateway. This sentence is spoken by an engine double."
UPLOAD = tone(2.0, 16_000, "wav", "pcm_s16le")
Step = Callable[[FakeHttpEngine, ServerThread], None]


def mode(name: str) -> Step:
    def step(engine: FakeHttpEngine, servers: ServerThread) -> None:
        engine.mode = name
    return step


def key(value: str) -> Step:
    def step(engine: FakeHttpEngine, servers: ServerThread) -> None:
        engine.expected_api_key = value
    return step


def stopped(engine: FakeHttpEngine, servers: ServerThread) -> None:
    servers.run(engine.stop())


def speak(fmt: str) -> Callable[[openai.OpenAI], object]:
    return lambda c: c.audio.speech.create(model="tts-1", voice="nova", input=SENTENCE,
                                           response_format=fmt).content  # type: ignore[arg-type]


def transcribe(**kw: Any) -> Callable[[openai.OpenAI], object]:
    return lambda c: c.audio.transcriptions.create(model="whisper-1", file=("hello.wav", UPLOAD, "audio/wav"), **kw)


@dataclass(frozen=True)
class Engine:
    """One HTTP engine's row: its double and config, the calls it serves, and its words for each failure."""

    backend: str
    double: Callable[[], FakeHttpEngine]
    config: Callable[[str, Path], str]
    calls: Mapping[str, Callable[[openai.OpenAI], object]]
    """"speech" and/or "transcription": the SDK call that reaches this engine."""
    paths: Mapping[str, str]
    """call -> the engine's path that call reaches (the contract's calls all POST)."""
    secrets: tuple[str, ...]
    """What the engine says in its failures that no client may see."""
    probe: tuple[str, str]
    """(method, path) of the readiness probe."""
    probe_header: tuple[str, str] | None
    """The credential header the probe carries, if the engine takes one."""
    readiness: tuple[tuple[Step, str], ...]
    """After the first probe (up): each step, then what /readyz says of the backend."""
    refused: tuple[str, ...] = ()
    """Modes in which the engine refuses the gateway's key (empty: it takes none)."""
    rate_limits: tuple[tuple[str | None, str], ...] = ()
    """(Retry-After the double sends, None for its own default; the Retry-After the client gets)."""
    rejected: tuple[tuple[str, str, str], ...] = ()
    """(call, mode, the engine's message in the client's 400)."""
    failures: tuple[str, ...] = ("500", "garbage")
    """Modes that are the engine failing: a 502."""
    messages: Mapping[str, str] = field(default_factory=dict)
    """mode -> what the 502's message says, where the contract pins it."""
    audio_chunk: int = 2048
    """The double's chunk size when it drops mid-audio: the client gets at least that much."""


ENGINES = [
    Engine("azure", lambda: FakeAzureSpeech(expected_api_key=ENGINE_KEY), azure_config,
           {"speech": speak("mp3"), "transcription": transcribe()},
           {"speech": "/cognitiveservices/v1", "transcription": "/speechtotext/transcriptions:transcribe"},
           secrets=("subscription key", "Access denied", "<html>"),
           probe=("GET", "/cognitiveservices/voices/list"), probe_header=("Ocp-Apim-Subscription-Key", ENGINE_KEY),
           readiness=((mode("401"), "down"),),
           refused=("401",), rate_limits=((None, "7"),),
           rejected=(("speech", "400", "invalid request"),
                     ("transcription", "400", "Invalid audio (fake mode 400)."))),
    Engine("deepgram", lambda: FakeDeepgram(expected_api_key=ENGINE_KEY), deepgram_config,
           {"speech": speak("mp3"), "transcription": transcribe()},
           {"speech": "/v1/speak", "transcription": "/v1/listen"},
           secrets=(ENGINE_KEY, "INVALID_AUTH", "Invalid credentials", "<html>"),
           probe=("GET", "/v1/projects"), probe_header=("Authorization", f"Token {ENGINE_KEY}"),
           readiness=((mode("401"), "down"), (mode("403"), "up")),  # a key without management scope still works
           refused=("401", "403"), rate_limits=((None, "7"),),
           rejected=tuple((call, m, message) for call in ("speech", "transcription") for m, message in (
               ("400", "Invalid query parameter (fake mode 400)."),
               ("400_category", "Invalid JSON submitted (fake mode 400_category).")))),
    Engine("eleven", lambda: FakeElevenLabs(expected_api_key=ENGINE_KEY), elevenlabs_config,
           {"speech": speak("pcm"), "transcription": transcribe()},
           {"speech": "/v1/text-to-speech/21m00Tcm4TlvDq8ikWAM/stream", "transcription": "/v1/speech-to-text"},
           secrets=(ENGINE_KEY, "Invalid API key", "credits remaining", "<html>"),
           probe=("GET", "/v1/voices"), probe_header=("xi-api-key", ENGINE_KEY),
           readiness=((key("rotated"), "down"),),
           refused=("401",), rate_limits=((None, "1"), ("7", "7")), audio_chunk=8_000),
    Engine("whisper", FakeWhisperAsr, whisper_config,
           {"transcription": transcribe(response_format="verbose_json")}, {"transcription": "/asr"},
           secrets=("<html>", "nginx", "Internal Server Error"),
           probe=("GET", "/openapi.json"), probe_header=None,
           readiness=((mode("500"), "down"), (stopped, "down")),
           failures=("500", "json_bug", "garbage", "drop"),
           messages={"500": "failed with status 500", "json_bug": "failed with status 500",
                     "garbage": "answered with a malformed transcript", "drop": "closed the connection unexpectedly",
                     "drop_midstream": "closed the connection unexpectedly"}),
]


def cases(*extra: Callable[[Engine], Iterable[tuple[Any, ...]]]) -> list[Any]:
    """pytest params (engine row, *values) for every engine and every tuple `extra` yields for it."""
    select = extra[0] if extra else (lambda e: [()])
    return [pytest.param(e, *values, id="-".join([e.backend, *(str(v) for v in values if " " not in str(v))]))
            for e in ENGINES for values in select(e)]


def per_call(e: Engine) -> Iterable[tuple[str]]:
    return [(call,) for call in e.calls]


def one(call: str) -> Callable[[Engine], Iterable[tuple[()]]]:
    return lambda e: [()] if call in e.calls else []


@pytest.fixture
def engine(servers: ServerThread, spec: Engine) -> Iterator[FakeHttpEngine]:
    yield from serve(servers, spec.double())


@pytest.fixture
def gateway(make_gateway: Callable[[str], Gateway], spec: Engine, engine: FakeHttpEngine, tmp_path: Path) -> Gateway:
    return make_gateway(spec.config(engine.url, tmp_path / "spool"))


# -- the engine refuses ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "call", "refusal"),
                         cases(lambda e: [(c, m) for c in e.calls for m in e.refused]))
def test_refused_credential_is_502_not_to_be_retried(servers: ServerThread, client: openai.OpenAI, gateway: Gateway,
                                                     engine: FakeHttpEngine, spec: Engine, call: str,
                                                     refusal: str) -> None:
    engine.mode = refusal
    expect_refused_credential(servers, gateway, engine, lambda: spec.calls[call](client), spec.backend, spec.secrets)


@pytest.mark.parametrize(("spec", "call"), cases(lambda e: per_call(e) if e.refused else []))
def test_wrong_configured_key_is_refused_by_the_engine(servers: ServerThread, client: openai.OpenAI,
                                                       gateway: Gateway, engine: FakeHttpEngine, spec: Engine,
                                                       call: str) -> None:
    engine.expected_api_key = "some-other-key"
    expect_refused_credential(servers, gateway, engine, lambda: spec.calls[call](client), spec.backend, spec.secrets)


@pytest.mark.parametrize(("spec", "call", "sent", "expected"),
                         cases(lambda e: [(c, *r) for c in e.calls for r in e.rate_limits]))
def test_rate_limit_is_429_with_retry_after(client: openai.OpenAI, engine: FakeHttpEngine, spec: Engine, call: str,
                                            sent: str | None, expected: str) -> None:
    engine.mode, engine.retry_after = "429", sent
    expect_rate_limited(lambda: spec.calls[call](client), expected, spec.secrets)


@pytest.mark.parametrize(("spec", "call", "rejection", "message"), cases(lambda e: e.rejected))
def test_rejected_request_is_400_with_the_engines_message(client: openai.OpenAI, engine: FakeHttpEngine,
                                                          spec: Engine, call: str, rejection: str,
                                                          message: str) -> None:
    engine.mode = rejection
    expect_rejected(lambda: spec.calls[call](client), spec.backend, message)


# -- the engine fails -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "call", "failure"), cases(lambda e: [(c, m) for c in e.calls for m in e.failures]))
def test_engine_failure_is_502_after_one_request(servers: ServerThread, client: openai.OpenAI, gateway: Gateway,
                                                 engine: FakeHttpEngine, spec: Engine, call: str,
                                                 failure: str) -> None:
    engine.mode = failure
    message = spec.messages.get(failure)
    expect_bad_gateway(servers, gateway, engine, lambda: spec.calls[call](client), spec.secrets,
                       message=message and f"Backend '{spec.backend}' {message}")
    assert [(r.method, r.path) for r in engine.requests] == [("POST", spec.paths[call])]  # once, not retried


@pytest.mark.parametrize(("spec", "call"), cases(per_call))
def test_hanging_engine_is_504(servers: ServerThread, make_gateway: Callable[[str], Gateway], engine: FakeHttpEngine,
                               tmp_path: Path, spec: Engine, call: str) -> None:
    gateway = make_gateway(quick_timeouts(spec.config(engine.url, tmp_path / "spool")))
    engine.mode = "hang"
    with sdk(gateway) as client:
        expect_timeout(servers, gateway, engine, lambda: spec.calls[call](client))


@pytest.mark.parametrize("spec", cases(one("speech")))
def test_drop_mid_audio_breaks_the_client_stream(servers: ServerThread, client: openai.OpenAI, gateway: Gateway,
                                                 engine: Any, spec: Engine) -> None:
    engine.mode, engine.chunk_size = "drop_midstream", spec.audio_chunk
    received = speech_until_cut(client, SENTENCE)
    assert spec.audio_chunk <= len(received) < len(engine.sent[-1])
    assert_settled(servers, gateway, engine)


@pytest.mark.parametrize("spec", cases(one("transcription")))
def test_drop_mid_transcript_is_502(servers: ServerThread, client: openai.OpenAI, gateway: Gateway,
                                    engine: FakeHttpEngine, spec: Engine) -> None:
    engine.mode, engine.chunk_size = "drop_midstream", 256
    message = spec.messages.get("drop_midstream")
    expect_bad_gateway(servers, gateway, engine, lambda: spec.calls["transcription"](client), spec.secrets,
                       message=message and f"Backend '{spec.backend}' {message}")
    assert [(r.method, r.path) for r in engine.requests] == [("POST", spec.paths["transcription"])]


# -- readiness ----------------------------------------------------------------------------------------------


def backends(gateway: Gateway) -> dict[str, str]:
    """What /readyz says of each backend (the gateway itself is ready whatever one backend says)."""
    ready = httpx2.get(f"{gateway.url}/readyz")
    assert ready.status_code == 200
    return dict(ready.json()["backends"])


@pytest.mark.parametrize("spec", cases())
def test_readiness_is_one_probe_that_never_bills(servers: ServerThread, gateway: Gateway, engine: FakeHttpEngine,
                                                  spec: Engine) -> None:
    probe_backends(servers, gateway)
    assert backends(gateway) == {spec.backend: "up"}
    assert [(r.method, r.path) for r in engine.requests] == [spec.probe]
    if spec.probe_header is not None:
        name, value = spec.probe_header
        assert engine.last.headers[name] == value
    for step, state in spec.readiness:
        step(engine, servers)
        probe_backends(servers, gateway)
        assert backends(gateway) == {spec.backend: state}
    assert {(r.method, r.path) for r in engine.requests} == {spec.probe}  # never a synthesis or a transcription
