"""Inverted-file indexes for collections larger than RAM: IVF-PQ lists on disk, re-ranked from a memory-mapped
float16 copy, built from embedding parts by one process or by several and merged.

A build has three stages; each is a function that a separate process, or a machine sharing the folder, can run:

1. train_ivf_index: trains the coarse quantiser (nlist centroids) and the 8-bit PQ codebooks on a sample drawn
   one part at a time; writes the empty trained index (trained.faiss), allocates vectors.npy (N x D float16,
   a sparse file) and writes index.json with stage "trained".
2. add_ivf_shard(out_dir, shard, num_shards): adds the parts p with p % num_shards == shard to a copy of the
   trained index under their global ids, writes their rows of vectors.npy (shards touch disjoint rows), and
   saves shards/shard-S-of-N.faiss. Shards run in parallel; each holds only its own codes in memory.
3. merge_ivf_shards: concatenates the shards' inverted lists into lists.ivfdata (FAISS's OnDiskInvertedLists,
   which search memory-maps), writes index.faiss, metadata.arrow and stage "merged", and removes the shards.

Ids are global row numbers of the embedding folder, so the merged lists hold the same (id, code) entries as a
one-process build; only the order inside a list may differ, and search results do not depend on it.

Sizes: nlist is the power of two nearest 2 * sqrt(N) (8,192 at 10M), so a list holds about sqrt(N) / 2 vectors;
codes take D/8 bytes (80 at D = 640) plus 8 for the id, the largest of D/8, D/16, D/32 that fits the budget. A
query scans nprobe lists (default nlist / 32: 3% of the collection) and re-scores k_factor * k candidates
(k_factor 64) against the float16 copy, so its recall is that of the lists probed, not of the codes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np

from openalign.index.faiss_index import (
    METADATA_FILE,
    quiet_native_stdout,
    resolve_embed_kind,
    training_sample,
    write_index_json,
    write_metadata,
)
from openalign.index.plan import IndexBuildError, IndexPlan, _faiss
from openalign.inference.embedding_folder import iter_embedding_parts

# Re-ranking depth: the 8-bit codes order candidates roughly; re-scoring from the float16 copy costs little.
# Measured on 200,000 clustered 640-d vectors: recall@10 0.923 with 32 x k candidates, 0.984 with 64 x k, for
# +0.7 ms at p50 (benchmarks/search.py --kind ivfpq --nprobe 32).
IVF_K_FACTOR = 64
IVF_MIN_VECTORS = 10_000  # 39 training points for each of the 256 centroids of an 8-bit sub-quantiser
PQ_TRAINING_POINTS = 65_536
ID_BYTES = 8


def ivf_list_count(num_vectors: int) -> int:
    """nlist: the power of two nearest 2 * sqrt(N), at most N / 39 (FAISS's minimum of points per centroid)."""
    target = 2 ** round(math.log2(2 * math.sqrt(num_vectors)))
    return max(1, min(target, num_vectors // 39))


def _code_sizes(dim: int) -> list[int]:
    """PQ code bytes to try, largest first: D/8, D/16, D/32 (each must divide D), else one byte."""
    sizes = [dim // parts for parts in (8, 16, 32) if dim // parts >= 1 and dim % (dim // parts) == 0]
    return sorted(set(sizes), reverse=True) or [1]


def ivf_plan(num_vectors: int, dim: int, budget: float, *, reason: str) -> IndexPlan:
    """The "ivfpq" plan for N x D within budget bytes of inverted lists (ids, codes, centroids, codebooks)."""
    if num_vectors < IVF_MIN_VECTORS:
        raise IndexBuildError(
            f"an ivfpq index trains 256 centroids per sub-quantizer and needs at least {IVF_MIN_VECTORS} vectors; "
            f"this collection has {num_vectors}: use kind 'flat' or 'pq'"
        )
    nlist = ivf_list_count(num_vectors)
    fixed_bytes = nlist * dim * 4 + 256 * dim * 4
    for code_bytes in _code_sizes(dim):
        estimated = num_vectors * (code_bytes + ID_BYTES) + fixed_bytes
        if estimated <= budget:
            return IndexPlan(
                "ivfpq",
                f"IVF{nlist},PQ{code_bytes}np",  # np: no polysemous training (slow, unused here)
                num_vectors,
                dim,
                estimated,
                k_factor=IVF_K_FACTOR,
                nlist=nlist,
                nprobe=max(1, nlist // 32),
                reason=f"{reason}; lists and float16 re-ranking copy on disk, memory-mapped",
                rerank_bytes=2 * num_vectors * dim,
            )
    smallest = num_vectors * (_code_sizes(dim)[-1] + ID_BYTES) + fixed_bytes
    raise IndexBuildError(
        f"an ivfpq index of {num_vectors} x {dim} needs {smallest} bytes, over the budget of {budget}"
    )


def _read_config(out_dir: Path, stage: str) -> dict:
    path = out_dir / "index.json"
    if not path.is_file():
        raise IndexBuildError(f"{path} is missing: train the index first (train_ivf_index / --stage train)")
    config = json.loads(path.read_text())
    if config.get("stage") != stage:
        raise IndexBuildError(f"{out_dir} is at stage {config.get('stage', 'merged')!r}, not {stage!r}")
    return config


def _shard_path(out_dir: Path, shard: int, num_shards: int) -> Path:
    return out_dir / "shards" / f"shard-{shard:05d}-of-{num_shards:05d}.faiss"


def train_ivf_index(embed_dir: str | Path, out_dir: str | Path, plan: IndexPlan, embed_kind: str) -> IndexPlan:
    """Stage 1: train the coarse quantiser and PQ on a sample, save trained.faiss, allocate vectors.npy."""
    faiss = _faiss()
    embed_dir, out_dir = Path(embed_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = faiss.index_factory(plan.dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    sample_size = min(plan.num_vectors, max(PQ_TRAINING_POINTS, 39 * plan.nlist))
    index.train(training_sample(embed_dir, embed_kind, plan.num_vectors, sample_size))
    faiss.write_index(index, str(out_dir / "trained.faiss"))
    # A sparse file: shards fill their own rows, and nothing is written twice.
    store = np.lib.format.open_memmap(
        out_dir / "vectors.npy", mode="w+", dtype=np.float16, shape=(plan.num_vectors, plan.dim)
    )
    del store
    shutil.rmtree(out_dir / "shards", ignore_errors=True)
    write_index_json(out_dir, plan, embed_dir, embed_kind, stage="trained")
    return plan


def add_ivf_shard(out_dir: str | Path, shard: int = 0, num_shards: int = 1) -> Path:
    """Stage 2: add this shard's parts (p % num_shards == shard) to a copy of the trained index; returns its file."""
    faiss = _faiss()
    out_dir = Path(out_dir)
    if not 0 <= shard < num_shards:
        raise IndexBuildError(f"shard {shard} is outside 0..{num_shards - 1}")
    config = _read_config(out_dir, "trained")
    index = faiss.read_index(str(out_dir / "trained.faiss"))
    store = np.load(out_dir / "vectors.npy", mmap_mode="r+")
    offset = 0
    for part_number, (embeddings, _) in enumerate(iter_embedding_parts(config["embed_dir"], config["embed_kind"])):
        count = len(embeddings)
        if part_number % num_shards == shard:
            index.add_with_ids(np.asarray(embeddings, dtype=np.float32), np.arange(offset, offset + count))
            store[offset : offset + count] = embeddings
        offset += count
    if offset != len(store):
        raise IndexBuildError(f"{config['embed_dir']} holds {offset} vectors, the trained index expects {len(store)}")
    store.flush()
    del store
    path = _shard_path(out_dir, shard, num_shards)
    path.parent.mkdir(exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    faiss.write_index(index, str(temporary))
    os.replace(temporary, path)  # a shard file exists only once its rows of vectors.npy are written
    return path


def merge_ivf_shards(out_dir: str | Path, num_shards: int = 1) -> IndexPlan:
    """Stage 3: merge every shard's lists into lists.ivfdata on disk; write index.faiss and metadata.arrow."""
    from faiss.contrib.ondisk import merge_ondisk

    faiss = _faiss()
    out_dir = Path(out_dir)
    config = _read_config(out_dir, "trained")
    shard_files = [_shard_path(out_dir, shard, num_shards) for shard in range(num_shards)]
    missing = [path.name for path in shard_files if not path.is_file()]
    if missing:
        raise IndexBuildError(f"{out_dir}: shards not built yet: {', '.join(missing)}")
    index = faiss.read_index(str(out_dir / "trained.faiss"))
    with quiet_native_stdout():  # merge_ondisk prints the file sizes it allocates
        merge_ondisk(index, [str(path) for path in shard_files], str(out_dir / "lists.ivfdata"))
    plan = IndexPlan.from_json(config["plan"])
    if index.ntotal != plan.num_vectors:
        raise IndexBuildError(f"{out_dir}: the shards hold {index.ntotal} vectors, the plan {plan.num_vectors}")
    faiss.write_index(index, str(out_dir / "index.faiss"))
    write_metadata(Path(config["embed_dir"]), config["embed_kind"], out_dir / METADATA_FILE)
    write_index_json(out_dir, plan, Path(config["embed_dir"]), config["embed_kind"], stage="merged")
    shutil.rmtree(out_dir / "shards")
    (out_dir / "trained.faiss").unlink()
    return plan


def build_ivf_index(embed_dir: str | Path, out_dir: str | Path, plan: IndexPlan, embed_kind: str) -> IndexPlan:
    """All three stages in this process: the one-shard build that a sharded build must equal."""
    train_ivf_index(embed_dir, out_dir, plan, embed_kind)
    add_ivf_shard(out_dir, 0, 1)
    return merge_ivf_shards(out_dir, 1)


def plan_ivf_index(embed_dir: str | Path, *, memory_budget_bytes: int | None = None, embed_kind: str | None = None):
    """(plan, embed_kind) of an "ivfpq" index over a finished embedding folder, for train_ivf_index."""
    summary, embed_kind, dim = resolve_embed_kind(Path(embed_dir), embed_kind)
    budget = math.inf if memory_budget_bytes is None else memory_budget_bytes
    return ivf_plan(summary["count"], dim, budget, reason="requested"), embed_kind
