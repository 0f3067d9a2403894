"""A JSON request body, decoded the way a hostile client cannot turn into a 500.

Python's `json` accepts more than JSON: `NaN`, `Infinity` and `1e999` (which becomes `inf`), and
`"\\ud800"` escapes that decode to lone surrogates no engine can encode; deep nesting raises
`RecursionError`; a `charset` it does not know raises `LookupError`. Each of these is the client's
error, answered here as a 400 before any field is validated or any backend called.
"""

from __future__ import annotations

import codecs
import json
import math
from typing import Any

from gateway.errors import InvalidRequestError

MAX_DEPTH = 16
"""Deeper nesting is refused: OpenAI's audio bodies are two levels deep, and unknown fields are forwarded
to some backends, whose encoders must not be the ones to hit Python's recursion limit."""

def invalid_json(detail: str = "") -> InvalidRequestError:
    return InvalidRequestError(
        "We could not parse the JSON body of your request. The API expects a JSON payload "
        f"(Content-Type: application/json).{' ' + detail if detail else ''}", code="invalid_json")


def parse(body: bytes, charset: str | None) -> Any:
    """The document in `body`, decoded with `charset` (UTF-8 when none is given)."""
    try:
        text = body.decode(codecs.lookup(charset or "utf-8").name)
    except LookupError:
        raise invalid_json("The charset of its Content-Type is unknown.") from None
    except UnicodeDecodeError:
        raise invalid_json("It is not valid text in its charset.") from None
    try:
        document = json.loads(text, parse_constant=not_json, parse_float=_finite)
    except (ValueError, RecursionError):
        raise invalid_json() from None
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and _depth(document) > MAX_DEPTH:
        raise invalid_json(f"It is nested more than {MAX_DEPTH} levels deep.")
    _refuse_surrogates(document)
    return document


def _depth(document: Any) -> int:
    """How deep arrays and objects nest (iteratively: the document may be ~1000 levels deep)."""
    deepest, stack = 0, [(document, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, depth + 1)
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest


def not_json(name: str) -> float:
    """For `json.loads(parse_constant=...)`: NaN and Infinity are Python's, not JSON."""
    raise ValueError(f"{name} is not JSON")


def _finite(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError(f"{literal} is out of range")
    return value


def _refuse_surrogates(document: Any) -> None:
    """Refuse text that is not valid Unicode anywhere in the body, naming the top-level field."""
    if not isinstance(document, dict):
        _check(document, None)
        return
    for key, value in document.items():
        _check(key, None)
        _check(value, key)


def _check(value: Any, param: str | None) -> None:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        where = f"'{param}'" if param else "the body"
        raise InvalidRequestError(f"Invalid {where}: the text is not valid Unicode (it contains a lone "
                                  "surrogate).", param=param, code="invalid_value") from None
