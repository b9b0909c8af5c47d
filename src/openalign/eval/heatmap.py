"""Image-text similarity matrices and their heat-map picture (the `openalign compare` command)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from openalign.errors import OpenAlignError
from openalign.figures import pyplot, save_figure


class CompareInputError(OpenAlignError, ValueError):
    """The matrix does not fit the images and texts it is drawn with."""


def similarity_matrix(encoders, images: Sequence, texts: Sequence[str]) -> np.ndarray:
    """Cosine similarity (N_images, N_texts) float32 between each image and each text.

    encoders: an `openalign.inference.encoders.Encoders` (its embeddings are L2-normalised).
    """
    image_embeds = encoders.encode_images(images)  # (I, D)
    text_embeds = encoders.encode_texts(texts)  # (T, D)
    return (image_embeds @ text_embeds.T).numpy()


def format_matrix(images: Sequence, texts: Sequence[str], matrix: np.ndarray, precision: int = 3) -> str:
    """The matrix as a plain-text table: one row per image, one numbered column per text, the texts listed."""
    matrix = np.asarray(matrix)
    names = [Path(str(image)).name for image in images]
    name_width = max(len(name) for name in names)
    cell_width = max(precision + 4, len(str(len(texts))) + 2)
    header = " " * name_width + "".join(f"{f'[{column}]':>{cell_width + 1}}" for column in range(len(texts)))
    rows = [f"{name:<{name_width}}" + "".join(f" {value:>{cell_width}.{precision}f}" for value in values)
            for name, values in zip(names, matrix)]
    legend = [f"[{column}] {text}" for column, text in enumerate(texts)]
    return "\n".join([header, *rows, "", *legend])


def _thumbnail(source, size: int) -> np.ndarray:
    from openalign.processing.images import load_image

    image = load_image(source)
    image.thumbnail((size, size))
    return np.asarray(image)


COLOUR_SCALES = {"auto": None, "cosine": (-1.0, 1.0), "positive": (0.0, 1.0)}


def plot_similarity_heatmap(
    images: Sequence, texts: Sequence[str], matrix, path: str | Path, *, thumbnail_size: int = 96,
    scale: str = "auto",
) -> Path:
    """Write a PNG: one row per image (its thumbnail on the left), one column per text, cells coloured and
    labelled with the similarity. Returns the path.

    scale: the colour scale, "auto" (the matrix's own range: the most contrast within one picture), "cosine"
    (-1 to 1) or "positive" (0 to 1), fixed so that pictures of different runs or models compare."""
    if scale not in COLOUR_SCALES:
        raise CompareInputError(f"scale {scale!r} is not one of {', '.join(COLOUR_SCALES)}")
    plt = pyplot()

    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (len(images), len(texts)):
        raise CompareInputError(
            f"matrix of shape {matrix.shape} does not fit {len(images)} images and {len(texts)} texts"
        )
    num_images, num_texts = matrix.shape
    figure, axes = plt.subplots(figsize=(2.5 + 1.3 * num_texts, 1.5 + 1.1 * num_images))
    low, high = COLOUR_SCALES[scale] or (matrix.min(), matrix.max())
    heat = axes.imshow(matrix, cmap="viridis", aspect="equal", vmin=low, vmax=high,
                       extent=(-0.5, num_texts - 0.5, num_images - 0.5, -0.5))
    # Thumbnails live in the same axes, one cell to the left of each row, so they line up with it exactly.
    for row, source in enumerate(images):
        thumbnail = _thumbnail(source, thumbnail_size)
        height, width = thumbnail.shape[:2]
        half_width, half_height = 0.45 * width / max(width, height), 0.45 * height / max(width, height)
        axes.imshow(thumbnail, extent=(-1 - half_width, -1 + half_width, row + half_height, row - half_height))
    middle = (high + low) / 2
    for row in range(num_images):
        for column in range(num_texts):
            colour = "black" if matrix[row, column] > middle else "white"
            axes.text(column, row, f"{matrix[row, column]:.2f}", ha="center", va="center", color=colour, fontsize=9)
    axes.set_xlim(-1.5, num_texts - 0.5)
    axes.set_ylim(num_images - 0.5, -0.5)
    axes.set_xticks(range(num_texts), labels=[textwrap.fill(text, 18) for text in texts], fontsize=8)
    axes.set_yticks(range(num_images), labels=[Path(str(image)).name for image in images], fontsize=8)
    axes.tick_params(length=0)
    for spine in axes.spines.values():
        spine.set_visible(False)
    figure.colorbar(heat, ax=axes, fraction=0.046, label="cosine similarity")
    return save_figure(figure, path)
