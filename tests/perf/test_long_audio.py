"""Long audio (issue 15): the figures the issue asks for, on the tone-transcribing double.

(a) Fan-out: the same 10-minute file (tests/long_audio_fixture.py) through the gateway with
    `long_audio.concurrency` 1, 4 and 8, the double taking 0.5 s per chunk (`delay_s`): wall clock and speed-up.
(b) A 200 MB upload (WAV, ~1.8 h of tones and silence) with `server.max_upload_bytes` raised, through a gateway
    in a process of its own (tests/process.py) and a route with `max_audio_s: 600`: the gateway's RSS before
    and its peak (VmHWM from /proc/<pid>/status).
(c) Cut accuracy over the 10-minute file (run (a) at concurrency 1): the distance of every cut to the middle of
    the silence it fell in and to the nearest burst edge. The splitter cuts as late as it can, so a cut sits
    near the end of its silence, a padding (0.2 s, 0.21 s on the 30 ms grid) before the next burst.

Only sane bounds are asserted (speed-up > 2 at concurrency 4, RSS peak < 300 MB).

Run: .venv/bin/python -m pytest tests/perf/test_long_audio.py -q -s -p no:cacheprovider
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Gateway, ServerThread, sdk
from tests.fakes.tone_transcriber import RATE, ToneTranscriber
from tests.long_audio_fixture import long_config, long_tones, silences, write_long_tones
from tests.perf.perfkit import MB, environment, median, print_table
from tests.process import GatewayProcess
from tests.support import words

DELAY_S = 0.5
BIG_BYTES = 200 * 1000 * 1000
BIG_MINUTES = round((BIG_BYTES - 44) / 2 / RATE / 60, 2)  # 16 kHz mono s16le: 104.17 minutes
BIG_LIMIT_S = 600.0
MAX_PEAK_RSS = 300 * MB


@pytest.fixture
def make_double(servers: ServerThread) -> Iterator[Callable[..., ToneTranscriber]]:
    started: list[ToneTranscriber] = []

    def make(**settings: float) -> ToneTranscriber:
        engine = ToneTranscriber(**settings)
        servers.run(engine.start())
        started.append(engine)
        return engine

    yield make
    for engine in started:
        servers.run(engine.stop())


def test_fan_out_speed_up_and_cut_accuracy(make_double: Callable[..., ToneTranscriber],
                                           make_gateway: Callable[[str], Gateway], tmp_path: Path) -> None:
    wav, bursts = long_tones(10, 10)
    rows, walls, cuts = [], {}, []
    for concurrency in (1, 4, 8):
        double = make_double(max_audio_s=30, delay_s=DELAY_S, keep_pcm=concurrency == 1)
        gw = make_gateway(long_config(tmp_path / "spool", double.url,
                                      extra=f"long_audio: {{concurrency: {concurrency}}}\n"))
        with sdk(gw, timeout=120) as client:
            started = time.perf_counter()
            text = client.audio.transcriptions.create(model="whisper-1", file=("ten.wav", wav, "audio/wav"),
                                                      response_format="text")
            walls[concurrency] = time.perf_counter() - started
        assert words(text) == [b.word for b in bursts]
        assert double.too_long == 0 and len(double.heard) > 10
        rows.append([concurrency, len(double.heard), double.peak, walls[concurrency], walls[1] / walls[concurrency],
                     len(double.heard) * DELAY_S / concurrency])
        if concurrency == 1:  # one at a time: the chunks arrived in file order
            ends = [0]
            for heard in double.heard:
                assert wav[44:].startswith(heard.pcm or b"", 2 * ends[-1])
                ends.append(ends[-1] + len(heard.pcm or b"") // 2)
            cuts = [e / RATE for e in ends[1:-1]]
    print_table(f"Fan-out: a 10-minute file ({len(bursts)} bursts), chunks of at most 30 s, the double waiting "
                f"{DELAY_S} s per chunk", ["concurrency", "chunks", "double peak", "wall s", "speed-up",
                                           "ideal s (chunks x delay / concurrency)"], rows, note=environment())
    quiet = silences(bursts, 600.0)
    to_middle, to_edge = [], []
    for cut in cuts:
        a, b = next((a, b) for a, b in quiet if a <= cut <= b)
        to_middle.append(abs(cut - (a + b) / 2))
        to_edge.append(min(cut - a, b - cut))
    print_table(f"Cut accuracy: {len(cuts)} cuts in the 10-minute file (silences {min(b - a for a, b in quiet):.2f}-"
                f"{max(b - a for a, b in quiet[:-1]):.2f} s)", ["distance (s)", "min", "median", "max"],
                [["to the middle of its silence", min(to_middle), median(to_middle), max(to_middle)],
                 ["to the nearest burst edge", min(to_edge), median(to_edge), max(to_edge)]])
    assert min(to_edge) >= 0.2  # the padding: no chunk starts or ends on a burst
    assert walls[1] / walls[4] > 2, walls


def _status_kb(pid: int, name: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        match = re.search(rf"^{name}:\s+(\d+) kB", f.read(), re.M)
    assert match, name
    return int(match.group(1)) * 1024


def test_a_200_mb_upload_keeps_the_gateway_small(make_double: Callable[..., ToneTranscriber], tmp_path: Path,
                                                 stopping: list[GatewayProcess]) -> None:
    """A route with `max_audio_s: 600` at the default `long_audio.concurrency` (4), then at 1, then 120 s chunks,
    each in a fresh gateway process: how the peak follows the chunks in flight and their size."""
    big = tmp_path / "big.wav"
    bursts = write_long_tones(big, 11, BIG_MINUTES)
    size = big.stat().st_size
    (tmp_path / "spool").mkdir()
    rows, peaks = [], []
    for limit_s, concurrency in ((BIG_LIMIT_S, 4), (BIG_LIMIT_S, 1), (120.0, 4)):
        double = make_double(max_audio_s=limit_s)
        config = tmp_path / f"gateway-{limit_s:g}-{concurrency}.yaml"
        config.write_text(long_config(tmp_path / "spool", double.url, limit_s=limit_s,
                                      max_upload_bytes=BIG_BYTES + MB,
                                      extra=f"long_audio: {{concurrency: {concurrency}}}\n"))
        gw = GatewayProcess(config, config.with_suffix(".log"))
        stopping.append(gw)
        pid = gw.proc.pid
        before = _status_kb(pid, "VmRSS")
        started = time.perf_counter()
        with sdk(gw.url + "/v1", timeout=600) as client, big.open("rb") as file:
            result = client.audio.transcriptions.create(model="whisper-1", file=("big.wav", file, "audio/wav"),
                                                        response_format="verbose_json")
        wall = time.perf_counter() - started
        peak, after = _status_kb(pid, "VmHWM"), _status_kb(pid, "VmRSS")
        gw.stop()
        assert result.duration == pytest.approx(BIG_MINUTES * 60, abs=0.01)
        assert words(result.text) == [b.word for b in bursts]
        assert double.too_long == 0 and max(h.duration for h in double.heard) <= limit_s
        assert not list((tmp_path / "spool").iterdir())
        rows.append([limit_s, limit_s * RATE * 2 / MB, concurrency, len(double.heard), double.peak, wall,
                     before / MB, peak / MB, after / MB])
        peaks.append(peak)
    print_table(f"A {size / 1e6:.0f} MB WAV upload ({BIG_MINUTES * 60:.0f} s, {len(bursts)} bursts) through a "
                "gateway process", ["max_audio_s", "chunk MiB (WAV)", "concurrency", "chunks", "double peak",
                                    "wall s", "RSS before MiB", "peak RSS (VmHWM) MiB", "RSS after MiB"], rows,
                note="VmHWM is the kernel's peak mark for the gateway process since it started.\n" + environment())
    assert max(peaks) < MAX_PEAK_RSS, f"peak RSS {max(peaks) / MB:.0f} MiB"
