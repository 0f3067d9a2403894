"""Connections to the backends (gateway/upstreams.py): a pool per backend, capped at its `max_connections`.

Past the cap a request waits for a connection to come free (at most the backend's connect timeout), it is
not refused; the engine double holds each speech request until the test lets it go and counts how many
it holds at once.
"""

from __future__ import annotations

import asyncio
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import aiohttp
import httpx2 as httpx
import pytest
from aiohttp import web

from gateway.adapters import ADAPTERS
from gateway.app import build_app
from gateway.config import DEFAULT_MAX_CONNECTIONS, ConfigError, load_config, parse_config
from gateway.state import RELOADER, TABLES
from tests.adapters.common import serve
from tests.conftest import DEMO_KEY, ENGINE_KEY, LOOPBACK_TLS, Gateway, ServerThread, serve_app, server_yaml
from tests.fakes.engine import RECORDED
from tests.fakes.openai_engine import FakeOpenAIEngine
from tests.support import assert_settled, check_error, wait_for


class GatedEngine(FakeOpenAIEngine):
    """Holds every speech request until `let_one_go`; counts the requests (each on its own connection) it
    holds at once, and the distinct client connections it has seen."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Semaphore(0)
        self.held = 0
        self.peak = 0
        self.arrived = 0
        self.peers: set[object] = set()

    async def _speech(self, request: web.Request) -> web.StreamResponse:
        assert request.transport is not None and request[RECORDED]
        self.peers.add(request.transport.get_extra_info("peername"))
        self.arrived += 1
        self.held += 1
        self.peak = max(self.peak, self.held)
        try:
            await self.gate.acquire()
        finally:
            self.held -= 1
        return await super()._speech(request)

    def let_one_go(self) -> None:
        self.gate.release()


@pytest.fixture
def gated(servers: ServerThread) -> Iterator[GatedEngine]:
    yield from serve(servers, GatedEngine())


def capped_config(spool_dir: Path, backends: dict[str, tuple[str, int]], connect_timeout: float = 5) -> str:
    """name -> (url, max_connections); a speech model `tts-<name>` per backend. No background probes: they
    would take a connection from the pools under test."""
    server = server_yaml(spool_dir).replace("server:\n", "server:\n          probe_interval_s: 0\n", 1)
    backend_yaml = "".join(f"""
          {name}: {{kind: openai, url: "{url}", api_key: "{ENGINE_KEY}", timeout_s: 10,
                   connect_timeout_s: {connect_timeout}, max_connections: {cap}}}"""
        for name, (url, cap) in backends.items())
    model_yaml = "".join(f"""
          tts-{name}: {{task: speech, routes: [{{backend: {name}, model: kokoro}}]}}""" for name in backends)
    return textwrap.dedent(server + f"""
        backends:{backend_yaml}
        models:{model_yaml}
    """)


def speak(gateway: Gateway, model: str) -> httpx.Response:
    return httpx.post(f"{gateway.base_url}/audio/speech", timeout=30, headers={"Authorization": f"Bearer {DEMO_KEY}"},
                      json={"model": model, "input": "Hello there.", "voice": "nova", "response_format": "pcm"},
                      verify=LOOPBACK_TLS)


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(8) as executor:
        yield executor


def test_past_the_cap_a_request_waits_for_a_connection(servers: ServerThread, make_gateway: Callable[[str], Gateway],
                                                       gated: GatedEngine, pool: ThreadPoolExecutor,
                                                       tmp_path: Path) -> None:
    gateway = make_gateway(capped_config(tmp_path / "spool", {"speaches": (gated.url, 2)}))
    calls: list[Future[httpx.Response]] = [pool.submit(speak, gateway, "tts-speaches") for _ in range(3)]
    wait_for(lambda: gated.held == 2, timeout=5, what="two requests at the engine")
    time.sleep(0.3)
    assert gated.arrived == 2, "the third request must wait for a connection"
    assert not any(c.done() for c in calls), "waiting, not refused"
    servers.call(gated.let_one_go)
    wait_for(lambda: gated.arrived == 3, timeout=5, what="the third request at the engine once one finished")
    servers.call(gated.let_one_go)
    servers.call(gated.let_one_go)
    assert [c.result(10).status_code for c in calls] == [200, 200, 200]
    assert gated.peak == 2
    assert len(gated.peers) == 2, "the third request reused the connection that came free"
    assert_settled(servers, gateway, gated)


def test_the_wait_is_bounded_by_the_connect_timeout(servers: ServerThread, make_gateway: Callable[[str], Gateway],
                                                    gated: GatedEngine, pool: ThreadPoolExecutor,
                                                    tmp_path: Path) -> None:
    gateway = make_gateway(capped_config(tmp_path / "spool", {"speaches": (gated.url, 1)}, connect_timeout=0.5))
    first = pool.submit(speak, gateway, "tts-speaches")
    wait_for(lambda: gated.held == 1, timeout=5, what="the first request at the engine")
    started = time.monotonic()
    second = speak(gateway, "tts-speaches")
    waited = time.monotonic() - started
    check_error(second.status_code, second.headers, second.content, expected_status=504, type_="upstream_error",
                code="upstream_timeout")
    assert 0.4 < waited < 3, waited
    assert gated.arrived == 1
    servers.call(gated.let_one_go)
    assert first.result(10).status_code == 200
    assert_settled(servers, gateway, gated)


def test_each_backend_has_a_pool_of_its_own(servers: ServerThread, make_gateway: Callable[[str], Gateway],
                                            gated: GatedEngine, pool: ThreadPoolExecutor, tmp_path: Path) -> None:
    """Two backends on the same engine address: one saturated does not hold up the other."""
    gateway = make_gateway(capped_config(tmp_path / "spool", {"busy": (gated.url, 1), "calm": (gated.url, 1)}))
    busy = pool.submit(speak, gateway, "tts-busy")
    wait_for(lambda: gated.held == 1, timeout=5, what="busy's request at the engine")
    calm = pool.submit(speak, gateway, "tts-calm")
    wait_for(lambda: gated.held == 2, timeout=5, what="calm's request at the engine beside busy's")
    servers.call(gated.let_one_go)
    servers.call(gated.let_one_go)
    assert busy.result(10).status_code == calm.result(10).status_code == 200
    assert_settled(servers, gateway, gated)


def test_max_connections_is_a_backend_field_with_a_default(tmp_path: Path) -> None:
    def backend(fields: str) -> str:
        return textwrap.dedent(f"""
            backends:
              speaches: {{kind: openai, url: "http://engine:8000/v1"{fields}}}
            models:
              tts-1: {{task: speech, routes: [{{backend: speaches}}]}}
        """)

    assert parse_config(backend("")).backends["speaches"].max_connections == DEFAULT_MAX_CONNECTIONS == 64
    assert parse_config(backend(", max_connections: 8")).backends["speaches"].max_connections == 8
    assert parse_config(backend(", max_connections: 8")).backends["speaches"].options == {}  # not a kind option
    for bad in ("0", "-1", "many"):
        with pytest.raises(ConfigError) as info:
            parse_config(backend(f", max_connections: {bad}"))
        assert info.value.problems[0].startswith("backends.speaches.max_connections: expected a number >= 1"), \
            info.value.problems


def test_a_kept_backend_keeps_its_pool_and_a_replaced_one_closes(servers: ServerThread, gated: GatedEngine,
                                                                 pool: ThreadPoolExecutor, tmp_path: Path) -> None:
    """Reload: `calm` is unchanged (same adapter, same pool); `busy` gets a new cap, so a new adapter and pool,
    and its old pool closes once the request still on it has finished."""
    (tmp_path / "spool").mkdir()
    path = tmp_path / "gateway.yaml"

    def write(busy_cap: int) -> None:
        text = capped_config(tmp_path / "spool", {"busy": (gated.url, busy_cap), "calm": (gated.url, 2)})
        path.write_text(text.replace("server:\n", "server:\n  reload_interval_s: 0\n", 1))

    async def start() -> Gateway:
        config = load_config(path, kinds=ADAPTERS.keys())
        return await serve_app(build_app(config), config, tmp_path / "spool")

    def sessions() -> dict[str, aiohttp.ClientSession]:
        """backend -> the pool its current adapter uses (the openai adapter's `http`), one the gateway owns."""
        tables = gateway.app[TABLES]

        def by_backend() -> dict[str, aiohttp.ClientSession]:
            found = {name: a.http for name, a in tables.current.adapters.items()}  # type: ignore[attr-defined]
            assert all(any(s is p for p in tables.upstreams.sessions()) for s in found.values())
            return found
        return servers.call(by_backend)

    write(1)
    gateway = servers.run(start())
    try:
        before = sessions()
        assert before["busy"] is not before["calm"]
        assert before["busy"].connector is not None and before["busy"].connector.limit == 1
        held = pool.submit(speak, gateway, "tts-busy")
        wait_for(lambda: gated.held == 1, timeout=5, what="a request on busy's old pool")
        write(3)
        assert servers.run(gateway.app[RELOADER].reload("test")) is True
        after = sessions()
        assert after["calm"] is before["calm"] and not after["calm"].closed
        assert after["busy"] is not before["busy"] and after["busy"].connector.limit == 3  # type: ignore[union-attr]
        assert not before["busy"].closed, "closed under the request still using it"
        servers.call(gated.let_one_go)
        assert held.result(10).status_code == 200
        wait_for(lambda: before["busy"].closed, timeout=5, what="the replaced pool closed")
    finally:
        servers.run(gateway.runner.cleanup())
    assert all(s.closed for s in (*before.values(), *after.values()))
