"""Audio bombs: tiny uploads that decode to hours (1 Hz WAV, FLAC and Opus of silence, headers claiming huge
lengths, packets claiming short ones). Each is refused from its headers and packets before any backend sees
it (a 400 on `file` naming the limit), or decoded a bounded chunk at a time and stopped at the limit; a
gateway process's peak RSS grows less than 50 MiB while it takes all of them, an hour of audio included."""

from __future__ import annotations

import functools
import io
import struct
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import av
import httpx2 as httpx
import openai
import pytest

from gateway.adapters import pocketsphinx
from gateway.config import ConfigError, parse_config
from tests.adapters.common import serve
from tests.conftest import DEMO_KEY, LOOPBACK_TLS, Gateway, ServerThread, sdk, server_yaml, sha, start_gateway
from tests.fakes.openai_engine import FakeOpenAIEngine
from tests.fakes.wyoming_engine import ASR_MODEL, FakeWyomingEngine
from tests.metering_support import scrape_settled, total
from tests.process import GatewayProcess
from tests.support import check_error, expect_error, wait_for

LIMIT = 60
RSS_BUDGET_KIB = 50 * 1024
needs_sphinx = pytest.mark.skipif(pocketsphinx.unavailable_reason() is not None,
                                  reason="the embedded engines are not installed")


# -- the bombs, made here ------------------------------------------------------------------------------------


def wav(rate: int, seconds: float, *, channels: int = 1, claim: int | None = None) -> bytes:
    """16-bit PCM WAV of silence, its data chunk's length field saying `claim` bytes if given."""
    data = bytes(int(seconds * rate) * channels * 2)
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * channels * 2, channels * 2, 16)
    size = len(data) if claim is None else claim
    riff = (36 + size) & 0xFFFFFFFF
    return b"RIFF" + struct.pack("<I", riff) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt \
        + b"data" + struct.pack("<I", size) + data


def encoded_silence(seconds: float, muxer: str, codec: str, rate: int, block: int,
                    options: dict[str, str] | None = None,
                    restamp: Callable[[av.Packet, int], None] | None = None, copies_after: int = 0) -> bytes:
    """`seconds` of mono silence encoded in frames of `block` samples; `restamp(packet, n)` may rewrite
    each packet's timestamps before it is muxed. Past `copies_after` packets (if given), the last one is
    muxed again for each further frame instead of encoding it: a settled encoder turns silence into the same
    packet every time, and two hours of AAC take milliseconds instead of seconds."""
    buf, zero, count = io.BytesIO(), bytes(2 * block), 0
    with av.open(buf, "w", format=muxer) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        stream.codec_context.options = options or {}
        last: av.Packet | None = None

        def mux(packets: list[av.Packet]) -> None:
            nonlocal count, last
            for packet in packets:
                if restamp is not None:
                    restamp(packet, count)
                count += 1
                out.mux(packet)
                last = packet

        end = int(seconds * rate)
        for start in range(0, end, block):
            if copies_after and count >= copies_after and last is not None:
                copy = av.Packet(bytes(last))
                copy.stream, copy.time_base = stream, last.time_base
                mux([copy])
                continue
            samples = min(block, end - start)
            frame = av.AudioFrame(format="s16", layout="mono", samples=samples)
            frame.planes[0].update(zero[: 2 * samples])
            frame.sample_rate, frame.pts = rate, start
            mux(stream.encode(frame))
        mux(stream.encode(None))
    return buf.getvalue()


def flac_silence(seconds: float) -> bytes:
    """FLAC of silence in blocks of 65535 samples at 8 kHz: three hours are about 26 KB."""
    return encoded_silence(seconds, "flac", "flac", 8_000, 65_535, {"frame_size": "65535"})


def opus_silence(seconds: float) -> bytes:
    """Ogg Opus of silence in 120 ms packets (about 1.5 KB a minute)."""
    return encoded_silence(seconds, "ogg", "libopus", 48_000, 5_760, {"frame_duration": "120"})


