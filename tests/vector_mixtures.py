"""Unit vectors from a mixture of clusters of very different sizes and spreads: the kind of collection whose
neighbourhoods a rule's fixed search settings get wrong (dense clusters need more lists probed and deeper
re-ranking than sparse ones). Shared by the index tests and benchmarks/search.py."""

from __future__ import annotations

import numpy as np


class VariedMixture:
    """num_clusters centres on the unit sphere; cluster sizes fall off as 1 / rank (a few hold most vectors);
    spreads are log-uniform over [min_spread, max_spread] (the noise's norm relative to the centre's)."""

    def __init__(self, dim: int, num_clusters: int, *, min_spread: float = 0.15, max_spread: float = 1.2,
                 seed: int = 0):
        rng = np.random.default_rng(seed)
        centres = rng.standard_normal((num_clusters, dim))
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)
        weights = 1.0 / np.arange(1, num_clusters + 1)
        self.weights = rng.permutation(weights / weights.sum())
        self.spreads = np.exp(rng.uniform(np.log(min_spread), np.log(max_spread), num_clusters))
        self.dim = dim

    def sample(self, count: int, seed: int) -> np.ndarray:
        """(count, dim) float32 unit vectors; another seed draws other points of the same mixture."""
        rng = np.random.default_rng(seed)
        clusters = rng.choice(len(self.centres), size=count, p=self.weights)
        noise = rng.standard_normal((count, self.dim)) * (self.spreads[clusters] / np.sqrt(self.dim))[:, None]
        points = self.centres[clusters] + noise
        return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)
