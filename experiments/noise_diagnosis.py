"""What a demo run has learnt about its mismatched captions, checkpoint by checkpoint (docs/demo.md, "Learning
through mismatched captions in one run"). Not a test.

    python experiments/noise_diagnosis.py DEMO_OUT [--checkpoints checkpoint-00000100 ...] [--coloured-only]

For a demo output folder whose run kept checkpoints (`--set train.run.checkpoint_every=100` in
experiments/demo_experiment.py), per checkpoint:

- the run's own per-pair estimates (its scores.parquet) against the generator's labels: ROC AUC clean against
  mismatched, and the precision at dropping as many pairs as are mismatched;
- the checkpoint's image-text cosine of every training pair, and label-free in-batch consistency scores (do the
  captions of the images that look like mine resemble mine, and the reverse; random batches of 256), each as a
  ROC AUC clean against mismatched. With --coloured-only the clean pairs drawn in grey (colourless captions,
  which a model tells from coloured pairs without knowing colour) are left out: what remains measures whether
  the model has learnt colour and shape at all.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import torch


def roc_auc(scores: np.ndarray, clean: np.ndarray) -> float:
    """ROC AUC of `scores` ranking the `clean` pairs above the others (ties count half)."""
    from openalign.curation.scorer_check import mann_whitney_auc

    scores = np.asarray(scores, dtype=np.float64)
    return mann_whitney_auc(scores[clean], scores[~clean])


def embeddings(checkpoint: Path, records) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) L2-normalised image and text embeddings of the records under the checkpoint."""
    from PIL import Image

    from openalign.inference.encoders import load_encoders

    encoders = load_encoders(checkpoint, device="cpu", batch_size=256, optimize=False)
    images = [Image.open(io.BytesIO(record.open_image_bytes())).convert("RGB") for record in records]
    with torch.inference_mode():
        image = torch.cat([encoders.encode_images(images[start:start + 512]) for start in range(0, len(images), 512)])
        text = torch.cat([encoders.encode_texts([record.caption for record in records[start:start + 512]])
                          for start in range(0, len(records), 512)])
    return (torch.nn.functional.normalize(image.float(), dim=-1), torch.nn.functional.normalize(text.float(), dim=-1))


def consistency(image: torch.Tensor, text: torch.Tensor, temperature: float = 0.05, rounds: int = 4) -> np.ndarray:
    """Per pair, over random batches of 256: the text similarity of its caption to the captions of the images
    that look like its image (softmax over image similarity), and the reverse, each less its mean."""
    rng = np.random.default_rng(0)
    total = np.zeros(len(image))
    eye = torch.eye(256, dtype=torch.bool)
    for _ in range(rounds):
        order = rng.permutation(len(image))
        for start in range(0, len(image) - 255, 256):
            rows = torch.from_numpy(order[start:start + 256])
            image_similarity, text_similarity = image[rows] @ image[rows].T, text[rows] @ text[rows].T
            by_image = (image_similarity / temperature).masked_fill(eye, -1e9).softmax(-1)
            by_text = (text_similarity / temperature).masked_fill(eye, -1e9).softmax(-1)
            text_mean = text_similarity.masked_fill(eye, 0).sum(-1) / 255
            image_mean = image_similarity.masked_fill(eye, 0).sum(-1) / 255
            score = ((by_image * text_similarity).sum(-1) - text_mean + (by_text * image_similarity).sum(-1)
                     - image_mean)
            total[rows.numpy()] += score.numpy()
    return total


def main() -> None:
    """Print each checkpoint's figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("demo_out", type=Path)
    parser.add_argument("--checkpoints", nargs="*", default=None, help="default: every checkpoint of run/")
    parser.add_argument("--coloured-only", action="store_true")
    args = parser.parse_args()
    from openalign.data.sources import iter_records
    from openalign.demo.curation import detection_figures

    manifest = args.demo_out / "filtered" / "manifest.jsonl"
    if not manifest.is_file():
        manifest = args.demo_out / "data" / "train" / "manifest.jsonl"
    records = list(iter_records(manifest))
    labels = np.array([str(record.extra.get("noise")) for record in records])
    grey = np.array([record.extra.get("colour") is None for record in records])
    kept = (labels == "clean") | (labels == "mismatch")
    if args.coloured_only:
        kept &= ~grey
    names = args.checkpoints or sorted(path.name for path in (args.demo_out / "run").glob("checkpoint-*"))
    for name in names:
        checkpoint = args.demo_out / "run" / name
        image, text = embeddings(checkpoint, records)
        cosine = (image * text).sum(-1).numpy()
        clean = labels[kept] == "clean"
        print(f"{name}: the run's estimates {detection_figures(checkpoint, manifest)}; "
              f"{'coloured ' if args.coloured_only else ''}pairs {int(kept.sum())}: cosine AUC "
              f"{roc_auc(cosine[kept], clean):.3f}, in-batch consistency AUC "
              f"{roc_auc(consistency(image, text)[kept], clean):.3f}", flush=True)


if __name__ == "__main__":
    main()
