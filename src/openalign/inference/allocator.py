"""Keep glibc malloc from returning large activations to the kernel between forward passes.

Why: with glibc's defaults every allocation above the mmap threshold (128 KiB, raised dynamically up to
32 MiB) is a fresh `mmap`, and freeing it `munmap`s it. An EfficientNet forward allocates hundreds of such
tensors, so each one is page-faulted and zeroed by the kernel on every pass: on a quiet 2-core machine that
was more than half of transformers' image-tower time, and in our single-thread benchmark openalign's fp32 image
path went from 0.38 to 0.30 s/image with it (docs/inference.md). Raising the mmap threshold and the trim
threshold keeps freed blocks in the heap, where the next forward reuses them after the first pass.

This changes the whole host process (every later `malloc`), so a library must not do it behind its user's
back: nothing calls it on import or while training. It is applied when the user asks for speed:
`AlignModel.optimize_for_inference()` on a CPU calls it (opt out with `allocator=False` or the environment
variable OPENALIGN_ALLOCATOR=0), and so do openalign's command-line entry points. Users of the plain model can
call it themselves, or set the equivalent environment before the process starts:

    MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=10000000000 python ...

The cost is memory: freed blocks stay mapped, so the resident set stays at its high-water mark (measured flat
over a stream of 1,000 align-base images). glibc 2.36 accepts both thresholds through `mallopt` at run time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# Some glibc versions refuse an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit) through mallopt;
# then we fall back to that cap, which still covers most align-base activations at small batch sizes.
MALLOPT_MMAP_CAP = 32 * 1024 * 1024
ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": "1000000000", "MALLOC_TRIM_THRESHOLD_": "10000000000"}

_state: dict = {"configured": None}


def _libc():
    if platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):  # musl and others have no mallopt
        return None


def environment_configured() -> bool:
    """True when the process was started with the allocator environment (glibc read it at start-up)."""
    return all(os.environ.get(name) == value for name, value in ENVIRONMENT.items())


def configure_allocator(mmap_threshold: int = 1_000_000_000, trim_threshold: int = 2**31 - 1) -> dict:
    """Opt-in, process-wide: raise glibc's mmap and trim thresholds with `mallopt` so that freed activations
    stay in the heap and are reused by the next forward pass. Returns what was done; a no-op off glibc.

    The defaults match the environment variables in the module docstring (mallopt takes a C int, so the trim
    threshold is 2 GiB rather than 10 GB). Where glibc refuses the mmap threshold it falls back to 32 MiB and
    reports it. Idempotent: the first call's result is returned again.
    """
    if _state["configured"] is not None:
        return _state["configured"]
    libc = _libc()
    if libc is None:
        result = {"applied": False, "reason": "not glibc on Linux"}
    else:
        mmap_ok = bool(libc.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)))
        if not mmap_ok and mmap_threshold > MALLOPT_MMAP_CAP:
            mmap_threshold = MALLOPT_MMAP_CAP
            mmap_ok = bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold))
        trim_ok = bool(libc.mallopt(M_TRIM_THRESHOLD, int(trim_threshold)))
        result = {
            "applied": mmap_ok and trim_ok,
            "mmap_threshold": int(mmap_threshold) if mmap_ok else None,
            "trim_threshold": int(trim_threshold) if trim_ok else None,
            "environment": environment_configured(),
        }
    _state["configured"] = result
    return result
