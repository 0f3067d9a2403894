"""The admission settings' parsing (gateway/settings.py `capacity_section`, gateway/policy/rules.py `rules`):
`backends.<b>.max_concurrency`, `max_queue`, `queue_timeout_s` and a key's or tenant's `queue_priority`,
hostile values refused at their YAML path with one problem each, and the documented defaults. Their effect
over HTTP is tests/test_capacity.py."""

from __future__ import annotations

import pytest

from gateway.config import Config, ConfigError, has_slots, parse_config
from gateway.policy.shared import scope_warnings
from gateway.settings import Capacity

_CONFIG = """
keys: [{{name: demo, key: k, tenant: t{key}}}]
backends:
  b: {{kind: openai, url: "http://127.0.0.1:9/v1"{backend}}}
models:
  tts-1: {{task: speech, routes: [{{backend: b}}]}}
{extra}"""
HUGE = "1" + "0" * 4000
HOSTILE = {
    "max_concurrency": [".nan", ".inf", "-.inf", "-1", "0", "0.0", "1.5", "1000001", HUGE, "1e400", "'abc'", "''",
                        "true", "false", "[1]", "{a: 1}"],
    "max_queue": [".nan", ".inf", "-1", "0.5", "1000001", HUGE, "'abc'", "true", "false", "[1]", "null"],
    "queue_timeout_s": [".nan", ".inf", "-1", "0", "0.0", "86401", HUGE, "'abc'", "true", "false", "[1]", "null"],
}


def _parse(backend: str = "", key: str = "", extra: str = "") -> Config:
    return parse_config(_CONFIG.format(backend=backend, key=key, extra=extra))


def _problem(**parts: str) -> str:
    with pytest.raises(ConfigError) as caught:
        _parse(**parts)
    [problem] = caught.value.problems
    assert len(problem) < 200, problem  # a 4000-digit number quoted cut short
    return problem


@pytest.mark.parametrize(("field", "value"), [(f, v) for f, values in HOSTILE.items() for v in values],
                         ids=[f"{f}={v[:12]}" for f, values in HOSTILE.items() for v in values])
def test_hostile_admission_settings_are_refused_by_path(field: str, value: str) -> None:
    limit = "" if field == "max_concurrency" else ", max_concurrency: 2"
    assert _problem(backend=f"{limit}, {field}: {value}").startswith(f"backends.b.{field}: expected ")


@pytest.mark.parametrize("value", ["urgent", "HIGH", "1", "true", "[high]", "''", "{a: 1}"])
def test_hostile_queue_priorities_are_refused_by_path(value: str) -> None:
    assert _problem(key=f", queue_priority: {value}").startswith("keys[0].queue_priority: expected ")
    tenant = _problem(extra=f"tenants: {{t: {{queue_priority: {value}}}}}")
    assert tenant.startswith("tenants.t.queue_priority: expected "), tenant


@pytest.mark.parametrize("fields", ["max_queue: 5", "queue_timeout_s: 5", "max_concurrency: null, max_queue: 5"])
def test_a_queue_without_max_concurrency_is_refused(fields: str) -> None:
    assert _problem(backend=f", {fields}") == ("backends.b.max_concurrency: is required for a queue (max_queue, "
                                               "queue_timeout_s queue requests beyond it)")


@pytest.mark.parametrize(("fields", "expected"), [
    ("max_concurrency: 3", Capacity(3, 100, 30.0)),
    ("max_concurrency: '3', max_queue: '0', queue_timeout_s: '0.25'", Capacity(3, 0, 0.25)),
    ("max_concurrency: 2.0, max_queue: 1000000, queue_timeout_s: 86400", Capacity(2, 1_000_000, 86_400)),
    ("max_concurrency: null", Capacity(None, 100, 30.0)),
])
def test_admission_settings_parse_with_their_defaults(fields: str, expected: Capacity) -> None:
    assert _parse(backend=f", {fields}").capacity["b"] == expected
    assert _parse().capacity["b"] == Capacity()  # no limit, no queue


def test_queue_priorities_parse() -> None:
    config = _parse(key=", queue_priority: low", extra="tenants: {t: {queue_priority: high}}")
    assert config.keys[0].rules.queue_priority == "low"
    assert config.policy.tenants["t"].rules.queue_priority == "high"


@pytest.mark.parametrize(("state", "workers", "environ", "said"), [
    ("memory", 2, {}, ["state.backend: memory: max_concurrency slots are counted by each worker process"]),
    ("memory", None, {}, ["state.backend: memory: max_concurrency slots are counted by each process"]),
    ("memory", 1, {}, []),
    ("sqlite", 4, {}, []),  # one file for every worker of the host
    ("sqlite", 1, {"KUBERNETES_SERVICE_HOST": "10.0.0.1"},
     ["state.backend: sqlite in Kubernetes: max_concurrency slots are counted per pod"]),
    ("redis", 4, {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, []),
])
def test_slots_counted_per_process_are_said_at_start(state: str, workers: int | None, environ: dict[str, str],
                                                     said: list[str]) -> None:
    """The startup guard of limits (gateway/policy/shared.py) covers max_concurrency too: with a store not
    shared by every process, each lets `max_concurrency` through on its own."""
    config = _parse(", max_concurrency: 2", extra=f"state: {{backend: {state}}}\n")
    warnings = scope_warnings(config.policy, workers, environ, has_slots(config))
    assert [w[:len(s)] for w, s in zip(warnings, said, strict=False)] == said and len(warnings) == len(said)
    assert scope_warnings(_parse(extra=f"state: {{backend: {state}}}\n").policy, workers, environ,
                          has_slots(_parse())) == []  # no slots, no limits: nothing counted
