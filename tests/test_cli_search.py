"""`openalign index` + `openalign search`: hits and scores equal brute force over embeddings computed by the
model called directly; the index remembers its checkpoint; --html writes the thumbnails."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from openalign.cli import main
from openalign.cli.index import parse_bytes
from openalign.index.faiss_index import Index
from openalign.inference.encoders import load_encoders
from tests.cli_fixtures import direct_image_embeddings, direct_text_embeddings, make_checkpoint, make_images

QUERIES = ["a red bicycle", "a dog on the beach"]


@pytest.fixture(scope="module")
def indexed(checkpoint, tmp_path_factory):
    """The checkpoint, 20 images, their embedding folder and its exact index."""
    root = tmp_path_factory.mktemp("search")
    images = make_images(root / "images", 20)
    main(["embed", str(root / "images"), "--model", str(checkpoint), "--out", str(root / "embeddings"),
          "--part-size", "5", "--no-progress"])
    main(["index", str(root / "embeddings")])
    return checkpoint, images, root / "embeddings" / "index"


def _brute_force(query_embeddings, image_embeddings, k):
    # float16 storage, as the embedding folder keeps them
    stored = image_embeddings.numpy().astype(np.float16).astype(np.float32)
    scores = query_embeddings.numpy() @ stored.T  # (Q, N)
    order = np.argsort(-scores, axis=1)[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def test_text_and_image_queries_equal_brute_force(indexed, capsys):
    checkpoint, images, index_dir = indexed
    capsys.readouterr()
    # No --model: the index folder names the checkpoint its embeddings came from.
    main(["search", str(index_dir), *QUERIES, "--image", str(images[3]), "-k", "4", "--json"])
    results = json.loads(capsys.readouterr().out)
    assert [(r["kind"], r["query"]) for r in results] == [("text", QUERIES[0]), ("text", QUERIES[1]),
                                                          ("image", str(images[3]))]
    queries = torch.cat([direct_text_embeddings(checkpoint, QUERIES), direct_image_embeddings(checkpoint, images[3:4])])
    order, scores = _brute_force(queries, direct_image_embeddings(checkpoint, images), 4)
    for result, expected_order, expected_scores in zip(results, order, scores):
        assert [hit["source"] for hit in result["hits"]] == [str(images[i]) for i in expected_order]
        np.testing.assert_allclose([hit["score"] for hit in result["hits"]], expected_scores, atol=2e-3)
    assert results[2]["hits"][0]["source"] == str(images[3])  # an image finds itself first


def test_python_index_search_table_and_html(indexed, tmp_path, capsys):
    checkpoint, images, index_dir = indexed
    encoders = load_encoders(checkpoint)
    index = Index.load(index_dir, encode_texts=encoders.encode_texts, encode_images=encoders.encode_images)
    assert len(index) == 20 and index.plan.kind == "flat"
    hits = index.search(texts=QUERIES[:1], k=3)[0]

    page = tmp_path / "results.html"
    capsys.readouterr()
    main(["search", str(index_dir), QUERIES[0], "-k", "3", "--model", str(checkpoint), "--html", str(page)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"text query: {QUERIES[0]}"
    assert [line.split()[2] for line in lines[1:4]] == [hit["source"] for hit in hits]
    assert [float(line.split()[1]) for line in lines[1:4]] == [round(hit["score"], 4) for hit in hits]
    html = page.read_text()
    assert html.count("data:image/jpeg;base64,") == 3 and QUERIES[0] in html


def test_approximate_index_under_a_memory_budget(indexed, tmp_path, capsys):
    _, _, index_dir = indexed
    embed_dir = index_dir.parent
    # 20 x 80 float32 vectors need 6400 bytes: a budget of 5000 forces the approximate kind (PQ needs at
    # least 16 training vectors).
    main(["index", str(embed_dir), "--out", str(tmp_path / "pq"), "--memory-budget", "5000"])
    assert "pq index" in capsys.readouterr().out
    assert Index.load(tmp_path / "pq").plan.kind == "pq"
    assert parse_bytes("4GB") == 4 * 10**9 and parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("1e3") == 1000


# -- the index knows its model (model.json: fingerprint, a path relative to the index) ---------------------------


@pytest.fixture(scope="module")
def movable(tmp_path_factory):
    """A project folder holding a model, images, their embeddings and the index: what a user moves together."""
    root = tmp_path_factory.mktemp("project") / "project"
    model = make_checkpoint(root / "model")
    make_images(root / "images", 8)
    main(["embed", str(root / "images"), "-m", str(model), "--out", str(root / "embeddings"), "--no-progress"])
    main(["index", str(root / "embeddings")])
    return root


def test_another_model_of_the_same_size_is_refused(movable, tmp_path, capsys):
    other = make_checkpoint(tmp_path / "other", seed=1)  # same config and vocabulary, other weights
    index_dir = movable / "embeddings" / "index"
    capsys.readouterr()
    assert main(["search", str(index_dir), "a red square", "-m", str(other)]) == 1
    error = capsys.readouterr().err
    assert "is not the one" in error and "model.json" in error and "--any-model" in error
    assert len(error.strip().splitlines()) == 1
    assert main(["search", str(index_dir), "a red square", "-m", str(other), "--any-model", "--json"]) == 0
    assert main(["search", str(index_dir), "a red square", "-m", str(movable / "model"), "--json"]) == 0
    assert Index.load(index_dir).model_mismatch(other) and not Index.load(index_dir).model_mismatch(movable / "model")


def test_the_server_refuses_another_model_of_the_same_size_unless_told(movable, tmp_path):
    from openalign.inference.encoders import load_encoders
    from openalign.serve.app import create_app
    from openalign.serve.service import ServerStartError

    other = make_checkpoint(tmp_path / "other", seed=1)  # same config and vocabulary, other weights
    index_dir = movable / "embeddings" / "index"
    with pytest.raises(ServerStartError, match="model.json.*--any-model|--any-model"):
        create_app(index_dir, load_encoders(other, device="cpu", optimize=False))
    assert create_app(index_dir, load_encoders(other, device="cpu", optimize=False), any_model=True)
    assert create_app(index_dir, load_encoders(movable / "model", device="cpu", optimize=False))


def test_an_index_moved_with_its_model_keeps_working(movable, tmp_path, capsys):
    import shutil

    record = json.loads((movable / "embeddings" / "index" / "model.json").read_text())
    assert record["model"] == "../../model" and len(record["fingerprint"]) == 64
    moved = tmp_path / "elsewhere"
    shutil.copytree(movable, moved)
    shutil.move(movable / "model", tmp_path / "model-away")  # the original place is gone
    try:
        capsys.readouterr()
        assert main(["search", str(moved / "embeddings" / "index"), "a red square", "--json"]) == 0
        assert json.loads(capsys.readouterr().out)[0]["hits"]
        # Moved alone, with its model nowhere: the error names model.json and the option to pass.
        shutil.rmtree(moved / "model")
        assert main(["search", str(moved / "embeddings" / "index"), "a red square"]) == 1
        error = capsys.readouterr().err
        assert "model.json" in error and "--model (-m)" in error and len(error.strip().splitlines()) == 1
    finally:
        shutil.move(tmp_path / "model-away", movable / "model")


def test_the_suggested_serve_command_names_the_folder_to_serve(movable, tmp_path, capsys):
    embeddings = movable / "embeddings"
    main(["index", str(embeddings), "--out", str(tmp_path / "two halves" / "image")])
    assert f"openalign serve '{tmp_path / 'two halves' / 'image'}'" in capsys.readouterr().out
    main(["index", str(embeddings), "--out", str(tmp_path / "two halves" / "text")])
    # Both halves built: serve the folder that holds them (quoted: the path has a space).
    assert f"openalign serve '{tmp_path / 'two halves'}')" in capsys.readouterr().out
