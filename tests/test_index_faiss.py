"""FAISS indexes against exact brute-force search over the same (float16-stored) embeddings."""

import shutil
import subprocess
import sys

import faiss
import numpy as np
import pytest
import torch

from openalign.index.faiss_index import Index, IndexBuildError, build_index, choose_index
from openalign.index.folder import building_folder
from openalign.index.html import write_results_html
from openalign.index.ivf import add_ivf_shard, merge_ivf_shards, plan_ivf_index, train_ivf_index
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
    # Past exact: float16 vectors in inverted lists while they fit the budget, nlist near 4 sqrt(N).
    listed = choose_index(100_001, 640)
    assert (listed.kind, listed.factory, listed.nlist) == ("ivfsq", "IVF1024,SQfp16", 1024)
    assert listed.estimated_bytes == 100_001 * (2 * 640 + 16) + 1024 * 640 * 4
    assert choose_index(1_000_000, 640).factory == "IVF4096,SQfp16"
    assert choose_index(1000, 640, memory_budget_bytes=1000 * 640 * 3).kind == "ivfsq"
    # Requested "pq": 4-bit fast-scan codes with the best re-ranking store that fits; lists from 100k vectors on.
    assert choose_index(99_999, 640, kind="pq").factory == "PQ320x4fs,Refine(SQfp16)"
    assert choose_index(100_001, 640, kind="pq").factory == "IVF1024,PQ320x4fs,Refine(SQfp16)"
    # Below 10,000 vectors, where inverted lists on disk cannot be trained, "pq" fills in under a small budget.
    assert choose_index(1000, 640, memory_budget_bytes=1000 * 800).factory == "PQ320x4fs,Refine(SQ8)"
    assert choose_index(1000, 640, memory_budget_bytes=1000 * 400).factory == "PQ320x4fs"
    with pytest.raises(IndexBuildError, match="over the budget"):
        choose_index(1000, 640, memory_budget_bytes=1000)
    # Inverted lists on disk: requested, past a million vectors, or when float16 vectors do not fit the budget
    # (the ivfpq copy is on disk). nlist is the power of two nearest 2 sqrt(N); codes are D/4 bytes when they fit.
    ivf = choose_index(1_000_000, 640, kind="ivfpq")
    assert (ivf.nlist, ivf.nprobe, ivf.factory) == (2048, 64, "IVF2048,PQ160np")
    assert ivf.estimated_bytes == 1_000_000 * 168 + 2048 * 640 * 4 + 256 * 640 * 4 and ivf.rerank_bytes == 1.28e9
    assert choose_index(1_000_001, 640).kind == "ivfpq"
    tight = choose_index(500_000, 640, memory_budget_bytes=10**8)  # float16 vectors would need 0.65 GB
    assert tight.kind == "ivfpq" and tight.factory == "IVF1024,PQ160np"
    assert choose_index(500_000, 640, memory_budget_bytes=6 * 10**7).factory == "IVF1024,PQ80np"
    assert choose_index(500_000, 640, memory_budget_bytes=3 * 10**7).factory == "IVF1024,PQ40np"
    with pytest.raises(IndexBuildError, match="at least 10000 vectors"):
        choose_index(5000, 640, kind="ivfpq")
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
    mapped_scores, mapped_ids, _ = Index.load(tmp_path / "index", memory_map=True).search_vectors(queries, k=10)
    np.testing.assert_array_equal(mapped_ids, ids)
    np.testing.assert_array_equal(mapped_scores, scores)
    assert [row["caption"] for row in rows[0]] == [f"item {i}" for i in exact_ids[0]]
    assert rows[3][0]["source"] == f"key-{exact_ids[3, 0]}" and rows[3][0]["score"] == pytest.approx(scores[3, 0])


