"""The benchmarks' backend: an OpenAI-compatible speech server reduced to fixed answers, in a process of its own.

tests.fakes.openai_engine is the double for behaviour (it records every request, uploads included, and
makes audio per request); here every column of a benchmark (direct, nginx, the gateway) needs the same
backend costing as little as possible, so that it is not what limits the load. Speech answers
`speech.mp3` (real MP3 frames) in `--chunk` pieces as a chunked stream; a transcription reads the
whole upload and answers a fixed transcript. `GET /v1/peak` answers the most speech requests it has had
in flight at once since the last such GET (an admission-control benchmark checks its limit with it);
`--hold-ms` makes each speech answer wait that long before its first byte, as an engine does, so that
requests overlap at all (an answer without a wait is done before the next request is read). It runs on
uvloop when that is installed.

    python -m tests.perf.backend SPEECH_FILE [--chunk 8192] [--hold-ms 0]  # prints its URL, serves until stdin closes
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from aiohttp import web

TRANSCRIPT = {"text": "The quick brown fox jumps over the lazy dog."}
MODELS = {"object": "list", "data": [{"id": "tts-1", "object": "model", "created": 0, "owned_by": "bench"},
                                     {"id": "whisper-1", "object": "model", "created": 0, "owned_by": "bench"}]}


def build(speech: bytes, chunk: int, hold_s: float = 0.0) -> web.Application:
    pieces = [speech[i : i + chunk] for i in range(0, len(speech), chunk)]
    in_flight = {"now": 0, "peak": 0}

    async def speech_route(request: web.Request) -> web.StreamResponse:
        in_flight["now"] += 1
        in_flight["peak"] = max(in_flight["peak"], in_flight["now"])
        try:
            await request.read()
            if hold_s:
                await asyncio.sleep(hold_s)
            response = web.StreamResponse(headers={"Content-Type": "audio/mpeg"})
            try:
                await response.prepare(request)
                for piece in pieces:
                    await response.write(piece)
                await response.write_eof()
            except ConnectionResetError:  # wrk hangs up on the requests in flight when its time is up
                pass
            return response
        finally:
            in_flight["now"] -= 1

    async def peak_route(request: web.Request) -> web.Response:
        peak, in_flight["peak"] = in_flight["peak"], in_flight["now"]
        return web.json_response({"peak": peak})

    async def transcription_route(request: web.Request) -> web.Response:
        received = 0
        try:
            while piece := await request.content.readany():
                received += len(piece)
        except ConnectionResetError:  # as above
            return web.Response(status=499)
        if not received:
            return web.json_response({"error": {"message": "no body", "type": "invalid_request_error",
                                                 "param": "file", "code": None}}, status=400)
        return web.json_response(TRANSCRIPT)

    async def models_route(request: web.Request) -> web.Response:
        return web.json_response(MODELS)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/audio/speech", speech_route)
    app.router.add_post("/v1/audio/transcriptions", transcription_route)
    app.router.add_get("/v1/models", models_route)
    app.router.add_get("/v1/peak", peak_route)
    return app


async def serve(speech: bytes, chunk: int, hold_s: float) -> None:
    runner = web.AppRunner(build(speech, chunk, hold_s), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    print(f"http://127.0.0.1:{runner.addresses[0][1]}/v1", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("speech", type=Path)
    parser.add_argument("--chunk", type=int, default=8192)
    parser.add_argument("--hold-ms", type=float, default=0.0)
    args = parser.parse_args()
    try:
        import uvloop
        factory = uvloop.new_event_loop
    except ImportError:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(args.speech.read_bytes(), args.chunk, args.hold_ms / 1000))


if __name__ == "__main__":
    main()
