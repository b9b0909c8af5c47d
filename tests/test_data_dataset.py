"""The training dataset: skips counted, splits exact, resume equal to an uninterrupted run."""

import functools
import io
import itertools
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from openalign.data.dataset import ImageTextDataset, TrainTransform, make_loader, train_transform
from openalign.data.sources import Record, write_manifest, write_shards
from openalign.errors import ConfigError

SMALL = functools.partial(train_transform, resize=12, crop=9)


def image_bytes(index: int) -> bytes:
    # A left-right asymmetric image, so a flip is visible.
    image = Image.new("RGB", (10, 8), (index * 17 % 256, 40, 200))
    image.paste((255, 255, 255), (0, 0, 3, 8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def make_shards(folder: Path, sizes: list[int], corrupt: set[int] = frozenset()) -> list[str]:
    """Shards of the given sizes; samples numbered globally, those in `corrupt` hold bytes that do not decode."""
    records = [Record(key=str(index), caption=f"sample {index}", image_ext="png",
                      image_bytes=b"not an image" if index in corrupt else image_bytes(index))
               for index in range(sum(sizes))]
    paths, start = [], 0
    for shard_index, size in enumerate(sizes):
        (path,) = write_shards(records[start:start + size], folder, prefix=f"part{shard_index}")
        paths.append(str(path))
        start += size
    return paths


def captions_of(batches) -> list[str]:
    return [caption for batch in batches for caption in batch["captions"]]


def test_corrupt_sample_in_shard_folder_is_skipped_counted_and_logged(tmp_path, caplog):
    make_shards(tmp_path, [4, 4], corrupt={5})
    dataset = ImageTextDataset(tmp_path, transform=SMALL, shuffle=False, epoch_size=7)
    loader = make_loader(dataset, batch_size=3)
    with caplog.at_level(logging.WARNING, logger="openalign.data.dataset"):
        batches = list(loader)
    assert sorted(captions_of(batches)) == sorted(f"sample {index}" for index in range(8) if index != 5)
    assert sum(batch["num_skipped"] for batch in batches) == 1
    assert dict(loader.skipped) == {"corrupt_image": 1}
    assert any("part1-00000/000000001" in message and "corrupt_image" in message for message in caplog.messages)
    assert [tuple(batch["pixel_values"].shape) for batch in batches] == [(3, 3, 9, 9), (3, 3, 9, 9), (1, 3, 9, 9)]


def test_fewer_shards_than_streams_every_sample_once(tmp_path):
    make_shards(tmp_path, [4, 4])
    # 2 ranks x 2 workers = 4 streams over 2 shards: split by sample, each exactly once.
    per_rank = []
    for rank in range(2):
        dataset = ImageTextDataset(tmp_path, transform=SMALL, seed=3, rank=rank, world_size=2,
                                   shuffle_buffer=3)
        per_rank.append(list(make_loader(dataset, batch_size=1, num_workers=2)))
    assert [len(batches) for batches in per_rank] == [4, 4]
    seen = captions_of(per_rank[0] + per_rank[1])
    assert sorted(seen) == sorted(f"sample {index}" for index in range(8))


def test_whole_shards_per_stream_when_enough_shards(tmp_path):
    make_shards(tmp_path, [2, 2, 2, 2])
    dataset = ImageTextDataset(tmp_path, transform=SMALL, seed=1)
    streams = [[sample["key"] for sample in dataset.iter_samples(stream, 4)] for stream in range(4)]
    # write_shards numbers samples within each call, so each shard's keys restart at 0.
    assert sorted(itertools.chain(*streams)) == [f"part{shard}-00000/{index:09d}"
                                                 for shard in range(4) for index in range(2)]
    assert all(len({key.split("/")[0] for key in keys}) == 1 for keys in streams)


def test_uneven_shards_give_every_rank_the_same_batch_count(tmp_path):
    make_shards(tmp_path, [5, 2, 1])
    counts = []
    for rank in range(2):
        dataset = ImageTextDataset(tmp_path, transform=SMALL, rank=rank, world_size=2, shuffle=False)
        loader = make_loader(dataset, batch_size=2)
        counts.append((len(list(loader)), loader.batches_per_epoch()))
    assert counts == [(2, 2), (2, 2)]


def test_piped_shards_stream_in_order_and_need_an_epoch_size(tmp_path):
    make_shards(tmp_path, [3, 2])
    spec = f"pipe:cat {tmp_path}/part{{0,1}}-00000.tar"
    with pytest.raises(ConfigError, match="pipe:cat"):
        make_loader(ImageTextDataset(spec, transform=SMALL), batch_size=2)
    dataset = ImageTextDataset(spec, transform=SMALL, shuffle=False, epoch_size=5)
    assert captions_of(make_loader(dataset, batch_size=2)) == [f"sample {index}" for index in range(5)]


def test_manifest_rows_split_by_index(tmp_path):
    records = [Record(key=str(index), caption=f"sample {index}", image_bytes=image_bytes(index), image_ext="png")
               for index in range(6)]
    manifest = write_manifest(records, tmp_path / "train.csv")
    dataset = ImageTextDataset(manifest, transform=SMALL, shuffle=False)
    streams = [[sample["caption"] for sample in dataset.iter_samples(stream, 3)] for stream in range(3)]
    assert streams == [[f"sample {index}" for index in range(stream, 6, 3)] for stream in range(3)]


def test_resampled_is_endless_and_seeded(tmp_path):
    make_shards(tmp_path, [2, 2])

    def first_keys(seed: int) -> list[str]:
        dataset = ImageTextDataset(tmp_path, transform=SMALL, seed=seed, resampled=True)
        return [sample["key"] for sample in itertools.islice(dataset.iter_samples(0, 1), 40)]

    keys = first_keys(7)
    assert len(keys) == 40 and set(keys) == {f"part{shard}-00000/{index:09d}" for shard in range(2)
                                             for index in range(2)}
    assert first_keys(7) == keys and first_keys(8) != keys


def test_flip_auto_spares_captions_that_name_a_side(tmp_path):
    records = [Record(key=name, caption=caption, image_bytes=image_bytes(0), image_ext="png")
               for name, caption in [("side", "the dog on the Left"), ("plain", "a dog")]]
    manifest = write_manifest(records, tmp_path / "flip.jsonl")
    flipped = {"side": set(), "plain": set()}
    for seed in range(12):
        never, auto = (ImageTextDataset(manifest, transform=SMALL, seed=seed, flip=flip, shuffle=False)
                       for flip in (False, "auto"))
        for reference, sample in zip(never.iter_samples(0, 1), auto.iter_samples(0, 1)):
            # Per-sample seeding gives both the same crop; only the flip may differ.
            same = torch.equal(sample["pixel_values"], reference["pixel_values"])
            mirrored = torch.equal(sample["pixel_values"], reference["pixel_values"].flip(-1))
            assert same or mirrored
            flipped["side" if "Left" in sample["caption"] else "plain"].add(not same)
    assert flipped == {"side": {False}, "plain": {False, True}}


def test_iterating_leaves_the_global_rng_alone(tmp_path):
    make_shards(tmp_path, [3])
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    list(make_loader(ImageTextDataset(tmp_path, transform=SMALL), batch_size=2))
    assert torch.equal(torch.rand(3), expected)


def test_a_transform_with_a_generator_gets_one_per_sample_and_the_globals_stay_unseeded(tmp_path, monkeypatch):
    make_shards(tmp_path, [6])
    seen = []

    def transform(image, generator=None):
        seen.append(generator)
        return SMALL(image, generator=generator)

    # The fast path must not touch the global RNGs at all (seeding numpy's costs about 75 us a sample).
    monkeypatch.setattr("openalign.data.dataset._seeded_rng", None)
    runs = [[sample["pixel_values"] for sample in ImageTextDataset(tmp_path, transform=transform, seed=seed)
             .iter_samples(0, 1)] for seed in (0, 0, 1)]
    assert len(seen) == 18 and all(isinstance(generator, torch.Generator) for generator in seen)
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))  # a pure function of the seed
    assert any(not torch.equal(a, b) for a, b in zip(runs[0], runs[2]))