def test_approximate_index_recall_on_random_vectors(tmp_path, kind="pq"):
    # Random Gaussian vectors are the hardest case (no cluster structure); 20k x 64 keeps the test fast. The
    # inverted-list kind is tested on clustered vectors below: on these its 8-byte codes miss 1 in 7 neighbours.
    rng = np.random.default_rng(1)
    database = _embed_folder(tmp_path / "embeddings", rng.standard_normal((20_000, 64)))
    plan = build_index(tmp_path / "embeddings", tmp_path / "index", kind=kind)
    assert plan.kind == kind and plan.k_factor > 1  # tuned: re-ranking does work here
    index = Index.load(tmp_path / "index")
    queries = rng.standard_normal((100, 64)).astype(np.float32)
    _, exact_ids = _exact(database, queries, 10)
    scores, ids, _ = index.search_vectors(queries, k=10)
    assert _recall(ids, exact_ids) >= 0.9
    # Re-ranked scores are the (float16-stored) exact inner products of the returned ids.
    unit_queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    exact_scores_of_ids = np.einsum("qd,qkd->qk", unit_queries, database[ids])
    np.testing.assert_allclose(scores, exact_scores_of_ids, atol=2e-3)
    # Without re-ranking candidates (k_factor 1) recall drops: the refine stage is doing the work.
    _, unrefined_ids, _ = index.search_vectors(queries, k=10, k_factor=1)
    assert _recall(unrefined_ids, exact_ids) < _recall(ids, exact_ids)


def test_float16_lists_give_back_their_vectors(tmp_path):
    rng = np.random.default_rng(4)
    database = _embed_folder(tmp_path / "embeddings", _clustered(rng.standard_normal((16, 24)), 3000, rng))
    plan = build_index(tmp_path / "embeddings", tmp_path / "index", kind="ivfsq")
    index = Index.load(tmp_path / "index", memory_map=True)
    assert plan.factory == "IVF76,SQfp16" and len(index) == 3000  # nlist at most N / 39
    # What search by an item and the server's de-duplication read: the stored (float16) vectors, by id.
    np.testing.assert_allclose(index.stored_vectors([5, 2999, 0]), database[[5, 2999, 0]], atol=1e-3)


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

    labelled = [{"query": query, "kind": "text", "hits": hits} for query, hits in zip(["item 7", "item 30"], results)]
    page = write_results_html(labelled, tmp_path / "results.html")
    text = page.read_text()
    assert "text query: item 7" in text and "key-7" in text and text.count("<figure") == 6
    assert "data:image" not in text  # the sources are keys, not files: grey boxes
    # Ranks 1..3 per query, each score labelled as what it is.
    assert text.count('class="rank">#1<') == 2 and text.count('class="rank">#3<') == 2
    assert f"cosine similarity {results[0][0]['score']:.3f}" in text

    from PIL import Image

    Image.new("RGB", (300, 200), (200, 30, 30)).save(tmp_path / "red.png")
    Image.new("RGB", (50, 50), (30, 30, 200)).save(tmp_path / "query.png")
    hits = [{"source": str(tmp_path / "red.png"), "caption": "a red <b> square", "score": 0.5}]
    labelled = [{"query": "a red <b>", "kind": "text", "hits": hits},
                {"query": str(tmp_path / "query.png"), "kind": "image", "hits": hits}]
    text = write_results_html(labelled, tmp_path / "red.html", thumbnail_size=64).read_text()
    assert "text query: a red &lt;b&gt;" in text and "image query:" in text
    # Two hit thumbnails and the query image's; the caption from the metadata under each hit.
    assert text.count("data:image/jpeg;base64,") == 3 and text.count("a red &lt;b&gt; square</div>") == 2


def test_load_errors(tmp_path):
    with pytest.raises(IndexBuildError, match="index.faiss is missing"):
        Index.load(tmp_path)


def test_approximate_index_on_too_few_vectors_is_refused_clearly():
    with pytest.raises(IndexBuildError, match="at least 16 vectors; this collection has 10"):
        choose_index(10, 64, kind="pq")
    assert choose_index(10, 64, kind="auto").kind == "flat"


def _clustered(centres, count, rng):
    """count points around random centres: the structure real embeddings have, and inverted lists exploit."""
    return centres[rng.integers(len(centres), size=count)] + 0.5 * rng.standard_normal((count, centres.shape[1]))


def _inverted_lists(index: Index) -> dict[int, list[tuple[int, bytes]]]:
    """{list number: sorted (id, code bytes)} of an IVF index: what the lists hold, whatever their order."""
    ivf = faiss.extract_index_ivf(index.faiss_index)
    lists = {}
    for number in range(ivf.nlist):
        size = ivf.invlists.list_size(number)
        ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(number), size).copy()
        codes = faiss.rev_swig_ptr(ivf.invlists.get_codes(number), size * ivf.code_size).copy()
        lists[number] = sorted(
            (int(i), codes[row * ivf.code_size : (row + 1) * ivf.code_size].tobytes()) for row, i in enumerate(ids)
        )
    return lists


