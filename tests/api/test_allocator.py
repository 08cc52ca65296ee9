"""glibc malloc in the web process (api/allocator.py: WEB_MALLOC_ARENAS, WEB_MALLOC_MMAP_THRESHOLD).

Each case runs in a fresh interpreter: an arena or a raised threshold, once
there, stays for the life of the process.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt(3) is glibc's")


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    # Without glibc's own malloc variables, which would set the same parameters before tune_malloc does.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60,
                          check=True, env=env)


# Threads each holding a block from malloc (bytes past pymalloc's 512), all alive at once, then
# glibc's malloc_stats() on stderr: one "Arena N:" line per arena.
ARENAS = """
    import ctypes, threading
    from api.allocator import tune_malloc
    tune_malloc({arenas}, 0)
    ready, done = threading.Barrier(5), threading.Event()
    def hold():
        block = bytes(4096) + b"x"
        ready.wait()
        done.wait()
    threads = [threading.Thread(target=hold) for _ in range(4)]
    for thread in threads:
        thread.start()
    ready.wait()
    libc = ctypes.CDLL(None)
    libc.malloc_stats()
    done.set()
    for thread in threads:
        thread.join()
"""


@pytest.mark.parametrize("arenas, expected", [(1, 1), (2, 2), (0, 5)], ids=["one", "two", "glibc-default"])
def test_threads_share_at_most_the_arenas_set(arenas, expected):
    """Given WEB_MALLOC_ARENAS (0: glibc's 8 per core)
    When four threads besides the main one allocate at the same time
    Then the process has that many arenas (glibc's default gives each thread its own: 5)."""
    stats = run_python(ARENAS.format(arenas=arenas)).stderr
    assert stats.count("Arena ") == expected, stats


# glibc's mallinfo2() as `libc.mallinfo2()` in a script (its struct: malloc.h).
MALLINFO = """class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2"""


# A big block freed, then a smaller one past the threshold held: mallinfo2().hblks counts the
# blocks that are mmapped (given back to the system the moment they are freed).
THRESHOLD = """
    import ctypes
    from api.allocator import tune_malloc
    {mallinfo}
    tune_malloc(0, {threshold})
    big = bytes(8 * 1024 * 1024)
    del big
    before = libc.mallinfo2().hblks
    held = [bytes(256 * 1024 + n) for n in range(4)]
    print(libc.mallinfo2().hblks - before)
"""


@pytest.mark.parametrize("threshold, mmapped", [(128 * 1024, 4), (0, 0)], ids=["128KiB", "glibc-default"])
def test_blocks_past_the_threshold_are_mmapped_after_a_big_free(threshold, mmapped):
    """Given WEB_MALLOC_MMAP_THRESHOLD (0: glibc's own, which rises to the size of a freed mmapped block)
    When an 8 MiB block was freed and four blocks of 256 KiB are then allocated
    Then with 128 KiB all four are mmapped (freeing them gives their memory back at once); with glibc's
    default none is: they went into the heap, where freed memory stays with the process."""
    if not hasattr(__import__("ctypes").CDLL(None), "mallinfo2"):
        pytest.skip("mallinfo2 is glibc 2.33 or later")
    assert int(run_python(THRESHOLD.format(threshold=threshold, mallinfo=MALLINFO)).stdout) == mmapped


# After tune_malloc: whether a 64 KiB block is mmapped (1) or in the heap (0); glibc's threshold on a fresh heap is 128 KiB.
PROBE = """
    import ctypes, logging, sys
    from api.allocator import tune_malloc
    {mallinfo}
    logging.basicConfig(stream=sys.stdout, format="%(message)s")
    print(tune_malloc(2, {threshold}))
    before = libc.mallinfo2().hblks
    held = bytes(64 * 1024)
    print(libc.mallinfo2().hblks - before)
"""


def test_a_threshold_past_a_c_int_is_refused_not_wrapped():
    """Given a WEB_MALLOC_MMAP_THRESHOLD past a C int (mallopt's argument), which would reach glibc
    wrapped around: 2**32 as 0, every block mmapped
    When the web process applies it
    Then tune_malloc says False and logs which setting was refused, and glibc's threshold is as it
    was: a 64 KiB block still goes into the heap."""
    threshold = 2**32
    if not hasattr(__import__("ctypes").CDLL(None), "mallinfo2"):
        pytest.skip("mallinfo2 is glibc 2.33 or later")
    out = run_python(PROBE.format(threshold=threshold, mallinfo=MALLINFO)).stdout
    assert out.splitlines() == [f"WEB_MALLOC_MMAP_THRESHOLD={threshold} was refused by glibc's mallopt; its default stays",
                                "False", "0"]
