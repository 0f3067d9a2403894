"""gateway/realtime/secrets.py: `POST /v1/realtime/client_secrets` minted over real HTTP with the official
SDK's `client.realtime.client_secrets.create`, its OpenAI-shaped 400s for hostile bodies, and `resolve`, which
the realtime endpoint asks about a token: the minting key's identity from the *current* config with the pinned
model, None once expired, once the key is gone (a reload), or while the store is down; a token minted by one
gateway resolved by another on the same Redis.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2
import openai
import pytest
import redis
from aiohttp import web

from gateway.app import build_app
from gateway.config import parse_config
from gateway.realtime.secrets import MAX_BODY, MAX_SESSION, MODEL, Grant, key, resolve
from gateway.state import RELOADER, SHARED_STATE, TABLES
from tests import test_store
from tests.conftest import BETA_KEY, DEMO_KEY, LOOPBACK_TLS, Gateway, ServerThread, engine_config, sdk, serve_app
from tests.fakes.openai_engine import FakeOpenAIEngine
from tests.redis_server import needs_redis
from tests.support import check_error, expect_error, free_port

redis_url = test_store.redis_url
"""A real redis-server for the session (tests/redis_server.py)."""
PINNED = {"type": "transcription", "audio": {"input": {
    "format": {"type": "audio/pcm", "rate": 24000},
    "transcription": {"model": "whisper-1", "language": "fr", "prompt": "Réunion — « ordre du jour »"},
    "turn_detection": None}}}


def with_state(text: str, state: str) -> str:
    return text + f"state: {state}\n"


@pytest.fixture
def gateway(make_gateway: Callable[[str], Gateway], engine: FakeOpenAIEngine, tmp_path: Path) -> Gateway:
    """The default table with its state store in the test's directory."""
    return make_gateway(with_state(engine_config(engine.url, tmp_path / "spool"),
                                   f"{{backend: sqlite, path: {tmp_path / 'state.sqlite3'}}}"))


def granted(servers: ServerThread, gw: Gateway, token: str) -> Grant | None:
    """`resolve` in the gateway's loop, against its current config."""
    return servers.run(resolve(gw.app, gw.app[TABLES].current.config, token))


def post(gw: Gateway, body: bytes, key: str = DEMO_KEY) -> httpx2.Response:
    with httpx2.Client(verify=LOOPBACK_TLS, timeout=10) as http:
        return http.post(gw.base_url + "/realtime/client_secrets", content=body,
                         headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})


def test_the_sdk_mints_a_secret_bound_to_the_key_and_the_pinned_model(
        gateway: Gateway, client: openai.OpenAI, servers: ServerThread, tmp_path: Path) -> None:
    before = time.time()
    raw = client.realtime.client_secrets.with_raw_response.create(
        expires_after={"anchor": "created_at", "seconds": 60}, session=PINNED)  # type: ignore[arg-type]
    assert raw.headers["Cache-Control"] == "no-store"
    created = raw.parse()
    assert re.fullmatch(r"ek_[A-Za-z0-9_-]{32}", created.value), created.value
    assert int(before) + 60 <= created.expires_at <= time.time() + 60
    shown = raw.http_response.json()["session"]
    assert shown["type"] == "transcription" and shown["object"] == "realtime.transcription_session"
    assert re.fullmatch(r"sess_[A-Za-z0-9_-]+", shown["id"]) and shown["expires_at"] == created.expires_at
    assert shown["audio"] == PINNED["audio"], "the pinned fields as given"
    assert created.session.audio.input.transcription.model == "whisper-1"  # type: ignore[union-attr]

    grant = granted(servers, gateway, created.value)
    assert grant is not None
    assert (grant.identity.key_name, grant.identity.tenant) == ("demo", "acme")
    assert grant.identity.models == frozenset({"whisper-1"}), "the demo key may use every model; the token one"
    assert grant.identity.may_use("whisper-1") and not grant.identity.may_use("tts-1")
    assert grant.session == PINNED and grant.expires_at == created.expires_at

    stored = (tmp_path / "state.sqlite3").read_bytes() + b"".join(
        p.read_bytes() for p in tmp_path.glob("state.sqlite3-*"))
    assert created.value.encode() not in stored, "the token itself is never stored"
    assert hashlib.sha256(created.value.encode()).hexdigest().encode() in stored
    second = client.realtime.client_secrets.create(session=PINNED)  # type: ignore[arg-type]
    assert second.value != created.value and granted(servers, gateway, second.value) is not None


