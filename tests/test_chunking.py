"""gateway/chunking.py and its settings: when an upload is split, `chunking_strategy` read (and refused) as OpenAI's
SDKs send it, the per-backend limits and `long_audio:` in the config with YAML-path errors. The transcripts of
split uploads are pinned by tests/test_long_audio.py against a double that listens to the audio."""

from __future__ import annotations

import io
import itertools
import textwrap
import wave
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

from gateway.config import ConfigError, parse_config
from gateway.settings import Limits, LongAudio
from tests.adapters.common import serve
from tests.conftest import DEMO_KEY, ENGINE_KEY, Gateway, ServerThread, engine_config, sdk, sha
from tests.fakes.openai_engine import FakeOpenAIEngine
from tests.fakes.whisper_asr_engine import TRANSCRIPT as ASR_TRANSCRIPT
from tests.fakes.whisper_asr_engine import FakeWhisperAsr
from tests.support import check_error, wav_bytes
from tests.tones import tone

RATE = 16_000
TEXT = "The quick brown fox jumps over the lazy dog."


def long_wav(parts: int = 6, tone_s: float = 2.0, quiet_s: float = 1.0) -> bytes:
    """Tones (speech to WebRTC's VAD) and silences, `parts` of each."""
    return wav_bytes((tone(tone_s, RATE) + bytes(2 * int(quiet_s * RATE))) * parts, RATE)


def config(engine: FakeOpenAIEngine, spool: Path, backend: str = "", long_audio: str = "") -> str:
    text = engine_config(engine.url, spool)
    if backend:
        text = text.replace("    connect_timeout_s: 1", f"    connect_timeout_s: 1\n    {backend}", 1)
    return text + textwrap.dedent(long_audio)


@pytest.fixture
def split_gateway(make_gateway: Callable[[str], Gateway], engine: FakeOpenAIEngine, tmp_path: Path) -> Gateway:
    return make_gateway(config(engine, tmp_path / "spool", "max_audio_s: 5"))


def seconds_of(data: bytes) -> float:
    with wave.open(io.BytesIO(data)) as w:
        return w.getnframes() / w.getframerate()


def test_an_upload_past_a_route_limit_is_sent_as_chunks_that_fit(split_gateway: Gateway,
                                                                 engine: FakeOpenAIEngine) -> None:
    client = sdk(split_gateway)
    data = long_wav()  # 18 s; the route takes 5 s
    result = client.audio.transcriptions.create(model="whisper-1", file=("long.wav", data, "audio/wav"))
    sent = [r for r in engine.requests if r.path == "/v1/audio/transcriptions"]
    assert len(sent) >= 4
    lengths = [seconds_of(r.files[0][3]) for r in sent]
    assert max(lengths) <= 5 and sum(lengths) == pytest.approx(18, abs=0.01)
    assert all(r.form_value("response_format") == "json" for r in sent)  # structure to stitch
    assert all(r.files[0][2] == "audio/wav" for r in sent)
    assert result.text == " ".join([TEXT] * len(sent))


def test_a_file_within_the_limits_is_sent_whole(split_gateway: Gateway, engine: FakeOpenAIEngine) -> None:
    data = long_wav(parts=1)  # 3 s
    sdk(split_gateway).audio.transcriptions.create(model="whisper-1", file=("short.wav", data, "audio/wav"))
    assert [r.files[0][3] for r in engine.requests if r.files] == [data]


def test_a_byte_limit_splits_too(make_gateway: Callable[[str], Gateway], engine: FakeOpenAIEngine,
                                 tmp_path: Path) -> None:
    gw = make_gateway(config(engine, tmp_path / "spool", "max_upload_bytes: 100000"))
    sdk(gw).audio.transcriptions.create(model="whisper-1", file=("long.wav", long_wav(), "audio/wav"))
    sizes = [len(r.files[0][3]) for r in engine.requests if r.files]
    assert len(sizes) >= 6 and max(sizes) <= 100_000


def test_the_ledger_notes_the_chunks_and_the_metrics_count_them(split_gateway: Gateway,
                                                                 engine: FakeOpenAIEngine) -> None:
    sdk(split_gateway).audio.transcriptions.create(model="whisper-1", file=("long.wav", long_wav(), "audio/wav"))
    chunks = len(engine.requests)
    metrics = httpx.get(f"{split_gateway.url}/metrics").text
    assert f'gateway_transcription_chunks_total{{model="whisper-1"}} {float(chunks)}' in metrics
    assert 'gateway_billable_audio_seconds_total{endpoint="/v1/audio/transcriptions",model="whisper-1",' \
           'tenant="acme"} 18.0' in metrics


