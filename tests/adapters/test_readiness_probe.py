"""The readiness probe of an `openai` backend (gateway/adapters/readiness_probe.py), seen on /readyz.

By default OpenAI's `GET <url>/models` must answer 200: a 404 (a server without the route, as
faster-whisper-server), a 401 or a 500 is "down". `probe: {path, method, up}` changes what is asked and
what counts as up; the path stays on the backend's host, redirects are not followed, and the method is
GET or HEAD only, so a probe never bills. Bad values are refused by YAML path (check-config).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2 as httpx
import pytest
from aiohttp import web

from tests.adapters.common import serve
from tests.conftest import Gateway, ServerThread, server_yaml
from tests.support import wait_for


class StatusServer:
    """Answers every request with `status` (and `location` for a 3xx), recording (method, path)."""

    def __init__(self) -> None:
        self.status = 200
        self.location = ""
        self.seen: list[tuple[str, str]] = []
        self.runner: web.AppRunner | None = None
        self.root = ""

    async def _any(self, request: web.Request) -> web.Response:
        self.seen.append((request.method, request.path_qs))
        headers = {"Location": self.location} if self.location else None
        return web.Response(status=self.status, text="{}", content_type="application/json", headers=headers)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._any)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.root = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
def backend(servers: ServerThread) -> Iterator[StatusServer]:
    yield from serve(servers, StatusServer())


@pytest.fixture
def other(servers: ServerThread) -> Iterator[StatusServer]:
    yield from serve(servers, StatusServer())


def probed(spool_dir: Path, url: str, probe: str = "") -> str:
    """One `openai` backend at `url` (with `probe`, a YAML flow mapping, if given), probed every 50 ms."""
    server = server_yaml(spool_dir).replace("server:\n", "server:\n          probe_interval_s: 0.05\n", 1)
    block = f", probe: {probe}" if probe else ""
    return textwrap.dedent(server + f"""
        backends:
          b: {{kind: openai, url: "{url}", timeout_s: 5, connect_timeout_s: 1{block}}}
        models:
          tts-1: {{task: speech, routes: [{{backend: b, model: kokoro}}]}}
    """)


def shows(gateway: Gateway, state: str) -> None:
    wait_for(lambda: httpx.get(f"{gateway.url}/readyz").json()["backends"] == {"b": state}, timeout=3,
             what=f"backend b {state} on /readyz")


def test_default_is_get_models_answering_200(make_gateway: Callable[[str], Gateway], backend: StatusServer,
                                             tmp_path: Path) -> None:
    gateway = make_gateway(probed(tmp_path / "spool", f"{backend.root}/v1"))
    shows(gateway, "up")
    for status in (404, 401, 429, 500, 204):  # below 500 used to count as up: a 404 is a server without the route
        backend.status = status
        shows(gateway, "down")
        backend.status = 200
        shows(gateway, "up")
    assert set(backend.seen) == {("GET", "/v1/models")}, "the probe asks OpenAI's list of models, and nothing else"


def test_configured_path_method_and_statuses(make_gateway: Callable[[str], Gateway], backend: StatusServer,
                                             tmp_path: Path) -> None:
    """A path with a leading slash is from the server's root (faster-whisper-server's /health sits outside /v1)."""
    probe = "{path: /health, method: head, up: [200, 401]}"
    gateway = make_gateway(probed(tmp_path / "spool", f"{backend.root}/v1", probe))
    backend.status = 401
    shows(gateway, "up")
    backend.status = 404
    shows(gateway, "down")
    backend.status = 200
    shows(gateway, "up")
    assert set(backend.seen) == {("HEAD", "/health")}


def test_a_relative_path_is_under_url(make_gateway: Callable[[str], Gateway], backend: StatusServer,
                                      tmp_path: Path) -> None:
    gateway = make_gateway(probed(tmp_path / "spool", f"{backend.root}/api/v1/", "{path: 'health?deep=1', up: [204]}"))
    backend.status = 200
    shows(gateway, "down")
    backend.status = 204
    shows(gateway, "up")
    assert set(backend.seen) == {("GET", "/api/v1/health?deep=1")}


def test_a_redirect_is_not_followed(make_gateway: Callable[[str], Gateway], backend: StatusServer,
                                   other: StatusServer, tmp_path: Path) -> None:
    """A 3xx is the probe's answer ("down" unless listed): the probe never leaves the backend's host."""
    backend.status, backend.location = 302, f"{other.root}/v1/models"
    gateway = make_gateway(probed(tmp_path / "spool", f"{backend.root}/v1"))
    shows(gateway, "down")
    assert other.seen == []
    gateway = make_gateway(probed(tmp_path / "spool2", f"{backend.root}/v1", "{up: [200, 302]}"))
    shows(gateway, "up")
    assert other.seen == []


HOSTILE = {
    "notmap": ("[GET, /v1/models]", "backends.notmap.probe: expected a mapping with path, method, up"),
    "post": ("{method: POST}", "backends.post.probe.method: expected GET or HEAD, got 'POST' (a probe never"),
    "nomethod": ("{method: 7}", "backends.nomethod.probe.method: expected GET or HEAD, got 7"),
    "uplist": ("{up: 200}", "backends.uplist.probe.up: expected a non-empty list of HTTP statuses"),
    "upempty": ("{up: []}", "backends.upempty.probe.up: expected a non-empty list of HTTP statuses"),
    "uplow": ("{up: [200, 99]}", "backends.uplow.probe.up: expected HTTP statuses from 200 to 599, got 99"),
    "uphigh": ("{up: [600]}", "backends.uphigh.probe.up: expected HTTP statuses from 200 to 599, got 600"),
    "upbool": ("{up: [true]}", "backends.upbool.probe.up: expected HTTP statuses from 200 to 599, got True"),
    "upstr": ("{up: ['200']}", "backends.upstr.probe.up: expected HTTP statuses from 200 to 599, got '200'"),
    "abs": ("{path: 'http://evil.example/v1/models'}", "backends.abs.probe.path: 'http://evil.example/v1/models' "
                                                      "is a URL; the probe stays on the backend's own host"),
    "schemeless": ("{path: '//evil.example/models'}",
                   "backends.schemeless.probe.path: '//evil.example/models' is a URL"),
    "dotdot": ("{path: '../../admin'}", "backends.dotdot.probe.path: '..' is not allowed"),
    "space": ("{path: 'models x'}", "backends.space.probe.path: expected at most 1024 URL path characters"),
    "empty": ("{path: ''}", "backends.empty.probe.path: expected a path"),
    "typo": ("{paht: /health}", "backends.typo.probe.paht: unknown option (known: path, method, up)"),
}


def test_hostile_probe_blocks_are_refused_by_path(tmp_path: Path) -> None:
    backends = "".join(f"""
          {name}: {{kind: openai, url: "http://127.0.0.1:9/v1", probe: {probe}}}"""
                       for name, (probe, _) in HOSTILE.items())
    good = """
          good: {kind: openai, url: "http://127.0.0.1:9/v1", probe: {path: /health, method: HEAD, up: [200, 204]}}"""
    path = tmp_path / "gateway.yaml"
    path.write_text(textwrap.dedent(server_yaml(tmp_path) + f"""
        backends:{backends}{good}
        models:
          tts-1: {{task: speech, routes: [{{backend: good, model: kokoro}}]}}
    """))
    result = subprocess.run([sys.executable, "-m", "gateway", "check-config", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    for _, message in HOSTILE.values():
        assert message in result.stderr, (message, result.stderr)
    assert "backends.good" not in result.stderr