def test_ivf_index_from_parts_merged_from_shards_equals_one_process(tmp_path):
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((64, 32))
    # 8 parts of 1,500: the index is built a part at a time, and the shards below take different parts.
    database = _embed_folder(tmp_path / "embeddings", _clustered(centres, 12_000, rng), part_size=1500)
    queries = _clustered(centres, 200, rng).astype(np.float32)
    _, exact_ids = _exact(database, queries, 10)

    plan, embed_kind = plan_ivf_index(tmp_path / "embeddings")
    assert plan.kind == "ivfpq" and plan.nlist == 256 and plan.nprobe == 8
    train_ivf_index(tmp_path / "embeddings", tmp_path / "one", plan, embed_kind)
    # Both builds from the same trained quantiser: stages work in the hidden building folder beside the index.
    shutil.copytree(building_folder(tmp_path / "one"), building_folder(tmp_path / "sharded"))
    assert not (tmp_path / "one").exists()
    with pytest.raises(IndexBuildError, match="merge its shards first"):
        Index.load(building_folder(tmp_path / "one"))
    add_ivf_shard(tmp_path / "one", 0, 1)
    merge_ivf_shards(tmp_path / "one", 1)

    # Three shards, one of them in another process, added in any order, then merged.
    add_ivf_shard(tmp_path / "sharded", 2, 3)
    with pytest.raises(IndexBuildError, match="shard-00001-of-00003.faiss"):
        merge_ivf_shards(tmp_path / "sharded", 3)
    subprocess.run([sys.executable, "-c", "import sys; from openalign.index.ivf import add_ivf_shard; "
                    "add_ivf_shard(sys.argv[1], 1, 3)", str(tmp_path / "sharded")], check=True)
    add_ivf_shard(tmp_path / "sharded", 0, 3)
    merge_ivf_shards(tmp_path / "sharded", 3)

    one, sharded = Index.load(tmp_path / "one"), Index.load(tmp_path / "sharded")
    # Searched where they lie: lists on disk and the float16 copy memory-mapped, not read into memory.
    assert isinstance(one.rerank_store, np.memmap)
    invlists = faiss.extract_index_ivf(one.faiss_index).invlists
    assert isinstance(faiss.downcast_InvertedLists(invlists), faiss.OnDiskInvertedLists)
    assert _inverted_lists(sharded) == _inverted_lists(one)
    np.testing.assert_array_equal(sharded.rerank_store, database.astype(np.float16))
    for nprobe in (1, 8, 256):
        one_scores, one_ids, one_rows = one.search_vectors(queries, k=10, nprobe=nprobe)
        sharded_scores, sharded_ids, sharded_rows = sharded.search_vectors(queries, k=10, nprobe=nprobe)
        np.testing.assert_array_equal(sharded_ids, one_ids)
        np.testing.assert_array_equal(sharded_scores, one_scores)
        assert sharded_rows == one_rows
    # At the tuned nprobe the clustered collection is found; scores are the exact (float16)
    # inner products of the ids returned, and metadata rows follow the ids.
    scores, ids, rows = one.search_vectors(queries, k=10)
    assert _recall(ids, exact_ids) >= 0.95
    unit_queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", unit_queries, database[ids]), atol=1e-5)
    assert rows[0][0]["caption"] == f"item {ids[0, 0]}"
    _, one_list_ids, _ = one.search_vectors(queries, k=10, nprobe=1)
    assert _recall(one_list_ids, exact_ids) < _recall(ids, exact_ids)  # nprobe matters: the lists are used

    # The one-call build does the same three stages.
    assert build_index(tmp_path / "embeddings", tmp_path / "auto", kind="ivfpq").factory == plan.factory
    assert _recall(Index.load(tmp_path / "auto").search_vectors(queries, k=10)[1], exact_ids) >= 0.95
    with pytest.raises(IndexBuildError, match="shard 3 is outside"):
        add_ivf_shard(tmp_path / "sharded", 3, 3)
