"""The plotting plumbing every PNG writer shares: pyplot on the Agg backend, and saving a finished figure."""

from __future__ import annotations

from pathlib import Path

from openalign.errors import ConfigError
from openalign.files import atomic_write


def pyplot():
    """matplotlib.pyplot on the Agg backend, so figures are written without a display (servers, training nodes).
    Imported on first use: matplotlib is slow to import and most commands draw nothing."""
    import matplotlib

    matplotlib.use("Agg")  # must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def check_figure_path(path: str | Path) -> Path:
    """`path` as a Path, after checking that matplotlib writes its extension: a mistyped one ("heat.jpgg") is a
    ConfigError naming it and the ones that work, which a command can raise before any work rather than a
    traceback after it. No extension writes PNG."""
    from matplotlib.backend_bases import FigureCanvasBase

    path = Path(path)
    extension = path.suffix.lower().lstrip(".")
    supported = sorted(FigureCanvasBase.get_supported_filetypes())
    if extension and extension not in supported:
        raise ConfigError(f"{path}: a figure cannot be written as .{extension}; use .png, or one of "
                          f"{', '.join('.' + name for name in supported)}")
    return path


def save_figure(figure, path: str | Path) -> Path:
    """Lay out, write (PNG unless the extension says otherwise; 100 dpi, parent folders created; under a
    temporary name, then renamed, so a kill leaves no half image) and close the figure; returns the path."""
    path = check_figure_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    image_format = path.suffix.lower().lstrip(".") or "png"
    atomic_write(path, lambda temporary: figure.savefig(temporary, dpi=100, format=image_format))
    pyplot().close(figure)
    return path
