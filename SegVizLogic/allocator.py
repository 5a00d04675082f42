"""Keep freed memory in the process instead of handing it back to the kernel after every step.

A 3D training step allocates and frees activations of tens of megabytes each. glibc serves
blocks that large with ``mmap`` and returns them with ``munmap`` when freed, so every step
page-faults (and the kernel zeroes) the same few hundred megabytes again: on two CPU cores that
was two thirds of a training step's wall time (1.0 s -> 0.34 s per demo step, system time
8.9 s -> 0.9 s, measured with the demo network; ``bench/bench_training.py --default-allocator`` compares). Serving them from the heap and not
trimming it makes the memory stay mapped and be reused; the peak stays what the work needs.
"""

from __future__ import annotations

import ctypes
import platform

__all__ = ["retain_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_applied: bool | None = None


def retain_freed_memory() -> bool:
    """Tell glibc's allocator to serve large blocks from the heap and to keep up to 1 GiB of
    freed heap (``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD, 1 GiB)``).

    Process-wide and idempotent; a no-op returning ``False`` where the C library is not glibc
    (macOS, Windows, musl), where the defaults stay.
    """
    global _applied
    if _applied is None:
        _applied = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL("libc.so.6")
                _applied = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
            except (OSError, AttributeError):
                _applied = False
    return _applied
