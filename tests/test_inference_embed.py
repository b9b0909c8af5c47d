"""The embedding writer: layout, skipped items, resume after a crash, and sharding across ranks."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from openalign.inference.embed import embed_to_folder
from openalign.inference.embedding_folder import (
    EmbeddingFolderError,
    iter_embedding_parts,
    read_embedding_folder,
    read_summary,
)


def _make_images(folder, count=23, broken=(4, 17)):
    """count small PNGs of distinct colours and sizes, some replaced by undecodable bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"image-{index:03d}.png"
        if index in broken:
            path.write_bytes(b"not an image at all")
        else:
            colour = (index * 10 % 256, index * 37 % 256, index * 91 % 256)
            Image.new("RGB", (8 + index, 5 + index % 3), colour).save(path)
        paths.append(path)
    return paths


class _ImageEncoder:
    """Mean colour and size of each image as a 5-d feature; records the sizes it saw and can crash on call n."""

    def __init__(self, crash_on_call=None):
        self.calls = 0
        self.crash_on_call = crash_on_call
        self.seen = []

    def __call__(self, images):
        self.calls += 1
        if self.calls == self.crash_on_call:
            raise KeyboardInterrupt("simulated crash")
        rows = []
        for image in images:
            pixels = np.asarray(image, dtype=np.float32)
            rows.append([*pixels.mean(axis=(0, 1)), image.size[0], image.size[1]])
            self.seen.append(image.size)
        return torch.tensor(rows)


def _folder_bytes(folder):
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_layout_metadata_and_skipped_items(tmp_path):
    paths = _make_images(tmp_path / "images")
    summary = embed_to_folder(paths, _ImageEncoder(), tmp_path / "out", part_size=10, batch_size=4, progress=False)
    assert summary["count"] == 21 and summary["num_parts"] == 3 and summary["num_skipped"] == 2
    assert [s["index"] for s in summary["skipped"]] == [4, 17]
    assert "image-004.png" in summary["skipped"][0]["error"]
    assert [part["count"] for part in summary["parts"]] == [9, 9, 3]
    assert read_summary(tmp_path / "out") == summary
    # clip-retrieval's layout, with openalign's markers beside it.
    written = sorted(str(path.relative_to(tmp_path / "out")) for path in (tmp_path / "out").rglob("*.np[y]"))
    assert written == [f"img_emb/img_emb_0000{part}.npy" for part in range(3)]
    assert sorted(path.name for path in (tmp_path / "out" / "metadata").iterdir()) == [
        f"metadata_0000{part}.parquet" for part in range(3)]

    embeddings, metadata = read_embedding_folder(tmp_path / "out")
    assert embeddings.dtype == np.float16 and embeddings.shape == (21, 5)
    kept = [index for index in range(23) if index not in (4, 17)]
    assert metadata.column("index").to_pylist() == kept
    assert metadata.column("source").to_pylist() == [str(paths[index]) for index in kept]
    assert metadata.column("width").to_pylist() == [8 + index for index in kept]
    assert metadata.column("height").to_pylist() == [5 + index % 3 for index in kept]
    # Oracle: the same features computed directly, normalised in float64.
    for row, index in enumerate(kept):
        colour = np.array([index * 10 % 256, index * 37 % 256, index * 91 % 256, 8 + index, 5 + index % 3], float)
        np.testing.assert_allclose(embeddings[row], colour / np.linalg.norm(colour), atol=1e-3)
    assert sum(len(part) for part, _ in iter_embedding_parts(tmp_path / "out")) == 21
    # Decoding on a thread pool changes nothing in the output.
    embed_to_folder(
        paths, _ImageEncoder(), tmp_path / "threads", part_size=10, batch_size=4, num_workers=3, progress=False
    )
    assert _folder_bytes(tmp_path / "threads") == _folder_bytes(tmp_path / "out")


def test_resume_after_crash_is_byte_identical(tmp_path):
    paths = _make_images(tmp_path / "images")
    embed_to_folder(paths, _ImageEncoder(), tmp_path / "straight", part_size=5, batch_size=2, progress=False)

    # Crash in the middle of part 2 (parts 0 and 1 take 3 calls each; item 4 is unreadable).
    crashing = _ImageEncoder(crash_on_call=8)
    with pytest.raises(KeyboardInterrupt):
        embed_to_folder(paths, crashing, tmp_path / "resumed", part_size=5, batch_size=2, progress=False)
    done = sorted(path.name for path in (tmp_path / "resumed").glob("*.done"))
    assert done == ["part-00000.done", "part-00001.done"]
    assert not (tmp_path / "resumed" / "summary.json").exists()
    with pytest.raises(EmbeddingFolderError, match="has not finished"):
        read_summary(tmp_path / "resumed")
    # A torn write of part 2 left behind by the crash must not survive the resume.
    (tmp_path / "resumed" / "img_emb" / "img_emb_00002.npy").write_bytes(b"torn")
    (tmp_path / "resumed" / "metadata" / "metadata_00002.parquet.tmp").write_bytes(b"torn")

    resuming = _ImageEncoder()
    embed_to_folder(paths, resuming, tmp_path / "resumed", part_size=5, batch_size=2, progress=False)
    assert len(resuming.seen) == 21 - 9  # the 9 readable items of parts 0-1 were not encoded again
    assert _folder_bytes(tmp_path / "resumed") == _folder_bytes(tmp_path / "straight")