@pytest.mark.parametrize("fields, message", [
    ({"chunking_strategy": "sometimes"}, "'auto' or a server_vad object"),
    ({"chunking_strategy": "[1, 2]"}, "'auto' or a server_vad object"),
    ({"chunking_strategy": '{"type": "server_vad", "threshold": 1e999}'}, "threshold"),
    ({"chunking_strategy[type]": "client_vad"}, "type must be 'server_vad'"),
    ({"chunking_strategy[threshold]": "0.5"}, "type must be 'server_vad'"),
    ({"chunking_strategy[type]": "server_vad", "chunking_strategy[threshold]": "nan"}, "threshold"),
    ({"chunking_strategy[type]": "server_vad", "chunking_strategy[threshold]": "1.5"}, "threshold"),
    ({"chunking_strategy[type]": "server_vad", "chunking_strategy[prefix_padding_ms]": "-1"}, "prefix_padding"),
    ({"chunking_strategy[type]": "server_vad", "chunking_strategy[prefix_padding_ms]": "9" * 400}, "prefix_padding"),
    ({"chunking_strategy[type]": "server_vad", "chunking_strategy[silence_duration_ms]": "inf"}, "silence"),
    ({"chunking_strategy[type]": "server_vad", "chunking_strategy[\udcff]": "1"}, "Unrecognized"),
    ({"chunking_strategy": "auto", "chunking_strategy[type]": "server_vad"}, "more than once"),
])
def test_a_malformed_chunking_strategy_is_a_400_before_any_backend_call(
        split_gateway: Gateway, engine: FakeOpenAIEngine, fields: dict[str, str], message: str) -> None:
    files = {"file": ("a.wav", long_wav(parts=1), "audio/wav")}
    data = {"model": "whisper-1", **{k.encode("utf-8", "surrogateescape").decode("latin-1"): v
                                     for k, v in fields.items()}}
    response = httpx.post(f"{split_gateway.url}/v1/audio/transcriptions", files=files, data=data,
                          headers={"Authorization": f"Bearer {DEMO_KEY}"})
    error = check_error(response.status_code, response.headers, response.content, expected_status=400,
                        type_="invalid_request_error", code="invalid_value", param="chunking_strategy")
    assert message in error["message"]
    assert engine.requests == []


def test_chunking_strategy_is_forwarded_to_an_engine_that_cuts_itself(split_gateway: Gateway,
                                                                      engine: FakeOpenAIEngine) -> None:
    data = long_wav(parts=1)
    sdk(split_gateway).audio.transcriptions.create(model="whisper-1", file=("a.wav", data, "audio/wav"),
                                                   extra_body={"chunking_strategy": "auto"})
    assert [r.form_value("chunking_strategy") for r in engine.requests] == ["auto"]
    assert engine.requests[0].files[0][3] == data


