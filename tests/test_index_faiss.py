"""FAISS indexes against exact brute-force search over the same (float16-stored) embeddings."""

import faiss
import numpy as np
import pytest
import torch

from openalign.index.faiss_index import Index, IndexBuildError, build_index, choose_index
from openalign.index.html import write_results_html
from openalign.inference.embed import embed_to_folder
from openalign.inference.embedding_folder import read_embedding_folder

faiss.omp_set_num_threads(1)  # the test machine's cores are shared


def _embed_folder(path, vectors, part_size=5000):
    """An embedding folder whose item i has caption "item i" and embedding vectors[i] (normalised, float16)."""
    table = torch.tensor(vectors, dtype=torch.float32)

    def encode_texts(captions):
        return table[[int(caption.split()[1]) for caption in captions]]

    items = [{"source": f"key-{i}", "caption": f"item {i}"} for i in range(len(vectors))]
    embed_to_folder(items, encode_texts, path, kind="text", part_size=part_size, batch_size=1024, progress=False)
    return read_embedding_folder(path)[0].astype(np.float32)


def _exact(database, queries, k):
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    scores = queries @ database.T
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


def _recall(ids, exact_ids):
    return np.mean([len(set(row) & set(exact_row)) / len(exact_row) for row, exact_row in zip(ids, exact_ids)])


def test_rule():
    assert choose_index(100_000, 640).kind == "flat"
    assert choose_index(100_001, 640).factory == "PQ320x4fs,Refine(SQfp16)"
    # Exact does not fit: approximate even for a small collection, with the best re-ranking store that fits.
    small = choose_index(1000, 640, memory_budget_bytes=1000 * 640 * 3)
    assert small.kind == "pq" and small.factory.endswith("Refine(SQfp16)")
    assert choose_index(1000, 640, memory_budget_bytes=1000 * 800).factory == "PQ320x4fs,Refine(SQ8)"
    assert choose_index(1000, 640, memory_budget_bytes=1000 * 400).factory == "PQ320x4fs"
    with pytest.raises(IndexBuildError, match="over the budget"):
        choose_index(1000, 640, memory_budget_bytes=1000)
    ivf = choose_index(1_000_000, 640, kind="ivfpq")
    assert ivf.nlist == 4000 and ivf.nprobe == 500 and ivf.factory.startswith("IVF4000,PQ320x4fs")
    with pytest.raises(IndexBuildError, match="'hnsw'"):
        choose_index(10, 4, kind="hnsw")


def test_flat_index_equals_exact_search(tmp_path):
    rng = np.random.default_rng(0)
    database = _embed_folder(tmp_path / "embeddings", rng.standard_normal((3000, 24)), part_size=700)
    plan = build_index(tmp_path / "embeddings", tmp_path / "index")
    assert plan.kind == "flat"
    index = Index.load(tmp_path / "index")
    assert len(index) == 3000
    queries = rng.standard_normal((50, 24)).astype(np.float32)
    scores, ids, rows = index.search_vectors(queries, k=10)
    exact_scores, exact_ids = _exact(database, queries, 10)
    np.testing.assert_array_equal(ids, exact_ids)
    np.testing.assert_allclose(scores, exact_scores, atol=1e-5)
    assert [row["caption"] for row in rows[0]] == [f"item {i}" for i in exact_ids[0]]
    assert rows[3][0]["source"] == f"key-{exact_ids[3, 0]}" and rows[3][0]["score"] == pytest.approx(scores[3, 0])


@pytest.mark.parametrize("kind", ["pq", "ivfpq"])
def test_approximate_index_recall_on_random_vectors(tmp_path, kind):
    # Random Gaussian vectors are the hardest case (no cluster structure); 20k x 64 keeps the test fast.
    rng = np.random.default_rng(1)
    database = _embed_folder(tmp_path / "embeddings", rng.standard_normal((20_000, 64)))
    plan = build_index(tmp_path / "embeddings", tmp_path / "index", kind=kind)
    assert plan.kind == kind and "Refine(SQfp16)" in plan.factory
    index = Index.load(tmp_path / "index")
    queries = rng.standard_normal((100, 64)).astype(np.float32)
    _, exact_ids = _exact(database, queries, 10)
    nprobe = plan.nlist if kind == "ivfpq" else None  # every list: IVF then loses nothing on random data
    scores, ids, _ = index.search_vectors(queries, k=10, nprobe=nprobe)
    assert _recall(ids, exact_ids) >= 0.9
    # Re-ranked scores are the (float16-stored) exact inner products of the returned ids.
    unit_queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    exact_scores_of_ids = np.einsum("qd,qkd->qk", unit_queries, database[ids])
    np.testing.assert_allclose(scores, exact_scores_of_ids, atol=2e-3)
    # Without re-ranking candidates (k_factor 1) recall drops: the refine stage is doing the work.
    _, unrefined_ids, _ = index.search_vectors(queries, k=10, nprobe=nprobe, k_factor=1)
    assert _recall(unrefined_ids, exact_ids) < _recall(ids, exact_ids)


def test_search_with_encoders_and_html(tmp_path):
    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((40, 8))
    _embed_folder(tmp_path / "embeddings", vectors)
    build_index(tmp_path / "embeddings", tmp_path / "index")

    def encode_texts(texts):  # "item 7" encodes to item 7's own vector, so it must come back first
        return torch.tensor(np.stack([vectors[int(text.split()[1])] for text in texts]), dtype=torch.float32)

    index = Index.load(tmp_path / "index", encode_texts=encode_texts)
    results = index.search(texts=["item 7", "item 30"], k=3)
    assert [hits[0]["id"] for hits in results] == [7, 30]
    assert results[0][0]["score"] == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(IndexBuildError, match="encode_images"):
        index.search(images=["query.jpg"], k=3)

    page = write_results_html(["item 7", "item 30"], results, tmp_path / "results.html")
    text = page.read_text()
    assert "item 7" in text and "key-7" in text and text.count("<figure") == 6
    assert "data:image" not in text  # the sources are keys, not files: grey boxes

    from PIL import Image

    Image.new("RGB", (300, 200), (200, 30, 30)).save(tmp_path / "red.png")
    hits = [[{"source": str(tmp_path / "red.png"), "caption": None, "score": 0.5}]]
    text = write_results_html(["a red <b>"], hits, tmp_path / "red.html", thumbnail_size=64).read_text()
    assert text.count("data:image/jpeg;base64,") == 1 and "a red &lt;b&gt;" in text


def test_load_errors(tmp_path):
    with pytest.raises(IndexBuildError, match="index.faiss is missing"):
        Index.load(tmp_path)


def test_approximate_index_on_too_few_vectors_is_refused_clearly():
    with pytest.raises(IndexBuildError, match="at least 16 vectors; this collection has 10"):
        choose_index(10, 64, kind="pq")
    assert choose_index(10, 64, kind="auto").kind == "flat"
