"""Image-text retrieval metrics under the Karpathy protocol (Flickr30K, MSCOCO).

Each image has several captions. Image -> text: a query image scores a hit at k if any of its captions is
among the top k texts. Text -> image: a caption scores a hit at k if its one image is among the top k images.

Tie rule (optimistic): the rank of a query is 1 + the number of wrong candidates that score *strictly higher*
than the best-scoring correct candidate. A wrong candidate that ties with the correct one does not push it
down.
Candidates scoring strictly higher than the best correct one are wrong by construction, so the rank is also
1 + the number of candidates (of any kind) scoring strictly higher than it.

Similarities are computed a chunk of queries at a time, so 5k images x 25k captions never needs the full
(5k, 25k) matrix at once; memory is chunk_size x (number of candidates) floats.
"""

from __future__ import annotations

import numpy as np
import torch

from openalign.errors import OpenAlignError


class RetrievalInputError(OpenAlignError, ValueError):
    """Embeddings or the caption -> image mapping have inconsistent shapes or values."""


def _as_float_tensor(array, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(array) if not isinstance(array, torch.Tensor) else array)
    if tensor.ndim != 2:
        raise RetrievalInputError(f"{name} must be 2-d (N, D), got shape {tuple(tensor.shape)}")
    return tensor.float()


def _check_inputs(image_embeds, text_embeds, text_to_image):
    images = _as_float_tensor(image_embeds, "image_embeds")
    texts = _as_float_tensor(text_embeds, "text_embeds")
    if images.shape[1] != texts.shape[1]:
        raise RetrievalInputError(
            f"image_embeds has dim {images.shape[1]} but text_embeds has dim {texts.shape[1]}"
        )
    mapping = torch.as_tensor(np.asarray(text_to_image), dtype=torch.long)
    if mapping.shape != (texts.shape[0],):
        raise RetrievalInputError(
            f"text_to_image must have one entry per caption ({texts.shape[0]}), "
            f"got shape {tuple(mapping.shape)}"
        )
    if len(mapping) and (mapping.min() < 0 or mapping.max() >= images.shape[0]):
        bad = int(mapping[(mapping < 0) | (mapping >= images.shape[0])][0])
        raise RetrievalInputError(f"text_to_image holds image index {bad}, outside [0, {images.shape[0]})")
    captions_per_image = torch.bincount(mapping, minlength=images.shape[0])
    if (captions_per_image == 0).any():
        missing = int(torch.nonzero(captions_per_image == 0)[0])
        raise RetrievalInputError(f"image {missing} has no caption in text_to_image; its rank is undefined")
    return images, texts, mapping


def retrieval_ranks(
    image_embeds, text_embeds, text_to_image, *, chunk_size: int = 1024, normalize: bool = True
):
    """Rank of the first correct answer for every query, in both directions.

    Returns (image_to_text_ranks (N_images,), text_to_image_ranks (N_texts,)) as int64 numpy arrays, 1-based,
    with the optimistic tie rule of this module. Embeddings are L2-normalised first unless normalize=False.
    """
    images, texts, mapping = _check_inputs(image_embeds, text_embeds, text_to_image)
    if normalize:
        images = torch.nn.functional.normalize(images, dim=-1)
        texts = torch.nn.functional.normalize(texts, dim=-1)
    num_images, num_texts = images.shape[0], texts.shape[0]

    image_ranks = torch.empty(num_images, dtype=torch.long)
    for start in range(0, num_images, chunk_size):
        stop = min(start + chunk_size, num_images)
        scores = images[start:stop] @ texts.T  # (B, N_texts)
        # Best correct caption per image in this chunk: scatter each caption's score onto its image's row.
        in_chunk = torch.nonzero((mapping >= start) & (mapping < stop)).squeeze(1)
        rows = mapping[in_chunk] - start
        best_correct = torch.full((stop - start,), -torch.inf)
        best_correct.scatter_reduce_(0, rows, scores[rows, in_chunk], reduce="amax")
        image_ranks[start:stop] = 1 + (scores > best_correct[:, None]).sum(dim=1)

    text_ranks = torch.empty(num_texts, dtype=torch.long)
    for start in range(0, num_texts, chunk_size):
        stop = min(start + chunk_size, num_texts)
        scores = texts[start:stop] @ images.T  # (B, N_images)
        correct = scores.gather(1, mapping[start:stop, None])  # (B, 1)
        text_ranks[start:stop] = 1 + (scores > correct).sum(dim=1)

    return image_ranks.numpy(), text_ranks.numpy()


def summarize_ranks(ranks: np.ndarray, prefix: str, ks=(1, 5, 10)) -> dict:
    """Recall@k as a fraction of the queries (0-1, as every openalign output gives it), mean rank and median
    rank for one direction's 1-based ranks."""
    ranks = np.asarray(ranks)
    metrics = {f"{prefix}_r{k}": float(np.mean(ranks <= k)) for k in ks}
    metrics[f"{prefix}_mean_rank"] = float(np.mean(ranks))
    metrics[f"{prefix}_median_rank"] = float(np.median(ranks))
    return metrics


def retrieval_metrics(
    image_embeds, text_embeds, text_to_image, *, ks=(1, 5, 10), chunk_size: int = 1024, normalize: bool = True
) -> dict:
    """Karpathy-protocol retrieval metrics in both directions.

    text_to_image maps each caption (row of text_embeds) to the index of its image (row of image_embeds).
    Returns a flat dict: image_to_text_r{k} and text_to_image_r{k} as fractions of the queries (0-1),
    *_mean_rank, *_median_rank, the counts num_images / num_texts, and rsum, the sum of the recalls (0-6).
    """
    image_ranks, text_ranks = retrieval_ranks(
        image_embeds, text_embeds, text_to_image, chunk_size=chunk_size, normalize=normalize
    )
    metrics = {"num_images": int(len(image_ranks)), "num_texts": int(len(text_ranks))}
    metrics.update(summarize_ranks(image_ranks, "image_to_text", ks))
    metrics.update(summarize_ranks(text_ranks, "text_to_image", ks))
    metrics["rsum"] = float(
        sum(metrics[f"{direction}_r{k}"] for direction in ("image_to_text", "text_to_image") for k in ks)
    )
    return metrics