def test_a_transform_drawing_from_numpy_is_seeded_per_sample(tmp_path):
    make_shards(tmp_path, [6])

    def transform(image):  # no generator keyword: draws from numpy's global RNG
        return SMALL(image) + float(np.random.randint(0, 1000))

    np.random.seed(5)
    state = np.random.get_state()[1].copy()
    runs = [[sample["pixel_values"] for sample in ImageTextDataset(tmp_path, transform=transform, seed=seed)
             .iter_samples(0, 1)] for seed in (0, 0, 1)]
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert any(not torch.equal(a, b) for a, b in zip(runs[0], runs[2]))
    assert np.array_equal(np.random.get_state()[1], state)  # restored after every sample


@pytest.mark.parametrize("staged", [False, True])
def test_image_cache_gives_the_same_samples_without_reading_again(tmp_path, staged):
    """Cached decoded images (any transform), or cached resized ones (a TrainTransform, whose random part alone
    runs again): the same pixels as the uncached train_transform, epoch after epoch."""
    records = [Record(key=str(index), caption=f"sample {index}", image_ext="png",
                      image_bytes=b"not an image" if index == 3 else image_bytes(index)) for index in range(8)]
    manifest = write_manifest(records, tmp_path / "train.jsonl")

    def loader(cache: bool, transform=SMALL):
        dataset = ImageTextDataset(manifest, transform=transform, seed=5, cache_images=cache)
        return make_loader(dataset, batch_size=3)

    plain, cached = loader(False), loader(True, TrainTransform(resize=12, crop=9) if staged else SMALL)
    expected = [list(plain) for _ in range(2)]  # two epochs, each in its own order, crops and flips
    first_epoch = list(cached)
    assert len(cached.dataset.image_cache) == 7  # every readable image, decoded once
    cached_shapes = {array.shape for array in cached.dataset.image_cache.values()}
    assert cached_shapes == ({(12, 12, 3)} if staged else {(8, 10, 3)})  # resized, or as decoded
    for image in (tmp_path / "train_images").iterdir():
        if image.stem != "000000003":  # the corrupt one stays, to be skipped again
            image.unlink()  # the second epoch must come from memory
    second_epoch = list(cached)
    assert captions_of(second_epoch) != captions_of(first_epoch)  # a new order, not a replay
    for want, got in zip(expected, [first_epoch, second_epoch], strict=True):
        assert captions_of(got) == captions_of(want)
        for want_batch, got_batch in zip(want, got, strict=True):
            assert torch.equal(got_batch["pixel_values"], want_batch["pixel_values"])
    # The corrupt image is not cached: it is skipped and counted each time it comes up, as without the cache
    # (at least once an epoch; a stream that runs short wraps into a new pass and may meet it again).
    assert dict(cached.skipped) == dict(plain.skipped)
    assert set(cached.skipped) == {"corrupt_image"} and cached.skipped["corrupt_image"] >= 2


