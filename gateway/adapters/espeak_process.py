"""The eSpeak NG child process of one backend, as the adapter sees it: requests out, frames back.

gateway/engines/espeak_child.py is the other end (the framing is described there). Requests are sent
as they come: the child queues them and synthesizes one at a time, so the frames it sends belong to
the oldest request not ended yet (`_owners`), and `stop` can name any of them. Audio is parsed out
of the pipe in bulk on the event loop, with one copy per frame and no await per frame.

The child dies with the gateway: it gets its own session (a terminal's Ctrl-C reaches the gateway,
which decides), SIGKILL when the thread that started it dies (prctl PR_SET_PDEATHSIG, set between
fork and exec, as for supervised engines: gateway/engine_process.py), and the end of its stdin when
the gateway's process does (then it aborts and exits).
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
import sys
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

from gateway.engine_process import die_with_parent
from gateway.errors import InvalidRequestError, Reason, UpstreamError

log = logging.getLogger("gateway.adapters.espeak")

CHILD = Path(__file__).resolve().parent.parent / "engines" / "espeak_child.py"
HEADER = struct.Struct(">cI")
MAX_CHUNK = 65_536
MAX_FRAME = 1 << 20
"""Far above any frame the child sends (a 100 ms buffer is 4410 bytes, its voice list ~10 KB): past it, a
broken child is killed rather than buffered without end."""
MAX_LOG_LINE = 2_000
START_TIMEOUT_S = 20.0
"""From spawn to the child's description of its voices: a Python start and a library load (~50 ms)."""
STOP_GRACE_S = 2.0
"""After its stdin closed, how long the child may take to abort and exit before SIGKILL."""


class PcmStream(AsyncIterator[bytes]):
    """One request's audio as an async iterator of PCM chunks; `aclose` stops the child's synthesis."""

    def __init__(self, engine: EspeakProcess, request: int, voice: str) -> None:
        self.engine, self.request, self.voice = engine, request, voice
        self._queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        self._error: BaseException | None = None
        self._done = self.cancelled = False
        self.produced = 0
        """Bytes the engine made for this request, those dropped after a stop included."""
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        """Done when the child is done with this request (finished, aborted, or gone)."""

    def push(self, chunk: bytes) -> None:
        self.produced += len(chunk)
        if not self.cancelled:
            self._queue.put_nowait(chunk)

    def end(self, error: BaseException | None) -> None:
        """The child is done with this request: the end of the stream, or the error it ended with."""
        if not self.ended.done():
            self.ended.set_result(None)
            self._queue.put_nowait(error)

    async def __anext__(self) -> bytes:
        """What the engine made so far (at least one buffer, at most about MAX_CHUNK bytes)."""
        parts: list[bytes] = []
        size = 0
        while not self._done and size < MAX_CHUNK and not (parts and self._queue.empty()):
            item = self._queue.get_nowait() if parts else await self._queue.get()
            if isinstance(item, bytes):
                parts.append(item)
                size += len(item)
            else:  # the end: None, or the error the synthesis ended with
                self._done, self._error = True, item
        if parts:
            return b"".join(parts)
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        raise StopAsyncIteration

    async def aclose(self) -> None:
        if not self._done:
            self.cancelled = self._done = True
            self.engine.stop(self)


