"""The plotting plumbing every PNG writer shares: pyplot on the Agg backend, and saving a finished figure."""

from __future__ import annotations

from pathlib import Path

from openalign.files import atomic_write


def pyplot():
    """matplotlib.pyplot on the Agg backend, so figures are written without a display (servers, training nodes).
    Imported on first use: matplotlib is slow to import and most commands draw nothing."""
    import matplotlib

    matplotlib.use("Agg")  # must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: str | Path) -> Path:
    """Lay out, write as PNG (100 dpi, parent folders created; under a temporary name, then renamed, so a kill
    leaves no half image) and close the figure; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=100, format="png"))
    pyplot().close(figure)
    return path
