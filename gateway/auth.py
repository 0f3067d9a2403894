"""Client authentication: a gateway key (Bearer or X-API-Key) resolved to a tenant, in constant time.

The key itself never leaves this module: it is hashed on arrival and only the configured key's
name and tenant travel on with the request. Backends get their own credentials from config.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from aiohttp import web

from gateway.config import Config, Key
from gateway.errors import AuthenticationError, PermissionDeniedError
from gateway.policy.rules import Rules

MISSING_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header "
    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the X-API-Key header."
)


@dataclass(frozen=True, slots=True)
class Identity:
    key_name: str
    tenant: str
    models: frozenset[str] | None
    rules: Rules
    """The key's own limits and budget."""

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models

    def require(self, model: str) -> None:
        if not self.may_use(model):
            raise PermissionDeniedError(
                f"Key '{self.key_name}' does not have access to model `{model}`.",
                param="model",
                code="model_not_found",
            )


def presented_key(request: web.Request) -> str | None:
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    key = request.headers.get("X-API-Key", "").strip()
    return key or None


def authenticate(config: Config, key: str | None) -> Identity:
    """The identity a presented key maps to; every configured digest is compared, in constant time."""
    if key is None:
        raise AuthenticationError(MISSING_KEY)
    try:
        digest = hashlib.sha256(key.encode()).digest()
    except UnicodeEncodeError:  # bytes that are not UTF-8 (aiohttp keeps them as surrogates): no key's
        digest = b""
    match: Key | None = None
    for candidate in config.keys:
        if hmac.compare_digest(digest, candidate.sha256):
            match = candidate
    if match is None:
        raise AuthenticationError("Incorrect API key provided. The gateway does not echo keys back; "
                                  "check the key you configured.", code="invalid_api_key")
    return Identity(match.name, match.tenant, match.models, match.rules)
