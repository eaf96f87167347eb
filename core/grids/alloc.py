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
would have been. The risk is a higher peak while inside: glibc's heap grows for a few rounds before its free
blocks fit the padded requests of ``posix_memalign`` (torch's CPU allocator), and can fragment further; so
:func:`bound_retained`, called between layers, gives the kept memory back once it has grown past a limit. On that
model the first collection peaked at 3408-3409 MiB with the bound, 3410-4218 MiB without it, 3404-3522 MiB with
glibc's defaults (``bench/run.py --only collect`` reports it).

Elsewhere (macOS, musl, Windows) this is a no-op: those allocators do not have this problem in this form, or do
not expose these knobs.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
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

# how much the resident memory not in use by the heap may grow inside the scope before it is given back: a quarter
# of the resident size at the outermost entry (the model, mostly), at least 256 MiB. That is above the forward's
# per-layer working set (~330 MB on the bench's Qwen2.5-0.5B-shaped model at 4096 tokens, whose weights take 1.9 GB;
# below it every layer would be trimmed and faulted in again) and inside the bench's memory limit
# (1.5 x model + 1 GiB) when glibc's heap fragments.
RETAINED_GROWTH_SHARE = 0.25
MIN_RETAINED_GROWTH = 256 * 2**20

_lock = threading.Lock()
_depth = 0
_base = 0  # resident bytes not in use by the heap at the outermost entry
_limit = MIN_RETAINED_GROWTH  # how much that may grow before bound_retained trims


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                              "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - present only in glibc
        libc.mallinfo2.restype = _MallInfo2  # glibc >= 2.33: the guard below needs it
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        os.sysconf("SC_PAGE_SIZE")
        open("/proc/self/statm").close()
        return libc
    except (OSError, AttributeError, ValueError):
        return None


def available() -> bool:
    """Whether this process's allocator is glibc's (2.33 or later), the one :func:`keep_freed_memory` tunes."""
    return _glibc() is not None


def _resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _not_in_use(libc: ctypes.CDLL) -> int:
    """Resident bytes minus the bytes the heap has handed out: what grows when freed memory is kept."""
    return _resident() - libc.mallinfo2().uordblks


def for_blocks_of(nbytes: int) -> contextlib.AbstractContextManager:
    """:func:`keep_freed_memory` for a loop whose largest temporaries are ``nbytes``, if they are over glibc's mmap
    ceiling (32 MiB); below it glibc serves them from its heap already, and the scope would only cost."""
    return keep_freed_memory() if nbytes > _STEADY_MMAP_THRESHOLD else contextlib.nullcontext()


@contextlib.contextmanager
def keep_freed_memory() -> Iterator[None]:
    """Serve every allocation from the heap and keep freed memory until the outermost ``with`` exits.

    Nests and is safe across threads (the settings are process-wide: the first entry sets them, the last exit
    restores them and trims). The working set is faulted in once instead of once per layer. Call
    :func:`bound_retained` between layers: it gives the kept memory back when it has grown by more than a quarter of
    the resident size at entry (``RETAINED_GROWTH_SHARE``, at least ``MIN_RETAINED_GROWTH``), so a heap that
    fragments does not raise peak memory by more than that."""
    global _depth, _base, _limit
    libc = _glibc()
    if libc is None:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            _base = _not_in_use(libc)
            _limit = max(MIN_RETAINED_GROWTH, int(RETAINED_GROWTH_SHARE * _resident()))
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


def bound_retained(limit: int | None = None) -> bool:
    """Inside :func:`keep_freed_memory`: if the resident memory not in use has grown by more than ``limit`` bytes
    (default: the scope's, see :func:`keep_freed_memory`) since the outermost entry, return the heap's free pages
    (``malloc_trim``).
    Meant for layer boundaries (~0.2-1 ms: glibc walks its free lists). Returns whether it trimmed."""
    libc = _glibc()
    if libc is None or _depth == 0:
        return False
    with _lock:
        if _depth == 0 or _not_in_use(libc) - _base <= (_limit if limit is None else limit):
            return False
        libc.malloc_trim(0)
        return True


GIVE_BACK_BYTES = 256 * 2**20  # free heap memory kept before give_back trims


def give_back(free_bytes: int = GIVE_BACK_BYTES) -> None:
    """Return the heap's free pages (``malloc_trim``) once more than ``free_bytes`` of it are free, or inside
    :func:`keep_freed_memory` only past its bound (:func:`bound_retained`). For the streamed engine after a block's
    weights are released: glibc serves those tensors (under its 32 MiB mmap ceiling) from its heap and, left alone,
    keeps most of each block's freed weights resident (about 25 MB more per block of the Qwen2.5-0.5B shape, the
    whole model's size after one pass). Not after every block: a trim returns pages the next block's temporaries
    then fault in again, which made sequential GPTQ on the bundled model 10x slower (146 s against 14 s)."""
    libc = _glibc()
    if libc is None:
        return
    if _depth:
        bound_retained()
    elif libc.mallinfo2().fordblks > free_bytes:
        libc.malloc_trim(0)
