"""An `embed --kind both` folder read by clip-retrieval's own tools: autofaiss builds one index per kind from
img_emb/ and text_emb/ (never image and text vectors mixed), clip-retrieval's clip_index builds its index
folder, and its back end's index and metadata loaders give the neighbours and rows of brute force."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import torch

from openalign.errors import ImageLoadError
from openalign.inference.embed import embed_to_folder
from openalign.inference.embedding_folder import read_embedding_folder
from tests.clip_retrieval_peer import clip_retrieval_module


class _NumpyTolerantJson:
    """autofaiss 2.18 writes its index metrics with json.dump; under NumPy 2 one of them ("reconstruction
    error %") is a numpy.float32 (NEP 50: float32 arithmetic with a Python float stays float32, where NumPy 1
    gave a float64, which is a Python float), and json refuses it. This writes numpy scalars as Python numbers,
    which is what NumPy 1 made them; nothing else of autofaiss changes."""

    loads, load, dumps = json.loads, json.load, json.dumps

    @staticmethod
    def dump(value, handle, **options):
        return json.dump(value, handle, default=lambda scalar: scalar.item(), **options)


def _both_kinds_folder(path, count=60, part_size=10, dim=24):
    """An embedding folder of both kinds from known vectors; the items of part 2 all fail to load, so that
    part has no files, as a real run's can."""
    rng = np.random.default_rng(0)
    image_vectors = rng.standard_normal((count, dim)).astype(np.float32)
    text_vectors = rng.standard_normal((count, dim)).astype(np.float32)

    def load(source, image):
        if 20 <= int(source.split("-")[1]) < 30:
            raise ImageLoadError(f"{source}: unreadable")
        return SimpleNamespace(size=(1, 1), number=int(source.split("-")[1]))  # what the encoder below reads

    encoders = {"image": lambda images: torch.from_numpy(image_vectors[[image.number for image in images]]),
                "text": lambda captions: torch.from_numpy(text_vectors[[int(c.split()[1]) for c in captions]])}
    items = [{"source": f"item-{i}", "caption": f"caption {i}"} for i in range(count)]
    embed_to_folder(items, encoders, path, kind="both", part_size=part_size, batch_size=4, image_loader=load,
                    progress=False)
    return path


def _exact(stored: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(queries @ stored.astype(np.float32).T), axis=1, kind="stable")[:, :k]


def test_autofaiss_and_clip_retrieval_read_the_folder(tmp_path, monkeypatch):
    clip_index = clip_retrieval_module("clip_index")
    clip_back = clip_retrieval_module("clip_back")
    import autofaiss.external.optimize

    folder = _both_kinds_folder(tmp_path / "embeddings")
    assert not (folder / "img_emb" / "img_emb_00002.npy").exists()  # the empty part wrote nothing
    queries = np.random.default_rng(1).standard_normal((8, 24)).astype(np.float32)
    k = 5

    # autofaiss alone, pointed at each kind's folder (save_on_disk=False avoids its metrics file entirely).
    from autofaiss import build_index

    for kind, subfolder in (("image", "img_emb"), ("text", "text_emb")):
        stored, metadata = read_embedding_folder(folder, kind)
        index, _ = build_index(embeddings=str(folder / subfolder), save_on_disk=False, metric_type="ip",
                               max_index_memory_usage="100M", current_memory_available="1G", verbose=40)
        assert index.ntotal == len(stored) == 50
        np.testing.assert_array_equal(index.search(queries, k)[1], _exact(stored, queries, k))

    # clip-retrieval's own indexing command, then its back end's loaders, as `clip-retrieval back` uses them.
    monkeypatch.setattr(autofaiss.external.optimize, "json", _NumpyTolerantJson)
    clip_index.clip_index(str(folder), str(tmp_path / "clip-index"), max_index_memory_usage="100M",
                          current_memory_available="1G", nb_cores=1)
    for kind in ("image", "text"):
        stored, metadata = read_embedding_folder(folder, kind)
        index = clip_back.load_index(str(tmp_path / "clip-index" / f"{kind}.index"), True)  # memory-mapped
        provider, _ = clip_back.load_metadata_provider(str(tmp_path / "clip-index"), False, False, index,
                                                       ["caption", "source", "index"], False)
        ids = index.search(queries, k)[1]
        np.testing.assert_array_equal(ids, _exact(stored, queries, k))
        rows = provider.get(ids[0].tolist(), ["caption", "source", "index"])
        assert [row["source"] for row in rows] == [metadata.column("source")[int(i)].as_py() for i in ids[0]]
        assert [row["caption"] for row in rows] == [f"caption {row['index']}" for row in rows]
