"""A real Prometheus server scrapes the gateway on loopback, and its PromQL answers match the gateway's /metrics.

Needs the `prometheus` binary (Debian: `apt-get install prometheus`; CI installs it). Prometheus runs as a
subprocess with a generated config (a 250 ms scrape interval), its own TSDB directory and a free loopback port, and
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

from tests.conftest import BETA_KEY, Gateway, sdk
from tests.fakes.openai_engine import FakeOpenAIEngine
from tests.metering_support import http_get, make_wav, metered_config, per_label, scrape_settled
from tests.support import free_port

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="the `prometheus` binary is not on PATH "
                                "(apt-get install prometheus); .ci/run installs it")


class Prometheus:
    def __init__(self, base: Path, targets: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = base / "prometheus.yml"
        config.write_text(textwrap.dedent(f"""
            global:
              scrape_interval: 250ms
              scrape_timeout: 250ms
              evaluation_interval: 250ms
            scrape_configs:
              - job_name: gateway
                static_configs:
                  - targets: {json.dumps(targets)}
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
def prometheus(tmp_path: Path) -> Iterator[Callable[[list[str]], Prometheus]]:
    started: list[Prometheus] = []

    def start(targets: list[str]) -> Prometheus:
        prom = Prometheus(tmp_path, targets)
        started.append(prom)
        prom.wait_ready()
        return prom

    yield start
    for prom in started:
        prom.stop()


def test_prometheus_scrapes_per_tenant_totals(make_gateway: Callable[[str], Gateway], engine: FakeOpenAIEngine,
                                              tmp_path: Path, prometheus: Callable[[list[str]], Prometheus]) -> None:
    """Two gateways, one serving /metrics on its API port and one on a port of its own (`metrics.port`),
    scraped by one Prometheus (version 2 waits 5 s before its first scrape)."""
    metrics_port = free_port()
    on_api = make_gateway(metered_config(engine.url, tmp_path / "spool"))
    own_port = f"metrics: {{port: {metrics_port}}}\n"
    on_own = make_gateway(metered_config(engine.url, tmp_path / "spool", metrics=own_port))
    gateways = {f"127.0.0.1:{on_api.port}": on_api, f"127.0.0.1:{metrics_port}": on_own}
    prom = prometheus(list(gateways))

    acme_texts = ["Scraped by a real Prometheus.", "Twice for acme."]
    beta_texts = ["And once for beta, with more characters."]
    expected: dict[str, tuple[dict[str, float], ...]] = {}
    for target, gateway in gateways.items():
        with sdk(gateway) as acme:
            for text in acme_texts:
                acme.audio.speech.create(model="tts-1", voice="nova", input=text, response_format="pcm")
            acme.audio.transcriptions.create(model="whisper-1", file=("a.wav", make_wav(0.75), "audio/wav"))
        with sdk(gateway, BETA_KEY) as beta:
            for text in beta_texts:
                beta.audio.speech.create(model="tts-1", voice="alloy", input=text, response_format="pcm")
            with pytest.raises(openai.NotFoundError):
                beta.audio.speech.create(model="no-such-model", voice="alloy", input="Not billed.")
        _, samples = scrape_settled(f"http://{target}/metrics", 5)
        expected[target] = tuple(per_label(samples, f"gateway_{name}_total", "tenant")
                                 for name in ("billable_characters", "billable_audio_seconds", "cost_usd"))
        chars, seconds, cost = expected[target]
        assert chars == {"acme": sum(map(len, acme_texts)) + len(engine.transcript_text),
                         "beta": sum(map(len, beta_texts))}
        assert set(seconds) == set(cost) == {"acme", "beta"}

    for target, (chars, seconds, cost) in expected.items():
        def scraped(family: str, labels: str = "", target: str = target) -> dict[str, float]:
            return prom.by(f'sum by (tenant) ({family}{{instance="{target}"{labels}}})', "tenant")

        deadline = time.monotonic() + 15
        while (now := scraped("gateway_billable_characters_total")) != chars:  # a scrape after the traffic
            assert time.monotonic() < deadline, f"{target}: Prometheus has {now}, the gateway {chars}; {prom.output()}"
            time.sleep(0.2)
        assert scraped("gateway_billable_audio_seconds_total") == pytest.approx(seconds)
        assert scraped("gateway_cost_usd_total") == pytest.approx(cost)
        assert scraped("gateway_requests_total", ',code="404"') == {"beta": 1}
    up = {r["metric"]["instance"]: r["value"][1] for r in prom.query('up{job="gateway"}')}  # type: ignore[index]
    assert up == dict.fromkeys(gateways, "1")
    assert len(prom.by("gateway_build_info", "instance")) == 2