def colour_of(caption: str) -> str:
    return caption.rstrip("0123456789")  # grouped_manifest's captions are "<colour><index>"


def grouped_manifest(folder: Path, counts: dict[str, int]) -> Path:
    records = [Record(key=f"{colour}{index}", caption=f"{colour}{index}", image_bytes=image_bytes(index),
                      image_ext="png", extra={"colour": colour})
               for colour, count in counts.items() for index in range(count)]
    return write_manifest(records, folder / "grouped.jsonl")


def test_group_by_shuffles_in_runs_sharing_a_column(tmp_path):
    manifest = grouped_manifest(tmp_path, {"red": 10, "blue": 10, "green": 10, "pink": 10})

    def keys(seed: int, epoch: int) -> list[str]:
        dataset = ImageTextDataset(manifest, transform=SMALL, seed=seed, group_by="colour", group_size=5)
        return [sample["caption"] for sample in dataset.iter_samples(0, 1, epoch=epoch)]

    order = keys(4, 0)
    assert sorted(order) == sorted(f"{c}{i}" for c in ("red", "blue", "green", "pink") for i in range(10))
    runs = [order[start : start + 5] for start in range(0, 40, 5)]
    assert all(len({colour_of(key) for key in run}) == 1 for run in runs)  # one colour per run
    colour_sequence = [colour_of(run[0]) for run in runs]
    assert colour_sequence != sorted(colour_sequence)  # the runs themselves are shuffled
    assert keys(4, 0) == order and keys(4, 1) != order and keys(5, 0) != order


def test_group_from_epoch_shuffles_plainly_before_it(tmp_path):
    manifest = grouped_manifest(tmp_path, {"red": 10, "blue": 10, "green": 10, "pink": 10})
    dataset = ImageTextDataset(manifest, transform=SMALL, group_by="colour", group_size=5, group_from_epoch=1)

    def one_colour_runs(epoch: int) -> int:
        order = [colour_of(sample["caption"]) for sample in dataset.iter_samples(0, 1, epoch=epoch)]
        return sum(len(set(order[start : start + 5])) == 1 for start in range(0, 40, 5))

    assert one_colour_runs(0) < 8 and one_colour_runs(1) == 8 and one_colour_runs(2) == 8


def test_group_fraction_scatters_the_runs_it_does_not_keep(tmp_path):
    manifest = grouped_manifest(tmp_path, {"red": 200, "blue": 200})

    def runs_kept(fraction: float) -> float:
        dataset = ImageTextDataset(manifest, transform=SMALL, group_by="colour", group_size=20,
                                   group_fraction=fraction)
        colours = [colour_of(sample["caption"]) for sample in dataset.iter_samples(0, 1)]
        assert len(colours) == 400
        # Rows whose colour equals their neighbour's: 19 of every whole run of 20, about half of scattered rows.
        return sum(a == b for a, b in zip(colours, colours[1:])) / 399

    whole, half, none = runs_kept(1.0), runs_kept(0.5), runs_kept(0.0)
    assert whole > 0.9 and 0.35 < none < 0.65 and none < half < whole
    with pytest.raises(ConfigError, match="group_fraction"):
        ImageTextDataset(manifest, transform=SMALL, group_by="colour", group_fraction=1.5)


