"""A backend's readiness probe as its YAML declares it: which path to ask, with which method, and which statuses
mean "up". Any HTTP kind may take the block; the `openai` kind does (default: OpenAI's `GET <url>/models`, 200).

    backends.<b>.probe: {path: models, method: GET, up: [200]}

`path` without a leading slash is relative to the backend's `url` (`models` -> `http://h:8000/v1/models`); with one,
it is relative to the server's root (`/health` -> `http://h:8000/health`): the usual URL resolution, and
the way to reach a health route outside `/v1`. It always stays on the backend's own host (an absolute or
scheme-relative URL is refused), and the probe is GET or HEAD only: a probe never synthesizes nor transcribes,
so it never bills. Redirects are not followed: a 3xx is the probe's answer, "up" only if listed.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from gateway.adapters.http_engine import probe
from gateway.config import Backend

METHODS = ("GET", "HEAD")
"""Methods that read without side effects (RFC 9110 "safe"): a readiness probe must not create work."""
MAX_PATH_CHARS = 1024
_PATH_CHARS = frozenset(string.ascii_letters + string.digits + "-._~/?&=%+:@!$'()*,;")
"""RFC 3986 path and query characters, unescaped; anything else (spaces, controls, `#`, `\\`) is refused."""


@dataclass(frozen=True, slots=True)
class ProbeSpec:
    path: str = "models"
    method: str = "GET"
    up: frozenset[int] = frozenset({200})

    def url(self, base: str) -> str:
        """The probe's URL from the backend's `url` (see the module docstring)."""
        if self.path.startswith("/"):
            parts = urlsplit(base)
            return f"{parts.scheme}://{parts.netloc}{self.path}"
        return f"{base.rstrip('/')}/{self.path}"

    async def ask(self, backend: Backend, http: aiohttp.ClientSession, headers: dict[str, str]) -> bool:
        """True when the backend answers this probe, within its connect timeout, with an `up` status."""
        return await probe(backend, http, self.url(backend.url or ""), headers, up=self.up.__contains__,
                           method=self.method, allow_redirects=False)


OPENAI_PROBE = ProbeSpec()
"""OpenAI's `GET /v1/models`: every OpenAI-compatible server that lists its models answers it with 200."""


def probe_spec(backend: Backend, default: ProbeSpec) -> ProbeSpec:
    """The backend's `probe:` block over `default`; a ValueError by YAML path for anything else."""
    where = f"backends.{backend.name}.probe"
    raw = backend.options.get("probe")
    if raw is None:
        return default
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: expected a mapping with path, method, up")
    unknown = sorted(str(k) for k in raw if k not in ("path", "method", "up"))
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown option (known: path, method, up)")
    return ProbeSpec(_path(where, raw.get("path", default.path)), _method(where, raw.get("method", default.method)),
                     _up(where, raw.get("up", sorted(default.up))))


def _path(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}.path: expected a path such as 'models' (relative to url) or '/health'")
    if value.startswith("//") or "://" in value:
        raise ValueError(f"{where}.path: '{value}' is a URL; the probe stays on the backend's own host "
                         "(a path relative to url, or one from the server's root)")
    if len(value) > MAX_PATH_CHARS or not set(value) <= _PATH_CHARS:
        raise ValueError(f"{where}.path: expected at most {MAX_PATH_CHARS} URL path characters "
                         "(no spaces, controls, '#' or '\\')")
    if ".." in value.split("?")[0].split("/"):
        raise ValueError(f"{where}.path: '..' is not allowed; a path from the server's root starts with '/'")
    return value


def _method(where: str, value: Any) -> str:
    method = value.upper() if isinstance(value, str) else value
    if method not in METHODS:
        raise ValueError(f"{where}.method: expected GET or HEAD, got {value!r} (a probe never synthesizes "
                         "nor transcribes)")
    return method


def _up(where: str, value: Any) -> frozenset[int]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}.up: expected a non-empty list of HTTP statuses, e.g. [200]")
    for status in value:
        if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
            raise ValueError(f"{where}.up: expected HTTP statuses from 200 to 599, got {status!r}")
    return frozenset(value)
