"""Image-text retrieval metrics under the Karpathy protocol (Flickr30K, MSCOCO).

Each image has several captions. Image -> text: a query image scores a hit at k if any of its captions is
among the top k texts. Text -> image: a caption scores a hit at k if its one image is among the top k images.

Ties. Per query, let `above` be the number of candidates scoring strictly higher than the best correct one (all
wrong by construction), and let `tied_wrong` wrong and `tied_correct` correct candidates score exactly that
best score. The rule (`ties=`) decides where the first correct candidate lands among them:

- "expected" (the default): the average over every order of the tied candidates, i.e. the expected rank and the
  probability of a hit when ties are broken at random. rank = 1 + above + tied_wrong / (tied_correct + 1);
  recall@k = P(above + X < k), X the wrong candidates drawn before the first correct one. A collapsed model
  (every score equal) gets chance, not a perfect score.
- "pessimistic": every tied wrong candidate first. rank = 1 + above + tied_wrong.
- "optimistic": the correct ones first. rank = 1 + above (what this module reported before).

When nothing ties, the three agree, and they agree with CLIP_benchmark, which ranks by torch.topk's order (an
order among ties that depends on the kernel). Non-finite embeddings are refused: a NaN scores neither higher nor
lower than anything, so no rule gives it a meaningful rank.

Similarities are computed a chunk of queries at a time, so 5k images x 25k captions never needs the full
(5k, 25k) matrix at once; memory is chunk_size x (number of candidates) floats.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    for name, tensor in (("image_embeds", images), ("text_embeds", texts)):
        finite = torch.isfinite(tensor).all(dim=1)
        if not finite.all():
            rows = torch.nonzero(~finite).squeeze(1)
            raise RetrievalInputError(
                f"{name} holds NaN or infinite values in {len(rows)} of {len(tensor)} rows (first: row "
                f"{int(rows[0])}): the model diverged or the embeddings are broken; no rank is meaningful"
            )
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


TIE_RULES = ("expected", "pessimistic", "optimistic")


@dataclass
class TieCounts:
    """Per query of one direction: candidates strictly above the best correct score, and the wrong and correct
    candidates exactly at it (the correct count is at least 1). Everything a tie rule needs (module docstring)."""

    above: np.ndarray
    tied_wrong: np.ndarray
    tied_correct: np.ndarray

    def ranks(self, ties: str = "expected") -> np.ndarray:
        """1-based rank of the first correct candidate under a tie rule: int64, float64 for "expected"."""
        _check_rule(ties)
        if ties == "optimistic":
            return 1 + self.above
        if ties == "pessimistic":
            return 1 + self.above + self.tied_wrong
        return 1.0 + self.above + self.tied_wrong / (self.tied_correct + 1.0)

    def hit_rate(self, k: int, ties: str = "expected") -> np.ndarray:
        """Per query, the probability that a correct candidate is among the top k (0 or 1 unless ties are
        broken at random)."""
        _check_rule(ties)
        if ties != "expected":
            return (self.ranks(ties) <= k).astype(np.float64)
        # X wrong candidates come before the first correct one in a random order of the tied group:
        # P(X >= j) = C(w, j) / C(w + c, j). A hit needs X <= k - 1 - above.
        draws = k - self.above  # j = (k - 1 - above) + 1
        wrong, correct = self.tied_wrong.astype(np.float64), self.tied_correct.astype(np.float64)
        j = np.clip(draws, 0, None).astype(np.float64)
        possible = (draws >= 1) & (j <= wrong)
        safe_j = np.where(possible, j, 0.0)
        log_ratio = (_log_factorial(wrong) - _log_factorial(wrong - safe_j)
                     - _log_factorial(wrong + correct) + _log_factorial(wrong + correct - safe_j))
        miss = np.where(possible, np.exp(log_ratio), 0.0)
        return np.where(draws >= 1, 1.0 - miss, 0.0)


def _check_rule(ties: str) -> None:
    if ties not in TIE_RULES:
        raise RetrievalInputError(f"ties={ties!r} is not one of {', '.join(TIE_RULES)}")


def _log_factorial(values: np.ndarray) -> np.ndarray:
    return torch.special.gammaln(torch.as_tensor(values, dtype=torch.float64) + 1).numpy()


def retrieval_tie_counts(
    image_embeds, text_embeds, text_to_image, *, chunk_size: int = 1024, normalize: bool = True
) -> tuple[TieCounts, TieCounts]:
    """(image -> text, text -> image) TieCounts for every query; embeddings are L2-normalised first unless
    normalize=False."""
    images, texts, mapping = _check_inputs(image_embeds, text_embeds, text_to_image)
    if normalize:
        images = torch.nn.functional.normalize(images, dim=-1)
        texts = torch.nn.functional.normalize(texts, dim=-1)
    num_images, num_texts = images.shape[0], texts.shape[0]

    image_counts = [torch.empty(num_images, dtype=torch.long) for _ in range(3)]
    for start in range(0, num_images, chunk_size):
        stop = min(start + chunk_size, num_images)
        scores = images[start:stop] @ texts.T  # (B, N_texts)
        # Best correct caption per image in this chunk: scatter each caption's score onto its image's row.
        in_chunk = torch.nonzero((mapping >= start) & (mapping < stop)).squeeze(1)
        rows = mapping[in_chunk] - start
        best_correct = torch.full((stop - start,), -torch.inf)
        best_correct.scatter_reduce_(0, rows, scores[rows, in_chunk], reduce="amax")
        at_best = scores == best_correct[:, None]
        correct_at_best = torch.zeros(stop - start, dtype=torch.long)
        correct_at_best.index_add_(0, rows, at_best[rows, in_chunk].long())
        image_counts[0][start:stop] = (scores > best_correct[:, None]).sum(dim=1)
        image_counts[1][start:stop] = at_best.sum(dim=1) - correct_at_best
        image_counts[2][start:stop] = correct_at_best

    text_counts = [torch.empty(num_texts, dtype=torch.long) for _ in range(2)]
    for start in range(0, num_texts, chunk_size):
        stop = min(start + chunk_size, num_texts)
        scores = texts[start:stop] @ images.T  # (B, N_images)
        correct = scores.gather(1, mapping[start:stop, None])  # (B, 1)
        text_counts[0][start:stop] = (scores > correct).sum(dim=1)
        text_counts[1][start:stop] = (scores == correct).sum(dim=1) - 1
    image_ties = TieCounts(*(counts.numpy() for counts in image_counts))
    text_ties = TieCounts(text_counts[0].numpy(), text_counts[1].numpy(), np.ones(num_texts, dtype=np.int64))
    return image_ties, text_ties


def retrieval_ranks(
    image_embeds, text_embeds, text_to_image, *, chunk_size: int = 1024, normalize: bool = True,
    ties: str = "expected",
):
    """Rank of the first correct answer for every query, in both directions.

    Returns (image_to_text_ranks (N_images,), text_to_image_ranks (N_texts,)) as numpy arrays, 1-based, under
    the tie rule `ties` (module docstring): int64, or float64 expected ranks for "expected". Embeddings are
    L2-normalised first unless normalize=False.
    """
    _check_rule(ties)
    image_ties, text_ties = retrieval_tie_counts(image_embeds, text_embeds, text_to_image, chunk_size=chunk_size,
                                                 normalize=normalize)
    return image_ties.ranks(ties), text_ties.ranks(ties)


def summarize_ranks(ranks: np.ndarray, prefix: str, ks=(1, 5, 10)) -> dict:
    """Recall@k as a fraction of the queries (0-1, as every openalign output gives it), mean rank and median
    rank for one direction's 1-based ranks (ties already resolved one way; `retrieval_metrics` takes the
    expected recall under random tie order instead)."""
    ranks = np.asarray(ranks)
    metrics = {f"{prefix}_r{k}": float(np.mean(ranks <= k)) for k in ks}
    metrics[f"{prefix}_mean_rank"] = float(np.mean(ranks))
    metrics[f"{prefix}_median_rank"] = float(np.median(ranks))
    return metrics


def _summarize_ties(counts: TieCounts, prefix: str, ks, ties: str) -> dict:
    ranks = counts.ranks(ties)
    metrics = {f"{prefix}_r{k}": float(np.mean(counts.hit_rate(k, ties))) for k in ks}
    metrics[f"{prefix}_mean_rank"] = float(np.mean(ranks))
    metrics[f"{prefix}_median_rank"] = float(np.median(ranks))
    return metrics


def retrieval_metrics(
    image_embeds, text_embeds, text_to_image, *, ks=(1, 5, 10), chunk_size: int = 1024, normalize: bool = True,
    ties: str = "expected",
) -> dict:
    """Karpathy-protocol retrieval metrics in both directions.

    text_to_image maps each caption (row of text_embeds) to the index of its image (row of image_embeds).
    Returns a flat dict: image_to_text_r{k} and text_to_image_r{k} as fractions of the queries (0-1),
    *_mean_rank, *_median_rank, the counts num_images / num_texts, and rsum, the sum of the recalls (0-6).
    With the default `ties="expected"`, recall is the expected recall when ties are broken at random and the
    ranks are expected ranks (module docstring).
    """
    _check_rule(ties)
    image_ties, text_ties = retrieval_tie_counts(image_embeds, text_embeds, text_to_image, chunk_size=chunk_size,
                                                 normalize=normalize)
    metrics = {"num_images": int(len(image_ties.above)), "num_texts": int(len(text_ties.above))}
    metrics.update(_summarize_ties(image_ties, "image_to_text", ks, ties))
    metrics.update(_summarize_ties(text_ties, "text_to_image", ks, ties))
    metrics["rsum"] = float(
        sum(metrics[f"{direction}_r{k}"] for direction in ("image_to_text", "text_to_image") for k in ks)
    )
    return metrics
