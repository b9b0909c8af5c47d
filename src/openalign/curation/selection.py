"""Which scored pairs to keep: the top fraction by score, a minimum score, or both.

Pairs are ranked by score, highest first, and pairs of equal score by their position in the source (earlier
first), so a selection is a function of the scores alone: the same whatever the number of processes that
scored them, and the same when re-run. `--keep-fraction F` keeps the first round(F x N) pairs of that order
(at least one); `--min-similarity S` keeps every pair scoring S or more. Both rules keep a prefix of the same
order, so when both are given the kept set is the shorter prefix, and the rule that made it is reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from openalign.errors import ConfigError


def priority_order(scores: np.ndarray) -> np.ndarray:
    """Positions of the pairs from highest to lowest score; equal scores keep their source order."""
    return np.argsort(-np.asarray(scores, dtype=np.float32), kind="stable")


def fraction_count(keep_fraction: float, total: int) -> int:
    """How many of `total` pairs `keep_fraction` keeps: round(F x N), halves up, at least one of a
    non-empty corpus."""
    check_keep_fraction(keep_fraction)
    if total == 0:
        return 0
    return min(total, max(1, math.floor(keep_fraction * total + 0.5)))


def check_keep_fraction(keep_fraction: float) -> None:
    """Raise ConfigError unless 0 < keep_fraction <= 1."""
    if not (isinstance(keep_fraction, (int, float)) and 0.0 < keep_fraction <= 1.0):
        raise ConfigError(f"keep fraction {keep_fraction!r} must lie in (0, 1]: the share of the pairs to keep")


@dataclass
class Selection:
    """The outcome of `select_by_score`.

    keep: (N,) bool, in source order. rule: "keep_fraction", "min_similarity", "both" (the two rules keep the
    same pairs) or "none" (no rule given: everything kept). kept_by_fraction / kept_by_threshold: how many
    pairs each rule alone keeps (None when not given). lowest_kept_score: the score of the last kept pair.
    """

    keep: np.ndarray
    rule: str
    kept_by_fraction: int | None
    kept_by_threshold: int | None
    lowest_kept_score: float | None

    @property
    def kept(self) -> int:
        """Number of pairs kept."""
        return int(self.keep.sum())


def select_by_score(scores: np.ndarray, keep_fraction: float | None = None,
                    min_similarity: float | None = None) -> Selection:
    """Keep the pairs the rules keep (module docstring); with neither rule every pair is kept."""
    scores = np.asarray(scores, dtype=np.float32)
    order = priority_order(scores)
    by_fraction = None if keep_fraction is None else fraction_count(keep_fraction, len(scores))
    # Pairs at or above the threshold form a prefix of the order: the prefix's length is their count.
    by_threshold = None if min_similarity is None else int((scores >= np.float32(min_similarity)).sum())
    counts = [count for count in (by_fraction, by_threshold) if count is not None]
    kept = min(counts) if counts else len(scores)
    if by_fraction is None and by_threshold is None:
        rule = "none"
    elif by_threshold is None or (by_fraction is not None and by_fraction < by_threshold):
        rule = "keep_fraction"
    elif by_fraction is None or by_threshold < by_fraction:
        rule = "min_similarity"
    else:
        rule = "both"
    keep = np.zeros(len(scores), dtype=bool)
    keep[order[:kept]] = True
    lowest = float(scores[order[kept - 1]]) if kept else None
    return Selection(keep=keep, rule=rule, kept_by_fraction=by_fraction, kept_by_threshold=by_threshold,
                     lowest_kept_score=lowest)
