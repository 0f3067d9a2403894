"""eSpeak NG in a process of its own: requests in on stdin, PCM out on stdout, one synthesis at a time.

Started by gateway/adapters/espeak.py as `python espeak_child.py`; imports nothing of the gateway's, so
libespeak-ng (GPL-3.0-or-later, from the `espeakng-loader` wheel) is only ever loaded here. Every frame,
both ways, is one kind byte and a big-endian u32 length, then that many bytes:

    out  H {"sample_rate", "voices", "variants"}   once, when the library is loaded
         A <s16le mono PCM>                        as eSpeak makes it, one buffer of BUFFER_MS per frame
         E {"error": null | "voice" | "..."}       the end of the current request
    in   S {"id", "text", "voice", "rate"}         synthesize (queued while another one runs)
         X {"id"}                                  stop request `id` if it still runs or waits

`espeak_Synth` runs in synchronous mode on the main thread and calls `_on_audio` per buffer; a reader
thread takes stdin, so a stop lands while synthesis runs and the next callback returns 1 (abort). The
end of stdin (the gateway closed it, or died) aborts and exits. Stray output of the library goes to
stderr, which the adapter logs: stdout carries frames only.
"""

from __future__ import annotations

import ctypes as _C
import json
import os
import queue
import struct
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, BinaryIO

BUFFER_MS = 100
HEADER = struct.Struct(">cI")
_SYNCHRONOUS, _DONT_EXIT, _CHARS_UTF8, _POS_CHARACTER, _PARAM_RATE = 2, 0x8000, 1, 1, 1
_CALLBACK = _C.CFUNCTYPE(_C.c_int, _C.POINTER(_C.c_short), _C.c_int, _C.c_void_p)


class _Voice(_C.Structure):
    _fields_ = [("name", _C.c_char_p), ("languages", _C.c_void_p), ("identifier", _C.c_char_p),
                *((f, _C.c_ubyte) for f in ("gender", "age", "variant", "xx1")),
                ("score", _C.c_int), ("spare", _C.c_void_p)]


