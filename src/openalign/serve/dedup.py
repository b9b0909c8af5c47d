"""clip-retrieval's deduplication of search results, in bounded memory and without a loop over pairs.

clip-retrieval drops every result of a connected group of near copies (cosine above 0.94, chains included)
except the best ranked. Its own code builds the dense k x k similarity matrix and walks the pairs in Python:
for the 10,000 results a request may ask for, 400 MB of float32 and 50 million loop turns. Here the matrix is
computed a block of rows at a time, against the later results only, and each block's pairs are merged into
the groups with array operations; memory is a block (BLOCK_ROWS x k), whatever the number of near copies.
"""

from __future__ import annotations

import numpy as np

DUPLICATE_THRESHOLD = 0.94  # clip-retrieval's: results closer than this to a better one are dropped
BLOCK_ROWS = 128  # (128, k) float32 similarities and at most 128 k pairs in memory at a time


def duplicate_positions(vectors: np.ndarray, threshold: float = DUPLICATE_THRESHOLD,
                        block_rows: int = BLOCK_ROWS) -> np.ndarray:
    """Sorted positions to drop from results ranked best first, whose unit vectors are `vectors` (k, D): every
    member of a connected group closer than `threshold` except the best ranked (the lowest position)."""
    count = len(vectors)
    # parent[i] <= i always; a group's root is its lowest position, the one it keeps.
    parent = np.arange(count)
    for start in range(0, count, block_rows):
        similarity = vectors[start : start + block_rows] @ vectors[start:].T  # (B, k - start)
        rows, columns = np.nonzero(similarity > threshold)
        rows, columns = rows + start, columns + start
        later = columns > rows  # each pair once, and no result paired with itself
        _merge(parent, rows[later], columns[later])
    return np.flatnonzero(parent != np.arange(count))


def _merge(parent: np.ndarray, first: np.ndarray, second: np.ndarray) -> None:
    """Join the groups of each pair (first[i], second[i]) in place: every root ends at its group's lowest member.

    Rounds of hooking each root to the lowest root it is paired with, then pointer jumping, until no pair spans
    two groups; a round needs no Python loop over pairs, and rounds are few (chains collapse in one).
    """
    while len(first):
        _compress(parent)
        first_root, second_root = parent[first], parent[second]
        apart = first_root != second_root
        if not apart.any():
            return
        first, second = first[apart], second[apart]
        low = np.minimum(first_root[apart], second_root[apart])
        high = np.maximum(first_root[apart], second_root[apart])
        np.minimum.at(parent, high, low)


def _compress(parent: np.ndarray) -> None:
    """Point every position straight at its root."""
    while True:
        grandparent = parent[parent]
        if np.array_equal(grandparent, parent):
            return
        parent[:] = grandparent
