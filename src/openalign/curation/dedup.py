"""Semantic deduplication: drop pairs whose image lies within cosine T of a kept pair's image.

The pairs come in priority order (highest score first). Walking that order, a pair is kept when the cosine of
its image embedding with every pair kept before it is below T, and is otherwise a duplicate of the kept pair it
is most similar to. So every group of near-identical images keeps its best-scoring member, and no two kept
images are within T of each other (as in SemDeDup, Abbas et al. 2023, which keeps one pair per group of
near-duplicates inside each k-means cluster of the embeddings).

Two ways, the same rule:
- "exact": the candidates' embeddings in memory (M x D x 4 bytes) and, block by block in priority order, a
  FAISS inner-product search of the block against every kept pair so far plus the block's own Gram matrix.
  Time grows as M x K x D (K: pairs kept), so quadratically: fine to a few hundred thousand pairs.
- "clusters": k-means on an evenly spaced sample of the embeddings (FAISS, spherical), every pair assigned to
  its nearest centroid, then the exact rule inside each cluster alone. Memory is one cluster's embeddings and
  time M x (M / C) x D for C clusters: linear in M at a fixed cluster size. Near-duplicates that fall in two
  different clusters are both kept, so this drops a subset of what the exact rule would (typically nearly all
  of it: near-identical images have near-identical nearest centroids).
"auto" picks exact up to EXACT_LIMIT candidates and clusters of about CLUSTER_SIZE pairs beyond.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from openalign.curation.scores import CurationError
from openalign.errors import ConfigError

METHODS = ("auto", "exact", "clusters")
EXACT_LIMIT = 200_000
CLUSTER_SIZE = 10_000
BLOCK_SIZE = 1024
SAMPLE_PER_CLUSTER = 256  # k-means training points per centroid (FAISS's own cap)


@dataclass
class Duplicates:
    """The outcome of `deduplicate`, per candidate in priority order: `duplicate_of` is the position (in that
    order) of the kept pair it duplicates, -1 for a kept pair; `cosine` is the image cosine to it."""

    duplicate_of: np.ndarray
    cosine: np.ndarray
    method: str
    num_clusters: int = 1

    @property
    def kept(self) -> np.ndarray:
        """(M,) bool: which candidates are kept."""
        return self.duplicate_of < 0


def _faiss():
    try:
        import faiss
    except ImportError as error:
        raise CurationError("semantic deduplication needs FAISS: pip install 'openalign[index]' "
                            "(faiss-cpu)") from error
    return faiss


def greedy_duplicates(vectors: np.ndarray, threshold: float, block_size: int = BLOCK_SIZE):
    """The exact rule on (M, D) L2-normalised rows in priority order: (duplicate_of, cosine) as in Duplicates."""
    faiss = _faiss()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    count = len(vectors)
    duplicate_of = np.full(count, -1, dtype=np.int64)
    cosine = np.zeros(count, dtype=np.float32)
    if count == 0:
        return duplicate_of, cosine
    index = faiss.IndexFlatIP(vectors.shape[1])
    kept_positions: list[int] = []
    for start in range(0, count, block_size):
        block = vectors[start:start + block_size]  # (B, D)
        if index.ntotal:
            similarities, ids = index.search(block, 1)  # (B, 1): the most similar pair kept in earlier blocks
            best, best_position = similarities[:, 0], np.asarray(kept_positions)[ids[:, 0]]
        else:
            best, best_position = np.full(len(block), -np.inf, dtype=np.float32), np.full(len(block), -1)
        gram = block @ block.T  # (B, B)
        block_kept: list[int] = []
        for row in range(len(block)):
            similarity, position = best[row], best_position[row]
            if block_kept:
                within = gram[row, block_kept]
                nearest = int(np.argmax(within))
                if within[nearest] > similarity:
                    similarity, position = within[nearest], start + block_kept[nearest]
            if similarity >= threshold:
                duplicate_of[start + row], cosine[start + row] = position, similarity
            else:
                block_kept.append(row)
        if block_kept:
            index.add(block[block_kept])
            kept_positions.extend(start + row for row in block_kept)
    return duplicate_of, cosine


def choose_method(count: int, method: str = "auto", num_clusters: int | None = None) -> tuple[str, int]:
    """(method, number of clusters) for `count` candidates; see the module docstring for "auto"."""
    if method not in METHODS:
        raise ConfigError(f"dedup method {method!r} is not one of {list(METHODS)}")
    if method == "auto":
        method = "exact" if count <= EXACT_LIMIT and num_clusters is None else "clusters"
    if method == "exact":
        return method, 1
    clusters = num_clusters or math.ceil(count / CLUSTER_SIZE)
    return method, max(1, min(clusters, count))


def deduplicate(vectors, threshold: float, *, method: str = "auto", num_clusters: int | None = None,
                seed: int = 0) -> Duplicates:
    """Apply the rule of the module docstring to `vectors`: (M, D) L2-normalised image embeddings in priority
    order, as a numpy array or any object with `len()`, `.shape` and row selection by an index array (a
    memory-mapped view of an embedding folder: only the rows asked for are read)."""
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"dedup similarity {threshold!r} must lie in (0, 1]: the image cosine at which two "
                          "pairs count as duplicates")
    count = len(vectors)
    method, clusters = choose_method(count, method, num_clusters)
    if method == "exact" or clusters == 1:
        duplicate_of, cosine = greedy_duplicates(vectors[np.arange(count)], threshold)
        return Duplicates(duplicate_of, cosine, method, 1)
    assignment = cluster_assignment(vectors, clusters, seed)
    duplicate_of = np.full(count, -1, dtype=np.int64)
    cosine = np.zeros(count, dtype=np.float32)
    for cluster in range(clusters):
        members = np.flatnonzero(assignment == cluster)  # ascending: priority order within the cluster
        if len(members) < 2:
            continue
        local, local_cosine = greedy_duplicates(vectors[members], threshold)
        duplicates = local >= 0
        duplicate_of[members[duplicates]] = members[local[duplicates]]
        cosine[members[duplicates]] = local_cosine[duplicates]
    return Duplicates(duplicate_of, cosine, method, clusters)


def cluster_assignment(vectors, clusters: int, seed: int = 0, block_size: int = 65_536) -> np.ndarray:
    """(M,) nearest k-means centroid of each row: spherical k-means trained on evenly spaced rows (a sample
    fixed by M alone, so the clustering is reproducible), assignment streamed block by block."""
    faiss = _faiss()
    count, dim = len(vectors), vectors.shape[1]
    sample = np.unique(np.linspace(0, count - 1, min(count, clusters * SAMPLE_PER_CLUSTER)).astype(np.int64))
    kmeans = faiss.Kmeans(dim, clusters, niter=20, seed=seed, spherical=True, verbose=False)
    kmeans.train(np.ascontiguousarray(vectors[sample], dtype=np.float32))
    assignment = np.empty(count, dtype=np.int64)
    for start in range(0, count, block_size):
        rows = np.arange(start, min(count, start + block_size))
        _, nearest = kmeans.index.search(np.ascontiguousarray(vectors[rows], dtype=np.float32), 1)
        assignment[rows] = nearest[:, 0]
    return assignment


class FolderRows:
    """Rows of an embedding folder's parts (one kind) addressed by their position among all its rows, read
    from the memory-mapped parts only when asked for; `view(positions)` reorders them (e.g. priority order)."""

    def __init__(self, folder, kind: str = "image"):
        from openalign.inference.embedding_folder import iter_embedding_parts

        self.parts = [embeddings for embeddings, _ in iter_embedding_parts(folder, kind)]
        self.starts = np.cumsum([0] + [len(part) for part in self.parts])
        self.dim = self.parts[0].shape[1] if self.parts else 0

    def __len__(self) -> int:
        return int(self.starts[-1])

    def take(self, positions: np.ndarray) -> np.ndarray:
        """(len(positions), D) float32 rows at these positions, in the order given."""
        positions = np.asarray(positions, dtype=np.int64)
        rows = np.empty((len(positions), self.dim), dtype=np.float32)
        part_of = np.searchsorted(self.starts, positions, side="right") - 1
        for part in np.unique(part_of):
            chosen = part_of == part
            rows[chosen] = self.parts[part][positions[chosen] - self.starts[part]]
        return rows

    def view(self, positions: np.ndarray) -> _RowView:
        """The rows at `positions`, in that order, as `deduplicate` takes them."""
        return _RowView(self, np.asarray(positions, dtype=np.int64))


class _RowView:
    def __init__(self, rows: FolderRows, positions: np.ndarray):
        self.rows, self.positions = rows, positions
        self.shape = (len(positions), rows.dim)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index) -> np.ndarray:
        return self.rows.take(self.positions[index])