class Engine:
    """The process's one libespeak-ng, used from the main thread only."""

    def __init__(self, out: BinaryIO) -> None:
        import espeakng_loader

        self.out = out
        self.data = Path(espeakng_loader.get_data_path())
        lib = _C.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [_C.c_int, _C.c_int, _C.c_char_p, _C.c_int]
        lib.espeak_SetVoiceByName.argtypes = [_C.c_char_p]
        lib.espeak_SetParameter.argtypes = [_C.c_int, _C.c_int, _C.c_int]
        lib.espeak_Synth.argtypes = [_C.c_void_p, _C.c_size_t, _C.c_uint, _C.c_int, _C.c_uint, _C.c_uint,
                                     _C.c_void_p, _C.c_void_p]
        lib.espeak_ListVoices.argtypes = [_C.c_void_p]
        lib.espeak_ListVoices.restype = _C.POINTER(_C.POINTER(_Voice))
        self.sample_rate = lib.espeak_Initialize(_SYNCHRONOUS, BUFFER_MS, str(self.data).encode(), _DONT_EXIT)
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed ({self.sample_rate})")
        self._callback = _CALLBACK(self._on_audio)  # referenced for as long as the library may call it
        lib.espeak_SetSynthCallback(self._callback)
        self.lib = lib
        self.current = 0
        """The id of the request being synthesized (ids grow: requests run in the order they came)."""
        self.stopped: set[int] = set()
        """Ids the gateway asked to stop, running or queued (an id's stop after its end is dropped)."""
        self._lock = threading.Lock()
        self.closed = False
        """stdin ended: the gateway is gone or shutting down, stop everything."""

    def describe(self) -> dict[str, Any]:
        variants = self.data / "voices" / "!v"
        listed = variants.iterdir() if variants.is_dir() else ()
        return {"sample_rate": self.sample_rate, "voices": self._list_voices(),
                "variants": sorted(p.name for p in listed if p.is_file())}

    def _list_voices(self) -> dict[str, str]:
        """Lower-cased identifier ("gmw/en-us"), file name ("en-us") or language ("en-gb") -> identifier."""
        keys: dict[str, str] = {}
        languages: list[tuple[int, int, str, str]] = []
        entries = self.lib.espeak_ListVoices(None)
        i = 0
        while entries[i]:
            voice = entries[i].contents
            ident = voice.identifier.decode()
            keys.setdefault(ident.lower(), ident)
            keys.setdefault(ident.rsplit("/", 1)[-1].lower(), ident)
            pointer = voice.languages  # (priority byte, NUL-terminated language)*, then a 0 byte
            while priority := _C.string_at(pointer, 1)[0]:
                language = _C.string_at(pointer + 1)
                languages.append((priority, i, language.decode().lower(), ident))
                pointer += len(language) + 2
            i += 1
        for _, _, language, ident in sorted(languages):  # each language's best voice comes first
            keys.setdefault(language, ident)
        return keys

    def _on_audio(self, wav: _C._Pointer[_C.c_short], samples: int, events: int | None) -> int:
        try:
            if self.closed or self.current in self.stopped:
                return 1
            if wav and samples > 0:
                send(self.out, b"A", _C.string_at(wav, samples * 2))
            return 0
        except BaseException as exc:  # an exception must not cross into C; a broken pipe ends us anyway
            print(f"synth callback failed: {exc!r}", file=sys.stderr)
            self.closed = True
            return 1

    def speak(self, request: dict[str, Any]) -> str | None:
        """Synthesize one request into frames; the error to end it with, or None."""
        self.current = request["id"]
        try:
            if self.closed or self.current in self.stopped:
                return None
            if self.lib.espeak_SetVoiceByName(request["voice"].encode()) != 0:
                return "voice"
            self.lib.espeak_SetParameter(_PARAM_RATE, request["rate"], 0)
            data = request["text"].encode()
            status = self.lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            aborted = self.closed or self.current in self.stopped
            return f"espeak_Synth failed ({status})" if status != 0 and not aborted else None
        finally:
            with self._lock:
                self.stopped = {i for i in self.stopped if i > self.current}

    def stop(self, request: int) -> None:
        """From the reader thread: stop `request` if it runs or waits. The set is replaced, never changed in
        place, so the callback reads it without the lock."""
        with self._lock:
            if request >= self.current:
                self.stopped = self.stopped | {request}


def send(out: BinaryIO, kind: bytes, payload: bytes) -> None:
    out.write(HEADER.pack(kind, len(payload)) + payload)
    out.flush()


def _read(source: BinaryIO, engine: Engine, requests: queue.SimpleQueue[dict[str, Any] | None]) -> None:
    """The reader thread: requests to the queue, stops to `engine.stopped`, until stdin ends."""
    try:
        while len(header := source.read(HEADER.size)) == HEADER.size:
            kind, size = HEADER.unpack(header)
            message = json.loads(source.read(size))
            if kind == b"S":
                requests.put(message)
            elif kind == b"X":
                engine.stop(message["id"])
    finally:
        engine.closed = True
        requests.put(None)


def main() -> None:
    out = os.fdopen(os.dup(1), "wb")  # the frames' own descriptor...
    os.dup2(2, 1)  # ...and whatever else writes to stdout (the library, a stray print) goes to stderr
    engine = Engine(out)
    send(out, b"H", json.dumps(engine.describe()).encode())
    requests: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
    threading.Thread(target=_read, args=(sys.stdin.buffer, engine, requests), daemon=True).start()
    while (request := requests.get()) is not None:
        try:
            error = engine.speak(request)
        except Exception as exc:  # a bug: this request fails, the next ones are still served
            traceback.print_exc()
            error = repr(exc)
        send(out, b"E", json.dumps({"error": error}).encode())


if __name__ == "__main__":
    main()
