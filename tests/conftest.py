"""Fixtures: the gateway and engine doubles on real loopback ports, driven by the official SDK.

The gateway and the doubles run in one background thread with its own event loop (`servers`), so
tests can use both the sync and the async `openai` clients exactly as applications do, and can
still look inside that loop (tasks, connections) through `servers.run(...)`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
import textwrap
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import openai
import pytest
from aiohttp import web

from gateway.adapters import ADAPTERS
from gateway.app import build_app
from gateway.config import Config, parse_config
from gateway.connections import make_runner
from tests.fakes.openai_engine import FakeOpenAIEngine

if TYPE_CHECKING:
    from tests.process import GatewayProcess  # which imports this module

T = TypeVar("T")
DEMO_KEY = "sk-test-demo-0123456789"
BETA_KEY = "sk-test-beta-9876543210"
ENGINE_KEY = "engine-secret-abc"
LOOPBACK_TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
"""One TLS context, with no CA loaded, for every test client: they all speak plain HTTP to loopback, and a
client of its own default context loads the system's CA bundle each time (about 25 ms, 15 s of a run)."""


class ServerThread:
    """An event loop in a thread, for servers under test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="servers", daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable[T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def call(self, fn: Callable[[], T]) -> T:
        async def wrapper() -> T:
            return fn()
        return self.run(wrapper())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="session")
def servers() -> Iterator[ServerThread]:
    st = ServerThread()
    yield st
    st.close()


@dataclass
class Gateway:
    runner: web.AppRunner
    app: web.Application
    port: int
    spool_dir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"


async def start_gateway(config_text: str, spool_dir: Path) -> Gateway:
    config = parse_config(config_text, kinds=ADAPTERS.keys())
    if "probe_interval_s" not in config_text:  # background probes would land in the doubles' request records
        config = replace(config, server=replace(config.server, probe_interval_s=0.0))
    return await serve_app(build_app(config), config, spool_dir)


async def serve_app(app: web.Application, config: Config, spool_dir: Path) -> Gateway:
    """`app`, built from `config`, on a loopback port behind the gateway's own runner (gateway.connections)."""
    runner = make_runner(app, config.server, shutdown_timeout=2)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return Gateway(runner, app, runner.addresses[0][1], spool_dir)


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def server_yaml(spool_dir: Path) -> str:
    """The `server:` section and the demo key every test table starts with (8-space indented, for dedent)."""
    return f"""
        server:
          max_upload_bytes: 2000000
          spool_memory_bytes: 65536
          spool_dir: {spool_dir}
          cors_origins: ["https://app.example"]
        keys:
          - {{name: demo, tenant: acme, sha256: "{sha(DEMO_KEY)}"}}"""


def engine_config(engine_url: str, spool_dir: Path, extra: str = "") -> str:
    """The default test table: one OpenAI-compatible backend, two tenants."""
    return textwrap.dedent(server_yaml(spool_dir) + f"""
          - {{name: beta, tenant: beta, key: "{BETA_KEY}", models: [tts-1]}}
        backends:
          speaches:
            kind: openai
            url: "{engine_url}"
            api_key: "{ENGINE_KEY}"
            timeout_s: 2
            connect_timeout_s: 1
        models:
          tts-1: {{task: speech, routes: [{{backend: speaches, model: kokoro}}]}}
          tts-1-hd: {{task: speech, routes: [{{backend: speaches, model: kokoro-hd}}]}}
          whisper-1: {{task: transcription, routes: [{{backend: speaches, model: Systran/faster-whisper-small}}]}}
        voices:
          nova: {{speaches: af_nova}}
          alloy: {{speaches: af_alloy}}
    """) + extra


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real three-node Redis Cluster for the session (tests/redis_cluster.py `Cluster`); skips without
    redis-server."""
    from tests.redis_cluster import MISSING, running_cluster  # it imports tests.support, which imports this

    if MISSING:
        pytest.skip(MISSING)
    with running_cluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


def running_engine(servers: ServerThread) -> Iterator[FakeOpenAIEngine]:
    """An OpenAI-compatible engine double on a loopback port, for as long as the fixture lives."""
    eng = FakeOpenAIEngine()
    servers.run(eng.start())
    yield eng
    servers.run(eng.stop())


@pytest.fixture
def engine(servers: ServerThread) -> Iterator[FakeOpenAIEngine]:
    yield from running_engine(servers)


@pytest.fixture
def second(servers: ServerThread) -> Iterator[FakeOpenAIEngine]:
    """Another engine double, for a model's second route."""
    yield from running_engine(servers)


@pytest.fixture
def third(servers: ServerThread) -> Iterator[FakeOpenAIEngine]:
    yield from running_engine(servers)


@pytest.fixture
def make_gateway(servers: ServerThread, tmp_path: Path) -> Iterator[Callable[[str], Gateway]]:
    started: list[Gateway] = []

    def make(config_text: str) -> Gateway:
        gw = servers.run(start_gateway(config_text, tmp_path / "spool"))
        started.append(gw)
        return gw

    (tmp_path / "spool").mkdir()
    yield make
    for gw in started:
        servers.run(gw.runner.cleanup())


@pytest.fixture
def gateway(make_gateway: Callable[[str], Gateway], engine: FakeOpenAIEngine, tmp_path: Path) -> Gateway:
    return make_gateway(engine_config(engine.url, tmp_path / "spool"))


def sdk(target: Gateway | str, key: str = DEMO_KEY, **options: Any) -> openai.OpenAI:
    """The official client for a gateway (or a base URL): the demo key, no retries, a 20 s timeout."""
    base_url = target.base_url if isinstance(target, Gateway) else target
    options = {"max_retries": 0, "timeout": 20, **options}
    options.setdefault("http_client", openai.DefaultHttpxClient(verify=LOOPBACK_TLS))
    return openai.OpenAI(base_url=base_url, api_key=key, **options)


@pytest.fixture
def client(gateway: Gateway) -> Iterator[openai.OpenAI]:
    with sdk(gateway) as c:
        yield c


@pytest.fixture
async def aclient(gateway: Gateway) -> Any:
    async with openai.AsyncOpenAI(base_url=gateway.base_url, api_key=DEMO_KEY, max_retries=0, timeout=20,
                                  http_client=openai.DefaultAsyncHttpxClient(verify=LOOPBACK_TLS)) as c:
        yield c


def open_fds_matching(fragment: str) -> list[str]:
    """This process's open file descriptors whose target contains `fragment` (temp spool files)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if fragment in target:
            found.append(target)
    return found


@pytest.fixture
def stopping() -> Iterator[list[GatewayProcess]]:
    """Gateway processes a test started (tests/process.py): stopped when it ends, whatever happened."""
    started: list[GatewayProcess] = []
    yield started
    for gw in started:
        gw.stop()