def test_group_by_keeps_every_row_with_uneven_groups_and_refuses_what_it_cannot_group(tmp_path):
    manifest = grouped_manifest(tmp_path, {"red": 7, "blue": 3})
    dataset = ImageTextDataset(manifest, transform=SMALL, group_by="colour", group_size=4)
    order = [sample["caption"] for sample in dataset.iter_samples(0, 1)]
    assert sorted(order) == sorted([f"red{i}" for i in range(7)] + [f"blue{i}" for i in range(3)])
    colours = [colour_of(key) for key in order]
    changes = sum(a != b for a, b in zip(colours, colours[1:]))
    assert changes <= 3  # runs red 4 + red 3 + blue 3 in some order: at most three colour changes
    with pytest.raises(ConfigError, match="'shape'"):
        ImageTextDataset(manifest, transform=SMALL, group_by="shape")
    with pytest.raises(ConfigError, match="group_size"):
        ImageTextDataset(manifest, transform=SMALL, group_by="colour", group_size=0)
    make_shards(tmp_path / "shards", [3])
    with pytest.raises(ConfigError, match="manifest"):
        ImageTextDataset(tmp_path / "shards", transform=SMALL, group_by="colour")


def test_collate_tokenizes_captions_with_default_transform(tmp_path):
    make_shards(tmp_path, [3])

    def tokenize(captions):
        lengths = torch.tensor([len(caption) for caption in captions])
        return {"input_ids": lengths[:, None], "attention_mask": torch.ones(len(captions), 1)}

    # Default decode and transform: the paper's 346 px resize and 289 px crop, scaled to [-1, 1].
    batch = next(iter(make_loader(ImageTextDataset(tmp_path, tokenize=tokenize), 3)))
    assert batch["input_ids"][:, 0].tolist() == [len(caption) for caption in batch["captions"]]
    pixels = batch["pixel_values"]
    assert pixels.shape == (3, 3, 289, 289) and pixels.dtype == torch.float32
    assert -1.0 <= pixels.min() < 0.0 < pixels.max() <= 1.0


def take(data_loader, count: int) -> list[dict]:
    """The next `count` batches, running into further epochs as needed; stops mid-epoch like a killed run."""
    batches = []
    while len(batches) < count:
        for batch in data_loader:
            batches.append(batch)
            if len(batches) == count:
                break
    return batches


@pytest.mark.parametrize("mode, num_workers, stop_after", [("shards", 0, 3), ("shards", 2, 3), ("shards", 2, 6),
                                                           ("resampled", 2, 3), ("manifest", 2, 5)])
def test_resume_follows_the_uninterrupted_run(tmp_path, mode, num_workers, stop_after):
    make_shards(tmp_path, [5, 5, 4], corrupt={6})
    source = tmp_path
    if mode == "manifest":
        records = [Record(key=str(index), caption=f"sample {index}", image_ext="png",
                          image_bytes=b"not an image" if index == 6 else image_bytes(index)) for index in range(14)]
        source = write_manifest(records, tmp_path / "manifest" / "train.parquet")

    def loader():
        dataset = ImageTextDataset(source, transform=SMALL, seed=5, shuffle_buffer=4, resampled=mode == "resampled")
        return make_loader(dataset, batch_size=2, num_workers=num_workers)

    # 8 batches after the cut cross into the next epoch (7 or 8 batches per epoch here).
    uninterrupted = take(loader(), stop_after + 8)
    first = loader()
    take(first, stop_after)
    resumed_loader = loader()
    resumed_loader.load_state_dict(first.state_dict())
    resumed, expected = take(resumed_loader, 8), uninterrupted[stop_after:]
    assert [batch["keys"] for batch in resumed] == [batch["keys"] for batch in expected]
    assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(resumed, expected))
    total_skipped = sum(batch["num_skipped"] for batch in uninterrupted)
    assert sum(resumed_loader.skipped.values()) == total_skipped and (mode == "resampled" or total_skipped >= 1)


def test_resume_refuses_a_different_worker_count(tmp_path):
    make_shards(tmp_path, [2])
    saved = make_loader(ImageTextDataset(tmp_path, transform=SMALL), 1, num_workers=0).state_dict()
    with pytest.raises(ConfigError, match="num_streams=1"):
        make_loader(ImageTextDataset(tmp_path, transform=SMALL), 1, num_workers=2).load_state_dict(saved)
