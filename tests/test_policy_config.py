"""Hostile traffic-policy YAML (gateway/policy/rules.py): every field the policy reads, given malformed,
oversized, non-finite, wrong-typed and adversarial values, is a ConfigError naming its YAML path (never an
exception of another type, never a hang); what is legitimate, however odd (names with `:` `|` `{` `}` and
non-ASCII), is accepted and, over HTTP, keeps its own counters.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from gateway.adapters import ADAPTERS
from gateway.config import Config, ConfigError, parse_config
from gateway.policy.rules import MAX_LIMITS
from tests.conftest import DEMO_KEY, Gateway, sdk
from tests.fakes.openai_engine import FakeOpenAIEngine

HUGE_INT = "1" + "0" * 4000
"""10**4000 as a YAML int: under Python's 4300-digit conversion limit, so it reaches the policy."""
NUMBERS = {
    "nan": ".nan", "inf": ".inf", "-inf": "-.inf", "zero": "0", "-0": "-0.0", "negative": "-1",
    "1e400-float": "1.0e+400", "1e400-string": "1e400", "10**4000": HUGE_INT, "bool": "true", "null": "null",
    "string": "'12'", "list": "[1, 2]", "mapping": "{a: 1}", "past-max": "1000000000000001",
}
"""Values no limit or budget amount may take."""
WINDOWS = {
    "nan": ".nan", "inf": ".inf", "zero": "0", "-0": "-0.0", "under-a-second": "0.5", "past-a-year": "31622401",
    "10**4000": HUGE_INT, "bool": "true", "null": "null", "unknown": "fortnight", "capitalised": "Minute",
    "list": "[minute]", "mapping": "{a: 1}", "odd-string": "'minute\\0'",
}
"""Values no `per` or `period` may take."""


def table(policy: str = "", key: str = "", model: str = "") -> str:
    """A servable table: one key of tenant acme (`key` adds to it), tts-1 (`model` adds to it), whisper-1."""
    return f"""
keys:
  - {{name: demo, tenant: acme, key: {DEMO_KEY}{key}}}
backends: {{b: {{kind: openai, url: "http://127.0.0.1:9"}}}}
models:
  tts-1: {{task: speech, routes: [{{backend: b}}]{model}}}
  whisper-1: {{task: transcription, routes: [{{backend: b}}]}}
""" + policy


AMOUNTS: dict[str, tuple[Callable[[str], str], str]] = {
    "limits.key": (lambda v: table(f"limits: {{key: [{{requests: {v}, per: minute}}]}}\n"),
                   "limits.key[0].requests"),
    "limits.tenant": (lambda v: table(f"limits: {{tenant: [{{characters: {v}, per: hour}}]}}\n"),
                      "limits.tenant[0].characters"),
    "limits.model": (lambda v: table(f"limits: {{model: [{{audio_seconds: {v}, per: day}}]}}\n"),
                     "limits.model[0].audio_seconds"),
    "key limits": (lambda v: table(key=f", limits: [{{speech_seconds: {v}, per: week}}]"),
                   "keys[0].limits[0].speech_seconds"),
    "model limits": (lambda v: table(model=f", limits: [{{characters: {v}, per: month}}]"),
                     "models.tts-1.limits[0].characters"),
    "tenant limits": (lambda v: table(f"tenants: {{acme: {{limits: [{{concurrent: {v}}}]}}}}\n"),
                      "tenants.acme.limits[0].concurrent"),
    "tenant model limits": (
        lambda v: table(f"tenants: {{acme: {{models: {{tts-1: [{{requests: {v}, per: 60}}]}}}}}}\n"),
        "tenants.acme.models.tts-1[0].requests"),
    "key budget": (lambda v: table(key=f", budget: {{usd: {v}}}"), "keys[0].budget.usd"),
    "tenant budget": (lambda v: table(f"tenants: {{acme: {{budget: {{seconds: {v}, period: day}}}}}}\n"),
                      "tenants.acme.budget.seconds"),
}
PERIODS: dict[str, tuple[Callable[[str], str], str]] = {
    "limits.key": (lambda v: table(f"limits: {{key: [{{requests: 1, per: {v}}}]}}\n"), "limits.key[0].per"),
    "key limits": (lambda v: table(key=f", limits: [{{characters: 1, per: {v}}}]"), "keys[0].limits[0].per"),
    "tenant model limits": (lambda v: table(f"tenants: {{acme: {{models: {{whisper-1: [{{audio_seconds: 1, "
                                            f"per: {v}}}]}}}}}}\n"), "tenants.acme.models.whisper-1[0].per"),
    "key budget": (lambda v: table(key=f", budget: {{characters: 1, period: {v}}}"), "keys[0].budget.period"),
    "tenant budget": (lambda v: table(f"tenants: {{acme: {{budget: {{usd: 1, period: {v}}}}}}}\n"),
                      "tenants.acme.budget.period"),
}
STATE_NUMBERS = ("timeout_s", "max_connections", "lease_ttl_s", "retry_s")
BAD_STATE_NUMBERS = {"nan": ".nan", "inf": ".inf", "-inf": "-.inf", "negative": "-1", "10**4000": HUGE_INT,
                     "1e300": "1.0e+300", "past-max": "100000", "bool": "true", "list": "[1]",
                     "mapping": "{a: 1}", "string": "abc", "string-inf": "'inf'"}
