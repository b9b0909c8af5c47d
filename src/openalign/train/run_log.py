"""Seeing a run: `metrics.jsonl` (one JSON object a line), TensorBoard when installed, a tqdm progress bar.

Only the main process writes. On resume the log is cut back to the checkpoint's step, so lines the killed run
wrote after its last checkpoint are replaced by the resumed run's, and the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of a run's metrics.jsonl, in order; a half-written last line (a kill mid-write) is dropped."""
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsLog:
    """Appends metric records to metrics.jsonl (and TensorBoard); a no-op on ranks other than 0."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True,
                 resume_step: int | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_NAME
        self.writer = None
        if not enabled:
            return
        if resume_step is not None:
            kept = [record for record in read_metrics(run_dir) if record.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))
        elif self.path.exists():
            self.path.unlink()  # a fresh run in an old folder starts a fresh log
        self.file = self.path.open("a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional: the JSONL log holds everything
                logger.info("tensorboard is not installed; metrics go to %s only", self.path)
            else:
                purge = None if resume_step is None else resume_step + 1
                self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge)

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (it must hold "step"); flushed at once so a kill loses at most this line."""
        if not self.enabled:
            return
        clean = {key: (None if isinstance(value, float) and not math.isfinite(value) else value)
                 for key, value in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        """Close the file and the TensorBoard writer."""
        if not self.enabled:
            return
        self.file.close()
        if self.writer is not None:
            self.writer.close()


class Progress:
    """A tqdm bar over optimiser steps (its ETA is tqdm's) showing loss, temperature and samples/s."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, steps: int, **values: float) -> None:
        """Advance by `steps` and show `values`."""
        if self.bar is None:
            return
        self.bar.set_postfix({key: f"{value:.4g}" for key, value in values.items()}, refresh=False)
        self.bar.update(steps)

    def set_total(self, total: int) -> None:
        """A new number of steps to go to (the plan changed)."""
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def close(self) -> None:
        """Close the bar."""
        if self.bar is not None:
            self.bar.close()