def test_two_ranks_embed_every_item_exactly_once(tmp_path):
    paths = _make_images(tmp_path / "images", count=31, broken=(12,))
    embed_to_folder(paths, _ImageEncoder(), tmp_path / "single", part_size=4, batch_size=3, progress=False)
    encoders = [_ImageEncoder(), _ImageEncoder()]
    assert (
        embed_to_folder(
            paths, encoders[0], tmp_path / "sharded", part_size=4, rank=0, world_size=2, batch_size=3, progress=False
        )
        is None
    )  # rank 1's parts are not done yet, so rank 0 cannot write the summary
    summary = embed_to_folder(
        paths, encoders[1], tmp_path / "sharded", part_size=4, rank=1, world_size=2, batch_size=3, progress=False
    )
    seen = encoders[0].seen + encoders[1].seen
    assert len(seen) == 30 and len(set(seen)) == 30  # every readable item once (sizes are unique)
    # Rank 0 owns parts 0, 2, 4, 6 (16 items); rank 1 owns 1, 3, 5, 7 (15 items, item 12 unreadable).
    assert len(encoders[0].seen) == 16 and len(encoders[1].seen) == 14
    assert summary["count"] == 30 and summary["num_parts"] == 8
    assert _folder_bytes(tmp_path / "sharded") == _folder_bytes(tmp_path / "single")


def test_texts_and_both_kinds(tmp_path):
    images = _make_images(tmp_path / "images", count=6, broken=(2,))
    captions = [f"caption number {index}" for index in range(6)]
    items = [{"source": str(path), "caption": caption} for path, caption in zip(images, captions)]
    items[4]["caption"] = None  # no text: skipped when texts are embedded

    def encode_texts(texts):
        return torch.tensor([[len(text), text.count("u") + 1.0, float(text[-1])] for text in texts])

    summary = embed_to_folder(
        items,
        {"image": _ImageEncoder(), "text": encode_texts},
        tmp_path / "both",
        kind="both",
        part_size=4,
        progress=False,
    )
    assert summary["dims"] == {"image": 5, "text": 3} and summary["count"] == 4
    assert [s["index"] for s in summary["skipped"]] == [2, 4]
    text_embeddings, metadata = read_embedding_folder(tmp_path / "both", kind="text")
    image_embeddings, _ = read_embedding_folder(tmp_path / "both", kind="image")
    assert text_embeddings.shape == (4, 3) and image_embeddings.shape == (4, 5)
    assert metadata.column("caption").to_pylist() == [captions[i] for i in (0, 1, 3, 5)]
    np.testing.assert_allclose(np.linalg.norm(text_embeddings.astype(np.float32), axis=1), 1.0, atol=1e-3)
    with pytest.raises(EmbeddingFolderError, match=r"choose one \(openalign index --embed-kind image\|text"):
        read_embedding_folder(tmp_path / "both")

    only_texts = embed_to_folder(captions, encode_texts, tmp_path / "texts", kind="text", progress=False)
    assert only_texts["count"] == 6 and only_texts["dims"] == {"text": 3}
    summary_on_disk = json.loads((tmp_path / "texts" / "summary.json").read_text())
    assert summary_on_disk == only_texts


def test_resume_with_other_settings_is_refused(tmp_path):
    paths = _make_images(tmp_path / "images", count=3, broken=())
    embed_to_folder(paths, _ImageEncoder(), tmp_path / "out", part_size=2, progress=False)
    with pytest.raises(EmbeddingFolderError, match="embed_config.json"):
        embed_to_folder(paths, _ImageEncoder(), tmp_path / "out", part_size=3, progress=False)
    with pytest.raises(EmbeddingFolderError, match="rank 2"):
        embed_to_folder(paths, _ImageEncoder(), tmp_path / "other", rank=2, world_size=2, progress=False)


def test_webdataset_shards_through_data_sources(tmp_path):
    from openalign.data.sources import Record, iter_records, write_shards

    paths = _make_images(tmp_path / "images", count=7, broken=(3,))
    records = [
        Record(key=path.name, caption=f"caption {index}", image_path=path, image_ext="png")
        for index, path in enumerate(paths)
    ]
    shards = write_shards(records, tmp_path / "shards", samples_per_shard=3)
    summary = embed_to_folder(
        iter_records(tmp_path / "shards"), _ImageEncoder(), tmp_path / "out", part_size=4, progress=False
    )
    assert len(shards) == 3 and summary["count"] == 6 and [s["index"] for s in summary["skipped"]] == [3]
    embeddings, metadata = read_embedding_folder(tmp_path / "out")
    assert metadata.column("caption").to_pylist() == [f"caption {i}" for i in (0, 1, 2, 4, 5, 6)]
    assert metadata.column("width").to_pylist() == [8 + i for i in (0, 1, 2, 4, 5, 6)]
    # Same images from the folder itself (paths, no bytes) give the same embeddings.
    embed_to_folder(paths, _ImageEncoder(), tmp_path / "from_paths", part_size=4, progress=False)
    np.testing.assert_array_equal(read_embedding_folder(tmp_path / "from_paths")[0], embeddings)