def test_a_secret_without_fields_lasts_ten_minutes_and_keeps_the_keys_models(
        gateway: Gateway, client: openai.OpenAI, servers: ServerThread) -> None:
    created = client.realtime.client_secrets.create()
    assert abs(created.expires_at - (time.time() + 600)) <= 2
    assert set(created.session.model_dump(exclude_none=True)) >= {"type", "object", "id", "expires_at"}
    grant = granted(servers, gateway, created.value)
    assert grant is not None and grant.identity.models is None and grant.session is None
    with sdk(gateway, key=BETA_KEY) as beta:
        narrow = granted(servers, gateway, beta.realtime.client_secrets.create().value)
    assert narrow is not None and narrow.identity.models == frozenset({"tts-1"}), "the beta key's own list"


def test_only_a_gateway_key_mints(gateway: Gateway, client: openai.OpenAI) -> None:
    token = client.realtime.client_secrets.create().value
    for wrong in ("sk-not-a-key", token):  # a token cannot mint more tokens
        with sdk(gateway, key=wrong) as other, pytest.raises(openai.AuthenticationError) as exc:
            other.realtime.client_secrets.create()
        expect_error(exc.value, 401, "invalid_request_error", "invalid_api_key", secrets=(wrong,))


def test_resolve_refuses_what_is_not_a_live_token(gateway: Gateway, servers: ServerThread) -> None:
    for token in ("", DEMO_KEY, "ek_" + "A" * 32, "ek_" + "x" * 5000, "sk-" + "A" * 32):
        assert granted(servers, gateway, token) is None


def test_an_expired_secret_resolves_to_nothing(gateway: Gateway, client: openai.OpenAI,
                                                servers: ServerThread) -> None:
    """10 s is the shortest TTL a client may ask for: the minted record is put back with a TTL of 50 ms at the
    store level (its own `put`), so that the store's expiry is what is tested, without waiting 10 s."""
    token = client.realtime.client_secrets.create(expires_after={"anchor": "created_at", "seconds": 10}).value
    assert granted(servers, gateway, token) is not None
    store = gateway.app[SHARED_STATE].store
    record = servers.run(store.get(key(token)))
    assert record is not None and json.loads(record)["key_name"] == "demo"
    servers.run(store.put(key(token), record, 0.05))
    time.sleep(0.1)
    assert granted(servers, gateway, token) is None


