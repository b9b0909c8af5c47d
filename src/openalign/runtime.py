"""Process-wide settings that openalign applies only when asked: glibc's allocator thresholds and OpenMP's wait
policy; and what this CPU does well, measured (reduced precision). Each setting changes the whole host process,
so a library must not set it behind its user's back; openalign's command-line entry points opt in, and so does
`optimize_for_inference` for the allocator; library users of the plain model call these themselves.

The allocator. With glibc's defaults every allocation above the mmap threshold (128 KiB, raised dynamically up to
32 MiB) is a fresh `mmap`, and freeing it `munmap`s it. An EfficientNet forward allocates hundreds of such
tensors, so each one is page-faulted and zeroed by the kernel on every pass: on a quiet 2-core machine that
was more than half of transformers' image-tower time, and in our single-thread benchmark openalign's fp32 image
path went from 0.38 to 0.30 s/image with it (docs/inference.md). Raising the mmap threshold and the trim
threshold keeps freed blocks in the heap, where the next forward reuses them after the first pass.
`configure_allocator()` does it at run time, and `AlignModel.optimize_for_inference()` calls it on a CPU (the
user asked for speed; opt out with `allocator=False` or the environment variable OPENALIGN_ALLOCATOR=0); nothing
calls it on import or while training. The equivalent environment must be set before the process starts:

    MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=10000000000 python ...

The cost is memory: freed blocks stay mapped, so the resident set stays at its high-water mark (measured flat
over a stream of 1,000 align-base images). glibc 2.36 accepts both thresholds through `mallopt` at run time.

Reduced precision on a CPU. oneDNN runs bfloat16 (and float16) convolutions and matmuls natively only with
AVX-512 BF16 / FP16, AMX or AVX-NE-CONVERT; on an AVX2-only CPU it emulates them, and they run 10-25x slower
than float32 (docs/inference.md, "bfloat16 on a CPU"). `native_reduced_precision` says which case this is,
and `warn_slow_precision` warns a user who asked for such a dtype there, once per dtype. Where the kernels are
native, whether bfloat16 autocast trains a given model faster still depends on the model and the CPU (how much
of the step is matrix work, AMX or not), so `faster_precision` measures it: a few training steps in each
precision, alternating.

The OpenMP wait policy. OpenMP reads OMP_WAIT_POLICY once, when torch loads its runtime, so
`set_omp_wait_policy()` must run before `import torch`; it picks ACTIVE (spinning threads) on a quiet machine and
PASSIVE on a busy one (see `omp_wait_policy`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import time
import warnings
from collections.abc import Callable

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# Some glibc versions refuse an mmap threshold above HEAP_MAX_SIZE / 2 (32 MiB on 64-bit) through mallopt;
# then we fall back to that cap, which still covers most align-base activations at small batch sizes.
MALLOPT_MMAP_CAP = 32 * 1024 * 1024
ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": "1000000000", "MALLOC_TRIM_THRESHOLD_": "10000000000"}

_state: dict = {"configured": None, "warned": set()}


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


def native_reduced_precision(dtype) -> bool:
    """Whether this CPU runs `dtype` (a torch dtype) convolutions and matmuls in native kernels: float32
    always; bfloat16 and float16 only where oneDNN reports it (AVX-512 BF16 / FP16, AMX, AVX-NE-CONVERT)."""
    import torch

    mkldnn = getattr(torch.ops, "mkldnn", None)
    if dtype == torch.bfloat16:
        return bool(mkldnn is not None and mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(mkldnn is not None and mkldnn._is_mkldnn_fp16_supported())
    return True


def warn_slow_precision(dtype, device_type: str, setting: str) -> bool:
    """Warn (once per dtype and process) that `setting`, which asked for `dtype` on `device_type`, runs on
    emulated kernels here; returns whether it does. Only CPUs are concerned."""
    if device_type != "cpu" or native_reduced_precision(dtype):
        return False
    if dtype not in _state["warned"]:
        _state["warned"].add(dtype)
        name = str(dtype).removeprefix("torch.")
        warnings.warn(f"{setting}: this CPU has no native {name} kernels (oneDNN needs AVX-512 {name[:4].upper()}"
                      f" or AMX; this one has AVX2 at most), so {name} convolutions and matmuls are emulated and run "
                      "10-25x slower than float32 (docs/inference.md, 'bfloat16 on a CPU'); use float32 here",
                      stacklevel=3)
    return True


def faster_precision(step_seconds: Callable[[str], float], rounds: int = 2, margin: float = 0.05) -> dict:
    """The autocast precision that trains faster on this CPU: "bf16" where its bfloat16 kernels are native and
    a training step measured at least `margin` faster in it, else "fp32" (without native kernels nothing is
    measured: emulated bfloat16 is many times slower). `step_seconds(precision)` runs one training step in
    "fp32" or "bf16" and returns its seconds; after one warm-up step each, the two alternate `rounds` times and
    the best of each counts, the time least disturbed by other processes. Returns {"precision": the choice,
    "native_bf16": whether the kernels are native, "seconds": the best step time of each precision}."""
    import torch

    if not native_reduced_precision(torch.bfloat16):
        return {"precision": "fp32", "native_bf16": False, "seconds": {}}
    candidates = ("fp32", "bf16")
    for precision in candidates:
        step_seconds(precision)
    best = dict.fromkeys(candidates, float("inf"))
    for _ in range(rounds):
        for precision in candidates:
            best[precision] = min(best[precision], step_seconds(precision))
    chosen = "bf16" if best["bf16"] * (1 + margin) <= best["fp32"] else "fp32"
    return {"precision": chosen, "native_bf16": True, "seconds": best}


def _proc_stat() -> tuple[int, int]:
    """(all jiffies, idle + iowait jiffies) of the whole machine, from /proc/stat's first line."""
    with open("/proc/stat", encoding="ascii") as handle:
        values = [int(value) for value in handle.readline().split()[1:]]
    return sum(values), values[3] + values[4]


