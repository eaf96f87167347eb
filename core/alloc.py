"""glibc's allocator during a loop of forward passes: keep freed memory for the loop's length, then give it back.

Why: glibc serves every block over 32 MiB (its largest dynamic mmap threshold) with a fresh ``mmap`` and unmaps it
on ``free``, and trims the top of its heap once more than ~64 MiB there is free. A transformer forward allocates
and frees such blocks in every layer (a Qwen2.5-0.5B-shaped model at 4096 tokens per batch: ``[4096, 4864]``
float32 MLP activations, 80 MB each), so unless a free region of the heap happens to be large enough, every one of
them is page-faulted in afresh: 1.5 to 5 million minor faults, ~10% of a collection pass spent zeroing pages in
the kernel, and a pass that takes 30 s or 35-40 s depending on where earlier allocations left the heap. Inside
:func:`keep_freed_memory` every block comes from the heap and nothing is returned, so each layer reuses what the
one before freed (the first layer faults its working set in once); on exit the settings go back to glibc's
steady state and ``malloc_trim`` returns the free pages, so the process's resident size after the loop is what it
would have been. The price is a higher peak while inside: glibc's heap grows for a few rounds before its free
blocks fit the padded requests of ``posix_memalign`` (torch's CPU allocator), a few hundred MB on that model
(first collection 3.5-3.7 GB at peak, 3.4-3.5 GB without; ``bench/run.py --only collect`` reports it).

Elsewhere (macOS, musl, Windows) this is a no-op: those allocators do not have this problem in this form, or do
not expose these knobs.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
from collections.abc import Iterator

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
# what the settings go back to: glibc's default count of mmapped blocks, and the mmap and trim thresholds its
# dynamic rule settles at in a process that frees large blocks (32 MiB, its ceiling, and twice that); setting any
# of these parameters turns the dynamic rule off for good, so the steady state is set explicitly
_DEFAULT_MMAP_MAX = 65536
_STEADY_MMAP_THRESHOLD = 32 * 2**20
_STEADY_TRIM_THRESHOLD = 64 * 2**20
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int

_lock = threading.Lock()
_depth = 0


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - present only in glibc
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


def available() -> bool:
    """Whether this process's allocator is glibc's (the one :func:`keep_freed_memory` tunes)."""
    return _glibc() is not None


@contextlib.contextmanager
def keep_freed_memory() -> Iterator[None]:
    """Serve every allocation from the heap and keep freed memory until the outermost ``with`` exits.

    Nests and is safe across threads (the settings are process-wide: the first entry sets them, the last exit
    restores them and trims). The working set is faulted in once instead of once per layer."""
    global _depth
    libc = _glibc()
    if libc is None:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                libc.mallopt(_M_MMAP_THRESHOLD, _STEADY_MMAP_THRESHOLD)
                libc.mallopt(_M_TRIM_THRESHOLD, _STEADY_TRIM_THRESHOLD)
                libc.malloc_trim(0)
