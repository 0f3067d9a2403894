"""glibc's allocator, told to give large buffers back to the system as soon as they are freed.

glibc serves an allocation above its mmap threshold (128 KiB at start) with a mapping of its own, unmapped on
free; but the first time such a buffer is freed it raises the threshold to that buffer's size (up to 32 MiB),
so that later buffers of that size come from the heap of the allocating thread's arena, which keeps the memory
once they are freed. Long audio (gateway/audio/splitter.py) builds chunk buffers of up to tens of MiB on
whichever audio worker thread runs it, each thread with an arena of its own: measured with tests/perf/
test_long_audio.py, a 200 MB upload in 600 s chunks took a gateway process from 64 MiB to 220 MiB, and it
stayed there. With the threshold fixed at 1 MiB, which also turns its adjustment off, the same upload peaks
at 124 MiB and falls back to 90-107 MiB between chunks. Buffers under 1 MiB (most of what the gateway
allocates) are served as before.

Set once per process at `serve` (each worker of `--workers N` too). Elsewhere than glibc (musl, macOS) there is
nothing to set and nothing happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

M_MMAP_THRESHOLD = -3
"""mallopt's parameter number (malloc.h)."""
THRESHOLD = 1_048_576

log = logging.getLogger("gateway")


def return_large_buffers(threshold: int = THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `threshold` bytes; False where there is no glibc to tell."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(M_MMAP_THRESHOLD, threshold) == 1
    if not done:
        log.warning("glibc refused an mmap threshold of %d bytes; large buffers may stay allocated", threshold)
    return done
