"""The mapping table: parsing into frozen objects, ${ENV} interpolation, errors by YAML path, the CLI check."""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.adapters import ADAPTERS
from gateway.config import ConfigError, NativeVoice, parse_config

KINDS = ADAPTERS.keys()
DIGEST = hashlib.sha256(b"k").hexdigest()
VALID = """
keys:     [{name: demo, tenant: acme, sha256: "DIGEST", models: [tts-1, whisper-1]}]
backends: {speaches: {kind: openai, url: "http://127.0.0.1:8000/v1", api_key: "${SPEACHES_KEY:-}", timeout_s: 120}}
models:   {tts-1: {task: speech, routes: [{backend: speaches, model: kokoro}]},
           whisper-1: {task: transcription, routes: [{backend: speaches, model: Systran/faster-whisper-small}]}}
voices:   {nova: {speaches: af_nova}, echo: {speaches: {name: en_US-lessac, speaker: "3"}}}
""".replace("DIGEST", DIGEST)


def problems(text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, kinds=KINDS, environ=environ or {})
    return info.value.problems


def test_issue_example_parses_into_frozen_objects() -> None:
    config = parse_config(VALID, kinds=KINDS, environ={})
    backend = config.backends["speaches"]
    assert backend.kind == "openai" and backend.api_key is None and backend.timeouts.read == 120
    assert config.models["tts-1"].routes[0].model == "kokoro"
    assert config.voices["nova"]["speaches"] == NativeVoice("af_nova")
    assert config.voices["echo"]["speaches"] == NativeVoice("en_US-lessac", "3")
    assert config.keys[0].models == frozenset({"tts-1", "whisper-1"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.models["tts-1"].task = "transcription"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.models["x"] = config.models["tts-1"]  # type: ignore[index]


def test_env_interpolation_with_and_without_default() -> None:
    config = parse_config(VALID, kinds=KINDS, environ={"SPEACHES_KEY": "s3cret"})
    assert config.backends["speaches"].api_key == "s3cret"
    assert "s3cret" not in repr(config)
    text = VALID.replace("${SPEACHES_KEY:-}", "${MISSING_KEY}")
    assert problems(text) == ["backends.speaches.api_key: environment variable MISSING_KEY is not set"]


def test_key_forms_literal_and_env_match_the_same_digest() -> None:
    text = VALID.replace(f'sha256: "{DIGEST}"', 'key: "${DEMO_KEY}"')
    config = parse_config(text, kinds=KINDS, environ={"DEMO_KEY": "k"})
    assert config.keys[0].sha256 == hashlib.sha256(b"k").digest()


def test_unknown_backend_is_named_by_path() -> None:
    assert problems(VALID.replace("{backend: speaches, model: kokoro}", "{backend: spaches, model: kokoro}")) == [
        "models.tts-1.routes[0].backend: unknown backend 'spaches'"]


def test_every_error_is_collected() -> None:
    text = """
keys: [{name: a, tenant: t}, {name: a, key: x, models: [nope]}, {name: b, sha256: "zz"}]
backends: {x: {kind: nosuch, url: "ftp://h", timeout_s: -1}}
models:
  m1: {task: dance, routes: []}
  m2: {task: speech, routes: [{backend: y}]}
voices: {nova: {z: v}, alloy: {x: [1]}}
extra: 1
"""
    found = problems(text)
    for expected in [
        "extra: unknown section",
        "keys[0]: give exactly one of 'key' (the key or ${ENV}) and 'sha256' (its hex digest)",
        "keys[1].name: duplicate key name 'a'",
        "keys[2].sha256: expected 64 hex digits",
        "backends.x.url: expected an http(s)://, tcp:// or unix:// URL, got 'ftp://h'",
        "backends.x.timeout_s: expected a number >= 0.001, got -1",
        "models.m1.task: expected one of speech, transcription, got 'dance'",
        "models.m1.routes: expected a non-empty list of {backend, model}",
        "models.m2.routes[0].backend: unknown backend 'y'",
        "voices.nova.z: unknown backend 'z'",
        "voices.alloy.x: expected a native voice id or {name, speaker}",
        "keys[1].models: unknown model 'nope'",
    ]:
        assert expected in found, (expected, found)
    assert any(p.startswith("backends.x.kind: unknown kind 'nosuch'") for p in found)


def test_invalid_yaml() -> None:
    assert problems("models: [unclosed")[0].startswith("<memory>: not valid YAML")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60)


def test_check_config_ok_and_failing(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(VALID)
    result = run_cli("check-config", str(good))
    assert result.returncode == 0, result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(VALID.replace("backend: speaches, model: kokoro", "backend: spaches, model: kokoro")
                   .replace("task: transcription", "task: nope"))
    result = run_cli("check-config", str(bad))
    assert result.returncode == 1
    assert "models.tts-1.routes[0].backend: unknown backend 'spaches'" in result.stderr
    assert "models.whisper-1.task: expected one of speech, transcription, got 'nope'" in result.stderr


def test_shipped_configs_are_valid() -> None:
    """config/gateway.yaml, the examples, and config/examples/servers/: one profile per OpenAI-compatible server."""
    root = Path(__file__).parent.parent / "config"
    profiles = sorted((root / "examples" / "servers").glob("*.yaml"))
    assert len(profiles) == 7
    paths = [root / "gateway.yaml", *sorted((root / "examples").glob("*.yaml")), *profiles]
    env = {"PATH": "/usr/bin:/bin", "OPENAI_API_KEY": "x", "DEMO_KEY": "y"}
    result = subprocess.run([sys.executable, "-m", "gateway", "check-config", *map(str, paths)], capture_output=True,
                            text=True, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    assert [line.split(": ok (")[0] for line in result.stdout.splitlines()] == list(map(str, paths))


def test_unknown_backend_option_is_refused_by_path(tmp_path: Path) -> None:
    """A typo (timeout instead of timeout_s) must not be silently ignored."""
    bad = tmp_path / "typo.yaml"
    bad.write_text(VALID.replace("timeout_s: 120", "timeout: 120"))
    result = run_cli("check-config", str(bad))
    assert result.returncode == 1
    assert "backends.speaches.timeout: unknown option for kind 'openai'" in result.stderr


async def test_invalid_options_close_the_adapters_already_built() -> None:
    """A reload that fails on one backend's options leaves no engine thread of the others running."""
    import threading

    from gateway.adapters import build_adapters, unavailable_reason
    from gateway.upstreams import Upstreams

    if unavailable_reason("pocketsphinx"):
        pytest.skip("the embedded engines are not installed")
    config = parse_config(VALID.replace("backends: {", "backends: {early: {kind: pocketsphinx}, ")
                          .replace("timeout_s: 120", "timeout_s: 120, bogus: 1"), kinds=KINDS, environ={})
    with pytest.raises(ConfigError) as info:
        await build_adapters(config, upstreams := Upstreams())
    assert not upstreams.sessions()
    assert info.value.problems[0].startswith("backends.speaches.bogus: unknown option for kind 'openai'")
    assert not [t.name for t in threading.enumerate() if t.name.startswith("sphinx-early")]


def test_client_limits_have_defaults_and_are_checked_by_path() -> None:
    server = parse_config(VALID, kinds=KINDS, environ={}).server
    assert (server.header_timeout_s, server.keepalive_timeout_s, server.body_timeout_s, server.max_connections,
            server.max_form_parts, server.max_part_header_bytes) == (15.0, 75.0, 30.0, 1024, 64, 8192)
    text = "server: {header_timeout_s: 0, body_timeout_s: x, max_connections: 0, max_form_parts: -1}\n" + VALID
    found = problems(text)
    for expected in ["server.header_timeout_s: expected a number >= 0.01, got 0",
                     "server.body_timeout_s: expected a number >= 0.01, got 'x'",
                     "server.max_connections: expected a number >= 1, got 0",
                     "server.max_form_parts: expected a number >= 1, got -1"]:
        assert expected in found, (expected, found)


def test_state_cluster_is_a_flag_that_needs_a_url_of_one_node() -> None:
    assert parse_config(VALID, kinds=KINDS, environ={}).policy.state.store.cluster is False
    text = "state: {backend: redis, cluster: true, url: 'rediss://:pw@redis-0.internal:6380'}\n" + VALID
    store = parse_config(text, kinds=KINDS, environ={}).policy.state.store
    assert (store.backend, store.cluster, store.url) == ("redis", True, "rediss://:pw@redis-0.internal:6380")
    assert problems("state: {backend: redis, cluster: maybe}\n" + VALID) == [
        "state.cluster: expected true or false, got 'maybe'"]
    for url in ("redis://:hunter2@redis-0.internal:6379/2", "unix:///run/redis.sock", "redis://:hunter2@[::1"):
        found = problems(f"state: {{backend: redis, cluster: true, url: '{url}'}}\n" + VALID)
        assert found == ["state.url: with cluster: true, expected a redis:// or rediss:// URL of one node with "
                         "database 0 (a cluster has no other)"], (url, found)