NESTED = "[" * 40 + "1" + "]" * 40
SOME_LIMITS = ", ".join(f"{{requests: 1, per: {n + 1}}}" for n in range(MAX_LIMITS + 1))
STRUCTURE: dict[str, tuple[str, str]] = {
    # what the table gets: `policy` text (or `key:`/`model:` additions), the path the error must name
    "two measures in one item": (table("limits: {key: [{requests: 1, characters: 2, per: minute}]}\n"),
                                 "limits.key[0]"),
    "no measure": (table("limits: {key: [{per: minute}]}\n"), "limits.key[0]"),
    "concurrent with per": (table("limits: {tenant: [{concurrent: 2, per: minute}]}\n"), "limits.tenant[0].per"),
    "concurrent not whole": (table("limits: {tenant: [{concurrent: 1.5}]}\n"), "limits.tenant[0].concurrent"),
    "sessions with per": (table("limits: {key: [{sessions: 2, per: minute}]}\n"), "limits.key[0].per"),
    "sessions not whole": (table("limits: {key: [{sessions: 0.5}]}\n"), "limits.key[0].sessions"),
    "window without per": (table(key=", limits: [{requests: 5}]"), "keys[0].limits[0].per"),
    "shadow junk": (table("limits: {key: [{requests: 1, per: minute, shadow: 'yes'}]}\n"),
                    "limits.key[0].shadow"),
    "shadow null": (table("limits: {key: [{requests: 1, per: minute, shadow: null}]}\n"),
                    "limits.key[0].shadow"),
    "unknown limit field": (table("limits: {key: [{requests: 1, per: minute, burst: 5}]}\n"),
                            "limits.key[0].burst"),
    "unknown level": (table("limits: {keys: [{requests: 1, per: minute}]}\n"), "limits.keys"),
    "null level": (table("limits: {~: [{requests: 1, per: minute}]}\n"), "limits.None"),
    "limits a list": (table("limits: [{requests: 1, per: minute}]\n"), "limits"),
    "level a mapping": (table("limits: {key: {requests: 1, per: minute}}\n"), "limits.key"),
    "item a number": (table("limits: {key: [1]}\n"), "limits.key[0]"),
    "item nested junk": (table("limits: {key: [[[{requests: 1}]]]}\n"), "limits.key[0]"),
    "nested too deep": (table(f"limits: {{key: [{{requests: {NESTED}, per: minute}}]}}\n"),
                        "limits.key[0].requests"),
    "more than MAX_LIMITS": (table(f"limits: {{key: [{SOME_LIMITS}]}}\n"), "limits.key"),
    "a limit twice in a list": (table(key=", limits: [{requests: 1, per: minute}, {requests: 5, per: minute}]"),
                                "keys[0].limits[1]"),
    "concurrent twice": (table(model=", limits: [{concurrent: 1}, {concurrent: 2}]"), "models.tts-1.limits[1]"),
    "budget with two units": (table(key=", budget: {usd: 1, characters: 10}"), "keys[0].budget"),
    "budget with no unit": (table("tenants: {acme: {budget: {period: day}}}\n"), "tenants.acme.budget"),
    "budget unknown field": (table(key=", budget: {usd: 1, cap: 2}"), "keys[0].budget.cap"),
    "budget a list": (table(key=", budget: [usd, 1]"), "keys[0].budget"),
    "budget a number": (table("tenants: {acme: {budget: 50}}\n"), "tenants.acme.budget"),
    "tenants a list": (table("tenants: [acme]\n"), "tenants"),
    "tenant a list": (table("tenants: {acme: [1]}\n"), "tenants.acme"),
    "tenant unknown field": (table("tenants: {acme: {quota: 1}}\n"), "tenants.acme.quota"),
    "tenant no key has": (table("tenants: {ghost: {limits: [{concurrent: 1}]}}\n"), "tenants.ghost"),
    "tenant given twice": (table("tenants: {1: {}, '1': {}}\n", key=", tenant: '1'"), "tenants.1"),
    "tenant models a list": (table("tenants: {acme: {models: [tts-1]}}\n"), "tenants.acme.models"),
    "tenant unknown model": (table("tenants: {acme: {models: {tts-2: [{concurrent: 1}]}}}\n"),
                             "tenants.acme.models.tts-2"),
    "tenant model given twice": (table("tenants: {acme: {models: {1: [], '1': []}}}\n"), "tenants.acme.models.1"),
    "tenant model limits a mapping": (table("tenants: {acme: {models: {tts-1: {concurrent: 1}}}}\n"),
                                      "tenants.acme.models.tts-1"),
    "key limits a string": (table(key=", limits: 'requests=5'"), "keys[0].limits"),
    "model limits a number": (table(model=", limits: 5"), "models.tts-1.limits"),
    "state a list": (table("state: [memory]\n"), "state"),
    "state a string": (table("state: memory\n"), "state"),
    "state unknown field": (table("state: {backend: memory, pool: 5}\n"), "state.pool"),
    "backend junk": (table("state: {backend: memcached}\n"), "state.backend"),
    "backend a number": (table("state: {backend: 5}\n"), "state.backend"),
    "backend a mapping": (table("state: {backend: {redis: 1}}\n"), "state.backend"),
    "backend a bool": (table("state: {backend: true}\n"), "state.backend"),
    "path a list": (table("state: {path: [a, b]}\n"), "state.path"),
    "url a mapping": (table("state: {backend: redis, url: {host: x}}\n"), "state.url"),
    "key_prefix a bool": (table("state: {key_prefix: false}\n"), "state.key_prefix"),
    "key_prefix with a brace": (table("state: {backend: redis, key_prefix: 'gw}x'}\n"), "state.key_prefix"),
    "key_prefix with an open brace": (table("state: {backend: redis, key_prefix: '{gw'}\n"), "state.key_prefix"),
    "on_error a string": (table("state: {on_error: open}\n"), "state.on_error"),
    "on_error junk": (table("state: {on_error: {limits: maybe}}\n"), "state.on_error.limits"),
    "on_error a bool": (table("state: {on_error: {budgets: true}}\n"), "state.on_error.budgets"),
    "on_error a list": (table("state: {on_error: {limits: [open]}}\n"), "state.on_error.limits"),
    # a lone surrogate (YAML's "\udc80" escape) parsed, then every request of the tenant and /metrics answered
    # 500: the name could not be encoded into a store key or a metrics label
    "tenant with a lone surrogate": (table(key=', tenant: "a\\udc80"'), "keys[0].tenant"),
    "tenant name with a lone surrogate": (table('tenants: {"t\\udc80": {}}\n'), "tenants.t\\udc80"),
    "key name with a lone surrogate": (table().replace("name: demo", 'name: "\\ud800demo"'), "keys[0].name"),
    "on_error unknown feature": (table("state: {on_error: {budget: open}}\n"), "state.on_error.budget"),
}


