"""Inverted-file indexes for collections larger than RAM: IVF-PQ lists on disk, re-ranked from a memory-mapped
float16 copy, built from embedding parts by one process or by several and merged.

A build of OUT has three stages, each a function that a separate process, or a machine sharing the folder, can
run; they work in OUT's building folder (.OUT.partial, openalign.index.folder) and the last publishes it as OUT:

1. train_ivf_index: checks the embedding parts' bytes against their SHA-256, trains the coarse quantiser (nlist
   centroids), then the 8-bit PQ codebooks on the residuals, on a sample drawn one part at a time; writes the
   empty trained index (trained.faiss), allocates vectors.npy (N x D float16, every block reserved on disk) and
   writes index.json with stage "trained".
2. add_ivf_shard(out_dir, shard, num_shards): adds the parts p with p % num_shards == shard to a copy of the
   trained index under their global ids, writes their rows of vectors.npy (shards touch disjoint rows), and
   saves shards/shard-S-of-N.faiss. Shards run in parallel; each holds only its own codes in memory.
3. merge_ivf_shards: concatenates the shards' inverted lists into lists.ivfdata (FAISS's OnDiskInvertedLists,
   which search memory-maps), writes index.faiss and metadata.arrow, then tunes nprobe / k_factor and publishes
   (openalign.index.tuning.finish_build).

Ids are global row numbers of the embedding folder, so the merged lists hold the same (id, code) entries as a
one-process build; only the order inside a list may differ, and search results do not depend on it. Each stage's
seconds go into index.json's build report (shards: their own file, summed at the merge).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np

from openalign.files import allocate_file, reporting_full_disk, reserve_space
from openalign.index.common import IndexBuildError, IndexPlan, import_faiss, quiet_native_stdout
from openalign.index.folder import (
    FAISS_FILE,
    INDEX_FILE,
    LISTS_FILE,
    METADATA_FILE,
    VECTORS_FILE,
    building_folder,
    read_index_json,
    start_building,
    update_index_json,
    write_faiss_index,
    write_index_json,
)
from openalign.index.plan import ID_BYTES, ivf_plan
from openalign.index.sources import resolve_embed_kind, training_sample, write_metadata
from openalign.index.tuning import DEFAULT_TARGET_RECALL, finish_build
from openalign.inference.embedding_folder import iter_embedding_parts, verify_embedding_folder

PQ_TRAINING_POINTS = 65_536
TRAINED_FILE = "trained.faiss"


def _read_config(work: Path, stage: str) -> dict:
    if not (work / INDEX_FILE).is_file():
        raise IndexBuildError(f"{work / INDEX_FILE} is missing: train the index first (--stage train, or "
                              "train_ivf_index)")
    config = read_index_json(work)
    if config.get("stage") != stage:
        raise IndexBuildError(f"{work} is at stage {config.get('stage', 'merged')!r}, not {stage!r}")
    return config


def _shard_path(work: Path, shard: int, num_shards: int) -> Path:
    return work / "shards" / f"shard-{shard:05d}-of-{num_shards:05d}.faiss"


def _allocate_vectors(path: Path, count: int, dim: int) -> None:
    """vectors.npy of count x dim float16 with every block reserved: shards fill it through a memory map, where a
    full disk would be a SIGBUS, so the disk is asked for all of it here (a DiskFullError naming the file)."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False,
              "shape": (count, dim)}
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, header)
        header_bytes = handle.tell()
    allocate_file(path, header_bytes + 2 * count * dim)
    with open(path, "r+b") as handle:
        np.lib.format.write_array_header_1_0(handle, header)


