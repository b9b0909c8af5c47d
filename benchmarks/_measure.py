"""Measuring helpers for the inference benchmark: timers, a matmul peak, FLOP counts, resident memory."""

from __future__ import annotations

import os
import threading
import time

import torch
from torch.utils.flop_counter import FlopCounterMode


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(run, repeats: int, device: torch.device, warmup: int = 1) -> float:
    """Best wall time of `repeats` calls after `warmup` calls: the least disturbed by other processes."""
    for _ in range(warmup):
        run()
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak(dtype: torch.dtype, device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    """Achieved GFLOP/s of a square matmul, the ceiling a dense model can approach on this machine: on a CPU the
    faster of torch.mm (MKL's sgemm in float32) and oneDNN's linear with a packed weight, which reached 3x MKL's
    float32 rate on an AMD EPYC (docs/inference.md)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    seconds = best_time(lambda: torch.mm(a, b), repeats, device)
    if device.type == "cpu":
        from openalign.inference.linear import onednn_linear_available

        if onednn_linear_available():
            with torch.inference_mode():
                packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), None)
                seconds = min(seconds, best_time(
                    lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""), repeats, device))
    return 2 * size**3 / seconds / 1e9


def count_flops(run) -> int:
    """FLOPs of the matmuls and convolutions one call performs (elementwise work is not counted)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        run()
    return counter.get_total_flops()


def resident_bytes() -> int:
    """Current resident set size of this process (Linux), 0 elsewhere."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class PeakResident:
    """Samples the resident set every few milliseconds while the block runs; `.peak` is the maximum seen."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, resident_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakResident:
        self.peak = resident_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())


def compare(result: torch.Tensor, reference: torch.Tensor) -> dict:
    """Max abs difference, max difference relative to the reference's largest value, min row cosine."""
    result, reference = result.float().cpu(), reference.float().cpu()
    difference = float((result - reference).abs().max())
    cosine = torch.nn.functional.cosine_similarity(result, reference, dim=-1)
    return {
        "max_abs": difference,
        "max_relative": difference / float(reference.abs().max()),
        "min_cosine": float(cosine.min()),
    }