def problems(text: str) -> list[str]:
    """The problems of a table that must not parse, within a second (no hang), as a ConfigError only."""
    started = time.process_time()
    with pytest.raises(ConfigError) as info:
        parse_config(text, kinds=ADAPTERS.keys(), environ={})
    assert time.process_time() - started < 1.0
    assert info.value.problems and all(isinstance(p, str) and len(p) < 400 for p in info.value.problems), \
        [p[:120] for p in info.value.problems]  # one readable line each, however huge the value
    return info.value.problems


def assert_names(found: list[str], path: str) -> None:
    assert any(p.startswith(f"{path}: ") or p.startswith(f"{path}[") for p in found), (path, found)


def unnamed(make: Callable[[str], str], path: str, values: dict[str, str]) -> list[str]:
    """The values (by name) whose table failed without a problem at `path`; one test per field, not per
    value, keeps the table cheap."""
    return [name for name, value in values.items()
            if not any(p.startswith(f"{path}: ") for p in problems(make(value)))]


@pytest.mark.parametrize("where", AMOUNTS.keys())
def test_a_bad_amount_is_a_config_error_at_its_path(where: str) -> None:
    assert unnamed(*AMOUNTS[where], NUMBERS) == []


@pytest.mark.parametrize("where", PERIODS.keys())
def test_a_bad_window_or_period_is_a_config_error_at_its_path(where: str) -> None:
    assert unnamed(*PERIODS[where], WINDOWS) == []


