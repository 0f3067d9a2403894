"""Shared checks for the gateway's error, auth, upstream-failure and disconnect tests.

`expect_error` asserts the exact OpenAI error shape; `assert_settled` waits until a gateway holds
no spool file, no upstream connection and no engine handler any more.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import socket
import textwrap
import time
import wave
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import openai

from gateway.state import HEALTH, TABLES
from tests.conftest import BETA_KEY, DEMO_KEY, ENGINE_KEY, Gateway, ServerThread, open_fds_matching, server_yaml
from tests.fakes.openai_engine import FakeOpenAIEngine

ERROR_KEYS = {"message", "type", "param", "code"}
SPOOL_PREFIX = "gateway-upload-"
def wav_bytes(pcm: bytes, rate: int = 16_000) -> bytes:
    """16-bit mono PCM in a WAV file."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return buf.getvalue()


def words(text: str) -> list[str]:
    """A transcript's words, lower case, without punctuation (what a word error rate compares)."""
    return re.findall(r"[a-z']+", text.lower())


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate: (substitutions + deletions + insertions) / reference words, by edit distance."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        diagonal, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (r != h))
    return row[-1] / len(ref)


WAV = wav_bytes(bytes(range(256)) * 25)
"""A small WAV file (its exact bytes are checked on the engine side)."""


def check_error(status: int, headers: Mapping[str, str], body: bytes, *, expected_status: int, type_: str,
                code: str | None, param: str | None = None, message: str | None = None,
                secrets: tuple[str, ...] = ()) -> dict[str, Any]:
    """The body is exactly OpenAI's error shape, with these values; returns the inner error."""
    text = body.decode("utf-8", errors="replace")
    assert status == expected_status, f"status {status}, body {text}"
    assert headers.get("Content-Type", "").startswith("application/json"), headers.get("Content-Type")
    assert headers.get("x-request-id"), "error response without x-request-id"
    parsed = json.loads(body)
    assert set(parsed) == {"error"}, parsed
    error = parsed["error"]
    assert set(error) == ERROR_KEYS, error
    assert isinstance(error["message"], str) and error["message"], error
    assert (error["type"], error["code"], error["param"]) == (type_, code, param), error
    if message is not None:
        assert message in error["message"], error["message"]
    assert_clean(text, secrets)
    return dict(error)


def expect_error(exc: openai.APIStatusError, status: int, type_: str, code: str | None,
                 param: str | None = None, message: str | None = None,
                 secrets: tuple[str, ...] = ()) -> dict[str, Any]:
    """An SDK status error: check the wire body and that the SDK read it (request id included)."""
    response = exc.response
    error = check_error(response.status_code, response.headers, response.content, expected_status=status,
                        type_=type_, code=code, param=param, message=message, secrets=secrets)
    assert exc.request_id == response.headers["x-request-id"]
    assert exc.code == code and exc.param == param and exc.type == type_
    return error


def assert_clean(text: str, secrets: tuple[str, ...] = ()) -> None:
    """No internals in anything a client sees: backend address, credentials, tracebacks."""
    for needle in ("127.0.0.1", "localhost", "http://", ENGINE_KEY, DEMO_KEY, BETA_KEY, "Traceback",
                   'File "', *secrets):
        assert needle not in text, f"{needle!r} leaked in {text!r}"


# -- the gateway's outbound connections and leftovers ----------------------------------------------


def acquired_connections(servers: ServerThread, gateway: Gateway) -> int:
    """Upstream connections the gateway's backend pools (gateway.upstreams) have checked out (in use) right now."""

    async def count() -> int:
        tables = gateway.app.get(TABLES)
        return 0 if tables is None else sum(_acquired(s.connector) for s in tables.upstreams.sessions() if not s.closed)

    return servers.run(count())


def _acquired(connector: Any) -> int:
    acquired = getattr(connector, "_acquired", None)
    if acquired is None:  # a future aiohttp without the private set: count per host instead
        return sum(len(v) for v in getattr(connector, "_acquired_per_host", {}).values())
    return len(acquired)


def probe_backends(servers: ServerThread, gateway: Gateway) -> None:
    """One round of the gateway's background backend probes, now (test gateways do not probe on their own
    unless their config sets server.probe_interval_s)."""
    servers.run(gateway.app[HEALTH].probe())


def spool_fds(gateway: Gateway) -> list[str]:
    """Open spool files. Linux's O_TMPFILE gives a temp file no name (the fd reads `<dir>/#1234 (deleted)`),
    so the file prefix alone finds nothing there; the gateway's own spool directory does."""
    return sorted(set(open_fds_matching(SPOOL_PREFIX)) | set(open_fds_matching(f"{gateway.spool_dir}/")))


def assert_settled(servers: ServerThread, gateway: Gateway, *engines: FakeOpenAIEngine,
                   timeout: float = 2.0) -> None:
    """Within `timeout`: no spool file open, no engine handler running, no upstream connection in use."""
    deadline = time.monotonic() + timeout
    while True:
        state = {"spool_fds": spool_fds(gateway),
                 "engine_active": [e.active for e in engines if e.active],
                 "acquired": acquired_connections(servers, gateway)}
        if not state["spool_fds"] and not state["engine_active"] and not state["acquired"]:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"gateway did not settle: {state}")
        time.sleep(0.02)


def loop_tasks(servers: ServerThread) -> set[asyncio.Task[Any]]:
    """Every task in the servers' loop (not counting the one this inspection runs in)."""

    async def snapshot() -> set[asyncio.Task[Any]]:
        me = asyncio.current_task()
        return {t for t in asyncio.all_tasks() if t is not me and not t.done()}

    return servers.run(snapshot())


def wait_for(predicate: Callable[[], bool], timeout: float = 2.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def table_config(backends: dict[str, str], models: dict[str, tuple[str, list[tuple[str, str]]]],
                 spool_dir: Path, voices: str = "") -> str:
    """A full config (the shape of conftest.engine_config) with several backends and routes.

    backends: name -> base URL; models: public name -> (task, [(backend, native model), ...]).
    """
    backend_yaml = "".join(
        f"""
          {name}:
            kind: openai
            url: "{url}"
            api_key: "{ENGINE_KEY}"
            timeout_s: 2
            connect_timeout_s: 1""" for name, url in backends.items())
    model_yaml = "".join(
        "\n          " + name + ": {task: " + task + ", routes: ["
        + ", ".join("{backend: " + b + ", model: " + m + "}" for b, m in routes) + "]}"
        for name, (task, routes) in models.items())
    return textwrap.dedent(server_yaml(spool_dir) + f"""
        backends:{backend_yaml}
        models:{model_yaml}
    """) + textwrap.dedent(voices)


HANG_TIMEOUT_S = 0.3
"""The backends' read timeout in hang tests: what they wait for is the timeout itself, so keep it short."""


def quick_timeouts(config_text: str, seconds: float = HANG_TIMEOUT_S) -> str:
    """`config_text` with every backend's `timeout_s` (not `connect_timeout_s`) set to `seconds`."""
    changed, count = re.subn(r"(?<!connect_)timeout_s: [0-9.]+", f"timeout_s: {seconds}", config_text)
    assert count, "no timeout_s in the config"
    return changed