BAD_BODIES: list[tuple[bytes, int, str, str | None]] = [
    (b"not json", 400, "invalid_json", None),
    (b"", 400, "invalid_json", None),
    (b"[]", 400, "invalid_type", None),
    (b'"a string"', 400, "invalid_type", None),
    (b'{"expires_after": {"seconds": NaN}}', 400, "invalid_json", None),
    (b'{"expires_after": {"seconds": 1e999}}', 400, "invalid_json", None),
    (b'{"expires_after": {"seconds": 1' + b"0" * 40 + b"}}", 400, "integer_above_max_value", "expires_after.seconds"),
    (b'{"expires_after": {"seconds": 7201}}', 400, "integer_above_max_value", "expires_after.seconds"),
    (b'{"expires_after": {"seconds": 9}}', 400, "integer_below_min_value", "expires_after.seconds"),
    (b'{"expires_after": {"seconds": -600}}', 400, "integer_below_min_value", "expires_after.seconds"),
    (b'{"expires_after": {"seconds": 600.5}}', 400, "invalid_type", "expires_after.seconds"),
    (b'{"expires_after": {"seconds": "600"}}', 400, "invalid_type", "expires_after.seconds"),
    (b'{"expires_after": {"seconds": true}}', 400, "invalid_type", "expires_after.seconds"),
    (b'{"expires_after": {"anchor": "now"}}', 400, "invalid_value", "expires_after.anchor"),
    (b'{"expires_after": {"anchor": null}}', 400, "invalid_value", "expires_after.anchor"),
    (b'{"expires_after": []}', 400, "invalid_type", "expires_after"),
    (b'{"expires_after": {"ttl": 5}}', 400, "unknown_parameter", "expires_after.ttl"),
    (b'{"bogus": 1}', 400, "unknown_parameter", "bogus"),
    (b'{"session": "transcription"}', 400, "invalid_type", "session"),
    (b'{"session": {}}', 400, "missing_required_parameter", "session.type"),
    (b'{"session": {"type": "realtime"}}', 400, "invalid_value", "session.type"),
    (b'{"session": {"type": ["transcription"]}}', 400, "invalid_value", "session.type"),
    (b'{"session": {"type": "transcription", "id": "sess_mine"}}', 400, "unknown_parameter", "session.id"),
    (b'{"session": {"type": "transcription", "audio": []}}', 400, "invalid_type", "session.audio"),
    (b'{"session": {"type": "transcription", "audio": {"input": 1}}}', 400, "invalid_type", "session.audio.input"),
    (b'{"session": {"type": "transcription", "audio": {"input": {"transcription": {"model": 5}}}}}', 400,
     "invalid_type", MODEL),
    (b'{"session": {"type": "transcription", "audio": {"input": {"transcription": {"model": ""}}}}}', 400,
     "invalid_type", MODEL),
    (b'{"session": {"type": "transcription", "audio": {"input": {"transcription": {"model": "nope"}}}}}', 404,
     "model_not_found", MODEL),
    (b'{"session": {"type": "transcription", "audio": {"input": {"transcription": {"model": "tts-1"}}}}}', 400,
     "model_not_supported", MODEL),
    (b'{"session": {"type": "transcription", "prompt": "' + b"x" * MAX_SESSION + b'"}}', 400, "invalid_value",
     "session"),
    (b'{"session": {"type": "transcription", "prompt": "' + b"x" * MAX_BODY + b'"}}', 413, "request_too_large",
     None),
    (b'{"session": ' + b"[" * 100 + b"]" * 100 + b"}", 400, "invalid_json", None),
    (b'{"session": {"type": "transcription", "x": "\\ud800"}}', 400, "invalid_value", "session"),
]


@pytest.mark.parametrize(("body", "status", "code", "param"), BAD_BODIES,
                         ids=[f"{i}-{c}-{p}" for i, (_, _, c, p) in enumerate(BAD_BODIES)])
def test_a_hostile_body_gets_openais_error_and_mints_nothing(
        gateway: Gateway, body: bytes, status: int, code: str, param: str | None) -> None:
    response = post(gateway, body)
    error = check_error(response.status_code, response.headers, response.content, expected_status=status,
                        type_="invalid_request_error", code=code, param=param)
    assert "ek_" not in response.text and len(error["message"]) < 400


def test_a_key_may_not_pin_a_model_it_may_not_use(gateway: Gateway) -> None:
    with sdk(gateway, key=BETA_KEY) as beta, pytest.raises(openai.PermissionDeniedError) as exc:
        beta.realtime.client_secrets.create(session={  # type: ignore[arg-type]
            "type": "transcription", "audio": {"input": {"transcription": {"model": "whisper-1"}}}})
    expect_error(exc.value, 403, "invalid_request_error", "model_not_found", param=MODEL)


