"""benchmarks/gpu.py stays ready to run: on the CPU with tiny sizes (`--device cpu --quick`) it runs every part
(inference, training step, embedding from disk, each against transformers) in fresh processes and writes the
JSON and the table; without CUDA, `--device cuda` stops with a message instead of a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine with CUDA runs the real benchmark")
def test_without_cuda_the_gpu_run_says_so(tmp_path):
    completed = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True,
                               text=True, timeout=120)
    assert completed.returncode == 2
    assert "no CUDA device here" in completed.stderr and "Traceback" not in completed.stderr


def test_the_cpu_smoke_run_measures_every_part_against_transformers(tmp_path):
    completed = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(tmp_path)],
                               capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["settings"]["device"] == "cpu"
    rows = report["inference"]["eager"]["rounds"][0]
    assert {(row["library"], row["dtype"], row["tower"]) for row in rows} == {
        (library, dtype, tower) for library in ("openalign", "transformers") for dtype in ("float32",)
        for tower in ("image", "text")}
    for row in rows:
        assert row["seconds_per_item"] > 0 and row["device"] == "cpu"
        assert row["min_cosine"] > 0.9999  # the same weights and inputs: the same features
    assert set(report["train"]) == {"batch2-fp32"}
    for part in report["train"].values():
        assert {row["implementation"] for row in part["rows"]} == {"openalign", "transformers"}
        assert all(row["samples_per_s"] > 0 for row in part["rows"])
        assert part["ratios"]["none"]["speed"] > 0
    for part in report["embed"].values():
        assert set(part["rows"]) == {"optimized", "plain", "transformers", "no model", "model alone", "FLOP limit"}
        assert all(row["images_per_s"] > 0 and row["texts_per_s"] > 0 for row in part["rows"].values())
    table = (tmp_path / "gpu.md").read_text()
    for heading in ("## Inference", "## Training step", "## Embedding from disk"):
        assert heading in table
    assert table.count("| eager | openalign |") == 4  # fresh and allocator env, both towers