@pytest.mark.parametrize("field", STATE_NUMBERS)
def test_a_bad_state_number_is_a_config_error_at_its_path(field: str) -> None:
    """10**4000 and 1e300 were accepted before: a lease TTL of 10**4000 then broke the first request on
    SQLite (OverflowError: Python int too large to convert to SQLite INTEGER) and every lease renewal."""
    def make(value: str) -> str:
        return table(f"state: {{backend: memory, {field}: {value}}}\n")
    assert unnamed(make, f"state.{field}", BAD_STATE_NUMBERS) == []


@pytest.mark.parametrize("text, path", STRUCTURE.values(), ids=STRUCTURE.keys())
def test_a_malformed_policy_is_a_config_error_at_its_path(text: str, path: str) -> None:
    assert_names(problems(text), path)


def test_every_problem_of_a_table_is_reported_together() -> None:
    found = problems(table("state: {backend: x, lease_ttl_s: .nan, on_error: {limits: y}}\n"
                           "limits: {key: [{requests: .inf, per: 0}]}\n", key=", budget: {usd: -0.0}"))
    for path in ("state.backend", "state.lease_ttl_s", "state.on_error.limits", "limits.key[0].requests",
                 "limits.key[0].per", "keys[0].budget.usd"):
        assert_names(found, path)


ODD = ["a:b", "a|b", "{x}", "}{", "ünï ☃", "a\tb", "tenant:acme", "model:1:a", "?", "  spaced  ", "1"]
LEGITIMATE: dict[str, str] = {
    "largest amount": table("limits: {key: [{requests: 1000000000000000, per: second}, "
                            "{concurrent: 1000000000000000}]}\n"),
    "window in seconds, fractional": table("limits: {key: [{requests: 1, per: 1.5}]}\n"),
    "window a year long": table("limits: {key: [{requests: 1, per: 31622400}]}\n"),
    "same measure, other windows": table(key=", limits: [{requests: 1, per: minute}, {requests: 5, per: 60}]"),
    "shadow on a concurrent limit": table("limits: {model: [{concurrent: 3, shadow: true}]}\n"),
    "an empty list turns defaults off": table("limits: {key: [{requests: 1, per: minute}]}\n", key=", limits: []"),
    "null limits keep the default": table("limits: {key: [{requests: 1, per: minute}]}\n", key=", limits: null"),
    "retry_s zero and -0": table("state: {backend: memory, retry_s: -0.0, lease_ttl_s: 1}\n"),
    "state maxima": table("state: {backend: redis, timeout_s: 60, max_connections: 1024, lease_ttl_s: 86400, "
                          "retry_s: 3600, on_error: {limits: closed, budgets: open}}\n"),
    "numbers as strings": table("state: {backend: memory, timeout_s: '0.25', retry_s: '2'}\n"),
    "YAML anchors reused": table("limits: {key: &l [{requests: 9, per: minute}], tenant: *l}\n"),
    "budgets in each unit and period": table("tenants: {acme: {budget: {seconds: 3600, period: week}}}\n",
                                             key=", budget: {characters: 1, period: 86400}"),
    "escapes of whole characters": table(key=', tenant: "\\U0001F600 \\u00e9"',
                                         model=', limits: [{concurrent: 1}]'),
    "an empty state": table("state: {}\nlimits: {}\ntenants: {}\n"),
}