class _CountedItem:
    """A Record-shaped text item that counts how many of its kind are alive at once."""

    alive = 0
    most_alive = 0

    def __init__(self, index):
        self.key, self.caption, self.image_bytes, self.image_path = f"key-{index}", f"text {index}", None, None
        _CountedItem.alive += 1
        _CountedItem.most_alive = max(_CountedItem.most_alive, _CountedItem.alive)

    def __del__(self):
        _CountedItem.alive -= 1


def test_raw_items_held_stay_bounded_by_the_batch(tmp_path):
    def encode_texts(texts):
        return torch.tensor([[1.0, float(text.split()[1])] for text in texts])

    stream = (_CountedItem(index) for index in range(1000))
    summary = embed_to_folder(
        stream, encode_texts, tmp_path / "out", kind="text", part_size=100, batch_size=8, progress=False
    )
    assert summary["count"] == 1000 and summary["num_parts"] == 10  # count a multiple of part_size
    assert _CountedItem.most_alive <= 8 + 2  # one batch, plus the item being created and the one in hand


def test_ranks_starting_together_never_read_a_half_written_config(tmp_path):
    # Every rank writes or checks embed_config.json on start; one must never read the file another has created
    # but not yet filled (under torchrun this surfaced as a JSONDecodeError on one rank).
    import threading

    from openalign.inference.embedding_folder import _check_config

    config = {"kinds": ["image"], "part_size": 3}
    errors = []
    for trial in range(150):
        folder = tmp_path / f"run-{trial}"
        folder.mkdir()
        start = threading.Barrier(4)

        def rank(folder=folder, start=start):
            start.wait()
            try:
                _check_config(folder, config)
            except Exception as error:  # any failure is what the test looks for
                errors.append(error)

        threads = [threading.Thread(target=rank) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert json.loads((folder / "embed_config.json").read_text()) == config
        assert [path.name for path in folder.iterdir()] == ["embed_config.json"]  # no temporary left behind
    assert errors == []


def test_folders_of_the_earlier_layout_are_read_and_resumed_in_it(tmp_path):
    paths = _make_images(tmp_path / "images")
    # A folder begun before the clip-retrieval layout: its embed_config.json names no layout.
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "embed_config.json").write_text(json.dumps({"kinds": ["image"], "part_size": 10}))
    summary = embed_to_folder(paths, _ImageEncoder(), tmp_path / "old", part_size=10, batch_size=4, progress=False)
    assert "layout" not in summary and (tmp_path / "old" / "part-00002.image.npy").is_file()
    assert not (tmp_path / "old" / "img_emb").exists()
    embed_to_folder(paths, _ImageEncoder(), tmp_path / "new", part_size=10, batch_size=4, progress=False)
    old, new = read_embedding_folder(tmp_path / "old"), read_embedding_folder(tmp_path / "new")
    np.testing.assert_array_equal(old[0], new[0])
    assert old[1].equals(new[1])
    with pytest.raises(EmbeddingFolderError, match="use a fresh folder"):
        embed_to_folder(paths, _ImageEncoder(), tmp_path / "old", part_size=5, batch_size=4, progress=False)


def test_with_decoding_threads_the_next_batch_decodes_while_this_one_is_encoded(tmp_path):
    """The encoder of the first batch waits for the loader to start on the second: without the overlap it would
    wait in vain (the loader would only be called after it returns)."""
    import threading

    paths = _make_images(tmp_path / "images", count=8, broken=())
    second_batch_loading = threading.Event()
    overlapped = []

    def loader(source, data=None):
        if Path(source).name >= "image-004":
            second_batch_loading.set()
        return Image.open(source).convert("RGB")

    encoder = _ImageEncoder()

    def encode(images):
        if encoder.calls == 0:
            overlapped.append(second_batch_loading.wait(timeout=10))
        return encoder(images)

    summary = embed_to_folder(paths, encode, tmp_path / "out", batch_size=4, num_workers=2, image_loader=loader,
                              progress=False)
    assert overlapped == [True] and summary["count"] == 8
    plain = embed_to_folder(paths, _ImageEncoder(), tmp_path / "plain", batch_size=4, progress=False)
    assert plain["count"] == 8  # the same embeddings with and without the overlap
    parts = zip(iter_embedding_parts(tmp_path / "out"), iter_embedding_parts(tmp_path / "plain"), strict=True)
    for (first, _), (second, _) in parts:
        np.testing.assert_array_equal(first, second)
