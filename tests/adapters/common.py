"""What the adapter tests share: serving an engine double for a fixture, probing audio, a speech stream
that the engine cuts, and the failure checks every HTTP adapter makes (a 5xx or garbage answer is 502, a
hanging engine is 504 and its handler is cancelled).

The SDK client fixture is tests.conftest's `client`: it uses each module's own `gateway` fixture.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, Protocol, TypeVar

import av
import httpx2
import openai
import pytest

from tests.conftest import ENGINE_KEY, Gateway, ServerThread
from tests.fakes.engine import FakeHttpEngine
from tests.support import HANG_TIMEOUT_S, assert_settled, expect_error


class Served(Protocol):
    def start(self) -> Coroutine[Any, Any, None]: ...
    def stop(self) -> Coroutine[Any, Any, None]: ...


E = TypeVar("E", bound=Served)


def serve(servers: ServerThread, engine: E) -> Iterator[E]:
    """For a fixture: `engine` started on the servers' loop, stopped after the test."""
    servers.run(engine.start())
    yield engine
    servers.run(engine.stop())


def probe(data: bytes) -> tuple[str, str, int, float]:
    """(container, codec, sample rate, seconds), decoded with PyAV."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        rate = stream.codec_context.sample_rate
        return container.format.name.split(",")[0], stream.codec_context.name.removesuffix("float"), rate, \
            samples / rate


def speech_until_cut(client: openai.OpenAI, text: str) -> bytes:
    """Stream `text` as pcm from voice nova: the answer starts 200, then breaks; what arrived before the cut."""
    received = b""
    with pytest.raises((httpx2.RemoteProtocolError, httpx2.ReadError)):
        with client.audio.speech.with_streaming_response.create(model="tts-1", voice="nova", input=text,
                                                                response_format="pcm") as response:
            assert response.status_code == 200
            for chunk in response.iter_bytes():
                received += chunk
    return received


def expect_bad_gateway(servers: ServerThread, gateway: Gateway, engine: FakeHttpEngine, call: Callable[[], object],
                       secrets: tuple[str, ...], message: str | None = None) -> None:
    """`call` fails with 502 bad_gateway (its message containing `message`), naming none of `secrets`, and the
    gateway settles."""
    with pytest.raises(openai.InternalServerError) as info:
        call()
    expect_error(info.value, 502, "upstream_error", "bad_gateway", message=message, secrets=secrets)
    assert_settled(servers, gateway, engine)  # type: ignore[arg-type]


def expect_timeout(servers: ServerThread, gateway: Gateway, engine: FakeHttpEngine, call: Callable[[], object]) -> None:
    """`call` to a hanging engine fails with 504 upstream_timeout once the backends' timeout_s (HANG_TIMEOUT_S) is
    waited out, not before; the gateway settles and the engine's handler was cancelled."""
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        call()
    assert time.monotonic() - started >= HANG_TIMEOUT_S  # it waited out the backend's timeout_s
    expect_error(info.value, 504, "upstream_error", "upstream_timeout")
    assert_settled(servers, gateway, engine, timeout=1.0)  # type: ignore[arg-type]
    assert engine.cancelled == 1


def expect_refused_credential(servers: ServerThread, gateway: Gateway, engine: FakeHttpEngine,
                              call: Callable[[], object], backend: str, secrets: tuple[str, ...]) -> None:
    """`call` to an engine refusing the gateway's key fails with a 502 naming `backend` that is not to be
    retried, and the gateway settles."""
    with pytest.raises(openai.InternalServerError) as info:
        call()
    error = expect_error(info.value, 502, "upstream_error", "bad_gateway", secrets=secrets)
    assert error["message"] == f"The gateway's credential for backend '{backend}' was refused."
    assert info.value.response.headers["x-should-retry"] == "false"
    assert_settled(servers, gateway, engine)  # type: ignore[arg-type]


def expect_rate_limited(call: Callable[[], object], retry_after: str, secrets: tuple[str, ...] = ()) -> None:
    """`call` to a rate-limited engine fails with 429, telling the client to retry after `retry_after` s."""
    with pytest.raises(openai.RateLimitError) as info:
        call()
    expect_error(info.value, 429, "requests", "rate_limit_exceeded", secrets=secrets)
    assert info.value.response.headers["Retry-After"] == retry_after


def expect_rejected(call: Callable[[], object], backend: str, message: str) -> None:
    """`call` that `backend` rejects fails with 400 carrying the engine's `message`."""
    with pytest.raises(openai.BadRequestError) as info:
        call()
    error = expect_error(info.value, 400, "invalid_request_error", None, secrets=(ENGINE_KEY,))
    assert error["message"] == f"Backend '{backend}' rejected the request: {message}"