def mp4_lying_low(seconds: float) -> bytes:
    """AAC in MP4 whose packets (1024 samples each) are stamped 1 ms apart: its timestamps say 90 s are 1.4 s."""

    def restamp(packet: av.Packet, n: int) -> None:
        packet.pts = packet.dts = n * 16
        packet.duration = 16

    return encoded_silence(seconds, "mp4", "aac", 16_000, 1024, restamp=restamp, copies_after=16)


def webm_lying_low(seconds: float) -> bytes:
    """Opus in WebM whose 120 ms packets are stamped 1 ms apart: 90 s of audio measures 0.75 s (Opus
    frames vary in length, so only decoding tells)."""

    def restamp(packet: av.Packet, n: int) -> None:
        packet.pts = packet.dts = n * 48
        packet.duration = 48

    return encoded_silence(seconds, "webm", "libopus", 48_000, 5_760, {"frame_duration": "120"}, restamp=restamp)


class Refusing(NamedTuple):
    client: openai.OpenAI
    engine: FakeOpenAIEngine
    whisper: FakeWyomingEngine


# -- in process, with a low limit: the exact errors, and no backend called -----------------------------------


@pytest.fixture
def whisper(servers: ServerThread) -> Iterator[FakeWyomingEngine]:
    yield from serve(servers, FakeWyomingEngine(("asr",)))


def bomb_table(engine_url: str, whisper_url: str, spool_dir: Path) -> str:
    server = server_yaml(spool_dir).replace("server:\n", f"server:\n          max_audio_seconds: {LIMIT}\n")
    return textwrap.dedent(server + f"""
        backends:
          speaches: {{kind: openai, url: "{engine_url}", timeout_s: 5}}
          sphinx: {{kind: pocketsphinx}}
          whisper: {{kind: wyoming, url: "{whisper_url}", timeout_s: 5}}
        models:
          whisper-1: {{task: transcription, routes: [{{backend: speaches, model: whisper-small}}]}}
          sphinx-1: {{task: transcription, routes: [{{backend: sphinx, model: en-us}}]}}
          wyoming-1: {{task: transcription, routes: [{{backend: whisper, model: {ASR_MODEL}}}]}}
    """)


@pytest.fixture
def bomb_gateway(make_gateway: Callable[[str], Gateway], engine: FakeOpenAIEngine, whisper: FakeWyomingEngine,
                 tmp_path: Path) -> Gateway:
    return make_gateway(bomb_table(engine.url, whisper.url, tmp_path / "spool"))