class EspeakProcess(asyncio.SubprocessProtocol):
    """One running child: `speak` sends a request, the frames it answers with feed that request's stream."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.described: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        """Done when the child has loaded the library and described itself (`start` waits for it)."""
        self.described.add_done_callback(lambda done: done.cancelled() or done.exception())
        self.sample_rate = 0
        self.voices: dict[str, str] = {}
        """Lower-cased identifier ("gmw/en-us"), file name ("en-us") or language ("en-gb") -> identifier."""
        self.variants: frozenset[str] = frozenset()
        """Voice variants ("m3", "f2", "klatt"), listed once by the child: no file system call per request."""
        self.exited: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.SubprocessTransport | None = None
        self.gone = self.closing = False
        self._owners: deque[PcmStream] = deque()
        self._requests = 0
        self._frames = bytearray()
        self._errors = bytearray()

    @classmethod
    async def start(cls, backend: str) -> EspeakProcess:
        """A child with its library loaded and its voices listed; an exception if it cannot start."""
        loop = asyncio.get_running_loop()
        _, child = await loop.subprocess_exec(
            lambda: cls(backend), sys.executable, str(CHILD), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True,
            preexec_fn=die_with_parent())
        try:
            await asyncio.wait_for(asyncio.shield(child.described), START_TIMEOUT_S)
        except BaseException:
            child.kill()
            raise
        return child

    @property
    def pid(self) -> int | None:
        return self.transport.get_pid() if self.transport is not None else None

    def speak(self, text: str, voice: str, rate: int, asked: str) -> PcmStream:
        """Queue a synthesis in the child; its audio, as made, once the requests before it are done.
        `asked` is the voice as the job named it, for the error if eSpeak refuses `voice` after all."""
        self._requests += 1
        stream = PcmStream(self, self._requests, asked)
        if self.gone:
            stream.end(self._error())
        else:
            self._owners.append(stream)
            self._send(b"S", {"id": stream.request, "text": text, "voice": voice, "rate": rate})
        return stream

    def stop(self, stream: PcmStream) -> None:
        if stream in self._owners:
            self._send(b"X", {"id": stream.request})

    async def aclose(self) -> None:
        """Stop every request, let the child exit on the end of its stdin, SIGKILL it after STOP_GRACE_S."""
        self.closing = True
        for stream in self._owners:
            stream.cancelled = True
        if self.transport is not None:
            stdin = self.transport.get_pipe_transport(0)
            if stdin is not None:
                stdin.close()
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), STOP_GRACE_S)
        except TimeoutError:
            log.warning("backend %s: eSpeak NG did not exit within %s s; killed", self.backend, STOP_GRACE_S)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.transport is not None:
            self.transport.close()  # kills the child if it still runs

    def _send(self, kind: bytes, message: dict[str, Any]) -> None:
        payload = json.dumps(message).encode()
        stdin = self.transport.get_pipe_transport(0) if self.transport is not None else None
        if stdin is not None and not stdin.is_closing():
            stdin.write(HEADER.pack(kind, len(payload)) + payload)

    def _error(self) -> UpstreamError:
        if self.closing:
            return UpstreamError(f"Backend '{self.backend}' is shut down.", reason=Reason.CLOSED)
        return UpstreamError(f"Backend '{self.backend}' failed.", reason=Reason.ENGINE)

    # asyncio.SubprocessProtocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.SubprocessTransport, transport)  # uvloop's is one, not a subclass

    def pipe_data_received(self, fd: int, data: bytes | bytearray) -> None:
        if fd == 2:
            self._log(data)
            return
        self._frames += data
        view, at = memoryview(self._frames), 0
        try:
            while len(view) - at >= HEADER.size:
                kind, size = HEADER.unpack_from(view, at)
                if size > MAX_FRAME:
                    log.error("backend %s: eSpeak NG sent a %d-byte frame; killed", self.backend, size)
                    at = len(view)
                    self.kill()
                    break
                if len(view) - at - HEADER.size < size:
                    break
                self._frame(kind, view[at + HEADER.size:at + HEADER.size + size])
                at += HEADER.size + size
        finally:
            view.release()
        del self._frames[:at]

    def _frame(self, kind: bytes, payload: memoryview) -> None:
        if kind == b"A" and self._owners:
            self._owners[0].push(bytes(payload))
        elif kind == b"E" and self._owners:
            error = json.loads(bytes(payload))["error"]
            stream = self._owners.popleft()
            if self.closing:  # aborted by aclose: a cut stream must not look complete
                stream.end(self._error())
            elif error == "voice":
                stream.end(InvalidRequestError(f"Voice '{stream.voice}' is not available on this backend.",
                                               param="voice", code="invalid_value"))
            elif error:
                log.error("backend %s: eSpeak NG synthesis failed: %s", self.backend, error)
                stream.end(self._error())
            else:
                stream.end(None)
        elif kind == b"H" and not self.described.done():
            description = json.loads(bytes(payload))
            self.sample_rate, self.voices = int(description["sample_rate"]), description["voices"]
            self.variants = frozenset(description["variants"])
            self.described.set_result(None)

    def _log(self, data: bytes) -> None:
        """The child's stderr, a line at a time under the backend's name (an overlong line in pieces)."""
        self._errors += data
        while (end := self._errors.find(b"\n")) >= 0 or len(self._errors) > MAX_LOG_LINE:
            cut = end if 0 <= end < MAX_LOG_LINE else MAX_LOG_LINE
            line = self._errors[:cut].decode(errors="replace").rstrip()
            del self._errors[:cut + (cut == end)]
            if line:
                log.warning("backend %s: eSpeak NG: %s", self.backend, line)

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        """Its stdout ended: after every frame it sent, the child is gone; what it still owed fails."""
        if fd != 1:
            return
        self.gone = True
        if not self.described.done():
            self.described.set_exception(RuntimeError("the eSpeak NG process exited before it was ready"))
        while self._owners:
            self._owners.popleft().end(self._error())

    def process_exited(self) -> None:
        code = self.transport.get_returncode() if self.transport is not None else None
        if not self.closing:
            log.warning("backend %s: eSpeak NG process %s exited (code %s)", self.backend, self.pid, code)
        if not self.exited.done():
            self.exited.set_result(code)
