"""The command line: `gateway serve --config PATH [--workers N]` and `gateway check-config PATH...`. Parsing only."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from dataclasses import replace

from gateway import __version__, allocator, event_loop, server
from gateway.adapters import ADAPTERS, build_adapters, unavailable_kinds
from gateway.config import Config, ConfigError, has_slots, load_config, unservable
from gateway.logs import queued_logging
from gateway.placeholders import Placeholders
from gateway.policy.shared import scope_warnings
from gateway.supervisor import supervise, usable_cpus
from gateway.upstreams import Upstreams
from gateway.worker_link import WorkerLink


def _load(path: str, placeholders: Placeholders | None = None) -> Config:
    """The config `serve` would start with: parsed, and serving somebody (keys and models)."""
    config = load_config(path, kinds=ADAPTERS.keys(), placeholders=placeholders)
    refused = unservable(config)
    if refused:
        raise ConfigError(refused)
    return config


async def _check_adapters(config: Config) -> None:
    upstreams = Upstreams()
    for adapter in (await build_adapters(config, upstreams)).values():
        await adapter.aclose()
    await upstreams.aclose()


def check_config(paths: list[str]) -> int:
    """Exit 0 if every file would serve, else 1; each problem on a line of its own, by file and YAML path;
    never a traceback, whatever a file holds. Every file is checked, whatever the ones before it hold."""
    return max([_check(path) for path in paths])


def _check(path: str) -> int:
    def report(line: str) -> None:
        print(line if line.startswith(f"{path}: ") else f"{path}: {line}", file=sys.stderr)

    placeholders = Placeholders()
    try:
        config = _load(path, placeholders)
        for where, why in unavailable_kinds(config).items():
            report(f"warning: {where}: {why}")
        for warning in scope_warnings(config.policy, None, os.environ, has_slots(config)):
            report(f"warning: {warning}")
        asyncio.run(_check_adapters(config))
    except ConfigError as exc:
        for problem in exc.problems:
            report(problem)
        return 1
    except Exception as exc:  # a bug of ours: still one line, and a failing check
        report(f"cannot check: {type(exc).__name__}: {exc}")
        return 1
    finally:
        placeholders.cleanup()  # a {socket}'s directory, whatever the file held
    print(f"{path}: ok ({len(config.models)} models, {len(config.backends)} backends, {len(config.keys)} keys)")
    return 0


def serve(path: str, host: str | None, port: int | None, workers: int = 1, link: WorkerLink | None = None) -> int:
    """One process (workers 1), a supervisor of `workers` processes, or one of them (`link`)."""
    if link is not None:
        # A SIGHUP before it serves must not end it (it checks the file itself then). A handler, not SIG_IGN,
        # which a process it starts would inherit.
        signal.signal(signal.SIGHUP, lambda *_: None)
    # `{port}` and `{socket}`: picked here, or by the parent of `--workers N` for its workers (gateway/placeholders.py)
    placeholders = Placeholders.for_process() if link is not None else Placeholders(shared=workers > 1)
    try:
        config = _load(path, placeholders)
        new_loop = event_loop.loop_factory()
    except ConfigError as exc:
        for problem in exc.problems:
            logging.error("%s", problem)
        return 1
    listen = replace(config.server, host=host or config.server.host, port=port or config.server.port)
    config = replace(config, server=listen)
    if link is None:
        for warning in scope_warnings(config.policy, workers, os.environ, has_slots(config)):
            logging.warning("WARNING: %s", warning)
    if workers > 1 and link is None:
        return supervise(config, workers)  # each worker runs on the loop GATEWAY_EVENT_LOOP picks
    allocator.return_large_buffers()  # long audio's chunk buffers given back once freed (gateway/allocator.py)
    event_loop.run(server.serve(config, link), new_loop)
    return 0


def worker_count(text: str) -> int:
    """`--workers`: a positive number, or `auto` for one per usable CPU."""
    if text == "auto":
        return usable_cpus()
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'auto', got '{text}'")
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description="OpenAI-compatible audio gateway")
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("serve", help="serve the OpenAI audio API")
    run.add_argument("--config", required=True, help="path to the YAML mapping table")
    run.add_argument("--host", help="listen address (default: server.host in the config)")
    run.add_argument("--port", type=int, help="listen port (default: server.port in the config)")
    run.add_argument("--workers", type=worker_count, default=1, metavar="N",
                     help="worker processes sharing the port, or 'auto' for one per usable CPU (default: 1)")
    run.add_argument("--worker", type=WorkerLink.decode, help=argparse.SUPPRESS)  # set by the parent only
    check = sub.add_parser("check-config", help="validate config files; exit 1 listing every error")
    check.add_argument("paths", nargs="+", metavar="PATH")
    args = parser.parse_args(argv)
    if args.command == "check-config":
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
        return check_config(args.paths)
    with queued_logging():  # the event loop never writes to stderr itself (gateway/logs.py)
        if args.worker is None:
            logging.info("gateway %s starting with %s", __version__, args.config)
        return serve(args.config, args.host, args.port, args.workers, args.worker)


if __name__ == "__main__":
    sys.exit(main())