@pytest.fixture
def file_gateway(servers: ServerThread, tmp_path: Path) -> Iterator[Callable[[Path, str], Gateway]]:
    """A gateway built from a config file, so it has its reloader."""
    runners: list[web.AppRunner] = []

    async def start(path: Path, text: str) -> Gateway:
        config = parse_config(text, source=str(path))
        gw = await serve_app(build_app(config), config, tmp_path / "spool")
        runners.append(gw.runner)
        return gw

    (tmp_path / "spool").mkdir(exist_ok=True)
    yield lambda path, text: servers.run(start(path, text))
    for runner in runners:
        servers.run(runner.cleanup())


def test_a_key_removed_by_a_reload_takes_its_secrets_with_it(
        file_gateway: Callable[[Path, str], Gateway], engine: FakeOpenAIEngine, servers: ServerThread,
        tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    text = with_state(engine_config(engine.url, tmp_path / "spool"), "{backend: memory}")
    path.write_text(text)
    gw = file_gateway(path, text)
    with sdk(gw) as demo, sdk(gw, key=BETA_KEY) as beta:
        pinned = demo.realtime.client_secrets.create(session=PINNED).value  # type: ignore[arg-type]
        kept = demo.realtime.client_secrets.create().value
        gone = beta.realtime.client_secrets.create().value
    assert all(granted(servers, gw, t) is not None for t in (pinned, kept, gone))
    beta_line = next(line for line in text.splitlines() if "name: beta" in line)
    demo_line = next(line for line in text.splitlines() if "name: demo" in line)
    path.write_text(text.replace(beta_line + "\n", "").replace("tenant: acme,", "tenant: acme, models: [tts-1],"))
    assert demo_line in text and "models: [tts-1], sha256" in path.read_text()
    assert servers.run(gw.app[RELOADER].reload("test")) is True
    assert granted(servers, gw, gone) is None, "its key is no longer configured"
    still = granted(servers, gw, kept)
    assert still is not None and still.identity.models == frozenset({"tts-1"}), "the key as it is now"
    narrowed = granted(servers, gw, pinned)
    assert narrowed is not None and narrowed.identity.models == frozenset(), \
        "pinned to whisper-1, which the key may no longer use"


@needs_redis
def test_two_gateways_on_one_redis_share_the_secrets(
        make_gateway: Callable[[str], Gateway], engine: FakeOpenAIEngine, servers: ServerThread,
        tmp_path: Path, redis_url: str) -> None:
    prefix = uuid.uuid4().hex
    state = f"{{backend: redis, url: '{redis_url}', key_prefix: {prefix}}}"
    first, second = (make_gateway(with_state(engine_config(engine.url, tmp_path / "spool"), state))
                     for _ in range(2))
    with sdk(first) as c:
        token = c.realtime.client_secrets.create(session=PINNED).value  # type: ignore[arg-type]
    grant = granted(servers, second, token)
    assert grant is not None and grant.identity.key_name == "demo" and grant.session == PINNED
    held = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        keys = held.keys(f"*{prefix}*")
        assert keys == [f"{{{prefix}:ek:{hashlib.sha256(token.encode()).hexdigest()}}}:v"]
        assert token not in held.get(keys[0]) and 0 < held.pttl(keys[0]) <= 600_000  # type: ignore[operator]
    finally:
        held.close()


def test_a_store_that_is_down_refuses_minting_and_resolves_nothing(
        make_gateway: Callable[[str], Gateway], engine: FakeOpenAIEngine, servers: ServerThread,
        tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    gw = make_gateway(with_state(engine_config(engine.url, tmp_path / "spool"),
                                 f"{{backend: redis, url: '{url}', timeout_s: 0.2}}"))
    with sdk(gw) as c, pytest.raises(openai.InternalServerError) as exc:
        c.realtime.client_secrets.create()
    error = check_error(exc.value.status_code, exc.value.response.headers, exc.value.response.content,
                        expected_status=503, type_="server_error", code="state_unavailable", secrets=(url,))
    assert "client secrets" in error["message"]
    assert granted(servers, gw, "ek_" + "A" * 32) is None
