"""glibc malloc in a web process: few arenas, big blocks given back (WEB_MALLOC_ARENAS, WEB_MALLOC_MMAP_THRESHOLD).

What a burst left behind in the web process was mostly free memory that
malloc kept (bench/rss.py): each thread-pool thread (large bodies are parsed
there, the admin API runs there) got an arena of its own, up to 8 per core,
and a freed arena is not given back while one live block sits near its top;
and after the first big block was freed, glibc raised its mmap threshold (up
to 32 MiB), so later big blocks went into the heap and stayed there, free. Two
arenas (the event loop's and one for the pool, whose threads mostly hold the
GIL anyway) and a fixed threshold keep that bounded. Python objects of up to
512 bytes are pymalloc's, not malloc's, and are not affected.
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger(__name__)

# mallopt(3) parameters, from glibc's malloc.h.
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
C_INT_MAX = 2**31 - 1


def tune_malloc(arenas: int, mmap_threshold: int) -> bool:
    """Set glibc's arena count and mmap threshold for this process (0 leaves either as glibc has it).

    False, with nothing changed, where the C library is not glibc (musl, macOS).
    Call it before the process starts threads: an arena made already stays.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    applied = True
    for parameter, value, name in ((M_ARENA_MAX, arenas, "WEB_MALLOC_ARENAS"),
                                   (M_MMAP_THRESHOLD, mmap_threshold, "WEB_MALLOC_MMAP_THRESHOLD")):
        # mallopt takes a C int: a larger value would wrap around, not be refused.
        if value and (value > C_INT_MAX or not libc.mallopt(parameter, value)):
            log.warning("%s=%d was refused by glibc's mallopt; its default stays", name, value)
            applied = False
    return applied
