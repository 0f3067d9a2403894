"""A recorded answer a double replays instead of making one up: the golden responses of tests/fixtures/<kind>/.

A double with `canned` set answers its transcription route with exactly these bytes, status and headers (after
its own checks of the request), so the gateway is tested against what the engine really said, not against what
the double's author believed it says.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
"""tests/fixtures/: the golden answers, one folder per kind."""


@dataclass(frozen=True, slots=True)
class Canned:
    body: bytes
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})

    def response(self) -> web.Response:
        return web.Response(status=self.status, body=self.body, headers=dict(self.headers))
