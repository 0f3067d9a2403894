"""Passive health: outlier ejection per backend, in memory, per process (Envoy's outlier detection).

A backend that fails `consecutive_failures` times in a row is ejected, and so is one that, within a window of
`interval_s`, had at least `failure_percentage_request_volume` attempts of which at least `failure_percentage`
percent failed (a backend failing 9 requests in 10 may never fail 5 in a row). Either way requests skip it for
`base_ejection_s` x the number of times it was ejected, capped at `max_ejection_s`. Then it is half-open:
the next request may use it as the one trial (one at a time); the trial's success returns it to rotation,
its failure ejects it again for longer. The multiplier drops back to zero once the backend has stayed in
rotation for `max_ejection_s`. A request already sent to it when it is ejected is not affected.

What counts (`first_success` and the background prober report it):
- a failure: UpstreamError (unreachable, timeout, 5xx, garbage, a refused credential), and a failed probe;
- "busy", neither failure nor success: the backend's own 429. It is alive and protecting itself; ejecting it
  would pile its load onto the others (Envoy's consecutive_5xx and gateway-failure detectors do not count
  429 either); the retry policy moves such a request to another route instead;
- a success: any answer, including the client's own 4xx relayed from the backend (as in Envoy, where any
  non-5xx resets the run): the backend worked, the request was wrong.
The ratio's window is fixed, per backend: it begins with the first attempt counted after the last window
ended and lasts `interval_s`; then the counts start afresh. It is judged at each attempt counted once the
volume is reached, not at the window's end as Envoy's interval timer does: a backend failing every request
is ejected at its `failure_percentage_request_volume`th attempt, not up to `interval_s` and many failed
requests later. Only attempts while the backend is in rotation count (not those sent to it while ejected,
nor its trial), and an ejection empties the window, so a backend back from one is judged on new attempts.
Probes count toward the consecutive failures but not toward the ratio: they are not requests, and only the
failed ones are reported (a probe's success says nothing of inference), so they would only ever push the
ratio up, the more so the quieter the gateway.
A successful probe does not end an ejection early (Envoy's default does when it runs active checks): the
probe asks a cheap path (a model list, a socket) while the ejection came from real requests, so a backend
whose inference fails but whose list answers would otherwise bounce in and out every probe interval.

At most `max_ejected_percent` of a model's routes are skipped at once, at least one and never all: a model's
only backend is never skipped (it is still tried, and its failures still decide its state); of a model of
two routes, one may be skipped. Skipped routes keep their order; ejected routes past the share are tried.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.config import Backend
from gateway.metering import Metrics
from gateway.settings import Outlier
from gateway.table import Candidate, TableHolder

log = logging.getLogger("gateway.ejection")

FAILURE, SUCCESS, BUSY, UNDECIDED = "failure", "success", "busy", "undecided"


@dataclass(slots=True)
class _Backend:
    backend: Backend
    failures: int = 0
    """Consecutive failures."""
    ejections: int = 0
    """The multiplier of the next ejection's length."""
    until: float | None = None
    """Ejected until then (time.monotonic()); None: in rotation."""
    trial: bool = False
    """The half-open trial request is in flight."""
    returned_at: float = 0.0
    window_start: float = -math.inf
    """When the ratio's current window began."""
    attempts: int = 0
    """Attempts counted in the current window (failures and successes, not "busy", not probes)..."""
    failed: int = 0
    """...and the failures among them."""


