"""PNG plots of a run from its metrics.jsonl: loss, temperature, learning rate, validation recall.

matplotlib runs on the Agg backend, so plotting works without a display (on a training node).
"""

from __future__ import annotations

import os
from pathlib import Path

from openalign.errors import ConfigError
from openalign.figures import pyplot, save_figure
from openalign.train.run_log import METRICS_NAME, read_metrics
from openalign.untrusted import refuse_links

PANELS = {  # file stem: (title, y label, [(metric key, legend label)], y limits)
    "loss": ("Loss", "loss", [("loss", "train"), ("val_loss", "validation"),
                              ("image_ssl_loss", "train: its image self-supervision share")], None),
    "temperature": ("Temperature", "temperature (logits = cosine / temperature)",
                    [("temperature", "temperature")], None),
    "learning_rate": ("Learning rate", "lr", [("lr", "lr")], None),
    "val_recall": ("Validation recall", "recall (fraction of the queries)", [
        ("val_image_to_text_r1", "image->text R@1"), ("val_image_to_text_r5", "image->text R@5"),
        ("val_text_to_image_r1", "text->image R@1"), ("val_text_to_image_r5", "text->image R@5"),
        ("val_chance_r1", "chance R@1"),
    ], (0.0, 1.0)),
}
REFERENCE_LINES = {"val_chance_r1"}  # constants drawn as dashed lines, not as a series that hides the first points


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write one PNG per panel that has data (loss.png, temperature.png, learning_rate.png, val_recall.png)
    into `out_dir` (default RUN_DIR/plots); return their paths."""
    plt = pyplot()

    run_dir = Path(run_dir)
    refuse_links(run_dir, [METRICS_NAME] + (["plots"] if out_dir is None else []), "run folder")
    records = read_metrics(run_dir)
    if not records:
        raise ConfigError(f"{run_dir / METRICS_NAME} is missing or empty: nothing to plot")
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    last_step = max(record.get("step", 0) for record in records)
    written = []
    for stem, (title, ylabel, series, limits) in PANELS.items():
        curves = []
        for key, label in series:
            points = [(record["step"], record[key]) for record in records if record.get(key) is not None]
            if points:
                curves.append((key, label, points))
        if not curves:
            continue
        figure, axes = plt.subplots(figsize=(6, 4))
        for key, label, points in curves:
            steps, values = zip(*points)
            if key in REFERENCE_LINES:
                axes.axhline(values[-1], linestyle="--", color="grey", linewidth=1, label=f"{label} ({values[-1]:.3g})")
            elif len(points) == 1:  # one validation at the end: a marked point, its value in the legend
                axes.plot(steps, values, marker="o", markersize=7, linestyle="none", label=f"{label} ({values[0]:.3g})")
            else:
                axes.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=label)
        axes.set(title=title, xlabel="step", ylabel=ylabel)
        axes.set_xlim(0, max(last_step, 1) * 1.04)  # every panel spans the run, so a lone point sits at its step
        if limits is not None:
            axes.set_ylim(*limits)
        if len(curves) > 1:
            axes.legend()
        axes.grid(alpha=0.3)
        written.append(save_figure(figure, out_dir / f"{stem}.png"))
    return written
