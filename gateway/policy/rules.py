"""Traffic policy as configured: limits and budgets on keys, tenants and models, the defaults, and the
`state:` section that says where they are counted. Parsed with YAML-path errors like the rest of the
config (gateway/config.py calls these); enforced per request by gateway/policy/admission.py.

    limits:                 # defaults for every key, tenant and (tenant, model) without limits of their own
      key: [{requests: 60, per: minute}]
    tenants:
      acme:
        limits: [{concurrent: 8}, {audio_seconds: 36000, per: day}]
        budget: {usd: 50, period: month}
        models: {whisper-1: [{audio_seconds: 600, per: hour}]}
    keys: [{name: ci, tenant: acme, key: ..., limits: [{characters: 100000, per: hour, shadow: true}]}]
    models: {tts-1: {..., limits: [{characters: 1000000, per: day}]}}   # per tenant, on this model
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from gateway.policy.windows import Window, parse_window
from gateway.store import BACKENDS, StoreConfig
from gateway.yaml_tree import YamlTree, shown

MEASURES = ("requests", "characters", "audio_seconds", "speech_seconds", "concurrent", "sessions")
"""requests: speech, transcription and translation requests per window (a realtime item is one); characters:
speech input; audio_seconds: transcription and translation input, as measured by the gateway (a realtime
item's committed audio); speech_seconds: speech output, counted once the audio went out; concurrent: requests
in flight at once (a realtime item being transcribed is one); sessions: realtime sessions open at once."""
SLOTS = ("concurrent", "sessions")
"""The measures counted as slots held while in use, with no window."""
BUDGET_UNITS = ("usd", "characters", "seconds")
LEVELS = ("key", "tenant", "model")
ON_ERROR = ("open", "closed")
MAX_AMOUNT = 1e15
"""Largest limit or budget amount (a float stays exact in whole units far past it)."""
MAX_LIMITS = 32
"""Most limits in one list: each is a store call on every request it applies to."""
STATE_FIELDS = ("backend", "path", "url", "key_prefix", "timeout_s", "max_connections", "cluster", "on_error",
                "lease_ttl_s", "retry_s")
STATE_MAXIMA = {"timeout_s": 60.0, "max_connections": 1024.0, "lease_ttl_s": 86400.0, "retry_s": 3600.0}
"""Upper bounds of the `state:` numbers: past them a value is a typo, and a huge one would overflow the
float arithmetic of timers and TTLs at run time instead of failing here."""
_NONE: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Limit:
    measure: str
    amount: float
    per: Window | None = None
    """The window; None for `concurrent`."""
    shadow: bool = False
    """Count and log what it would reject, reject nothing."""

    @property
    def name(self) -> str:
        """`requests/minute`, `concurrent`: with its level, the `limit` label and the ledger's `rejected_by`."""
        return self.measure if self.per is None else f"{self.measure}/{self.per.name}"


@dataclass(frozen=True, slots=True)
class Budget:
    unit: str
    """`usd` (from the models' prices), `characters` or `seconds` (as billed, gateway/usage.py)."""
    amount: float
    period: Window


@dataclass(frozen=True, slots=True)
class Rules:
    """What a key or a tenant carries."""

    limits: tuple[Limit, ...] | None = None
    """None: its level's defaults apply; an empty list turns them off."""
    budget: Budget | None = None
    queue_priority: str | None = None
    """Its place in backend queues (gateway/capacity.py): high, normal or low; None: the tenant's, else normal."""


@dataclass(frozen=True, slots=True)
class Tenant:
    rules: Rules = field(default_factory=Rules)
    models: Mapping[str, tuple[Limit, ...]] = field(default_factory=lambda: _NONE)
    """Limits of this tenant on one model, in place of the model's own."""


@dataclass(frozen=True, slots=True)
class StateSettings:
    """The `state:` section."""

    store: StoreConfig = field(default_factory=StoreConfig)
    limits_on_error: str = "open"
    """When the store fails: `open` counts limits in this process's memory until it is back; `closed`
    answers 503."""
    budgets_on_error: str = "closed"
    """`closed` answers 503 while the store fails (no spending goes uncounted); `open` counts in memory."""
    lease_ttl_s: float = 30.0
    """A concurrency slot is leased for this long and renewed every third of it while its request runs,
    so the slots of a crashed process come back within it."""
    retry_s: float = 1.0
    """After the store failed three times in a row, requests go straight to the failure policy this long
    before it is tried again (no request waits for a store known to be down)."""


@dataclass(frozen=True, slots=True)
class Policy:
    state: StateSettings = StateSettings()
    defaults: Mapping[str, tuple[Limit, ...]] = field(default_factory=lambda: _NONE)
    """level (key, tenant, model) -> limits for those without their own."""
    tenants: Mapping[str, Tenant] = field(default_factory=lambda: _NONE)
    active: bool = False
    """Whether any limit or budget is configured anywhere (else requests skip the policy entirely)."""


def _amount(p: YamlTree, value: Any, path: str) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_AMOUNT:
        p.fail(path, f"expected a number above 0 and at most {MAX_AMOUNT:g}, got {shown(value)}")
        return None
    return float(value)


def limits(p: YamlTree, value: Any, path: str) -> tuple[Limit, ...] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        p.fail(path, "expected a list of limits, e.g. [{requests: 60, per: minute}]")
        return None
    if len(value) > MAX_LIMITS:
        p.fail(path, f"expected at most {MAX_LIMITS} limits, got {len(value)}")
        return None
    parsed: list[Limit] = []
    for i, raw in enumerate(value):
        lpath = f"{path}[{i}]"
        node = p.mapping(raw, lpath)
        measures = [m for m in MEASURES if m in node]
        for unknown in sorted(set(node) - {*MEASURES, "per", "shadow"}):
            p.fail(f"{lpath}.{unknown}", f"unknown field (a limit is one of {', '.join(MEASURES)}, with per "
                                         "and shadow)")
        if len(measures) != 1:
            p.fail(lpath, f"expected exactly one of {', '.join(MEASURES)}")
            continue
        measure = measures[0]
        amount = _amount(p, node[measure], f"{lpath}.{measure}")
        if measure in SLOTS and amount is not None and amount != math.floor(amount):
            p.fail(f"{lpath}.{measure}", f"expected a whole number, got {shown(amount)}")
        per = None
        if measure in SLOTS:
            if "per" in node:
                p.fail(f"{lpath}.per", f"a {measure} limit has no window")
        elif "per" not in node:
            p.fail(f"{lpath}.per", "is required (second, minute, hour, day, week, month or seconds)")
        elif isinstance(window := parse_window(node["per"]), str):
            p.fail(f"{lpath}.per", window)
        else:
            per = window
        shadow = p.bool_(node, "shadow", lpath, False)
        if amount is not None and (per is not None or measure in SLOTS):
            limit = Limit(measure, amount, per, shadow)
            if any(other.name == limit.name for other in parsed):  # they would share one counter
                p.fail(lpath, f"a second {limit.name} limit in this list")
            else:
                parsed.append(limit)
    return tuple(parsed)


def budget(p: YamlTree, value: Any, path: str) -> Budget | None:
    if value is None:
        return None
    node = p.mapping(value, path)
    units = [u for u in BUDGET_UNITS if u in node]
    for unknown in sorted(set(node) - {*BUDGET_UNITS, "period"}):
        p.fail(f"{path}.{unknown}", f"unknown field (a budget is one of {', '.join(BUDGET_UNITS)}, with period)")
    if len(units) != 1:
        p.fail(path, f"expected exactly one of {', '.join(BUDGET_UNITS)}")
        return None
    amount = _amount(p, node[units[0]], f"{path}.{units[0]}")
    period = parse_window(node.get("period", "month"))
    if isinstance(period, str):
        p.fail(f"{path}.period", period)
        return None
    return None if amount is None else Budget(units[0], amount, period)


QUEUE_PRIORITIES = ("high", "normal", "low")


def rules(p: YamlTree, node: dict[str, Any], path: str) -> Rules:
    """The `limits`, `budget` and `queue_priority` of a key or tenant entry."""
    priority = p.str_(node, "queue_priority", path)
    if priority is not None and priority not in QUEUE_PRIORITIES:
        p.fail(f"{path}.queue_priority", f"expected one of {', '.join(QUEUE_PRIORITIES)}, got {shown(priority)}")
        priority = None
    return Rules(limits(p, node.get("limits"), f"{path}.limits"), budget(p, node.get("budget"), f"{path}.budget"),
                 priority)


def tenants_section(p: YamlTree, value: Any, models: Collection[str]) -> dict[str, Tenant]:
    tenants: dict[str, Tenant] = {}
    _distinct_names(p, value, "tenants")
    for name, raw in p.mapping(value, "tenants").items():
        path = f"tenants.{name}"
        node = p.mapping(raw, path)
        for unknown in sorted(set(node) - {"limits", "budget", "models", "queue_priority"}):
            p.fail(f"{path}.{unknown}", "unknown field (limits, budget, models, queue_priority)")
        per_model: dict[str, tuple[Limit, ...]] = {}
        _distinct_names(p, node.get("models"), f"{path}.models")
        for model, raw_limits in p.mapping(node.get("models"), f"{path}.models").items():
            if model not in models:
                p.fail(f"{path}.models.{model}", f"unknown model '{model}'")
            per_model[model] = limits(p, raw_limits, f"{path}.models.{model}") or ()
        tenants[name] = Tenant(rules(p, node, path), MappingProxyType(per_model))
    return tenants


def _distinct_names(p: YamlTree, value: Any, path: str) -> None:
    """YAML keys that read as one name (`1` and `'1'`) would silently merge into one entry."""
    if isinstance(value, dict):
        seen: set[str] = set()
        for name in map(str, value):
            if name in seen:
                p.fail(f"{path}.{name}", "given twice (as a number and as a string?)")
            seen.add(name)


def defaults_section(p: YamlTree, node: dict[str, Any]) -> dict[str, tuple[Limit, ...]]:
    for unknown in sorted(set(node) - set(LEVELS)):
        p.fail(f"limits.{unknown}", f"unknown level (expected {', '.join(LEVELS)})")
    return {level: parsed for level in LEVELS if (parsed := limits(p, node.get(level), f"limits.{level}"))}


def cluster_url(url: str) -> bool:
    """A URL a Redis Cluster client can start from: TCP (no unix socket) and database 0 or none."""
    try:
        parts = urlsplit(url)
        return parts.scheme in ("redis", "rediss") and bool(parts.hostname) and parts.path in ("", "/", "/0")
    except ValueError:  # a malformed port or IPv6 address
        return False


def state_section(p: YamlTree, node: dict[str, Any]) -> StateSettings:
    path, d, ds = "state", StateSettings(), StoreConfig()
    for unknown in sorted(set(node) - set(STATE_FIELDS)):
        p.fail(f"{path}.{unknown}", f"unknown field (expected {', '.join(STATE_FIELDS)})")
    backend = p.str_(node, "backend", path, ds.backend) or ds.backend
    if backend not in BACKENDS:
        p.fail(f"{path}.backend", f"expected one of {', '.join(BACKENDS)}, got '{backend}'")
        backend = ds.backend
    on_error = p.mapping(node.get("on_error"), f"{path}.on_error")
    for unknown in sorted(set(on_error) - {"limits", "budgets"}):
        p.fail(f"{path}.on_error.{unknown}", "unknown feature (limits, budgets)")
    choices = {}
    for feature, default in (("limits", d.limits_on_error), ("budgets", d.budgets_on_error)):
        choices[feature] = p.str_(on_error, feature, f"{path}.on_error", default) or default
        if choices[feature] not in ON_ERROR:
            p.fail(f"{path}.on_error.{feature}", f"expected open or closed, got '{choices[feature]}'")
    key_prefix = p.str_(node, "key_prefix", path, ds.key_prefix) or ds.key_prefix
    if "{" in key_prefix or "}" in key_prefix:
        p.fail(f"{path}.key_prefix", "must not hold { or }: it goes inside each key's Redis Cluster hash tag")
        key_prefix = ds.key_prefix
    url = p.str_(node, "url", path, ds.url) or ds.url
    cluster = p.bool_(node, "cluster", path, ds.cluster)
    if cluster and backend == "redis" and not cluster_url(url):  # the URL may hold a password: not quoted
        p.fail(f"{path}.url", "with cluster: true, expected a redis:// or rediss:// URL of one node with "
                              "database 0 (a cluster has no other)")
    store = StoreConfig(
        backend=backend,  # type: ignore[arg-type]
        path=p.str_(node, "path", path, ds.path) or ds.path,
        url=url,
        key_prefix=key_prefix,
        timeout_s=_bounded(p, node, "timeout_s", ds.timeout_s, 0.001),
        max_connections=int(_bounded(p, node, "max_connections", ds.max_connections, 1)),
        cluster=cluster,
    )
    return StateSettings(store, choices["limits"], choices["budgets"],
                         _bounded(p, node, "lease_ttl_s", d.lease_ttl_s, 1),
                         _bounded(p, node, "retry_s", d.retry_s, 0))


def _bounded(p: YamlTree, node: dict[str, Any], key: str, default: float, minimum: float) -> float:
    return float(p.number(node, key, "state", default, minimum, STATE_MAXIMA[key]))


def policy_section(p: YamlTree, root: dict[str, Any], models: Collection[str], others_active: bool) -> Policy:
    """`state:`, `limits:` and `tenants:`; `others_active`: a key or model carries limits or a budget."""
    defaults = defaults_section(p, p.mapping(root.get("limits"), "limits"))
    tenants = tenants_section(p, root.get("tenants"), models)
    active = others_active or bool(defaults) or any(
        t.rules.limits or t.rules.budget or any(t.models.values()) for t in tenants.values())
    return Policy(state_section(p, p.mapping(root.get("state"), "state")), MappingProxyType(defaults),
                  MappingProxyType(tenants), active)
