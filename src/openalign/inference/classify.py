"""Zero-shot classification of a few images against labels given on the spot (the `openalign zero-shot` command).

Each label becomes one class embedding: the mean of its normalised prompt embeddings over a template set
(`openalign.eval.templates`: "imagenet80", "photo" or a file), renormalised. Probabilities are the softmax of
cosine / temperature over all labels, with the model's own temperature.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from openalign.errors import OpenAlignError
from openalign.eval.templates import load_templates
from openalign.eval.zero_shot import build_classifier, classify


class LabelFileError(OpenAlignError, ValueError):
    """A labels file is missing or holds no label."""


def read_labels(path: str | Path) -> list[str]:
    """Labels from a text file, one a line; blank lines and lines starting with # are ignored."""
    path = Path(path)
    if not path.is_file():
        raise LabelFileError(f"labels file {path} does not exist")
    labels = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    labels = [label for label in labels if label and not label.startswith("#")]
    if not labels:
        raise LabelFileError(f"labels file {path} holds no label")
    return labels


def zero_shot_classify(
    encoders,
    images: Sequence,
    labels: Sequence[str],
    templates: str | Path | Sequence[str] = "photo",
    k: int = 5,
) -> list[dict]:
    """One row per image, in order: {"image": its name, "labels": top-k labels, "probabilities": theirs}.

    encoders: an `openalign.inference.encoders.Encoders`. templates: a built-in set name, a file of
    templates, or the templates themselves. k is clipped to the number of labels.
    """
    if isinstance(templates, (str, Path)):
        templates = load_templates(templates)
    classifier = build_classifier(encoders.encode_texts, list(labels), templates)  # (C, D)
    image_embeds = encoders.encode_images(images)  # (N, D)
    indices, probabilities = classify(image_embeds, classifier, k=k, temperature=encoders.temperature)
    return [
        {
            "image": str(image),
            "labels": [labels[index] for index in row_indices],
            "probabilities": [float(probability) for probability in row_probabilities],
        }
        for image, row_indices, row_probabilities in zip(images, indices, probabilities)
    ]


def format_predictions(rows: Sequence[dict]) -> str:
    """The rows of zero_shot_classify as a plain-text table: per image, rank, label and probability."""
    lines = []
    for row in rows:
        lines.append(row["image"])
        width = max(len(label) for label in row["labels"])
        for rank, (label, probability) in enumerate(zip(row["labels"], row["probabilities"]), start=1):
            lines.append(f"  {rank}. {label:<{width}}  {probability:7.2%}")
    return "\n".join(lines)
