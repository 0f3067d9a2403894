"""Backend health (gateway/health.py): probed in the background, /readyz answered from memory.

A backend that accepts connections and never answers must not slow /readyz nor take the pod out of the
Service; it shows down once the probe timeout has passed, whatever its request timeouts. Draining is
the one thing that makes /readyz fail. `gateway_backend_up` follows the background probes with no
/readyz request at all, and a reload has the new table probed at once.
"""

from __future__ import annotations

import asyncio
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2 as httpx
import pytest
from aiohttp import web

from gateway.app import build_app
from gateway.config import parse_config
from gateway.state import DRAINING, RELOADER
from tests.adapters.common import serve
from tests.conftest import ENGINE_KEY, LOOPBACK_TLS, Gateway, ServerThread, serve_app, server_yaml
from tests.fakes.openai_engine import FakeOpenAIEngine
from tests.metering_support import scrape
from tests.support import wait_for


class SilentBackend:
    """Accepts TCP connections, reads what comes, never answers a byte."""

    def __init__(self) -> None:
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.url = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        while await reader.read(65536):
            pass

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/v1"

    async def stop(self) -> None:
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


@pytest.fixture
def silent(servers: ServerThread) -> Iterator[SilentBackend]:
    yield from serve(servers, SilentBackend())


def health_config(spool_dir: Path, backends: dict[str, str], *, interval: float = 0.2, timeout: float = 0.3) -> str:
    """Each backend (name -> url) with request timeouts far longer than the probe's, and one model routed
    to it alone (`tts-<name>`), plus `tts-any` routed to all of them in order."""
    server = server_yaml(spool_dir).replace(
        "server:\n", f"server:\n          probe_interval_s: {interval}\n          probe_timeout_s: {timeout}\n", 1)
    backend_yaml = "".join(f"""
          {name}: {{kind: openai, url: "{url}", api_key: "{ENGINE_KEY}", timeout_s: 60, connect_timeout_s: 30}}"""
                           for name, url in backends.items())
    model_yaml = "".join(f"""
          tts-{name}: {{task: speech, routes: [{{backend: {name}, model: kokoro}}]}}""" for name in backends)
    every = ", ".join(f"{{backend: {name}, model: kokoro}}" for name in backends)
    return textwrap.dedent(server + f"""
        backends:{backend_yaml}
        models:{model_yaml}
          tts-any: {{task: speech, routes: [{every}]}}
    """)


HTTP = httpx.Client(verify=LOOPBACK_TLS, timeout=5)
"""One keep-alive client, so that a timing is /readyz's and not a new connection's."""


def readyz(gateway: Gateway) -> tuple[int, dict[str, object], float]:
    started = time.monotonic()
    response = HTTP.get(f"{gateway.url}/readyz")
    return response.status_code, response.json(), time.monotonic() - started


def test_a_backend_that_never_answers_neither_slows_readyz_nor_unreadies_the_pod(
        make_gateway: Callable[[str], Gateway], engine: FakeOpenAIEngine, silent: SilentBackend,
        tmp_path: Path) -> None:
    gateway = make_gateway(health_config(tmp_path / "spool", {"silent": silent.url, "speaches": engine.url}))
    HTTP.get(f"{gateway.url}/healthz")  # connected
    status, body, took = readyz(gateway)  # the first probes are in flight right now
    assert body["backends"]["silent"] == "unknown", body  # probed, not answered yet
    assert status == 200 and body["status"] == "ready", body
    assert took < 0.1, f"/readyz took {took * 1000:.0f} ms"
    wait_for(lambda: readyz(gateway)[1]["backends"] == {"silent": "down", "speaches": "up"}, timeout=3,
             what="the silent backend to show down")
    assert silent.connections >= 1  # it was probed: connected to, and never answered
    for _ in range(20):
        status, body, took = readyz(gateway)
        assert status == 200 and body["status"] == "ready", body
        assert took < 0.1, f"/readyz took {took * 1000:.0f} ms"
    assert body["unroutable_models"] == ["tts-silent"]  # reported, not fatal; tts-any fails over
    ages = body["probe_age_s"]
    assert isinstance(ages, dict) and set(ages) == {"silent", "speaches"}
    assert all(isinstance(age, float) and 0 <= age < 2 for age in ages.values()), ages
    assert "127.0.0.1" not in str(body)


def test_down_after_the_probe_timeout_not_the_request_timeouts(
        make_gateway: Callable[[str], Gateway], silent: SilentBackend, tmp_path: Path) -> None:
    """connect_timeout_s is 30 s and timeout_s 60 s; probe_timeout_s 0.3 s decides."""
    gateway = make_gateway(health_config(tmp_path / "spool", {"silent": silent.url}, interval=30, timeout=0.3))
    started = time.monotonic()
    wait_for(lambda: readyz(gateway)[1]["backends"] == {"silent": "down"}, timeout=3, what="silent down")
    assert 0.25 < time.monotonic() - started < 2.0


