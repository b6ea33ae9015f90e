"""Transparent huge pages for memory read at random: MagicPIG's key/value row gathers and bucket walks.

A MagicPIG decode step reads a few thousand rows scattered over the KV pools and a few hundred
buckets scattered over its hash tables (hundreds of MiB in all): with 4 KiB pages nearly every
one of those reads also misses the TLB, and a page walk under virtualisation costs about what
the read itself does. Where the kernel offers transparent huge pages on request
(``/sys/kernel/mm/transparent_hugepage/enabled`` = ``madvise``, the default of many
distributions), advising the memory before it is first touched backs it with 2 MiB pages.
Measured on this project's 2-core machine, one 64k-token layer step (32/8 heads, d 128, bf16):
the shared-gather kernel 4.6 -> 3.3 ms, its key/value gathers 2.1 -> 1.6 ms.

Advice only: where the OS refuses (another setting, another OS) nothing changes but the speed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap

import numpy as np
import torch

HUGE = 2 << 20  # bytes of a huge page (x86-64, arm64 with 4 KiB base pages)
MIN_BYTES = 2 * HUGE  # smaller arrays: plain allocations (a huge page would mostly be padding)
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)


def _libc():
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return lib
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def advise(t: torch.Tensor) -> bool:
    """Ask for huge pages under the whole 2 MiB-aligned extents of ``t``'s memory (contiguous; pages
    not yet touched then fault in as huge pages). Whether the OS took the advice."""
    nbytes = t.numel() * t.element_size()
    start = -(-t.data_ptr() // HUGE) * HUGE
    stop = (t.data_ptr() + nbytes) // HUGE * HUGE
    if _LIBC is None or nbytes < MIN_BYTES or stop <= start:
        return False
    return _LIBC.madvise(start, stop - start, _MADV_HUGEPAGE) == 0


def empty(shape, dtype) -> np.ndarray:
    """``np.empty(shape, dtype)``, from an anonymous mapping advised to huge pages when it is large."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    if nbytes < MIN_BYTES or not hasattr(mmap.mmap, "madvise"):
        return np.empty(shape, dtype)
    mm = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # shared: shmem, no THP
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    skip = (-addr) % HUGE
    try:
        mm.madvise(_MADV_HUGEPAGE, skip, nbytes // HUGE * HUGE)
    except OSError:
        pass  # advice only
    return np.frombuffer(mm, dtype=dtype, count=int(np.prod(shape)), offset=skip).reshape(shape)
