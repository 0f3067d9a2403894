"""A real Prometheus server scrapes the gateway on loopback, and its PromQL answers match the gateway's /metrics.

Needs the `prometheus` binary (Debian: `apt-get install prometheus`; CI installs it). Prometheus runs as a
subprocess with a generated config (1 s scrape interval), its own TSDB directory and a free loopback port, and
is killed in teardown.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import textwrap
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest

from tests.conftest import BETA_KEY, DEMO_KEY, Gateway
from tests.fakes.openai_engine import FakeOpenAIEngine
from tests.metering_support import http_get, make_wav, metered_config, per_label, scrape_settled
from tests.support import free_port

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="the `prometheus` binary is not on PATH "
                                "(apt-get install prometheus); .ci/run installs it")


class Prometheus:
    def __init__(self, base: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = base / "prometheus.yml"
        config.write_text(textwrap.dedent(f"""
            global:
              scrape_interval: 1s
              scrape_timeout: 1s
              evaluation_interval: 1s
            scrape_configs:
              - job_name: gateway
                static_configs:
                  - targets: ["{target}"]
        """))
        self.log = (base / "prometheus.log").open("wb")
        assert PROMETHEUS is not None
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={base / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            cwd=base, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"prometheus exited: {self.output()}"
            try:
                if http_get(self.url + "/-/ready", timeout=1)[0] == 200:
                    return
            except OSError:
                pass
            assert time.monotonic() < deadline, f"prometheus not ready: {self.output()}"
            time.sleep(0.1)

    def query(self, promql: str) -> list[dict[str, object]]:
        status, _, body = http_get(self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "success", answer
        assert answer["data"]["resultType"] == "vector", answer
        return list(answer["data"]["result"])

    def by(self, promql: str, label: str) -> dict[str, float]:
        return {str(r["metric"].get(label, "")): float(r["value"][1])  # type: ignore[index,union-attr]
                for r in self.query(promql)}

    def output(self) -> str:
        self.log.flush()
        return (Path(self.log.name).read_text(errors="replace"))[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


@pytest.fixture
def start_prometheus(tmp_path: Path) -> Iterator[Callable[[str], Prometheus]]:
    started: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        base = tmp_path / f"prometheus{len(started)}"
        base.mkdir()
        prom = Prometheus(base, target)
        started.append(prom)
        return prom

    yield start
    for prom in started:
        prom.stop()


@pytest.mark.parametrize("where", ["api-port", "metrics-port"])
def test_prometheus_scrapes_per_tenant_totals(make_gateway: Callable[[str], Gateway], engine: FakeOpenAIEngine,
                                              tmp_path: Path, start_prometheus: Callable[[str], Prometheus],
                                              where: str) -> None:
    metrics_port = free_port() if where == "metrics-port" else None
    extra = f"metrics: {{port: {metrics_port}}}\n" if metrics_port else ""
    gateway = make_gateway(metered_config(engine.url, tmp_path / "spool", metrics=extra))
    target = f"127.0.0.1:{metrics_port or gateway.port}"
    prom = start_prometheus(target)
    prom.wait_ready()

    acme_texts = ["Scraped by a real Prometheus.", "Twice for acme."]
    beta_texts = ["And once for beta, with more characters."]
    with openai.OpenAI(base_url=gateway.base_url, api_key=DEMO_KEY, max_retries=0) as acme:
        for text in acme_texts:
            acme.audio.speech.create(model="tts-1", voice="nova", input=text, response_format="pcm")
        acme.audio.transcriptions.create(model="whisper-1", file=("a.wav", make_wav(0.75), "audio/wav"))
    with openai.OpenAI(base_url=gateway.base_url, api_key=BETA_KEY, max_retries=0) as beta:
        for text in beta_texts:
            beta.audio.speech.create(model="tts-1", voice="alloy", input=text, response_format="pcm")
        with pytest.raises(openai.NotFoundError):
            beta.audio.speech.create(model="no-such-model", voice="alloy", input="Not billed.")

    _, samples = scrape_settled(f"http://{target}/metrics", 5)
    chars = per_label(samples, "gateway_billable_characters_total", "tenant")
    seconds = per_label(samples, "gateway_billable_audio_seconds_total", "tenant")
    cost = per_label(samples, "gateway_cost_usd_total", "tenant")
    transcript = len(engine.transcript_text)
    assert chars == {"acme": sum(map(len, acme_texts)) + transcript, "beta": sum(map(len, beta_texts))}
    assert set(seconds) == set(cost) == {"acme", "beta"}

    deadline = time.monotonic() + 10
    while True:  # until a scrape after the traffic has landed
        scraped = prom.by("sum by (tenant) (gateway_billable_characters_total)", "tenant")
        if scraped == chars:
            break
        assert time.monotonic() < deadline, f"Prometheus has {scraped}, the gateway {chars}; {prom.output()}"
        time.sleep(0.2)
    assert prom.by("sum by (tenant) (gateway_billable_audio_seconds_total)", "tenant") == pytest.approx(seconds)
    assert prom.by("sum by (tenant) (gateway_cost_usd_total)", "tenant") == pytest.approx(cost)
    assert prom.by('sum by (tenant) (gateway_requests_total{code="404"})', "tenant") == {"beta": 1}
    up = prom.query('up{job="gateway"}')
    assert len(up) == 1 and up[0]["metric"]["instance"] == target and up[0]["value"][1] == "1", up  # type: ignore
    assert prom.by("gateway_build_info", "version")
