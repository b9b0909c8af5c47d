"""Whether a scorer separates anything, told without labels: the given pairs against the same images with
shuffled captions.

A scorer that has learnt anything about images and captions scores an image with its own caption above the
same image with another pair's caption; one that has learnt nothing scores both alike, and filtering by its
scores keeps pairs at random (or worse: it then drops the pairs its accidents dislike). So every scoring also
scores each image against the caption of another pair of its part (a fixed derangement, from the embeddings
already computed: a permutation and dot products), and the check compares the two sets of scores:

    auc                  the probability that a given pair outscores a shuffled one (0.5: chance; 1: perfect)
    gap_standard_errors  the mean paired gap (given minus shuffled) in units of its standard error: how sure
                         the gap is not noise, at this many pairs
    spread               the standard deviation of the given scores (near 0: every pair scores alike)

A scorer is weak when its AUC is under WEAK_AUC, its gap is under WEAK_GAP_STANDARD_ERRORS standard errors, or
its scores do not spread. A noisy corpus lowers the AUC too, since its mismatched pairs score like shuffled
ones: with a share m of them the AUC is about 0.5 + (1 - m) x (the AUC on the clean pairs - 0.5).
"""

from __future__ import annotations

import numpy as np

SHUFFLE_SEED = 20_261_206  # fixed: scores.parquet is a function of the embedding parts
WEAK_AUC = 0.55
WEAK_GAP_STANDARD_ERRORS = 3.0
WEAK_SPREAD = 1e-3
ADVICE = ("train the scorer longer (curate: --bootstrap-steps / --bootstrap-minutes), on more pairs, or score "
          "with a better model (--model)")


def shuffled_partners(count: int, part: int) -> np.ndarray:
    """(count,) positions: the pair whose caption each pair of a part is scored against, never its own (for
    two pairs or more).

    A random cycle through the part (seeded by the part's number, so any number of processes gives the same):
    the pairs in a random order, each taking the next one's caption."""
    order = np.random.default_rng([SHUFFLE_SEED, part]).permutation(count)
    partners = np.empty(count, dtype=np.int64)
    partners[order] = np.roll(order, -1)
    return partners


def mann_whitney_auc(higher: np.ndarray, lower: np.ndarray) -> float:
    """P(a score of `higher` > a score of `lower`), ties counted half: the Mann-Whitney statistic over n x m
    (ROC AUC with `higher` the positives), by sorting (n log n), not by comparing every pair."""
    ordered = np.sort(np.asarray(lower, dtype=np.float64))
    higher = np.asarray(higher, dtype=np.float64)
    below = np.searchsorted(ordered, higher, side="left")
    at_or_below = np.searchsorted(ordered, higher, side="right")
    return float((below + at_or_below).sum() / (2.0 * len(higher) * len(ordered)))


def check_scorer(scores: np.ndarray, shuffled: np.ndarray) -> dict:
    """The figures of the module docstring for row-aligned given and shuffled scores, and `weak` with its
    `reasons` (empty when the scorer separates the given pairs from the shuffled ones)."""
    scores, shuffled = np.asarray(scores, dtype=np.float64), np.asarray(shuffled, dtype=np.float64)
    paired = ~np.isnan(shuffled)
    given, other = scores[paired], shuffled[paired]
    pairs = int(paired.sum())
    spread = float(scores.std()) if len(scores) else 0.0
    check = {"pairs": pairs, "given_mean": None, "shuffled_mean": None, "gap": None, "gap_standard_errors": None,
             "auc": None, "spread": round(spread, 4)}
    reasons = []
    if pairs < 2:
        reasons.append(f"{pairs} pair(s) with a shuffled partner: too few to tell")
    else:
        gaps = given - other
        standard_error = float(gaps.std(ddof=1) / np.sqrt(pairs))
        gap_errors = float(gaps.mean() / standard_error) if standard_error > 0 else 0.0
        auc = mann_whitney_auc(given, other)
        check.update(given_mean=round(float(given.mean()), 4), shuffled_mean=round(float(other.mean()), 4),
                     gap=round(float(gaps.mean()), 4), gap_standard_errors=round(gap_errors, 1), auc=round(auc, 3))
        if auc < WEAK_AUC:
            reasons.append(f"given-vs-shuffled AUC {auc:.3f} (under {WEAK_AUC:g}; chance 0.5)")
        if gap_errors < WEAK_GAP_STANDARD_ERRORS:
            reasons.append(f"mean gap over shuffled captions {gap_errors:.1f} standard errors (under "
                           f"{WEAK_GAP_STANDARD_ERRORS:g})")
    if spread < WEAK_SPREAD:
        reasons.append(f"the scores hardly spread (standard deviation {spread:.1e})")
    return {**check, "weak": bool(reasons), "reasons": reasons}


def describe_check(check: dict) -> str:
    """Lines for a report or a terminal: the figures, and for a weak scorer what to do."""
    if check["auc"] is None:
        figures = f"{check['pairs']} pair(s) with a shuffled caption"
    else:
        figures = (f"a pair outscores its image with a shuffled caption with probability {check['auc']:.3f} (AUC; "
                   f"chance 0.5), mean score {check['given_mean']:.3f} vs {check['shuffled_mean']:.3f} "
                   f"({check['gap_standard_errors']:.1f} standard errors), spread {check['spread']:.3f}")
    if not check["weak"]:
        return f"scorer check: separates pairs from shuffled captions: {figures}"
    return (f"scorer check: WEAK, no better than chance: {figures}\n"
            f"  filtering by its scores keeps pairs about at random: {ADVICE}")