def train_ivf_index(embed_dir: str | Path, out_dir: str | Path, plan: IndexPlan, embed_kind: str) -> IndexPlan:
    """Stage 1: train the coarse quantiser and PQ on a sample, save trained.faiss, allocate vectors.npy."""
    faiss = import_faiss()
    embed_dir = Path(embed_dir)
    work = start_building(out_dir)
    index = faiss.index_factory(plan.dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    began = time.perf_counter()
    verify_embedding_folder(embed_dir, embed_kind)  # the parts' every byte, once: the shards rely on them
    started = time.perf_counter()
    sample = training_sample(embed_dir, embed_kind, plan.num_vectors,
                             min(plan.num_vectors, max(PQ_TRAINING_POINTS, 39 * plan.nlist)))
    sampled = time.perf_counter()
    # The coarse quantiser first, on its own, so that its time is known; index.train then sees it trained and
    # trains only the PQ codebooks on the residuals.
    faiss.extract_index_ivf(index).train_q1(len(sample), faiss.swig_ptr(sample), False, faiss.METRIC_INNER_PRODUCT)
    quantised = time.perf_counter()
    index.train(sample)
    trained = time.perf_counter()
    del sample
    write_faiss_index(index, work / TRAINED_FILE)
    _allocate_vectors(work / VECTORS_FILE, plan.num_vectors, plan.dim)
    stages = {"verify_s": started - began, "sample_s": sampled - started, "coarse_quantiser_s": quantised - sampled,
              "pq_training_s": trained - quantised}
    write_index_json(work, plan, embed_dir, embed_kind, stage="trained",
                     build={"stages": {name: round(value, 2) for name, value in stages.items()}})
    return plan


def add_ivf_shard(out_dir: str | Path, shard: int = 0, num_shards: int = 1) -> Path:
    """Stage 2: add this shard's parts (p % num_shards == shard) to a copy of the trained index; returns its file."""
    faiss = import_faiss()
    work = building_folder(out_dir)
    if not 0 <= shard < num_shards:
        raise IndexBuildError(f"shard {shard} is outside 0..{num_shards - 1}")
    config = _read_config(work, "trained")
    index = faiss.read_index(str(work / TRAINED_FILE))
    store = np.load(work / VECTORS_FILE, mmap_mode="r+")
    offset, add_seconds, copy_seconds = 0, 0.0, 0.0
    for part_number, (embeddings, _) in enumerate(iter_embedding_parts(config["embed_dir"], config["embed_kind"])):
        count = len(embeddings)
        if part_number % num_shards == shard:
            started = time.perf_counter()
            index.add_with_ids(np.asarray(embeddings, dtype=np.float32), np.arange(offset, offset + count))
            added = time.perf_counter()
            store[offset : offset + count] = embeddings
            copy_seconds += time.perf_counter() - added
            add_seconds += added - started
        offset += count
    if offset != len(store):
        raise IndexBuildError(f"{config['embed_dir']} holds {offset} vectors, the trained index expects {len(store)}")
    started = time.perf_counter()
    store.flush()
    del store
    copy_seconds += time.perf_counter() - started
    path = _shard_path(work, shard, num_shards)
    path.parent.mkdir(exist_ok=True)
    write_faiss_index(index, path)  # a shard file exists only once its rows of vectors.npy are written
    path.with_suffix(".json").write_text(json.dumps({"add_s": add_seconds, "rerank_copy_s": copy_seconds}))
    return path


def merge_ivf_shards(out_dir: str | Path, num_shards: int = 1, *,
                     target_recall: float = DEFAULT_TARGET_RECALL) -> IndexPlan:
    """Stage 3: merge every shard's lists into lists.ivfdata on disk, write index.faiss and metadata.arrow, tune
    the search settings and publish the folder as out_dir."""
    from faiss.contrib.ondisk import merge_ondisk

    faiss = import_faiss()
    out_dir = Path(out_dir)
    work = building_folder(out_dir)
    config = _read_config(work, "trained")
    shard_files = [_shard_path(work, shard, num_shards) for shard in range(num_shards)]
    missing = [path.name for path in shard_files if not path.is_file()]
    if missing:
        raise IndexBuildError(f"{out_dir}: shards not built yet: {', '.join(missing)}")
    plan = IndexPlan.from_json(config["plan"])
    index = faiss.read_index(str(work / TRAINED_FILE))
    started = time.perf_counter()
    # FAISS grows lists.ivfdata with ftruncate and fills it through a memory map: ask the disk for the room first.
    reserve_space(work / LISTS_FILE, plan.num_vectors * (faiss.extract_index_ivf(index).code_size + ID_BYTES))
    with quiet_native_stdout(), reporting_full_disk(work / LISTS_FILE):  # merge_ondisk prints the sizes it allocates
        merge_ondisk(index, [str(path) for path in shard_files], str(work / LISTS_FILE))
    if index.ntotal != plan.num_vectors:
        raise IndexBuildError(f"{out_dir}: the shards hold {index.ntotal} vectors, the plan {plan.num_vectors}")
    write_faiss_index(index, work / FAISS_FILE)
    merged = time.perf_counter()
    write_metadata(Path(config["embed_dir"]), config["embed_kind"], work / METADATA_FILE)
    shard_times = [json.loads(path.with_suffix(".json").read_text()) for path in shard_files]
    stages = {"add_s": round(sum(times["add_s"] for times in shard_times), 2),
              "rerank_copy_s": round(sum(times["rerank_copy_s"] for times in shard_times), 2),
              "lists_s": round(merged - started, 2), "metadata_s": round(time.perf_counter() - merged, 2)}
    update_index_json(work, stage="merged")
    shutil.rmtree(work / "shards")
    (work / TRAINED_FILE).unlink()
    del index
    config = finish_build(work, out_dir, target_recall=target_recall, stages=stages)
    return IndexPlan.from_json(config["plan"])


def build_ivf_index(embed_dir: str | Path, out_dir: str | Path, plan: IndexPlan, embed_kind: str, *,
                    target_recall: float = DEFAULT_TARGET_RECALL) -> IndexPlan:
    """All three stages in this process: the one-shard build that a sharded build must equal."""
    train_ivf_index(embed_dir, out_dir, plan, embed_kind)
    add_ivf_shard(out_dir, 0, 1)
    return merge_ivf_shards(out_dir, 1, target_recall=target_recall)


def plan_ivf_index(embed_dir: str | Path, *, memory_budget_bytes: int | None = None, embed_kind: str | None = None):
    """(plan, embed_kind) of an "ivfpq" index over a finished embedding folder, for train_ivf_index."""
    summary, embed_kind, dim = resolve_embed_kind(Path(embed_dir), embed_kind)
    budget = math.inf if memory_budget_bytes is None else memory_budget_bytes
    return ivf_plan(summary["count"], dim, budget, reason="requested"), embed_kind