@pytest.mark.parametrize("text", LEGITIMATE.values(), ids=LEGITIMATE.keys())
def test_legitimate_odd_tables_are_accepted(text: str) -> None:
    parse_config(text, kinds=ADAPTERS.keys(), environ={})


@pytest.mark.parametrize("name", ODD)
def test_odd_tenant_and_key_names_are_accepted(name: str) -> None:
    quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"').replace("\t", "\\t") + '"'
    rules = "{limits: [{concurrent: 1}], models: {tts-1: [{requests: 1, per: hour}]}}"
    text = table(f"tenants: {{{quoted}: {rules}}}\n")
    config: Config = parse_config(text.replace("name: demo, tenant: acme", f"name: {quoted}, tenant: {quoted}"),
                                  kinds=ADAPTERS.keys(), environ={})
    assert config.keys[0].name == config.keys[0].tenant == name
    assert config.policy.active and set(config.policy.tenants) == {name}


SECOND_KEY = "sk-test-odd-second-0123"


def odd_table(engine: FakeOpenAIEngine, tmp_path: Path, state: str) -> str:
    """Tenant "a:b" (key "k:1|{x}") and tenant "a" (key "k:1"), models "b:c" and "c": scopes that read the
    same when joined with `:` (a, b:c and a:b, c) must still be counted apart."""
    return f"""
server: {{spool_dir: {tmp_path / 'spool'}, probe_interval_s: 0}}
keys:
  - {{name: "k:1|{{x}}", tenant: "a:b", key: {DEMO_KEY}}}
  - {{name: "k:1", tenant: "a", key: {SECOND_KEY}}}
backends: {{speaches: {{kind: openai, url: "{engine.url}"}}}}
models:
  "b:c": {{task: speech, routes: [{{backend: speaches, model: kokoro}}]}}
  c: {{task: speech, routes: [{{backend: speaches, model: kokoro}}]}}
voices: {{nova: {{speaches: af_nova}}}}
state: {state}
limits: {{model: [{{requests: 1, per: hour}}], key: [{{characters: 7, per: hour}}]}}
tenants: {{"a:b": {{limits: [{{requests: 3, per: hour}}]}}, a: {{limits: [{{requests: 3, per: hour}}]}}}}
"""


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_tenants_and_models_whose_names_join_alike_do_not_share_counters(
        make_gateway: Callable[[str], Gateway], engine: FakeOpenAIEngine, tmp_path: Path, backend: str) -> None:
    state = "{backend: memory}" if backend == "memory" else f"{{backend: sqlite, path: {tmp_path / 's.db'}}}"
    gw = make_gateway(odd_table(engine, tmp_path, state))
    with sdk(gw) as ab, sdk(gw, key=SECOND_KEY) as a:
        for client, model in ((ab, "c"), (a, "b:c"), (ab, "b:c"), (a, "c")):  # each (tenant, model) once
            raw = client.audio.speech.with_raw_response.create(model=model, voice="nova", input="abc",
                                                               response_format="pcm")
            assert raw.headers["x-ratelimit-remaining-requests"] == "0"  # the model level's, the tightest
        with pytest.raises(openai.RateLimitError) as again:
            a.audio.speech.create(model="b:c", voice="nova", input="a", response_format="pcm")
        assert "'a' for model `b:c`" in again.value.message
        with pytest.raises(openai.RateLimitError) as chars:  # key "k:1|{x}" spent 6 of its 7 characters
            ab.audio.speech.create(model="c", voice="nova", input="ab", response_format="pcm")
        assert "on key 'k:1|{x}'" in chars.value.message
    assert engine.calls("/v1/audio/speech") == 4
