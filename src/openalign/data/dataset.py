"""The training dataset: decoded, augmented image-text samples split across ranks and workers, exactly resumable.

Each (rank, worker) pair reads one *stream*. A stream's record order is a pure function of (seed, epoch, stream),
so a position is just "records consumed, samples yielded" per stream and resuming replays the order up to it
without decoding. Every stream yields the same number of samples per epoch (wrapping into a fresh pass when its
share runs short, stopping when it has enough), so every rank sees the same number of batches and DDP never
waits on a rank that ran dry.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from openalign.data.sources import (
    DataError,
    Record,
    count_shard_samples,
    expand_shards,
    is_shard_source,
    iter_records,
    iter_shard,
)
from openalign.errors import ConfigError
from openalign.processing.images import load_image, train_transform

logger = logging.getLogger(__name__)

# Flipping an image whose caption says "left" or "right" makes the caption false (the paper's caveat).
SIDE_WORDS = re.compile(r"\b(left|right)\b", re.IGNORECASE)


# The dataset flips (so a caption can veto it); the shared transform does the rest of the paper's augmentation.
DEFAULT_TRANSFORM = functools.partial(train_transform, flip=False)


@contextmanager
def _seeded_rng(seed: int):
    """Seed torch, random and numpy for one sample, then restore them (the caller's RNG stream is untouched)."""
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])


def _permutation(size: int, shuffle: bool, seed: str) -> list[int]:
    order = list(range(size))
    if shuffle:
        random.Random(seed).shuffle(order)
    return order


def _buffer_shuffle(records: Iterator[Record], size: int, rng: random.Random) -> Iterator[Record]:
    """Bounded shuffle: each incoming record replaces a random one of `size` held back, which goes out."""
    buffer: list[Record] = []
    for record in records:
        if len(buffer) < size:
            buffer.append(record)
            continue
        index = rng.randrange(size)
        yield buffer[index]
        buffer[index] = record
    rng.shuffle(buffer)
    yield from buffer


