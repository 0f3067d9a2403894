"""The Wyoming engine double (tests/fakes/wyoming_engine.py) as a process of its own, for supervised-engine tests
(gateway/engine_process.py): `python -m tests.fakes.wyoming_process --port P` (or `--socket PATH`).

`--exit N` exits with code N at once (a crash loop); `--chunk-delay S` slows its audio (a request to kill it
in the middle of); `--starts FILE` appends a line per start, its pid and time (starts counted across restarts);
`--long-line N` prints a line of N characters; `--ignore-term`
ignores SIGTERM. It prints a line on stdout and one on stderr once it listens,
as real engines log. Blocking calls before the loop serves are fine here: nothing else runs yet.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time

from wyoming.server import AsyncTcpServer, AsyncUnixServer

from tests.fakes.wyoming_engine import FakeWyomingEngine


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int)
    parser.add_argument("--socket")
    parser.add_argument("--exit", type=int)
    parser.add_argument("--chunk-delay", type=float, default=0.0)
    parser.add_argument("--starts")
    parser.add_argument("--long-line", type=int, default=0)
    parser.add_argument("--ignore-term", action="store_true")
    args = parser.parse_args()
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.starts:
        with open(args.starts, "a") as f:  # noqa: ASYNC230
            f.write(f"{os.getpid()} {time.time()}\n")
    if args.exit is not None:
        print("engine failing at once", file=sys.stderr, flush=True)
        return int(args.exit)
    engine = FakeWyomingEngine(("tts",))
    engine.chunk_delay = args.chunk_delay
    server = AsyncUnixServer(args.socket) if args.socket else AsyncTcpServer("127.0.0.1", args.port)
    await server.start(engine.handler)
    if args.long_line:
        print("x" * args.long_line, flush=True)
    print(f"listening (pid {os.getpid()})", flush=True)
    print("a line on stderr", file=sys.stderr, flush=True)
    await asyncio.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
