"""Evaluation on datasets on disk with a checkpoint's encoders (the `openalign eval` commands).

Each function embeds the dataset with an `openalign.inference.encoders.Encoders` and hands the embeddings to
the metric modules (retrieval, zeroshot, knn), which hold the definitions and are tested against brute force.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from openalign.errors import OpenAlignError
from openalign.eval.knn import evaluate_knn
from openalign.eval.retrieval import retrieval_metrics
from openalign.eval.templates import load_templates
from openalign.eval.zero_shot import build_classifier, class_folder, evaluate_zero_shot, plot_confusion_matrix


class EvalDataError(OpenAlignError, ValueError):
    """An evaluation dataset is empty or inconsistent (a caption missing, test classes unknown to train)."""


def read_caption_set(source, image_column: str | None = None, caption_column: str | None = None):
    """(images, captions, text_to_image) from any source of pairs `data.sources.iter_records` reads: a manifest,
    an image folder with .txt captions, shards or a caption file.

    Pairs naming the same image file are that image's captions (Karpathy protocol: usually five manifest rows);
    images keep the order of their first pair. Images are paths, or a shard sample's bytes. The column names
    apply to a manifest alone.
    """
    from openalign.data.sources import iter_manifest, iter_records

    if image_column or caption_column:
        records = iter_manifest(source, image_column=image_column, caption_column=caption_column)
    else:
        records = iter_records(source)
    image_rows: dict[str, int] = {}
    images, captions, text_to_image = [], [], []
    for record in records:
        if record.error:
            raise EvalDataError(f"{source}: {record.key}: {record.error}")
        if not record.caption:
            raise EvalDataError(f"{source}: the pair of {record.key} has no caption")
        if record.image_path is None and record.image_bytes is None:
            raise EvalDataError(f"{source}: {record.key} has no image: retrieval needs image-caption pairs (a "
                                "manifest, an image folder with .txt captions or shards), not captions alone")
        identity = str(record.image_path) if record.image_path is not None else record.key
        if identity not in image_rows:
            image_rows[identity] = len(images)
            images.append(str(record.image_path) if record.image_path is not None else record.image_bytes)
        captions.append(record.caption)
        text_to_image.append(image_rows[identity])
    if not images:
        raise EvalDataError(f"{source} holds no pair")
    return images, captions, np.array(text_to_image, dtype=np.int64)


def evaluate_retrieval_pairs(
    encoders, source, *, image_column: str | None = None, caption_column: str | None = None, ks=(1, 5, 10),
) -> dict:
    """Image->text and text->image R@k, mean and median rank on a source of (image, caption) pairs
    (`read_caption_set`)."""
    images, captions, text_to_image = read_caption_set(source, image_column, caption_column)
    image_embeds = encoders.encode_images(images)
    text_embeds = encoders.encode_texts(captions)
    return retrieval_metrics(image_embeds, text_embeds, text_to_image, ks=ks)


def evaluate_zero_shot_folder(
    encoders, root: str | Path, *, templates="imagenet80", confusion_png: str | Path | None = None
) -> dict:
    """Top-1 / top-5, per-class accuracy and confusion matrix on a folder of class sub-folders.

    Class names are the sub-folder names (underscores read as spaces). With confusion_png, the row-normalised
    confusion matrix is drawn there.
    """
    paths, labels, class_names = class_folder(root)
    if not paths:
        raise EvalDataError(f"{root}: the class sub-folders hold no image")
    if isinstance(templates, (str, Path)):
        templates = load_templates(templates)
    classifier = build_classifier(encoders.encode_texts, class_names, templates)
    metrics = evaluate_zero_shot(encoders.encode_images(paths), labels, classifier)
    metrics["class_names"] = class_names
    metrics["num_templates"] = len(templates)
    if confusion_png is not None:
        plot_confusion_matrix(metrics["confusion_matrix"], class_names, confusion_png)
        metrics["confusion_png"] = str(confusion_png)
    return metrics


def evaluate_knn_folders(
    encoders, train_root: str | Path, test_root: str | Path, *, k: int = 20, temperature: float = 0.07
) -> dict:
    """kNN top-1 / top-5 of test images against train images, both folders of class sub-folders.

    Classes are matched by name; a test class absent from train is an error (it could never be predicted).
    """
    train_paths, train_labels, train_classes = class_folder(train_root)
    test_paths, test_labels, test_classes = class_folder(test_root)
    unknown = sorted(set(test_classes) - set(train_classes))
    if unknown:
        raise EvalDataError(f"test classes {unknown[:5]} of {test_root} have no sub-folder in {train_root}")
    if not train_paths or not test_paths:
        raise EvalDataError(f"{train_root if not train_paths else test_root}: the class sub-folders hold no image")
    to_train_index = np.array([train_classes.index(name) for name in test_classes], dtype=np.int64)
    metrics = evaluate_knn(
        encoders.encode_images(train_paths),
        train_labels,
        encoders.encode_images(test_paths),
        to_train_index[test_labels],
        k=min(k, len(train_paths)),
        temperature=temperature,
        num_classes=len(train_classes),
    )
    metrics["num_classes"] = len(train_classes)
    return metrics