class ImageTextDataset(IterableDataset):
    """Image-text pairs from a manifest, image folder or WebDataset shards, ready for contrastive training.

    Split: with at least as many shards as streams (ranks x workers), each stream reads whole shards; otherwise,
    and for manifests, stream s takes every s-th record of one global order. `epoch_size` (global samples per
    epoch) defaults to the manifest's rows or the local shards' sample count; `pipe:` shards need it given.
    Corrupt samples are skipped, logged with their key and counted per reason in each sample's "skipped".
    """

    def __init__(self, source: Any, *, transform: Callable[[Image.Image], torch.Tensor] = DEFAULT_TRANSFORM,
                 decode: Callable[[bytes], Image.Image] = load_image,
                 tokenize: Callable[[list[str]], dict[str, torch.Tensor]] | None = None,
                 seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 1000, resampled: bool = False,
                 flip: bool | str = True, epoch_size: int | None = None, rank: int | None = None,
                 world_size: int | None = None, max_consecutive_skips: int = 1000):
        if flip not in (True, False, "auto"):
            raise ConfigError(f"flip must be True, False or 'auto', got {flip!r}")
        if epoch_size is not None and epoch_size < 1:
            raise ConfigError(f"epoch_size must be positive, got {epoch_size}")
        self.transform, self.decode, self.tokenize = transform, decode, tokenize
        self.seed, self.shuffle, self.shuffle_buffer, self.resampled = seed, shuffle, shuffle_buffer, resampled
        self.flip, self.epoch_size, self.max_consecutive_skips = flip, epoch_size, max_consecutive_skips
        self._rank, self._world_size = rank, world_size
        if is_shard_source(source):
            self.shards, self.records = expand_shards(source), None
        else:
            self.shards, self.records = None, list(iter_records(source))
            if not self.records:
                raise DataError(f"data source {source} holds no records")
        self._num_samples: int | None = None
        # Set by the loader before each epoch; pickled into the workers with the dataset.
        self.epoch = 0
        self.resume_positions: list[tuple[int, int]] | None = None
        self.rotation = 0

    # -- sizes and placement --------------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        """This process's rank: as given, else torch.distributed's, else 0."""
        if self._rank is not None:
            return self._rank
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        return torch.distributed.get_rank() if distributed else 0

    @property
    def world_size(self) -> int:
        """Number of ranks: as given, else torch.distributed's, else 1."""
        if self._world_size is not None:
            return self._world_size
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        return torch.distributed.get_world_size() if distributed else 1

    @property
    def num_samples(self) -> int:
        """Samples in one epoch across all ranks (`epoch_size`, else counted from the source once)."""
        if self._num_samples is None:
            if self.epoch_size is not None:
                self._num_samples = self.epoch_size
            elif self.records is not None:
                self._num_samples = len(self.records)
            else:
                piped = [url for url in self.shards if url.startswith("pipe:")]
                if piped:
                    raise ConfigError(f"cannot count the samples of piped shards such as {piped[0]!r}; "
                                      "give epoch_size")
                self._num_samples = sum(count_shard_samples(url) for url in self.shards)
        return self._num_samples

    def samples_per_stream(self, num_streams: int) -> int | None:
        """Samples each stream yields per epoch; None for an endless resampled stream without `epoch_size`."""
        if self.resampled and self.epoch_size is None:
            return None
        share = self.num_samples // num_streams
        if share == 0:
            raise ConfigError(f"{self.num_samples} samples per epoch cannot feed {num_streams} streams "
                              "(ranks x workers); give a larger epoch_size or use fewer workers")
        return share

    # -- record order -----------------------------------------------------------------------------------------

    def _read_shard(self, url: str, skipped: Counter) -> Iterator[Record]:
        try:
            yield from iter_shard(url)
        except DataError as error:
            logger.warning("skipping the rest of shard %s: %s", url, error)
            skipped["unreadable_shard"] += 1

    def _global_order(self, epoch: int, skipped: Counter) -> Iterator[tuple[int, Record]]:
        """(pass, record) for all records, pass after pass, each pass in its own seeded order."""
        for pass_index in itertools.count():
            produced = 0
            order = _permutation(len(self.records or self.shards), self.shuffle, f"{self.seed}:{epoch}:{pass_index}")
            for index in order:
                for record in ([self.records[index]] if self.records is not None
                               else self._read_shard(self.shards[index], skipped)):
                    produced += 1
                    yield pass_index, record
            if produced == 0:
                raise DataError(f"no readable samples in any of {len(self.shards or [])} shards")

    def _passes(self, stream: int, num_streams: int, epoch: int, skipped: Counter) -> Iterator[Iterator[Record]]:
        """The stream's records as a sequence of passes over its share (one endless pass when resampled)."""
        if self.resampled:
            yield self._resampled(random.Random(f"{self.seed}:{epoch}:{stream}:draws"), skipped)
        elif self.records is None and len(self.shards) >= num_streams:
            for pass_index in itertools.count():
                order = _permutation(len(self.shards), self.shuffle, f"{self.seed}:{epoch}:{pass_index}")
                own = [self.shards[index] for index in order[stream::num_streams]]
                records = (record for url in own for record in self._read_shard(url, skipped))
                first = next(records, None)
                if first is None:
                    raise DataError(f"stream {stream}: no readable samples in its shards {own}")
                yield itertools.chain([first], records)
        else:
            # Fewer shards than streams, or a manifest: stride over one global order so that no stream goes
            # empty; the stride runs on across passes so it also works with fewer samples than streams.
            strided = itertools.islice(self._global_order(epoch, skipped), stream, None, num_streams)
            for _, group in itertools.groupby(strided, key=lambda item: item[0]):
                yield (record for _, record in group)

    def _resampled(self, rng: random.Random, skipped: Counter) -> Iterator[Record]:
        empty_draws = 0
        while True:
            if self.records is not None:
                yield self.records[rng.randrange(len(self.records))]
                continue
            produced = 0
            for record in self._read_shard(rng.choice(self.shards), skipped):
                produced += 1
                yield record
            empty_draws = 0 if produced else empty_draws + 1
            if empty_draws > 10 * len(self.shards):
                raise DataError(f"no readable samples in {empty_draws} shards drawn from {self.shards[:3]}...")

    def record_stream(self, stream: int, num_streams: int, epoch: int, skipped: Counter) -> Iterator[Record]:
        """The endless, deterministic record order of one stream; shard read failures go into `skipped`.

        Shard records are shuffled with a bounded buffer that empties at each pass's end, so an epoch takes
        its samples from the first pass before wrapping into the next.
        """
        rng = random.Random(f"{self.seed}:{epoch}:{stream}:buffer")
        for records in self._passes(stream, num_streams, epoch, skipped):
            if self.records is None and self.shuffle and self.shuffle_buffer > 1:
                records = _buffer_shuffle(records, self.shuffle_buffer, rng)
            yield from records

    # -- samples ----------------------------------------------------------------------------------------------

    def _load(self, record: Record, sample_seed: int, skipped: Counter) -> torch.Tensor | None:
        """Pixels of one record, or None (logged and counted by reason) when it cannot be used."""
        reason, error = None, None
        if record.caption is None or not record.caption.strip():
            reason = "missing_caption"
        else:
            try:
                data = record.open_image_bytes()
            except (OSError, DataError) as caught:
                reason, error = "unreadable_image", caught
        if reason is None:
            try:
                image = self.decode(data)
            except Exception as caught:  # decoders raise many types on bad bytes; all mean a corrupt sample
                reason, error = "corrupt_image", caught
        if reason is None:
            try:
                with _seeded_rng(sample_seed):
                    pixels = self.transform(image)
                    flip_allowed = self.flip is True or (
                        self.flip == "auto" and not SIDE_WORDS.search(record.caption))
                    if flip_allowed and torch.rand(()) < 0.5:
                        pixels = pixels.flip(-1)  # (C, H, W): mirror W
                return pixels
            except Exception as caught:  # e.g. an image too small for a custom transform
                reason, error = "transform_failed", caught
        skipped[reason] += 1
        logger.warning("skipping sample %s: %s%s", record.key, reason, f" ({error})" if error else "")
        return None

    def iter_samples(self, stream: int, num_streams: int, *, epoch: int | None = None, start_records: int = 0,
                     start_samples: int = 0) -> Iterator[dict[str, Any]]:
        """Yield the samples of one stream for an epoch, resuming after `start_records` records consumed.

        Each sample carries "position" = (stream, records consumed, samples yielded) and "skipped", the counts
        by reason of records skipped since the previous sample.
        """
        epoch = self.epoch if epoch is None else epoch
        limit = self.samples_per_stream(num_streams)
        skipped: Counter = Counter()
        records = self.record_stream(stream, num_streams, epoch, skipped)
        consumed, yielded, consecutive_skips = 0, start_samples, 0
        try:
            while limit is None or yielded < limit:
                record = next(records)
                consumed += 1
                if consumed <= start_records:
                    if consumed == start_records:
                        skipped.clear()  # already reported before the interruption
                    continue
                pixels = self._load(record, hash_seed(self.seed, epoch, stream, consumed), skipped)
                if pixels is None:
                    consecutive_skips += 1
                    if consecutive_skips > self.max_consecutive_skips:
                        raise DataError(f"{consecutive_skips} consecutive samples unusable in stream {stream} "
                                        f"(last {record.key!r}; counts {dict(skipped)}): check the source")
                    continue
                consecutive_skips = 0
                yielded += 1
                yield {"pixel_values": pixels, "caption": record.caption, "key": record.key,
                       "skipped": dict(skipped), "position": (stream, consumed, yielded)}
                skipped.clear()
        finally:
            records.close()  # ends a piped shard's process now rather than at garbage collection

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The loader rotates workers on resume so the batch after the cut comes from the same stream as before.
        local = (worker + self.rotation) % num_workers
        start_records, start_samples = self.resume_positions[local] if self.resume_positions else (0, 0)
        yield from self.iter_samples(self.rank * num_workers + local, self.world_size * num_workers,
                                     start_records=start_records, start_samples=start_samples)


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions (string seeding is SHA-512)."""
    return random.Random(":".join(str(part) for part in parts)).getrandbits(63)


class Collate:
    """Stack samples into a batch, tokenize the captions, and carry the skip counts and stream position."""

    def __init__(self, tokenize: Callable[[list[str]], dict[str, torch.Tensor]] | None = None):
        self.tokenize = tokenize

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        captions = [sample["caption"] for sample in samples]
        batch: dict[str, Any] = {
            "pixel_values": torch.stack([sample["pixel_values"] for sample in samples]),  # (B, C, H, W)
            "captions": captions,
            "keys": [sample["key"] for sample in samples],
        }
        if self.tokenize is not None:
            batch.update(self.tokenize(captions))
        skipped: Counter = Counter()
        for sample in samples:
            skipped.update(sample["skipped"])
        batch["num_skipped"] = sum(skipped.values())
        batch["skipped_reasons"] = dict(skipped)
        batch["position"] = samples[-1]["position"]  # one worker builds a whole batch: its last sample's place
        return batch


class ResumableLoader(DataLoader):
    """A DataLoader over an ImageTextDataset that knows its exact data position.

    Every batch reports (stream, records consumed, samples yielded); the loader keeps the latest per worker
    stream and which stream serves next. Batches arrive round-robin from workers that all yield the same
    number of batches, so restoring those positions and rotating the workers to start at the next stream makes
    the resumed batches equal, key for key and pixel for pixel, to an uninterrupted run's.
    """

    def __init__(self, dataset: ImageTextDataset, batch_size: int, num_workers: int = 0, **kwargs: Any):
        if kwargs.get("persistent_workers"):
            raise ConfigError("persistent_workers=True would keep stale resume positions in the workers")
        # DataLoader draws a worker base seed per iterator; from its own generator, so a resume mid-epoch
        # leaves the trainer's global RNG where an uninterrupted run has it (samples are seeded per position).
        kwargs.setdefault("generator", torch.Generator().manual_seed(dataset.seed))
        super().__init__(dataset, batch_size=batch_size, num_workers=num_workers,
                         collate_fn=Collate(dataset.tokenize), **kwargs)
        self.num_streams = max(1, num_workers)
        self.epoch = dataset.epoch
        self.positions = [(0, 0)] * self.num_streams
        self.next_stream = 0
        self.skipped: Counter = Counter()

    def batches_per_epoch(self) -> int | None:
        """Batches this rank yields per epoch (the same on every rank); None when endless."""
        share = self.dataset.samples_per_stream(self.dataset.world_size * self.num_streams)
        if share is None:
            return None
        per_stream = share // self.batch_size if self.drop_last else math.ceil(share / self.batch_size)
        return per_stream * self.num_streams

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # The workers receive a pickled copy of the dataset when the iterator starts: set its place first.
        self.dataset.epoch = self.epoch
        self.dataset.resume_positions = list(self.positions)
        self.dataset.rotation = self.next_stream
        for batch in super().__iter__():
            stream, records, samples = batch["position"]
            local = stream % self.num_streams
            self.positions[local] = (records, samples)
            self.next_stream = (local + 1) % self.num_streams
            self.skipped.update(batch["skipped_reasons"])
            yield batch
        self.epoch += 1
        self.positions = [(0, 0)] * self.num_streams
        self.next_stream = 0

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning at the next iteration."""
        self.epoch, self.positions, self.next_stream = epoch, [(0, 0)] * self.num_streams, 0

    def state_dict(self) -> dict[str, Any]:
        """The data position after the last batch handed out (the same on every rank)."""
        return {"epoch": self.epoch, "positions": [list(position) for position in self.positions],
                "next_stream": self.next_stream, "num_streams": self.num_streams,
                "world_size": self.dataset.world_size, "seed": self.dataset.seed,
                "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`; the workers, ranks and seed must match the saved run."""
        expected = {"num_streams": self.num_streams, "world_size": self.dataset.world_size,
                    "seed": self.dataset.seed}
        for key, value in expected.items():
            if state.get(key) != value:
                raise ConfigError(f"data state has {key}={state.get(key)!r} but this run has {value!r}; "
                                  "an exact resume needs the same workers, ranks and seed")
        self.epoch, self.next_stream = state["epoch"], state["next_stream"]
        self.positions = [tuple(position) for position in state["positions"]]
        self.skipped = Counter(state.get("skipped", {}))


def make_loader(dataset: ImageTextDataset, batch_size: int, num_workers: int = 0,
                **kwargs: Any) -> ResumableLoader:
    """A resumable DataLoader whose batches hold pixel_values (B, 3, H, W), token tensors, captions, keys,
    num_skipped, skipped_reasons and position; extra keyword arguments go to DataLoader."""
    return ResumableLoader(dataset, batch_size, num_workers, **kwargs)
