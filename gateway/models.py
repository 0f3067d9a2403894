"""Public models, as the YAML's `models:` section defines them: the task, the routes (backend, native
model, priority, weight), how routes share requests (`balance`), retries, and the price. Parsed by
gateway/config.py's `parse_config` through `models_section`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from gateway.policy import rules as policy_rules
from gateway.policy.rules import Limit
from gateway.retry import Retry, retry_section
from gateway.yaml_tree import YamlTree, shown

TASKS = ("speech", "transcription")
BALANCES = ("weighted", "least_busy", "ordered")
"""A model's `balance` (gateway/balance.py)."""
MAX_PRIORITY = 1000
MIN_WEIGHT, MAX_WEIGHT = 0.001, 1_000_000
"""A route's weight: positive (0 would be a route never used: remove it instead), and bounded, so that the
ratio of two weights stays a meaningful share."""


@dataclass(frozen=True, slots=True)
class Route:
    backend: str
    model: str
    priority: int = 0
    """Lower is tried first (Envoy's: 0 is the highest); a lower group only once every route above failed."""
    weight: float = 1.0
    """Its share within its priority under `balance: weighted` (gateway/balance.py)."""


@dataclass(frozen=True, slots=True)
class Price:
    """USD prices for a public model; either may be zero."""

    per_million_characters: float = 0.0
    per_audio_minute: float = 0.0

    def cost(self, characters: float, seconds: float) -> float:
        return characters / 1_000_000 * self.per_million_characters + seconds / 60 * self.per_audio_minute


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    task: str
    routes: tuple[Route, ...]
    owned_by: str = "gateway"
    price: Price | None = None
    """None: no cost is counted for this model."""
    limits: tuple[Limit, ...] | None = None
    """Limits of each tenant on this model (None: `limits.model`, the default)."""
    balance: str = "ordered"
    """How routes of one priority share its requests: weighted, least_busy or ordered (gateway/balance.py);
    default `ordered` when no route sets priority or weight (the YAML order, as before balancing), else
    `weighted`."""
    retry: Retry = field(default_factory=Retry)
    """Retries before the first byte (gateway/retry.py)."""
    deadline_s: float | None = None
    """Transcription only: the longest the gateway works on one request across all its attempts and failovers,
    from when its routes are first tried; then a 504 (gateway/deadlines.py). None: off (each attempt is bounded
    by its backend's timeout_s between reads only). A retry loop must not start an attempt past it."""


def _price(p: YamlTree, value: Any, path: str) -> Price | None:
    if value is None:
        return None
    node = p.mapping(value, path)
    for unknown in sorted(set(node) - {"per_million_characters", "per_audio_minute"}):
        p.fail(f"{path}.{unknown}", "unknown price (per_million_characters, per_audio_minute)")
    return Price(p.number(node, "per_million_characters", path, 0.0),
                 p.number(node, "per_audio_minute", path, 0.0))


def models_section(p: YamlTree, value: Any, backends: Collection[str]) -> dict[str, Model]:
    """`models:`, each route's backend checked against `backends` (their names)."""
    models: dict[str, Model] = {}
    for name, raw in p.mapping(value, "models").items():
        path = f"models.{name}"
        node = p.mapping(raw, path)
        task = p.str_(node, "task", path, required=True) or ""
        if task and task not in TASKS:
            p.fail(f"{path}.task", f"expected one of {', '.join(TASKS)}, got '{task}'")
        raw_routes = node.get("routes")
        if not isinstance(raw_routes, list) or not raw_routes:
            p.fail(f"{path}.routes", "expected a non-empty list of {backend, model}")
            raw_routes = []
        routes: list[Route] = []
        balancing = False
        for i, r in enumerate(raw_routes):
            rpath = f"{path}.routes[{i}]"
            rnode = p.mapping(r, rpath)
            for unknown in [k for k in rnode if k not in _ROUTE_FIELDS]:  # a misspelt `weight` would go unseen
                p.fail(f"{rpath}.{unknown}", f"unknown setting (a route has {', '.join(_ROUTE_FIELDS)})")
            backend = p.str_(rnode, "backend", rpath, required=True)
            if backend is not None and backend not in backends:
                p.fail(f"{rpath}.backend", f"unknown backend '{backend}'")
            model = p.str_(rnode, "model", rpath, name) or name
            balancing = balancing or "priority" in rnode or "weight" in rnode
            priority, weight = _priority(p, rnode, rpath), _weight(p, rnode, rpath)
            if backend:
                routes.append(Route(backend, model, priority, weight))
        balance = p.str_(node, "balance", path, "weighted" if balancing else "ordered") or "ordered"
        if balance not in BALANCES:
            p.fail(f"{path}.balance", f"expected one of {', '.join(BALANCES)}, got {shown(balance)}")
            balance = "ordered"
        owned_by = p.str_(node, "owned_by", path, "gateway") or "gateway"
        deadline = p.seconds(node, "deadline_s", path)
        if deadline is not None and task == "speech":
            p.fail(f"{path}.deadline_s", "only for transcription models: a speech stream lasts as long as its "
                   "audio (bound the wait for its first byte with backends.<b>.first_byte_timeout_s)")
        models[name] = Model(name, task, tuple(routes), owned_by, _price(p, node.get("price"), f"{path}.price"),
                             policy_rules.limits(p, node.get("limits"), f"{path}.limits"), balance,
                             retry_section(p, node.get("retry"), f"{path}.retry"), deadline)
    return models


_ROUTE_FIELDS = ("backend", "model", "priority", "weight")


def _priority(p: YamlTree, node: dict[str, Any], path: str) -> int:
    value = node.get("priority", 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PRIORITY:
        p.fail(f"{path}.priority", f"expected an integer from 0 (tried first) to {MAX_PRIORITY}, got {shown(value)}")
        return 0
    return value


def _weight(p: YamlTree, node: dict[str, Any], path: str) -> float:
    return float(p.number(node, "weight", path, 1.0, MIN_WEIGHT, MAX_WEIGHT))