def test_config_reads_backend_limits_and_long_audio(engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    parsed = parse_config(config(engine, tmp_path, "max_audio_s: 1500\n    max_upload_bytes: 26214400",
                                 "long_audio: {concurrency: 8, max_chunks: 50, chunk_s: 20, pad_s: 0.3}"))
    assert parsed.limits["speaches"] == Limits(1500.0, 26_214_400)
    assert parsed.long_audio == LongAudio(8, 50, 20.0, 0.3)
    assert parse_config(config(engine, tmp_path)).long_audio == LongAudio()


@pytest.mark.parametrize("backend, long_audio, problem", [
    ("max_audio_s: 0", "", "backends.speaches.max_audio_s: expected seconds above 0"),
    ("max_audio_s: 0.5", "", "backends.speaches.max_audio_s: expected at least 1 second"),
    ("max_audio_s: .nan", "", "backends.speaches.max_audio_s"),
    ("max_upload_bytes: 1000", "", "backends.speaches.max_upload_bytes: expected a number >= 65536"),
    ("max_upload_bytes: 100000.5", "", "backends.speaches.max_upload_bytes: expected a whole number"),
    ("", "long_audio: {concurrency: 0}", "long_audio.concurrency"),
    ("", "long_audio: {max_chunks: 2.5}", "long_audio.max_chunks: expected a whole number"),
    ("", "long_audio: {chunk_s: 0.3}", "long_audio.chunk_s"),
    ("", "long_audio: {pad_s: .inf}", "long_audio.pad_s"),
    ("", "long_audio: {chunk_s: 1, pad_s: 0.6}", "long_audio.chunk_s: expected more than twice pad_s"),
    ("", "long_audio: {fan_out: 3}", "long_audio.fan_out: unknown setting"),
    ("", "long_audio: [1]", "long_audio: expected a mapping"),
])
def test_config_refuses_bad_limits_by_yaml_path(engine: FakeOpenAIEngine, tmp_path: Path, backend: str,
                                                long_audio: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(config(engine, tmp_path, backend, long_audio))
    assert any(problem in p for p in caught.value.problems), caught.value.problems


def test_openai_itself_gets_its_25_mib_limit_by_default(tmp_path: Path) -> None:
    from gateway.adapters.openai import OpenAIAdapter
    from gateway.config import Backend
    assert OpenAIAdapter.capabilities.limits == Limits()
    adapter = OpenAIAdapter(Backend("openai", "openai", "https://api.openai.com/v1", ENGINE_KEY), None)  # type: ignore[arg-type]
    assert adapter.capabilities.limits == Limits(max_upload_bytes=26_214_400)


def test_too_many_chunks_is_a_400_before_any_chunk_is_sent(make_gateway: Callable[[str], Gateway],
                                                            engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    gw = make_gateway(config(engine, tmp_path / "spool", "max_audio_s: 5", "long_audio: {max_chunks: 3}"))
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(gw).audio.transcriptions.create(model="whisper-1", file=("long.wav", long_wav(), "audio/wav"))
    assert caught.value.body["code"] == "audio_too_long" and caught.value.body["param"] == "file"  # type: ignore[index]
    assert engine.requests == []


# -- emulation of chunking_strategy on an engine that cannot cut (whisper-asr-webservice), and diarized_json --

def whisper_asr_config(url: str, spool: Path, long_audio: str = "") -> str:
    return textwrap.dedent(f"""
        server: {{max_upload_bytes: 20000000, spool_memory_bytes: 65536, spool_dir: {spool}}}
        keys:
          - {{name: demo, tenant: acme, sha256: "{sha(DEMO_KEY)}"}}
        backends:
          whisper: {{kind: whisper_asr, url: "{url}", timeout_s: 30, connect_timeout_s: 5}}
        models:
          whisper-1: {{task: transcription, routes: [{{backend: whisper, model: large-v3}}]}}
        """) + textwrap.dedent(long_audio)


@pytest.fixture
def asr(servers: ServerThread) -> Iterator[FakeWhisperAsr]:
    yield from serve(servers, FakeWhisperAsr())


def cut_points(asr: FakeWhisperAsr) -> list[float]:
    """Where each chunk the engine got ends on the file's timeline (seconds), the chunks in the order they arrived
    (file order only with `long_audio.concurrency: 1`)."""
    ends = itertools.accumulate(seconds_of(data) for rec in asr.asr_requests
                                for name, _, _, data in rec.files if name == "audio_file")
    return list(ends)[:-1]


def test_chunking_strategy_is_emulated_where_the_engine_cannot_cut(
        make_gateway: Callable[[str], Gateway], asr: FakeWhisperAsr, tmp_path: Path) -> None:
    gw = make_gateway(whisper_asr_config(asr.url, tmp_path / "spool"))
    data = long_wav(parts=25)  # 75 s, no route limit: chunks of long_audio.chunk_s (30 s)
    result = sdk(gw).audio.transcriptions.create(
        model="whisper-1", file=("long.wav", data, "audio/wav"), response_format="verbose_json",
        timestamp_granularities=["word", "segment"], extra_body={"chunking_strategy": "auto"})
    lengths = [seconds_of(d) for r in asr.asr_requests for n, _, _, d in r.files if n == "audio_file"]
    assert len(lengths) == 3 and max(lengths) <= 30 and sum(lengths) == pytest.approx(75)
    assert all(r.query.get("output") == "json" for r in asr.asr_requests)
    assert not any("chunking" in k for r in asr.asr_requests for k in [*r.query, *(n for n, _ in r.form)])
    assert result.duration == pytest.approx(75)
    assert result.words is not None and len(result.words) == 3 * len(ASR_TRANSCRIPT.split())
    starts = [w.start for w in result.words]
    assert starts == sorted(starts) and starts[-1] > 60  # the last chunk's words are on the file's timeline
    assert [s.id for s in result.segments or []] == list(range(len(result.segments or [])))


def test_server_vad_padding_and_silence_decide_where_cuts_fall(
        make_gateway: Callable[[str], Gateway], asr: FakeWhisperAsr, tmp_path: Path) -> None:
    """Silences of 0.6 s and 1.5 s alternate; prefix_padding_ms 500 needs 1 s of silence for a cut (0.5 s each
    side), so every cut falls in a long one, with its padding."""
    gw = make_gateway(whisper_asr_config(asr.url, tmp_path / "spool", "long_audio: {chunk_s: 9, concurrency: 1}"))
    unit = tone(2.0, RATE) + bytes(2 * int(0.6 * RATE)) + tone(2.0, RATE) + bytes(2 * int(1.5 * RATE))  # 6.1 s
    sdk(gw).audio.transcriptions.create(
        model="whisper-1", file=("long.wav", wav_bytes(unit * 8, RATE), "audio/wav"),
        extra_body={"chunking_strategy": {"type": "server_vad", "prefix_padding_ms": 500,
                                          "silence_duration_ms": 200, "threshold": 0.5}})
    cuts = cut_points(asr)
    assert len(cuts) >= 4
    for cut in cuts:
        offset = cut % 6.1  # the long silence is [4.6, 6.1) of each unit
        assert 4.6 + 0.5 - 0.03 <= offset <= 6.1 - 0.5 + 0.03, cuts


def test_diarized_json_from_chunks_keeps_each_chunks_speakers_apart(split_gateway: Gateway,
                                                                      engine: FakeOpenAIEngine) -> None:
    response = httpx.post(f"{split_gateway.url}/v1/audio/transcriptions",
                          files={"file": ("long.wav", long_wav(), "audio/wav")},
                          data={"model": "whisper-1", "response_format": "diarized_json"},
                          headers={"Authorization": f"Bearer {DEMO_KEY}"})
    assert response.status_code == 200, response.text
    body = response.json()
    sent = [r for r in engine.requests if r.files]
    assert len(sent) >= 4 and all(r.form_value("response_format") == "diarized_json" for r in sent)
    speakers = [s["speaker"] for s in body["segments"]]
    assert speakers[:2] == ["1:A", "2:A"] and f"{len(sent)}:A" in speakers  # one sentence per chunk here
    assert [s["id"] for s in body["segments"]] == [f"seg_{i:03d}" for i in range(len(speakers))]
    starts = [s["start"] for s in body["segments"]]
    assert starts == sorted(starts) and body["duration"] == pytest.approx(18)
    assert body["text"] == "\n".join([TEXT] * len(sent))


def test_a_malformed_answer_to_a_chunk_fails_the_chunk_over_then_the_request(
        make_gateway: Callable[[str], Gateway], engine: FakeOpenAIEngine, second: FakeOpenAIEngine,
        tmp_path: Path) -> None:
    text = config(engine, tmp_path / "spool", "max_audio_s: 5").replace(
        "routes: [{backend: speaches, model: Systran/faster-whisper-small}]",
        "routes: [{backend: speaches, model: Systran/faster-whisper-small}, {backend: spare, model: small}]")
    text = text.replace("models:\n", f'  spare: {{kind: openai, url: "{second.url}", max_audio_s: 5}}\nmodels:\n', 1)
    gw = make_gateway(text)
    engine.mode, engine.fail_next = "garbage", 1  # the first chunk's first answer is not JSON
    result = sdk(gw).audio.transcriptions.create(model="whisper-1", file=("long.wav", long_wav(), "audio/wav"),
                                                 response_format="verbose_json")
    chunks = len(engine.requests) + len(second.requests) - 1  # the garbage answer's chunk, sent twice
    assert len(second.requests) == 1 and chunks >= 4 and result.text == " ".join([TEXT] * chunks)
    engine.mode, second.mode = "garbage", "garbage"  # now every answer, on both routes
    with pytest.raises(openai.APIStatusError) as caught:
        sdk(gw).audio.transcriptions.create(model="whisper-1", file=("long.wav", long_wav(), "audio/wav"))
    assert caught.value.status_code == 502 and caught.value.body["code"] == "bad_gateway"  # type: ignore[index]
    assert second.url not in str(caught.value.body) and ENGINE_KEY not in str(caught.value.body)
