"""Load balancing among a model's routes: the order a request tries them in, and requests in flight per backend.

Routes are grouped by `priority`, lower first (Envoy's: 0 is the highest); a lower group is reached only when
every route above was ejected, failed or refused for this request (the failover loop in
gateway/handlers/routing.py moves on, outlier ejection's `pick` runs on the order made here). Within a group,
the model's `balance` orders them:
- `weighted`: a weighted random order, as LiteLLM's simple-shuffle and Envoy's weights within a priority: the
  first is route i with probability weight_i / sum, the next likewise among the rest (an exponential race:
  each route draws Exp(weight), smallest first, which is exactly that successive draw);
- `least_busy`: fewest attempts in flight to the route's backend from this process first (LiteLLM's
  least_busy), ties by higher weight, then at random;
- `ordered`: the YAML order (failover only). It is the default of a model none of whose routes sets
  `priority` or `weight`, so that configs written before balancing keep their exact failover order;
  otherwise `weighted` is.

The in-flight count of a backend covers an attempt's whole life: from its start until it fails, or, when it
answered, until the request is over (a stream's last byte, relayed, included); `release` runs then, from
table_middleware, the one place every request passes on its way out.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from aiohttp import web

from gateway.capacity import Slot
from gateway.metering import Metrics
from gateway.models import BALANCES
from gateway.state import HELD
from gateway.table import Candidate

WEIGHTED, LEAST_BUSY, ORDERED = BALANCES


def order(candidates: Sequence[Candidate], balance: str, in_flight: Mapping[str, int],
          rng: random.Random | None = None) -> list[Candidate]:
    """`candidates` in the order this request tries them: by priority, each group by `balance`."""
    rng = rng or _RNG
    if balance == WEIGHTED:
        keys = [(c.route.priority, rng.expovariate(c.route.weight)) for c in candidates]
    elif balance == LEAST_BUSY:
        keys = [(c.route.priority, in_flight.get(c.route.backend, 0), -c.route.weight, rng.random())
                for c in candidates]
    else:
        keys = [(c.route.priority, i) for i, c in enumerate(candidates)]
    return [c for _, c in sorted(zip(keys, candidates, strict=True), key=lambda kc: kc[0])]


_RNG = random.Random()


class InFlight:
    """Attempts in flight per backend from this process (least_busy's input, `gateway_backend_in_flight`)."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.counts: dict[str, int] = {}
        self.metrics = metrics

    def start(self, backend: str) -> None:
        self.counts[backend] = self.counts.get(backend, 0) + 1
        if self.metrics is not None:
            self.metrics.backend_in_flight.labels(backend).inc()

    def end(self, backend: str) -> None:
        left = self.counts.get(backend, 0) - 1
        if left > 0:
            self.counts[backend] = left
        else:
            self.counts.pop(backend, None)
        if self.metrics is not None:
            self.metrics.backend_in_flight.labels(backend).dec()

    def hold(self, request: web.Request, backend: str, slot: Slot) -> None:
        """The attempt on `backend` answered: it stays in flight, holding its slot, until the request is over."""
        request.setdefault(HELD, []).append((backend, slot))

    def release(self, request: web.Request) -> None:
        """The request is over (its stream relayed or cut): its answered attempts end, their slots are freed."""
        for backend, slot in request.pop(HELD, ()):
            slot.release()
            self.end(backend)
