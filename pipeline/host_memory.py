"""How the process's C heap treats freed memory: kept for the next CPU forward, not handed back."""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc malloc.h


def reuse_freed_memory() -> None:
    """Make glibc keep freed memory for the next allocation instead of giving it back to the kernel.
    A CPU forward allocates each activation anew (torch has no CPU caching allocator) and glibc maps
    every block over 32 MB freshly, so a 224 px convnet at batch 16 spent a quarter of its CPU time
    zeroing new pages (benchmarks/extract_vs_official.py with and without --no-heap-reuse). The price: freed memory stays
    with the process (a few hundred MB more resident for a convnet teacher, settled after a few
    batches). With another C library than glibc, nothing is done."""
    libc = ctypes.CDLL(None)
    if hasattr(libc, "gnu_get_libc_version"):
        libc.mallopt(M_MMAP_MAX, 0)  # big blocks come from the heap too (glibc still maps when it cannot grow)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