def test_draining_is_what_makes_readyz_fail(servers: ServerThread, make_gateway: Callable[[str], Gateway],
                                            engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    gateway = make_gateway(health_config(tmp_path / "spool", {"speaches": engine.url}))
    assert readyz(gateway)[0] == 200
    servers.call(gateway.app[DRAINING].set)
    status, body, took = readyz(gateway)
    assert status == 503 and body["status"] == "draining", body
    assert took < 0.1
    assert httpx.get(f"{gateway.url}/healthz", verify=LOOPBACK_TLS).status_code == 200  # alive, just leaving


def _backend_up(gateway: Gateway) -> dict[str, float]:
    _, samples = scrape(f"{gateway.url}/metrics")
    return {dict(labels)["backend"]: value for (name, labels), value in samples.items() if name == "gateway_backend_up"}


def test_backend_up_follows_the_background_probes_without_any_readyz(
        make_gateway: Callable[[str], Gateway], engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    gateway = make_gateway(health_config(tmp_path / "spool", {"speaches": engine.url}, interval=0.1))
    wait_for(lambda: _backend_up(gateway) == {"speaches": 1.0}, timeout=3, what="speaches up")
    engine.mode = "500"
    wait_for(lambda: _backend_up(gateway) == {"speaches": 0.0}, timeout=3, what="speaches down")
    engine.mode = "ok"
    wait_for(lambda: _backend_up(gateway) == {"speaches": 1.0}, timeout=3, what="speaches up again")
    probes = [r for r in engine.requests if r.path == "/v1/models"]
    assert len(probes) >= 3
    assert all(r.method == "GET" for r in engine.requests), "a probe must never bill"


def test_probe_interval_zero_probes_nothing(make_gateway: Callable[[str], Gateway], engine: FakeOpenAIEngine,
                                            tmp_path: Path) -> None:
    gateway = make_gateway(health_config(tmp_path / "spool", {"speaches": engine.url}, interval=0))
    time.sleep(0.3)
    status, body, _ = readyz(gateway)
    assert status == 200 and body["backends"] == {"speaches": "unknown"}
    assert body["probe_age_s"] == {"speaches": None} and body["unroutable_models"] == []
    assert engine.requests == []
    assert _backend_up(gateway) == {}


def write_config(directory: Path, text: str) -> Path:
    path = directory / "gateway.yaml"
    path.write_text(text.replace("server:\n", "server:\n  reload_interval_s: 0\n", 1))
    return path


@pytest.fixture
def file_gateway(servers: ServerThread, tmp_path: Path) -> Iterator[Callable[[str], Gateway]]:
    """A gateway built from a config file, so that it has its reloader (the file is not watched)."""
    runners: list[web.AppRunner] = []

    async def start(text: str) -> Gateway:
        path = write_config(tmp_path, text)
        config = parse_config(path.read_text(), source=str(path))
        gateway = await serve_app(build_app(config), config, tmp_path / "spool")
        runners.append(gateway.runner)
        return gateway

    (tmp_path / "spool").mkdir()
    yield lambda text: servers.run(start(text))
    for runner in runners:
        servers.run(runner.cleanup())


def test_a_reload_has_the_new_table_probed_at_once(servers: ServerThread, file_gateway: Callable[[str], Gateway],
                                                   engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    other = FakeOpenAIEngine()
    servers.run(other.start())
    try:
        gateway = file_gateway(health_config(tmp_path / "spool", {"speaches": engine.url}, interval=60))
        wait_for(lambda: readyz(gateway)[1]["backends"] == {"speaches": "up"}, timeout=3, what="first probe")
        write_config(tmp_path, health_config(tmp_path / "spool", {"speaches": engine.url, "other": other.url},
                                             interval=60))

        async def reload() -> bool | None:
            return await gateway.app[RELOADER].reload("test")

        assert servers.run(reload()) is True
        # the next probe round would be a minute away: this one is the reload's
        wait_for(lambda: readyz(gateway)[1]["backends"] == {"speaches": "up", "other": "up"}, timeout=3,
                 what="the new backend probed")
        assert [r.path for r in other.requests] == ["/v1/models"]
        assert _backend_up(gateway) == {"speaches": 1.0, "other": 1.0}
        write_config(tmp_path, health_config(tmp_path / "spool", {"other": other.url}, interval=60))
        assert servers.run(reload()) is True
        wait_for(lambda: _backend_up(gateway) == {"other": 1.0}, timeout=3, what="speaches forgotten")
        assert readyz(gateway)[1]["backends"] == {"other": "up"}
    finally:
        servers.run(other.stop())

