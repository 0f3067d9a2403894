"""Shared helpers for the metering, ledger and Prometheus tests: reading /metrics with prometheus-client's
own parser, reading the usage ledger (written by a background thread, so polled), and a priced config."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import engine_config
from tests.support import wav_bytes

TTS1_PRICE = {"per_million_characters": 15.0, "per_audio_minute": 0.6}
LEDGER_FIELDS = {"request_id", "time", "tenant", "key", "endpoint", "model", "backend", "native_model", "voice",
                 "characters", "audio_seconds", "cost_usd", "status", "billable", "completed", "rejected_by",
                 "chunks", "item"}
_TTS1_LINE = "tts-1: {task: speech, routes: [{backend: speaches, model: kokoro}]}"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    """GET on loopback, never through a proxy from the environment."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def metered_config(engine_url: str, spool_dir: Path, *, ledger_path: Path | None = None, metrics: str = "",
                   timeout_s: float = 2, ledger: str = "") -> str:
    """The default test table with tts-1 priced (the other models have no price), a file ledger at
    `ledger_path` (when given) and extra `metrics:` settings."""
    text = engine_config(engine_url, spool_dir)
    price = ", ".join(f"{name}: {value}" for name, value in TTS1_PRICE.items())
    assert _TTS1_LINE in text, "conftest.engine_config changed shape"
    text = text.replace(_TTS1_LINE, _TTS1_LINE[:-1] + f", price: {{{price}}}}}")
    assert "timeout_s: 2\n" in text
    text = text.replace("timeout_s: 2\n", f"timeout_s: {timeout_s}\n")
    if ledger_path is not None:
        text += f"ledger: {{sink: file, path: {ledger_path}}}\n"
    elif ledger:
        text += ledger
    if metrics:
        text += metrics
    return text


def parse_metrics(text: str) -> Samples:
    """Every sample in an exposition, keyed by (sample name, labels), parsed by prometheus-client itself."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = s.value
    return samples


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def scrape(url: str) -> tuple[str, Samples]:
    status, headers, body = http_get(url)
    assert status == 200, (status, body[:300])
    assert headers.get("Content-Type", "").startswith("text/plain"), headers
    text = body.decode()
    return text, parse_metrics(text)


def scrape_settled(url: str, requests: int, timeout: float = 5.0) -> tuple[str, Samples]:
    """/metrics once `requests` audio requests have been recorded. A request is recorded just after its
    response went out (the meter may still be measuring the audio), so a client can scrape before it."""
    deadline = time.monotonic() + timeout
    while True:
        text, samples = scrape(url)
        done = sum(v for (n, labels), v in samples.items()
                   if n == "gateway_requests_total" and dict(labels)["endpoint"].startswith("/v1/audio/"))
        if done >= requests:
            return text, samples
        if time.monotonic() > deadline:
            raise AssertionError(f"/metrics shows {done} audio requests, expected {requests}")
        time.sleep(0.02)


def total(samples: Samples, name: str, **match: str) -> float:
    """The sum of `name` over samples whose labels include `match`."""
    return sum(v for (n, labels), v in samples.items()
               if n == name and all((k, val) in labels for k, val in match.items()))


def per_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    """`sum by (label) (name)`."""
    out: dict[str, float] = {}
    for (n, labels), v in samples.items():
        if n == name:
            key = dict(labels)[label]
            out[key] = out.get(key, 0.0) + v
    return out


def label_sets(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for (n, labels) in samples if n == name]


def read_ledger(path: Path | Iterable[Path]) -> list[dict[str, Any]]:
    paths = [path] if isinstance(path, Path) else list(path)
    records = []
    for p in paths:
        if p.exists():
            for line in p.read_text(encoding="utf-8").splitlines():
                records.append(json.loads(line))
    return records


def wait_ledger(path: Path, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The ledger once it holds at least `count` records (it is written by a background thread);
    then a short grace period to catch any extra (duplicate) record."""
    deadline = time.monotonic() + timeout
    while True:
        records = read_ledger(path)
        if len(records) >= count:
            time.sleep(0.2)
            return read_ledger(path)
        if time.monotonic() > deadline:
            raise AssertionError(f"ledger has {len(records)} records, expected {count}: {records}")
        time.sleep(0.02)


def make_wav(seconds: float, rate: int = 16_000) -> bytes:
    """A mono 16-bit WAV of exactly `seconds` (a quiet ramp, not silence)."""
    n = round(seconds * rate)
    return wav_bytes(bytes((i * 7) % 256 for i in range(n * 2)), rate)