class CpuWatch:
    """How a stretch of work shared the machine: `start()`, the work, then `stop()` returns wall seconds, this
    process's CPU seconds, the cores other processes kept busy on average meanwhile (/proc/stat's non-idle time
    less this process's own), and `share`, this process's CPU time over `threads` cores for the whole wall time.
    On a quiet machine a process with spinning OpenMP threads gets close to all of it; a busy machine takes the
    rest. `others_cores` is None where /proc/stat is missing."""

    def __init__(self, threads: int):
        self.threads = max(1, threads)

    def start(self) -> CpuWatch:
        self.wall, self.cpu = time.monotonic(), time.process_time()
        try:
            self.stat = _proc_stat()
        except (OSError, ValueError, IndexError):
            self.stat = None
        return self

    def stop(self) -> dict:
        wall, cpu = time.monotonic() - self.wall, time.process_time() - self.cpu
        others = None
        if self.stat is not None:
            try:
                total, idle = _proc_stat()
            except (OSError, ValueError, IndexError):
                total = None
            if total is not None and total > self.stat[0]:
                cores = os.cpu_count() or 1
                busy_seconds = cores * wall * (1 - (idle - self.stat[1]) / (total - self.stat[0]))
                others = max(0.0, busy_seconds - cpu) / wall if wall > 0 else 0.0
        return {"wall_seconds": wall, "cpu_seconds": cpu, "threads": self.threads,
                "share": cpu / (wall * self.threads) if wall > 0 else 1.0, "others_cores": others}


def busy_cores(interval: float = 0.5) -> float:
    """How many cores other processes keep busy now: the non-idle share of all CPU time in /proc/stat over
    `interval` seconds (this process sleeps meanwhile), times the core count. Where /proc/stat is missing,
    the 1-minute load average (which also remembers processes that have just ended)."""

    try:
        total_before, idle_before = _proc_stat()
        time.sleep(interval)
        total_after, idle_after = _proc_stat()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0]
    elapsed = total_after - total_before
    return (os.cpu_count() or 1) * (1 - (idle_after - idle_before) / elapsed) if elapsed > 0 else 0.0


def omp_wait_policy(busy: float | None = None, cores: int | None = None) -> str:
    """OpenMP's wait policy for this machine now: PASSIVE when other processes keep half the cores busy
    (spinning threads then make two threads many times slower than one), else ACTIVE. On a quiet 2-core
    machine ACTIVE trained 1.3-1.4x faster than PASSIVE (520-555 vs 392 samples/s): passive threads sleep
    between the thousands of small parallel regions of a step."""
    busy = busy_cores() if busy is None else busy
    cores = (os.cpu_count() or 1) if cores is None else cores
    return "PASSIVE" if busy >= cores / 2 else "ACTIVE"


def set_omp_wait_policy() -> str:
    """Opt-in, process-wide: set OMP_WAIT_POLICY to omp_wait_policy() unless the environment already sets it (a
    policy set there wins); returns the policy in force. Takes effect only when called before torch is imported."""
    if "OMP_WAIT_POLICY" not in os.environ:
        _state["busy_cores_at_start"] = busy = busy_cores()
        os.environ["OMP_WAIT_POLICY"] = omp_wait_policy(busy)
    return os.environ["OMP_WAIT_POLICY"]


def busy_cores_at_start() -> float | None:
    """The cores other processes kept busy when `set_omp_wait_policy` chose the policy (None: it did not)."""
    return _state.get("busy_cores_at_start")