@pytest.fixture
def bomb_client(bomb_gateway: Gateway) -> Iterator[openai.OpenAI]:
    with sdk(bomb_gateway, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def refusing(servers: ServerThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Refusing]:
    """One gateway and one pair of doubles for every refused bomb: building the gateway's PocketSphinx
    decoder takes 0.3 s, and as no bomb may reach a double, what the doubles record is checked across all."""
    spool = tmp_path_factory.mktemp("spool")
    engine, whisper = FakeOpenAIEngine(), FakeWyomingEngine(("asr",))
    servers.run(engine.start())
    servers.run(whisper.start())
    gateway = servers.run(start_gateway(bomb_table(engine.url, whisper.url, spool), spool))
    with sdk(gateway, timeout=60) as client:
        yield Refusing(client, engine, whisper)
    servers.run(gateway.runner.cleanup())
    servers.run(whisper.stop())
    servers.run(engine.stop())


REFUSED = {  # name -> (upload, code, words the message has)
    "1 Hz wav": (lambda: wav(1, 32_768), "unsupported_sample_rate", "(1 Hz)"),
    "100 Hz wav": (lambda: wav(100, 600), "unsupported_sample_rate", "8000-192000 Hz"),
    "384 kHz wav": (lambda: wav(384_000, 0.1), "unsupported_sample_rate", "(384000 Hz)"),
    "64-channel wav": (lambda: wav(16_000, 0.5, channels=64), "unsupported_channels", "at most 8"),
    "wav past the limit": (lambda: wav(8_000, LIMIT + 1), "audio_too_long", f"maximum of {LIMIT} seconds"),
    "3 hours of flac silence": (lambda: flac_silence(3 * 3600), "audio_too_long", f"maximum of {LIMIT} seconds"),
    "opus silence past the limit": (lambda: opus_silence(LIMIT + 30), "audio_too_long", f"{LIMIT} seconds"),
    "40 s of 2.5 ms opus packets": (  # measuring costs work per packet: 200 per second of the limit
        lambda: encoded_silence(40, "ogg", "libopus", 48_000, 120, {"frame_duration": "2.5"}),
        "invalid_value", f"more than {LIMIT * 200} packets"),
    "aac in mp4 stamped 1 ms apart": (  # AAC frames are 1024 samples whatever the timestamps say
        lambda: mp4_lying_low(LIMIT + 30), "audio_too_long", f"{LIMIT} seconds"),
}


@functools.cache
def made(name: str) -> bytes:
    """Each bomb of REFUSED, made once for all the models it is tried on."""
    return REFUSED[name][0]()


@pytest.mark.parametrize("name", sorted(REFUSED))
@pytest.mark.parametrize("model", ["whisper-1", "wyoming-1", pytest.param("sphinx-1", marks=needs_sphinx)])
def test_bombs_are_refused_before_any_backend(refusing: Refusing, name: str, model: str) -> None:
    _, code, words = REFUSED[name]
    with pytest.raises(openai.BadRequestError) as caught:
        refusing.client.audio.transcriptions.create(model=model, file=("bomb.wav", made(name), "audio/wav"))
    expect_error(caught.value, 400, "invalid_request_error", code, "file", message=words)
    assert refusing.engine.requests == [] and refusing.whisper.requests("transcribe") == []


def test_a_wav_header_claiming_gigabytes_counts_the_bytes_present(bomb_client: openai.OpenAI,
                                                                  bomb_gateway: Gateway,
                                                                  engine: FakeOpenAIEngine) -> None:
    bomb = wav(16_000, 2.0, claim=0x7FFF_0000)  # "18 hours"; 64 KB
    bomb_client.audio.transcriptions.create(model="whisper-1", file=("a.wav", bomb, "audio/wav"))
    assert engine.last.files[0][3] == bomb
    _, samples = scrape_settled(f"{bomb_gateway.url}/metrics", 1)
    assert total(samples, "gateway_billable_audio_seconds_total", model="whisper-1") == pytest.approx(2.0)


@needs_sphinx
def test_packets_that_lie_low_are_stopped_while_decoding(bomb_client: openai.OpenAI, bomb_gateway: Gateway) -> None:
    bomb = webm_lying_low(LIMIT + 30)
    with pytest.raises(openai.BadRequestError) as caught:
        bomb_client.audio.transcriptions.create(model="sphinx-1", file=("bomb.webm", bomb, "audio/webm"))
    expect_error(caught.value, 400, "invalid_request_error", "audio_too_long", "file",
                 message=f"maximum of {LIMIT} seconds")
    ok = webm_lying_low(20)
    within = bomb_client.audio.transcriptions.create(model="sphinx-1", file=("ok.webm", ok, "audio/webm"),
                                                     response_format="verbose_json")
    assert within.duration == pytest.approx(20, abs=0.2)  # the decoded length, not the timestamps' 0.17 s
    _, samples = scrape_settled(f"{bomb_gateway.url}/metrics", 2)
    assert total(samples, "gateway_billable_audio_seconds_total", model="sphinx-1") == pytest.approx(20, abs=0.2)


def test_wyoming_gets_the_audio_as_it_is_decoded_and_no_more_than_the_limit(bomb_client: openai.OpenAI,
                                                                           whisper: FakeWyomingEngine) -> None:
    bomb = webm_lying_low(LIMIT + 30)
    with pytest.raises(openai.BadRequestError) as caught:
        bomb_client.audio.transcriptions.create(model="wyoming-1", file=("bomb.webm", bomb, "audio/webm"))
    expect_error(caught.value, 400, "invalid_request_error", "audio_too_long", "file")
    wait_for(lambda: whisper.active == 0, what="the gateway to drop the Wyoming connection")
    [session] = whisper.requests("transcribe")
    assert "audio-stop" not in session.types  # cut off, not transcribed
    assert 0 < len(session.pcm) <= (LIMIT + 1) * 32_000  # what was decoded up to the limit went out as it came
    ok = webm_lying_low(20)
    within = bomb_client.audio.transcriptions.create(model="wyoming-1", file=("ok.webm", ok, "audio/webm"),
                                                     response_format="verbose_json")
    assert within.duration == pytest.approx(20, abs=0.2)


def test_an_unknown_model_is_a_404_before_the_file_is_looked_at(bomb_gateway: Gateway) -> None:
    response = httpx.post(f"{bomb_gateway.base_url}/audio/transcriptions",
                          headers={"Authorization": f"Bearer {DEMO_KEY}"},
                          data={"model": "no-such-model"}, files={"file": ("a.mp3", b"not audio" * 100)},
                          verify=LOOPBACK_TLS)
    check_error(response.status_code, response.headers, response.content, expected_status=404,
                type_="invalid_request_error", code="model_not_found", param="model")


def test_max_audio_seconds_default_and_checks() -> None:
    assert parse_config("server: {}").server.max_audio_seconds == 7200
    assert parse_config("server: {max_audio_seconds: 1500}").server.max_audio_seconds == 1500
    with pytest.raises(ConfigError, match=r"server\.max_audio_seconds: expected a number >= 1"):
        parse_config("server: {max_audio_seconds: 0}")


# -- a gateway process: peak RSS while it takes every bomb, and an hour of allowed audio ----------------------


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


@needs_sphinx
def test_bombs_leave_peak_rss_flat(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(textwrap.dedent(f"""
        server: {{spool_dir: {tmp_path}}}
        keys: [{{name: demo, tenant: demo, sha256: "{sha(DEMO_KEY)}"}}]
        backends: {{sphinx: {{kind: pocketsphinx}}}}
        models: {{whisper-1: {{task: transcription, routes: [{{backend: sphinx, model: en-us}}]}}}}
    """))  # the light embedded config's transcription side, with the default max_audio_seconds (7200)
    gateway = GatewayProcess(config, tmp_path / "gateway.log")
    try:
        with sdk(f"{gateway.url}/v1", timeout=120) as client:

            def transcribe(data: bytes) -> float:
                return client.audio.transcriptions.create(model="whisper-1", file=("a", data),
                                                          response_format="verbose_json").duration

            assert transcribe(wav(16_000, 3.0)) == pytest.approx(3.0)  # warm: codecs, decoder, first buffers
            baseline = peak_rss_kib(gateway.proc.pid)
            for bomb, code in ((wav(1, 32_768), "unsupported_sample_rate"),
                               (wav(16_000, 1, channels=64), "unsupported_channels"),
                               (flac_silence(3 * 3600), "audio_too_long"),
                               (mp4_lying_low(7_300), "audio_too_long")):
                with pytest.raises(openai.BadRequestError) as caught:
                    transcribe(bomb)
                assert caught.value.code == code
            assert transcribe(wav(16_000, 2.0, claim=0xFFFF_0000)) == pytest.approx(2.0)
            assert transcribe(opus_silence(600)) == pytest.approx(600, abs=0.1)
            assert transcribe(flac_silence(3600)) == pytest.approx(3600, abs=0.1)  # 115 MB of 16 kHz PCM
            growth = peak_rss_kib(gateway.proc.pid) - baseline
    finally:
        gateway.stop()
    print(f"\npeak RSS: {baseline / 1024:.1f} MiB after warm-up, grew {growth / 1024:.1f} MiB over the bombs "
          "and an hour of FLAC transcribed")
    assert growth < RSS_BUDGET_KIB
