"""Redaction: an engine's own words made safe to show a client or write to a log.

An engine's error text is useful ("voice 'x' not found", "Input should be 'json'") but it is the
engine's, and engines echo what they were sent: the URL the gateway called, the credential it sent,
a proxy's `Authorization` header. Every piece of engine text that reaches a client message or a log
line goes through `redact`, which removes

- this backend's secrets, wherever they appear (any case, URL-encoded too): its configured `url`,
  host:port and (if dotted) host, its `api_key`, and every option whose name says credential (key, token,
  secret, password);
- anything shaped like one, from any backend: `Bearer`/`Token`/`Basic` credentials, `name=value`
  or `name: value` where the name says credential (`api-key=`, `Authorization:`), `sk-...` keys,
  long hex or base64-ish runs, URLs of any scheme, IPv4 addresses;
- control and invisible formatting characters (after which whitespace is collapsed to one line),

and clips what is left to MAX_TEXT characters.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator, Mapping
from functools import lru_cache
from typing import Any
from urllib.parse import quote, quote_plus, urlsplit

from gateway.config import Backend

MAX_TEXT = 300
"""Characters of engine text kept in a client message (OpenAI's own messages are shorter)."""
HIDDEN = "[redacted]"
_MIN_SECRET = 4
"""Shorter configured values (a port, a one-letter host) are left alone: they would mangle plain words."""
_CREDENTIAL_WORDS = r"api[_-]?key|apikey|access[_-]?key|secret|token|password|passwd|authorization|credential|signature"
_CREDENTIAL = re.compile(rf"[\w-]*(?:{_CREDENTIAL_WORDS})[\w-]*", re.IGNORECASE)
"""An option name that says it holds a credential."""
_NAMED = re.compile(rf"(?<![\w-])(?=[\w-]{{0,60}}?(?:{_CREDENTIAL_WORDS}))([\w-]{{1,64}})(\"?\s*[:=]\s*\"?)[^\s,;&\"']+"
                    r"|(?<![\w-])(key|sig)(=)[^\s,;&\"']+", re.IGNORECASE)
"""`api-key=…`, `"x-api-key": "…"`, `Authorization: …`, `?key=…`. Every attempt starts where a word starts and
looks at most 64 characters ahead, so that no hostile text (`a-a-a-…`) makes it quadratic."""
_SHAPES = [
    re.compile(r"\b(?:bearer|basic)\s+[^\s,;\"']+", re.IGNORECASE),
    re.compile(r"\btoken\s+(?=\S*\d)[A-Za-z0-9._~+/=-]{8,}", re.IGNORECASE),
    re.compile(r"\b[a-z][a-z0-9+.-]{1,15}://[^\s\"'<>]+", re.IGNORECASE),
    re.compile(r"\bsk-[A-Za-z0-9_-]{6,}"),
    re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d{1,5})?\b"),
    re.compile(r"(?<![A-Za-z0-9+/_-])(?=[A-Za-z_-]*\d)(?=[0-9_-]*[A-Za-z])[A-Za-z0-9+/_-]{24,}={0,2}"),
]
"""Credentials, URLs and addresses of any backend (or of whatever is behind it)."""


def redact(backend: Backend, text: object, limit: int = MAX_TEXT) -> str:
    """`text` (any value; None is empty) without secrets, credential shapes or control characters, on one line,
    at most `limit` characters."""
    if text is None:
        return ""
    cleaned = " ".join("".join(c for c in str(text)[: limit * 20] if _visible(c)).split())
    for pattern in _secret_patterns(_secrets(backend)):
        cleaned = pattern.sub(HIDDEN, cleaned)
    for pattern in _SHAPES:
        cleaned = pattern.sub(HIDDEN, cleaned)
    cleaned = _NAMED.sub(_keep_name, cleaned)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1].rstrip() + "…"


def _visible(char: str) -> bool:
    """Not a control character (Cc) nor an invisible format character (Cf: zero-width space, bidi controls);
    whitespace stays so that words stay apart."""
    return char.isspace() or unicodedata.category(char) not in ("Cc", "Cf")


def _keep_name(match: re.Match[str]) -> str:
    """The credential's name stays (it says what was there); its value goes."""
    name, separator = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
    return f"{name}{separator}{HIDDEN}"


def _secrets(backend: Backend) -> tuple[str, ...]:
    """What this backend's configuration holds that no client may see, longest first."""
    found: set[str] = set()
    if backend.api_key:
        found.add(backend.api_key)
    if backend.url:
        url = backend.url.rstrip("/")
        found.update({url, url.split("://", 1)[-1]})
        try:
            parts = urlsplit(url)
            host = parts.hostname or ""  # alone only when dotted: a compose service named `whisper` is also a word
            found.update({parts.netloc, parts.netloc.rpartition("@")[2], host if "." in host else ""})
        except ValueError:
            pass
    found.update(_credential_options(backend.options))
    return tuple(sorted((s for s in found if len(s) >= _MIN_SECRET), key=len, reverse=True))


def _credential_options(options: Mapping[str, Any]) -> Iterator[str]:
    """String values under option keys that name a credential, at any depth."""
    for key, value in options.items():
        if isinstance(value, Mapping):
            yield from _credential_options(value)
        elif isinstance(value, str) and _CREDENTIAL.fullmatch(str(key)[:64]):
            yield value


@lru_cache(maxsize=64)
def _secret_patterns(secrets: tuple[str, ...]) -> tuple[re.Pattern[str], ...]:
    """One case-insensitive pattern per secret, matching it as written and URL-encoded."""
    return tuple(re.compile("|".join(re.escape(v) for v in sorted({s, quote(s, safe=""), quote_plus(s)},
                                                                    key=len, reverse=True)), re.IGNORECASE)
                 for s in secrets)