class Ejections:
    """Every backend's ejection state, read and fed by each request's routing and by the prober."""

    def __init__(self, tables: TableHolder, metrics: Metrics | None = None) -> None:
        self.tables = tables
        self.metrics = metrics
        self._states: dict[str, _Backend] = {}
        if metrics is not None:
            metrics.view.ejections = self

    def _settings(self, name: str) -> Outlier:
        return self.tables.current.config.outlier.get(name) or Outlier()

    def _state(self, backend: Backend) -> _Backend | None:
        """`backend`'s state; a changed backend starts afresh, a removed one is forgotten. None: `backend` is
        a setting no longer served (a request on a replaced snapshot): its outcome is not recorded."""
        current = self.tables.current.config.backends
        for gone in [n for n in self._states if n not in current]:
            del self._states[gone]
        state = self._states.get(backend.name)
        if state is None or state.backend != backend:
            if current.get(backend.name) != backend:
                return None
            state = self._states[backend.name] = _Backend(backend)
        return state

    def pick(self, candidates: Sequence[Candidate], now: float | None = None) -> list[tuple[Candidate, bool]]:
        """`candidates` in order without those ejected (or whose trial is taken), up to the allowed share;
        each with True where it is kept although ejected (past the share): tried anyway, as in rotation."""
        now = time.monotonic() if now is None else now
        picked: list[tuple[Candidate, bool]] = []
        skipped = 0
        for c in candidates:
            state = self._state(c.adapter.backend)
            settings = self._settings(c.route.backend)
            out = state is not None and settings.enabled and state.until is not None \
                and (now < state.until or state.trial)
            if out:
                share = math.floor(settings.max_ejected_percent * len(candidates) / 100)
                if skipped < min(max(1, share), len(candidates) - 1):
                    skipped += 1
                    continue
            picked.append((c, out))
        return picked

    def begin(self, backend: Backend, now: float | None = None) -> bool | None:
        """An attempt on `backend` is about to start. True: it is the half-open trial (its outcome decides);
        False: the backend is in rotation; None: it is not to be tried now (ejected, or its trial taken by
        another request since `pick`)."""
        state = self._state(backend)
        now = time.monotonic() if now is None else now
        if state is None or state.until is None or not self._settings(backend.name).enabled:
            return False
        if now < state.until or state.trial:
            return None
        state.trial = True
        return True

    def record(self, backend: Backend, outcome: str, trial: bool = False, now: float | None = None,
               probe: bool = False) -> None:
        """What an attempt (or a `probe`, never a trial) on `backend` came to."""
        state = self._state(backend)
        settings = self._settings(backend.name)
        if state is None:
            return
        now = time.monotonic() if now is None else now
        if trial:
            state.trial = False
        if not settings.enabled:
            state.failures, state.until, state.attempts, state.failed = 0, None, 0, 0
            return
        if state.until is None and not probe and outcome in (SUCCESS, FAILURE) \
                and settings.failure_percentage is not None:
            self._count(state, settings, outcome == FAILURE, now)
        if outcome == SUCCESS:
            state.failures = 0
            if trial:
                state.until, state.returned_at = None, now
                log.warning("backend %s: back in rotation after a successful trial", backend.name)
            elif state.until is None and state.ejections and now - state.returned_at >= settings.max_ejection_s:
                state.ejections = 0
        elif outcome == FAILURE:
            state.failures += 1
            if trial or (state.until is None and state.failures >= settings.consecutive_failures):
                self._eject(state, settings, now, "its trial failed" if trial
                            else f"{state.failures} consecutive failures")

    def _count(self, state: _Backend, settings: Outlier, failed: bool, now: float) -> None:
        """One attempt in the ratio's window (a new window once the last one is `interval_s` old); ejects the
        backend once the window holds the volume and the failures reach the percentage."""
        if now - state.window_start >= settings.interval_s:
            state.window_start, state.attempts, state.failed = now, 0, 0
        state.attempts += 1
        state.failed += failed
        if state.attempts >= settings.failure_percentage_request_volume \
                and state.failed * 100 >= (settings.failure_percentage or 0) * state.attempts:
            self._eject(state, settings, now, f"{state.failed} of {state.attempts} attempts failed within "
                                              f"{now - state.window_start:.3g} s")

    def _eject(self, state: _Backend, settings: Outlier, now: float, why: str) -> None:
        state.window_start, state.attempts, state.failed = -math.inf, 0, 0  # counted afresh once back
        state.ejections += 1
        seconds = min(settings.base_ejection_s * state.ejections, settings.max_ejection_s)
        state.until = now + seconds
        log.warning("backend %s: ejected for %.3g s (%s; ejection %d)", state.backend.name, seconds, why,
                    state.ejections)
        if self.metrics is not None:
            self.metrics.ejections.labels(state.backend.name).inc()

    def ejected(self, now: float | None = None) -> dict[str, float | None]:
        """backend name -> seconds of ejection left (0: half-open, waiting for its trial), or None: in rotation.
        For the gauge and /readyz."""
        now = time.monotonic() if now is None else now
        current = self.tables.current.config.backends if self.tables.serving else {}
        found: dict[str, float | None] = {name: None for name in current}
        for name, state in self._states.items():
            if name in found and state.until is not None and state.backend == current[name]:
                found[name] = round(max(0.0, state.until - now), 3)
        return found
