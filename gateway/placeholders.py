"""`{port}`, `{socket}`, `{python}` and `{package:NAME}` in a backend's `url` and `process:` values.

A supervised engine (gateway/engine_process.py) must listen where the gateway connects, on an address the
gateway picks: `{port}` is a free loopback port, `{socket}` a Unix socket path in a directory of the
gateway's own, each picked once per backend name per gateway start, so that a reload keeps them (an
engine whose block did not change keeps running on the same address). `{python}` is this interpreter, so
an engine installed next to the gateway runs in the same environment; `{package:NAME}` the directory of
the installed top-level package NAME (found without importing it: a GPL engine's package must never be
imported into the gateway), so bundled model files need no absolute path.

In `serve --workers N` the parent picks (it owns the engines, gateway/supervisor.py) and writes what it
picked to `assigned.json` in its directory, whose path its workers get in GATEWAY_ENGINE_DIR: a worker
only reads it, so every process connects to the address the one engine listens on.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ENV_DIR = "GATEWAY_ENGINE_DIR"
"""Set by the parent of `serve --workers N` for its workers: the directory holding `assigned.json`."""
_PLACEHOLDER = re.compile(r"\{(port|socket|python|package:([^{}]*))\}")
_UNKNOWN = re.compile(r"\{([a-z_]+)(:[^{}]*)?\}")


def free_port() -> int:
    """A loopback port nothing listens on now (the kernel's pick; the engine binds it moments later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def package_dir(name: str) -> str | None:
    """The directory of the installed top-level package `name`, found without importing it; None if absent."""
    if not name.isidentifier():
        return None
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return str(next(iter(spec.submodule_search_locations)))
    return str(Path(spec.origin).parent) if spec.origin else None


class Placeholders:
    """The addresses picked for this gateway start, by backend name; shared by every parse (reloads too)."""

    def __init__(self, inherited: str | None = None, shared: bool = False) -> None:
        self._dir: str | None = inherited
        self._inherited = inherited is not None
        self.shared = shared
        """Write what is picked to `assigned.json`, for workers (the parent of `serve --workers N`)."""
        self._assigned: dict[str, dict[str, str]] = {}

    @classmethod
    def for_process(cls) -> Placeholders:
        """A worker's (reading what its parent picked) or a fresh set."""
        return cls(os.environ.get(ENV_DIR) or None)

    @property
    def directory(self) -> str:
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="gateway-engines-")
        return self._dir

    def resolve(self, text: str, backend: str, fail: Callable[[str, str], None], path: str) -> str:
        """`text` with its placeholders replaced; an unknown one or a missing package is `fail(path, why)`."""
        def sub(m: re.Match[str]) -> str:
            what = m.group(1)
            if what == "python":
                return sys.executable
            if what.startswith("package:"):
                found = package_dir(m.group(2))
                if found is None:
                    fail(path, f"{{package:{m.group(2)}}}: no installed Python package '{m.group(2)}'")
                    return ""
                return found
            return self._address(backend, what, fail, path)

        for m in _UNKNOWN.finditer(_PLACEHOLDER.sub("", text)):
            fail(path, f"unknown placeholder {m.group(0)!r} (known: {{port}}, {{socket}}, {{python}}, "
                       "{package:NAME})")
        return _PLACEHOLDER.sub(sub, text)

    def _address(self, backend: str, what: str, fail: Callable[[str, str], None], path: str) -> str:
        if self._inherited:
            try:
                found = json.loads(Path(self.directory, "assigned.json").read_text()).get(backend, {}).get(what)
            except (OSError, ValueError, AttributeError):
                found = None
            if found is None:
                fail(path, f"{{{what}}} for backend '{backend}' was not picked by the parent process yet")
                return ""
            return str(found)
        mine = self._assigned.setdefault(backend, {})
        if what not in mine:
            index = len(self._assigned)  # a socket path by number: a backend name may be anything
            mine[what] = str(free_port()) if what == "port" else str(Path(self.directory, f"{index}.sock"))
            if self.shared:
                tmp = Path(self.directory, "assigned.json.tmp")
                tmp.write_text(json.dumps(self._assigned))
                tmp.replace(Path(self.directory, "assigned.json"))
        return mine[what]

    def cleanup(self) -> None:
        """Remove the directory (sockets, assignments) of a gateway that picked them; a worker leaves it."""
        if self._dir is not None and not self._inherited:
            shutil.rmtree(self._dir, ignore_errors=True)
