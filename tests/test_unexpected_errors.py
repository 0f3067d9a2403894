"""A failure nobody planned for: a 500 in OpenAI's shape that names the request id, never the traceback."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from aiohttp import web

from gateway.adapters import ADAPTERS
from gateway.app import build_app
from gateway.config import parse_config
from tests.conftest import ServerThread, engine_config, sdk, serve_app


async def explode(request: web.Request) -> web.Response:
    raise RuntimeError("internal detail: http://10.1.2.3:8000/v1 with key engine-secret-abc")


@pytest.fixture
def gateway_url(servers: ServerThread, tmp_path: Path) -> Iterator[str]:
    """The real app with one extra route, mounted behind the same middleware list, whose handler fails."""
    config = parse_config(engine_config("http://127.0.0.1:9/v1", tmp_path), kinds=ADAPTERS.keys())
    app = build_app(config)
    app.router.add_post("/v1/audio/explode", explode)

    gateway = servers.run(serve_app(app, config, tmp_path))
    yield gateway.base_url
    servers.run(gateway.runner.cleanup())


def test_unexpected_exception_is_a_clean_500(gateway_url: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="gateway"), \
            sdk(gateway_url) as client, \
            pytest.raises(openai.InternalServerError) as info:
        client.post("/audio/explode", cast_to=object, body={})
    response = info.value.response
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "server_error"
    request_id = response.headers["x-request-id"]
    assert request_id in body["error"]["message"]
    for leak in ("Traceback", "RuntimeError", "10.1.2.3", "engine-secret-abc", "internal detail"):
        assert leak not in response.text
    assert "RuntimeError: internal detail" in caplog.text  # the traceback is in the log, with the id
    assert request_id in caplog.text
