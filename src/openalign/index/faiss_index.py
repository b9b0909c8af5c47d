"""FAISS indexes over embedding folders: build_index, verify_index, search_index, and the names users import.

The modules under it, each importing only those before it: common (error, plan, FAISS's import), folder (the
index folder on disk: files, index.json, files.json, publishing by rename), plan (which kind: choose_index),
sources (what a build reads from the embedding folder), searcher (Index: load, search, re-rank), tuning (search
settings measured on the collection; finish_build, every build's last step), ivf (the staged "ivfpq" build).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from openalign.index.common import IndexBuildError, IndexPlan, import_faiss
from openalign.index.folder import (
    FAISS_FILE,
    METADATA_FILE,
    check_files,
    start_building,
    write_faiss_index,
    write_index_json,
)
from openalign.index.ivf import build_ivf_index
from openalign.index.plan import DEFAULT_K_FACTOR, EXACT_MAX_VECTORS, INDEX_KINDS, choose_index
from openalign.index.searcher import Index, rerank
from openalign.index.sources import resolve_embed_kind, training_sample, write_metadata
from openalign.index.tuning import DEFAULT_TARGET_RECALL, finish_build
from openalign.inference.embedding_folder import iter_embedding_parts, verify_embedding_folder

__all__ = ["DEFAULT_K_FACTOR", "DEFAULT_TARGET_RECALL", "EXACT_MAX_VECTORS", "INDEX_KINDS", "Index",
           "IndexBuildError", "IndexPlan", "build_index", "choose_index", "rerank", "search_index", "verify_index"]


def build_index(
    embed_dir: str | Path,
    out_dir: str | Path,
    *,
    kind: str = "auto",
    memory_budget_bytes: int | None = None,
    embed_kind: str | None = None,
    exact_max_vectors: int = EXACT_MAX_VECTORS,
    target_recall: float = DEFAULT_TARGET_RECALL,
) -> IndexPlan:
    """Build an index over a finished embedding folder (see openalign.inference.embed) and publish it as out_dir.

    embed_kind picks image or text embeddings when the folder holds both. The parts' bytes are checked against
    their SHA-256 first; vectors are then added one part at a time, so peak memory is the index plus one part
    (and the training sample for approximate kinds); an "ivfpq" index does not even hold its own lists in
    memory (openalign.index.ivf). The search settings are tuned to reach target_recall (recall@10 on the
    collection's own vectors, openalign.index.tuning). The folder is assembled beside out_dir and renamed into
    place, so a server reading out_dir meanwhile keeps its answers. Returns the plan with the tuned settings.
    """
    faiss = import_faiss()
    embed_dir, out_dir = Path(embed_dir), Path(out_dir)
    summary, embed_kind, dim = resolve_embed_kind(embed_dir, embed_kind)
    plan = choose_index(summary["count"], dim, kind=kind, memory_budget_bytes=memory_budget_bytes,
                        exact_max_vectors=exact_max_vectors)
    if plan.kind == "ivfpq":
        return build_ivf_index(embed_dir, out_dir, plan, embed_kind, target_recall=target_recall)
    work = start_building(out_dir)
    started = time.perf_counter()
    verify_embedding_folder(embed_dir, embed_kind)
    verified = time.perf_counter()
    index = faiss.index_factory(dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        # 4-bit PQ has 16 centroids per sub-quantiser: 65,536 points train them well; k-means of the inverted
        # lists wants 39 a list.
        sample_size = min(summary["count"], max(65_536, 39 * plan.nlist))
        index.train(training_sample(embed_dir, embed_kind, summary["count"], sample_size))
    trained = time.perf_counter()
    if plan.nlist and "Refine" not in plan.factory:
        # Inverted lists keep no map from id to list: without one, stored_vectors (search by an item, the
        # server's de-duplication) cannot read an item's vector back. 8 bytes a vector.
        faiss.extract_index_ivf(index).make_direct_map()
    for embeddings, _ in iter_embedding_parts(embed_dir, embed_kind):
        index.add(np.ascontiguousarray(embeddings, dtype=np.float32))
    added = time.perf_counter()
    write_faiss_index(index, work / FAISS_FILE)
    del index
    write_metadata(embed_dir, embed_kind, work / METADATA_FILE)
    stages = {"verify_s": verified - started, "training_s": trained - verified, "add_s": added - trained,
              "write_s": time.perf_counter() - added}
    write_index_json(work, plan, embed_dir, embed_kind, stage="merged")
    config = finish_build(work, out_dir, target_recall=target_recall,
                          stages={name: round(value, 2) for name, value in stages.items()})
    return IndexPlan.from_json(config["plan"])


def verify_index(index_dir: str | os.PathLike) -> Index:
    """Check every byte of an index folder against its files.json (SHA-256), then load it (which checks that its
    files agree with each other); IndexBuildError naming the folder and the file otherwise."""
    check_files(index_dir, check_bytes=True)
    return Index.load(index_dir)


def search_index(index_dir: str | os.PathLike, encoders, texts: Sequence[str] = (), images: Sequence = (),
                 k: int = 10, *, any_model: bool = False) -> list[dict]:
    """Load the index at index_dir with `encoders`' text and image encoders (an
    `openalign.inference.encoders.Encoders`) and search: one {"query", "kind", "hits"} dict per query, texts
    first, kind "text" or "image", hits as `Index.search` returns them (metadata with "score"), best first.

    The encoders' model must be the one the index's model.json records (config and weights hashed): another
    model's queries give hits without meaning. any_model=True searches anyway."""
    index = Index.load(index_dir, encode_texts=encoders.encode_texts, encode_images=encoders.encode_images)
    mismatch = index.model_mismatch(encoders.source) if encoders.source and not any_model else None
    if mismatch:
        raise IndexBuildError(f"{mismatch}. Pass the model the embeddings were made with as --model (-m), or "
                              "--any-model to search anyway")
    results = index.search(texts=list(texts), images=list(images), k=k)
    queries = [("text", text) for text in texts] + [("image", str(image)) for image in images]
    return [{"query": query, "kind": kind, "hits": hits} for (kind, query), hits in zip(queries, results)]
