"""Process-wide settings applied only when asked: the OpenMP wait policy (the allocator is tested with the
inference path, in test_inference_optimize.py)."""

import os
import subprocess
import sys

from openalign.runtime import busy_cores, omp_wait_policy, set_omp_wait_policy


def test_openmp_threads_wait_passively_only_when_others_share_the_cores():
    assert omp_wait_policy(busy=0.3, cores=2) == "ACTIVE"  # a quiet machine: spinning threads are faster
    assert omp_wait_policy(busy=1.0, cores=2) == "PASSIVE"  # another process keeps a core busy
    assert omp_wait_policy(busy=3.9, cores=8) == "ACTIVE"
    assert omp_wait_policy(busy=4.0, cores=8) == "PASSIVE"
    assert 0.0 <= busy_cores(interval=0.05) <= os.cpu_count()


def test_set_omp_wait_policy_keeps_a_policy_from_the_environment(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "passive")
    assert set_omp_wait_policy() == "passive" and os.environ["OMP_WAIT_POLICY"] == "passive"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    chosen = set_omp_wait_policy()
    assert chosen in ("ACTIVE", "PASSIVE") and os.environ["OMP_WAIT_POLICY"] == chosen


def test_importing_runtime_does_not_load_torch():
    # The wait policy is read when torch loads its OpenMP runtime, so setting it must not load torch first.
    code = "import sys, openalign.runtime; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() \
        == "False"


def test_cpu_watch_counts_this_process_and_not_others():
    import time

    from openalign.runtime import CpuWatch

    watch = CpuWatch(threads=1).start()
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:  # this process's own work: it is not "others"
        pass
    figures = watch.stop()
    assert figures["cpu_seconds"] >= 0.3 and figures["wall_seconds"] >= figures["cpu_seconds"] * 0.99
    assert 0 < figures["share"] <= 1.05
    assert figures["others_cores"] is None or 0 <= figures["others_cores"] <= os.cpu_count()


def test_bfloat16_is_chosen_only_where_native_and_measured_faster(monkeypatch):
    import openalign.runtime as runtime

    calls = []

    def timed(seconds):
        def step_seconds(precision):
            calls.append(precision)
            return seconds[precision]
        return step_seconds

    monkeypatch.setattr(runtime, "native_reduced_precision", lambda dtype: True)
    faster = runtime.faster_precision(timed({"fp32": 1.0, "bf16": 0.7}), rounds=3)
    assert faster == {"precision": "bf16", "native_bf16": True, "seconds": {"fp32": 1.0, "bf16": 0.7}}
    assert calls == ["fp32", "bf16"] * 4  # a warm-up each, then alternating rounds
    # Within the margin, or slower: float32.
    assert runtime.faster_precision(timed({"fp32": 1.0, "bf16": 0.97}))["precision"] == "fp32"
    assert runtime.faster_precision(timed({"fp32": 1.0, "bf16": 3.0}))["precision"] == "fp32"
    # The best time of each counts: one disturbed bf16 step does not decide.
    noisy = iter([1.0, 5.0, 1.0, 0.6, 1.0, 9.0])
    assert runtime.faster_precision(lambda precision: next(noisy), rounds=2)["precision"] == "bf16"
    # Without native kernels nothing is measured.
    monkeypatch.setattr(runtime, "native_reduced_precision", lambda dtype: False)
    calls.clear()
    assert runtime.faster_precision(timed({"fp32": 1.0, "bf16": 0.1}))["precision"] == "fp32" and not calls
