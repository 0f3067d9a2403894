"""Reading a YAML tree by path: typed reads that collect every problem under its path instead of
stopping at the first, and ${NAME} / ${NAME:-default} interpolation from the environment."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
MAX_DEPTH = 32
"""Deepest nesting a config may have (the deepest real one, an adapter's options, is about 5)."""
MAX_VALUES = 100_000
"""Most values a config may hold once YAML aliases are expanded (a few "billion laughs" lines would
otherwise expand to gigabytes on every reload)."""
MAX_SECONDS = 86_400.0
"""The longest optional duration (`seconds`): a day."""


class YamlTree:
    """Walks the YAML tree, threading the path, collecting problems instead of stopping."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.problems: list[str] = []
        self._values = 0

    def fail(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}" if path else message)

    def interpolate(self, value: Any, path: str, depth: int = 0) -> Any:
        """A copy of the tree with ${NAME} replaced; too deep or too large a tree is a problem, not a crash."""
        self._values += 1
        if self._values == MAX_VALUES + 1:
            self.fail(path, f"more than {MAX_VALUES} values (YAML aliases expanded)")
        if self._values > MAX_VALUES:
            return None
        if depth > MAX_DEPTH and isinstance(value, (dict, list)):
            self.fail(path, f"nested more than {MAX_DEPTH} levels deep")
            return None
        if isinstance(value, str):
            if not _encodable(value):
                self.fail(path, f"not valid Unicode: '{_escaped(value)}' holds a lone surrogate (a \\udXXX escape)")
                return ""
            def sub(m: re.Match[str]) -> str:
                name, default = m.group(1), m.group(2)
                if name in self.environ:
                    return self.environ[name]
                if default is not None:
                    return default
                self.fail(path, f"environment variable {name} is not set")
                return ""
            return _ENV.sub(sub, value)
        if isinstance(value, dict):
            tree: dict[Any, Any] = {}
            for k, v in value.items():
                if isinstance(k, str) and not _encodable(k):
                    k = _escaped(k)
                    self.fail(f"{path}.{k}" if path else k, "not valid Unicode: the name holds a lone surrogate")
                tree[k] = self.interpolate(v, f"{path}.{k}" if path else str(k), depth + 1)
            return tree
        if isinstance(value, list):
            return [self.interpolate(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value)]
        return value

    def mapping(self, value: Any, path: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping, got {type(value).__name__}")
            return {}
        return {str(k): v for k, v in value.items()}

    def str_(self, node: dict[str, Any], key: str, path: str, default: str | None = None,
             required: bool = False) -> str | None:
        value = node.get(key, default)
        if value is None:
            if required:
                self.fail(f"{path}.{key}", "is required")
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            self.fail(f"{path}.{key}", f"expected a string, got {type(value).__name__}")
            return None
        return str(value)

    def number(self, node: dict[str, Any], key: str, path: str, default: float,
               minimum: float = 0.0, maximum: float | None = None) -> float:
        value = node.get(key, default)
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or (isinstance(value, float) and not math.isfinite(value)) \
                or value < minimum:  # NaN compares false with everything, and int(inf) raises
            self.fail(f"{path}.{key}", f"expected a number >= {minimum}, got {shown(value)}")
            return default
        if maximum is not None and value > maximum:
            self.fail(f"{path}.{key}", f"expected a number from {minimum} to {maximum:.15g}, got {shown(value)}")
            return default
        return value

    def whole(self, node: dict[str, Any], key: str, path: str, default: int, minimum: float = 0.0,
              maximum: float | None = None) -> int:
        """`number`, which must also be a whole number (a count: slots, chunks, sessions, bytes)."""
        value = self.number(node, key, path, default, minimum, maximum)
        if value != int(value):
            self.fail(f"{path}.{key}", f"expected a whole number, got {shown(value)}")
        return int(value)

    def seconds(self, node: dict[str, Any], key: str, path: str, maximum: float = MAX_SECONDS) -> float | None:
        """An optional duration: absent (or null) is None, "off"; else a finite number of seconds above 0 and at
        most `maximum` (0 would refuse every request, a day already means "never")."""
        value = node.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= maximum:
            self.fail(f"{path}.{key}", f"expected seconds above 0 and at most {maximum:g}, got {shown(value)}")
            return None
        return float(value)

    def bool_(self, node: dict[str, Any], key: str, path: str, default: bool) -> bool:
        value = node.get(key, default)
        if not isinstance(value, bool):
            self.fail(f"{path}.{key}", f"expected true or false, got {shown(value)}")
            return default
        return value

    def str_list(self, value: Any, path: str) -> tuple[str, ...]:
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, list) or not all(isinstance(v, (str, int)) for v in value):
            self.fail(path, "expected a list of strings")
            return ()
        return tuple(str(v) for v in value)


def shown(value: Any) -> str:
    """A value as a problem quotes it: cut short, so a huge list or a 4000-digit number stays one line."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:50]}... ({len(text)} characters)"


def _encodable(text: str) -> bool:
    """Whether `text` can be written as UTF-8: YAML's \\udXXX escapes make lone surrogates, which would
    fail later, on every request, wherever the name is encoded (a store key, a metrics label, a log line)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _escaped(text: str) -> str:
    """`text` with its lone surrogates written as \\udXXX, so the problem naming it can be printed."""
    return text.encode("utf-8", "backslashreplace").decode()
