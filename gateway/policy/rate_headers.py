"""OpenAI's rate-limit headers for the gateway's limits: `x-ratelimit-limit-<unit>`,
`x-ratelimit-remaining-<unit>` and `x-ratelimit-reset-<unit>` (a duration such as `20ms` or `6m0s`), with
unit `requests` as OpenAI sends it and `characters`, `audio-seconds`, `speech-seconds` for the audio
measures. When several limits count the same unit (a key's per minute, its tenant's per day), the one with
the least left is shown; a refused request shows the limit that refused it, plus `retry-after-ms`.
"""

from __future__ import annotations

import math

from gateway.policy.rules import Limit


class RateHeaders:
    def __init__(self) -> None:
        self._shown: dict[str, tuple[float, float, float]] = {}
        """measure -> (remaining, limit, reset_s)"""
        self._refused: tuple[str, float] | None = None

    def note(self, limit: Limit, remaining: float, reset_s: float, refused: bool = False) -> None:
        held = self._shown.get(limit.measure)
        if refused or held is None or remaining < held[0]:
            self._shown[limit.measure] = (max(0.0, remaining), limit.amount, reset_s)
        if refused:
            self._refused = (limit.measure, reset_s)

    def headers(self) -> dict[str, str]:
        headers = {}
        for measure, (remaining, limit, reset_s) in self._shown.items():
            unit = measure.replace("_", "-")
            headers[f"x-ratelimit-limit-{unit}"] = _number(limit)
            headers[f"x-ratelimit-remaining-{unit}"] = _number(remaining)
            headers[f"x-ratelimit-reset-{unit}"] = duration(reset_s)
        if self._refused is not None:
            headers["retry-after-ms"] = str(max(1, math.ceil(self._refused[1] * 1000)))
        return headers


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:.3f}".rstrip("0")


def duration(seconds: float) -> str:
    """`20ms`, `1s`, `1.5s`, `6m0s`, `2h0m0s`, as OpenAI writes them (Go's durations)."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{int(hours)}h{int(minutes)}m{text}"
    return f"{int(minutes)}m{text}" if minutes else text
