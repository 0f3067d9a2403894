"""Retries before the first byte: which failures are worth another attempt, and after how long.

A model's routes are each tried once, in the order balancing makes (failover: what routes are for). A route
whose failure was transient is then tried again, up to `attempts` times in all, each time after every other
route had its turn and after a backoff: `backoff_s` doubled per retry, capped at `max_backoff_s`, jittered
(a uniform draw between half and all of it, so that requests failed together do not return together), or
the backend's own `Retry-After` when it is longer and at most `retry_after_max_s` (a longer one: that
route is not retried; a 429 without one counts as 1 s, whole seconds as the client gets them). No retry
starts past `budget_s` after the first attempt began, nor past the model's `deadline_s`, nor on a backend
ejected meanwhile. Once a byte went to the client nothing is retried (gateway/streaming.py): the loop in
gateway/handlers/routing.py returns at the first attempt that answered.

Transient (retried on the same route): unreachable, timed out, cut mid-answer, the backend's 5xx, its own
408/504, its 429. Not retried on the same route: what would fail the same way again (a refused credential,
a missing model, garbage, audio that cannot be transcoded, an engine's error) and a full or timed-out
queue (it already waited). Those where no retry by the client can help either say `x-should-retry: false`,
since OpenAI's SDKs retry 5xx twice by themselves: `FINAL`.

Defaults, per model in `models.<m>.retry`: same-route retries are off (`attempts: 1`), as in Envoy, whose
routes retry only with a retry policy, and LiteLLM (`num_retries: 0`): OpenAI's SDKs already retry a 429 or
5xx twice, and a retry after a timeout doubles the wait. Failover to the other routes needs no setting.
Turned on (`attempts: 2` is Envoy's `num_retries: 1`), they stay few and fast: 0.1 s doubling to 1 s (Envoy
starts at 25 ms, the SDKs at 0.5 s), a Retry-After honoured up to 2 s, none later than 10 s into the request.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from gateway.errors import GatewayError, Reason
from gateway.yaml_tree import YamlTree

TRANSIENT = frozenset({Reason.CONNECT, Reason.TIMEOUT, Reason.DISCONNECT, Reason.BACKEND_5XX,
                       Reason.BACKEND_TIMEOUT, Reason.BACKEND_RATE_LIMIT})
FINAL = frozenset({Reason.BACKEND_AUTH, Reason.BACKEND_NOT_FOUND, Reason.UNAVAILABLE_KIND, Reason.BAD_AUDIO})
"""Failures no retry fixes, by the gateway or the client: a config or credential to correct, audio that will
not transcode again."""
_RNG = random.Random()


@dataclass(frozen=True, slots=True)
class Retry:
    """`models.<m>.retry`."""

    attempts: int = 1
    """Attempts per route in all; 1 (the default): no retries, each route is tried once."""
    backoff_s: float = 0.1
    """The wait before a route's first retry; doubled for each further one."""
    max_backoff_s: float = 1.0
    retry_after_max_s: float = 2.0
    """A backend's Retry-After up to this is waited for; a longer one is not (that route is not retried)."""
    budget_s: float = 10.0
    """No retry starts later than this after the request's first attempt began."""

    def delay(self, retry: int, failure: GatewayError) -> float | None:
        """Seconds to wait before the `retry`-th retry (1, 2...) of a route that failed with `failure`; None: it
        is not to be retried."""
        if failure.reason not in TRANSIENT or retry >= self.attempts:
            return None
        backoff = min(self.max_backoff_s, self.backoff_s * 2 ** (retry - 1)) * _RNG.uniform(0.5, 1.0)
        if failure.retry_after is not None:
            if failure.retry_after > self.retry_after_max_s:
                return None
            backoff = max(backoff, float(failure.retry_after))
        return backoff


_FIELDS = ("attempts", "backoff_s", "max_backoff_s", "retry_after_max_s", "budget_s")


def retry_section(p: YamlTree, value: Any, path: str) -> Retry:
    node = p.mapping(value, path)
    for unknown in sorted(set(node) - set(_FIELDS)):
        p.fail(f"{path}.{unknown}", f"unknown setting ({', '.join(_FIELDS)})")
    d = Retry()
    attempts = p.number(node, "attempts", path, d.attempts, 1, 10)
    if attempts != int(attempts):
        p.fail(f"{path}.attempts", f"expected a whole number, got {attempts}")
    backoff = p.number(node, "backoff_s", path, d.backoff_s, 0, 60)
    cap = p.number(node, "max_backoff_s", path, max(d.max_backoff_s, backoff), backoff, 600)
    return Retry(int(attempts), backoff, cap, p.number(node, "retry_after_max_s", path, d.retry_after_max_s, 0, 600),
                 p.number(node, "budget_s", path, d.budget_s, 0, 86_400))
