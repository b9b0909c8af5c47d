"""The training dataset: decoded, augmented image-text samples split across ranks and workers, exactly resumable.

Each (rank, worker) pair reads one *stream*. A stream's record order is a pure function of (seed, epoch, stream),
so a position is just "records consumed, samples yielded" per stream and resuming replays the order up to it
without decoding. Every stream yields the same number of samples per epoch (wrapping into a fresh pass when its
share runs short, stopping when it has enough), so every rank sees the same number of batches and DDP never
waits on a rank that ran dry.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from openalign.data.loader import Collate, ResumableLoader, make_loader
from openalign.data.sources import (
    DataError,
    Record,
    Shard,
    count_shard_samples,
    expand_shards,
    is_shard_source,
    iter_records,
    iter_shard,
)
from openalign.distributed import rank_and_world_size
from openalign.errors import ConfigError, InputLimitError
from openalign.processing import images
from openalign.processing.images import TrainTransform, train_transform
from openalign.processing.tokenizer import is_unicode_text

# train_transform and TrainTransform (processing.images'; the dataset's default) are imported from here too.
__all__ = ["Collate", "ImageTextDataset", "ResumableLoader", "TrainTransform", "hash_seed", "make_loader",
           "train_transform"]

logger = logging.getLogger(__name__)

# Flipping an image whose caption says "left" or "right" makes the caption false (the paper's caveat).
SIDE_WORDS = re.compile(r"\b(left|right)\b", re.IGNORECASE)
# Draws per segment of a resampled manifest: bounds what a resume replays.
RESAMPLED_BLOCK = 10_000
# The paper's 346 px resize and 289 px random crop.
DEFAULT_TRANSFORM = TrainTransform()


def takes_generator(transform: Callable) -> bool:
    """Whether `transform` accepts a `generator=` keyword (a torch.Generator that it draws all its randomness
    from): then the dataset hands it a per-sample generator instead of seeding the global RNGs."""
    try:
        return "generator" in inspect.signature(transform).parameters
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return False


@contextmanager
def _seeded_rng(seed: int):
    """Seed torch's CPU generator, random and numpy for one sample, then restore them (the caller's RNG stream
    is untouched); for transforms without a `generator` keyword. Only the CPU generator: `torch.manual_seed`
    also queues a seeding of every CUDA device, and with CUDA not yet initialised each queued call records a
    stack trace, which cost half of the loader's time."""
    generator = torch.default_generator
    states = generator.get_state(), random.getstate(), np.random.get_state()
    generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        generator.set_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])


def _permutation(size: int, shuffle: bool, seed: str) -> list[int]:
    order = list(range(size))
    if shuffle:
        random.Random(seed).shuffle(order)
    return order


def _grouped_permutation(labels: list[Any], group_size: int, seed: str, fraction: float = 1.0) -> list[int]:
    """A shuffled order in runs of up to `group_size` consecutive indices sharing a label: each label's indices
    shuffled and cut into runs, the runs shuffled. A batch then holds a few labels with many rows each. With
    `fraction` < 1 each run stays whole with that probability and is otherwise scattered as single rows, so
    about that share of the rows come in runs and the rest as in a plain shuffle."""
    rng = random.Random(seed)
    by_label: dict[Any, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    units = []
    for label in sorted(by_label, key=repr):  # a fixed label order, whatever the manifest's row order
        indices = by_label[label]
        rng.shuffle(indices)
        for start in range(0, len(indices), group_size):
            run = indices[start : start + group_size]
            units.extend([run] if rng.random() < fraction else [[index] for index in run])
    rng.shuffle(units)
    return [index for unit in units for index in unit]


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
    and for manifests, stream s takes every s-th record of one global order. Every stream yields
    `epoch_size // streams` samples per epoch: a stream whose share runs short (uneven shards, skipped samples)
    wraps into a fresh pass, and the remainder of the division is dropped. `epoch_size` defaults to the
    manifest's rows or the local shards' sample count; `pipe:` shards need it given. `resampled` draws shards
    (or rows) with replacement, endlessly unless `epoch_size` is given.

    `transform` (image -> (3, H, W) tensor) draws its randomness from a seed per sample, a function of (seed,
    epoch, stream, position), which is what makes the pixels of a resumed run exact: a transform with a
    `generator` keyword (the built-in ones) gets a torch.Generator seeded with it; any other transform may draw
    from torch's, Python's or numpy's global RNG, which are seeded for the call and restored after it (about
    0.1 ms a sample). `decode` (bytes -> RGB image) should be deterministic. The transform should not flip;
    `flip` does (True, False, or "auto": not when the caption says left or right). Unusable samples are
    skipped, logged with their key and counted by reason (missing_caption, invalid_caption, over_limit: a member
    or file above its size bound, unreadable_image, corrupt_image, transform_failed; unreadable_shard for the
    rest of a shard that breaks off); `max_consecutive_skips` in a row mean a broken source and raise DataError.
    A shard that cannot be counted at the start counts 0 samples; only a set of which no shard is readable is
    refused.

    `group_by` (manifests only) names a manifest column: each pass is then shuffled in runs of `group_size`
    consecutive rows sharing that column's value, so a batch holds a few values with many rows each (hard
    negatives: with `group_by="colour"` and runs of half a batch, most in-batch negatives share the anchor's
    colour and differ in what else the caption says). Rows without the column form one group.
    `group_fraction` < 1 keeps only about that share of the rows in runs and scatters the rest, so batches
    mix hard negatives with ordinary ones. Epochs before `group_from_epoch` are shuffled plainly.

    `cache_images` keeps every decoded image in memory (as a read-only uint8 array, keyed by the sample's key) after
    its first use, so later epochs skip reading and decoding; with a `TrainTransform` (the trainer's) it keeps the
    resized image instead, so they skip resizing too. The random part of the transform still runs per sample, so
    augmentation and the pixels of every epoch are unchanged. For data that fits in memory: each process (and each
    loader worker) holds its own copy of what it has read.
    """

    def __init__(self, source: Any, *, transform: Callable[[Image.Image], torch.Tensor] = DEFAULT_TRANSFORM,
                 decode: Callable[[bytes], Image.Image] = images.load_image,
                 tokenize: Callable[[list[str]], dict[str, torch.Tensor]] | None = None,
                 seed: int = 0, shuffle: bool = True, shuffle_buffer: int = 1000, resampled: bool = False,
                 flip: bool | str = True, epoch_size: int | None = None, rank: int | None = None,
                 world_size: int | None = None, max_consecutive_skips: int = 1000, cache_images: bool = False,
                 group_by: str | None = None, group_size: int = 128, group_fraction: float = 1.0,
                 group_from_epoch: int = 0):
        if flip not in (True, False, "auto"):
            raise ConfigError(f"flip must be True, False or 'auto', got {flip!r}")
        if epoch_size is not None and epoch_size < 1:
            raise ConfigError(f"epoch_size must be positive, got {epoch_size}")
        self.transform, self.decode, self.tokenize = transform, decode, tokenize
        self._transform_takes_generator = takes_generator(transform)
        self.seed, self.shuffle, self.shuffle_buffer, self.resampled = seed, shuffle, shuffle_buffer, resampled
        self.flip, self.epoch_size, self.max_consecutive_skips = flip, epoch_size, max_consecutive_skips
        self._rank, self._world_size = rank, world_size
        self.image_cache: dict[str, np.ndarray] | None = {} if cache_images else None
        if is_shard_source(source):
            self.shards, self.records = expand_shards(source), None
        else:
            self.shards, self.records = None, list(iter_records(source))
            if not self.records:
                raise DataError(f"data source {source} holds no records")
        self.group_by, self.group_size, self.group_fraction = group_by, group_size, group_fraction
        self.group_from_epoch = group_from_epoch
        self._group_labels: list[Any] | None = None
        if group_by is not None:
            if self.records is None or resampled:
                raise ConfigError(f"group_by={group_by!r} needs a manifest read in passes (not shards, not "
                                  "resampled)")
            if group_size < 1:
                raise ConfigError(f"group_size must be positive, got {group_size}")
            if not 0.0 <= group_fraction <= 1.0:
                raise ConfigError(f"group_fraction must lie in [0, 1], got {group_fraction}")
            self._group_labels = [record.extra.get(group_by) for record in self.records]
            if all(label is None for label in self._group_labels):
                raise ConfigError(f"group_by={group_by!r}: no row of {source} has that column")
        self._num_samples: int | None = None
        self.uncountable_shards: list[str] = []
        # Set by the loader before each epoch; pickled into the workers with the dataset.
        self.epoch = 0
        self.resume_positions: list[tuple[int, int, int, int]] | None = None
        self.rotation = 0

    # -- sizes and placement --------------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        """This process's rank: as given, else torch.distributed's, else 0."""
        return self._rank if self._rank is not None else rank_and_world_size()[0]

    @property
    def world_size(self) -> int:
        """Number of ranks: as given, else torch.distributed's, else 1."""
        return self._world_size if self._world_size is not None else rank_and_world_size()[1]

    def resolve_placement(self) -> None:
        """Fix rank and world size now (from torch.distributed when not given), so workers need not ask it."""
        self._rank, self._world_size = self.rank, self.world_size

    @property
    def num_samples(self) -> int:
        """Samples in one epoch across all ranks (`epoch_size`, else counted from the source once)."""
        if self._num_samples is None:
            if self.epoch_size is not None:
                self._num_samples = self.epoch_size
            elif self.records is not None:
                self._num_samples = len(self.records)
            else:
                piped = [shard for shard in self.shards if shard.command]
                if piped:
                    raise ConfigError(f"cannot count the samples of piped shards such as {str(piped[0])!r}; "
                                      "give epoch_size")
                self._num_samples = self._count_shard_samples()
        return self._num_samples

    def _count_shard_samples(self) -> int:
        """Samples in the local shards, read from their headers; an unreadable shard counts 0 (logged and kept in
        `uncountable_shards`; reading it later skips and counts what it cannot yield), and only a set of which
        no shard can be read is refused."""
        total, self.uncountable_shards = 0, []
        for shard in self.shards:
            try:
                total += count_shard_samples(shard)
            except DataError as error:
                self.uncountable_shards.append(str(shard))
                logger.warning("counting 0 samples for unreadable shard %s: %s", shard, error)
        if len(self.uncountable_shards) == len(self.shards):
            raise DataError(f"none of the {len(self.shards)} shards can be read (first: {self.shards[0]})")
        return total

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

    def _read_shard(self, shard: Shard, skipped: Counter) -> Iterator[Record]:
        try:
            yield from iter_shard(shard)
        except DataError as error:
            logger.warning("skipping the rest of shard %s: %s", shard, error)
            skipped["unreadable_shard"] += 1

    def _global_order(self, epoch: int, skipped: Counter) -> Iterator[tuple[int, Record]]:
        """(pass, record) for all records, pass after pass, each pass in its own seeded order."""
        for pass_index in itertools.count():
            produced = 0
            size = len(self.records) if self.records is not None else len(self.shards)
            seed = f"{self.seed}:{epoch}:{pass_index}"
            if self._group_labels is not None and self.shuffle and epoch >= self.group_from_epoch:
                order = _grouped_permutation(self._group_labels, self.group_size, seed, self.group_fraction)
            else:
                order = _permutation(size, self.shuffle, seed)
            for index in order:
                for record in ([self.records[index]] if self.records is not None
                               else self._read_shard(self.shards[index], skipped)):
                    produced += 1
                    yield pass_index, record
            if produced == 0:
                raise DataError(f"no readable samples in any of {len(self.shards or [])} shards")

    def segments(self, stream: int, num_streams: int, epoch: int, skipped: Counter) -> Iterator[Iterator[Record]]:
        """One stream's records for an epoch as an endless sequence of lazy segments.

        A segment is a unit that resume can jump to without reading what came before: one shard when streams
        own whole shards or draw them (resampled), a block of draws for a resampled manifest, and a whole pass
        over the global order otherwise. The shuffle buffer empties at each segment's end.
        """
        if self.resampled and self.records is not None:
            for segment_index in itertools.count():
                rng = random.Random(f"{self.seed}:{epoch}:{stream}:draws:{segment_index}")
                yield (self.records[rng.randrange(len(self.records))] for _ in range(RESAMPLED_BLOCK))
        elif self.resampled:
            for segment_index in itertools.count():
                rng = random.Random(f"{self.seed}:{epoch}:{stream}:draws:{segment_index}")
                yield self._read_shard(self.shards[rng.randrange(len(self.shards))], skipped)
        elif self.records is None and len(self.shards) >= num_streams:
            for pass_index in itertools.count():
                order = _permutation(len(self.shards), self.shuffle, f"{self.seed}:{epoch}:{pass_index}")
                for index in order[stream::num_streams]:
                    yield self._read_shard(self.shards[index], skipped)
        else:
            # Fewer shards than streams, or a manifest: stride over one global order so that no stream goes
            # empty; the stride runs on across passes so it also works with fewer samples than streams.
            strided = itertools.islice(self._global_order(epoch, skipped), stream, None, num_streams)
            for _, group in itertools.groupby(strided, key=lambda item: item[0]):
                yield (record for _, record in group)

    # -- samples ----------------------------------------------------------------------------------------------

    def _load(self, record: Record, sample_seed: int, skipped: Counter) -> torch.Tensor | None:
        """Pixels of one record, or None (logged and counted by reason) when it cannot be used."""
        reason, error = None, None
        image = self.image_cache.get(record.key) if self.image_cache is not None else None
        if record.error is not None:
            reason, error = "over_limit", record.error
        elif record.caption is None or not record.caption.strip():
            reason = "missing_caption"
        elif not is_unicode_text(record.caption):
            reason, error = "invalid_caption", "a lone surrogate or other text that is not Unicode"
        elif image is None:
            try:
                data = record.open_image_bytes()
            except InputLimitError as caught:
                reason, error = "over_limit", caught
            except (OSError, DataError) as caught:
                reason, error = "unreadable_image", caught
            if reason is None:
                try:
                    image = self.decode(data)
                except Exception as caught:  # decoders raise many types on bad bytes; all mean a corrupt sample
                    reason, error = "corrupt_image", caught
        if reason is None:
            try:
                if self.image_cache is not None and not isinstance(image, np.ndarray):
                    image = self._cache(record.key, image)
                flip_allowed = self.flip is True or (self.flip == "auto" and not SIDE_WORDS.search(record.caption))
                if self._transform_takes_generator:
                    generator = torch.Generator().manual_seed(sample_seed)
                    pixels = self._transform(image, generator=generator)
                    flip = flip_allowed and torch.rand((), generator=generator) < 0.5
                else:  # a transform drawing from the global RNGs: seed them for this sample, then restore
                    with _seeded_rng(sample_seed):
                        pixels = self._transform(image)
                        flip = flip_allowed and torch.rand(()) < 0.5
                return pixels.flip(-1) if flip else pixels  # (C, H, W): mirror W
            except Exception as caught:  # e.g. an image too small for a custom transform
                reason, error = "transform_failed", caught
        skipped[reason] += 1
        logger.warning("skipping sample %s: %s%s", record.key, reason, f" ({error})" if error else "")
        return None

    def cache_entry(self, image: Image.Image) -> np.ndarray:
        """What `cache_images` keeps of a decoded image: what every epoch would compute again from it, its
        resized pixels when the transform is a `TrainTransform` (whose `prepare` is deterministic), else the
        decoded pixels. Read-only, so a transform cannot change what later epochs read."""
        array = self.transform.prepare(image) if isinstance(self.transform, TrainTransform) else np.asarray(image)
        array.flags.writeable = False
        return array

    def _cache(self, key: str, image: Image.Image) -> np.ndarray:
        self.image_cache[key] = array = self.cache_entry(image)
        return array

    def _transform(self, image: Image.Image | np.ndarray, **generator) -> torch.Tensor:
        """The transform of a decoded image, or of a cached array (see `_cache`)."""
        if not isinstance(image, np.ndarray):
            return self.transform(image, **generator)
        if isinstance(self.transform, TrainTransform):
            return self.transform.augment(image, **generator)
        return self.transform(Image.fromarray(image), **generator)

    def iter_samples(self, stream: int, num_streams: int, *, epoch: int | None = None,
                     start: tuple[int, int, int, int] | None = None) -> Iterator[dict[str, Any]]:
        """Yield the samples of one stream for an epoch, from the start or from a saved position.

        A position is (segment, records taken from it, records consumed, samples yielded); each sample carries
        its own as "position" = (stream, *position), and in "skipped" the counts by reason of the records
        skipped since the previous sample. Resuming re-reads only the current segment, without decoding.
        """
        epoch = self.epoch if epoch is None else epoch
        limit = self.samples_per_stream(num_streams)
        start_segment, start_within, consumed, yielded = start or (0, 0, 0, 0)
        skipped: Counter = Counter()
        consecutive_skips, empty_segments = 0, 0
        shuffled = self.records is None and self.shuffle and self.shuffle_buffer > 1
        for segment_index, segment in enumerate(self.segments(stream, num_streams, epoch, skipped)):
            if limit is not None and yielded >= limit:
                return
            if segment_index < start_segment:
                continue  # segments are lazy: skipping one reads nothing
            if shuffled:
                rng = random.Random(f"{self.seed}:{epoch}:{stream}:buffer:{segment_index}")
                segment = _buffer_shuffle(segment, self.shuffle_buffer, rng)
            within = 0
            for record in segment:
                within += 1
                if segment_index == start_segment and within <= start_within:
                    if within == start_within:
                        skipped.clear()  # reported before the interruption
                    continue
                consumed += 1
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
                       "skipped": dict(skipped), "position": (stream, segment_index, within, consumed, yielded)}
                skipped.clear()
                if limit is not None and yielded >= limit:
                    segment.close()  # ends a piped shard's process now rather than at garbage collection
                    return
            empty_segments = 0 if within else empty_segments + 1
            if empty_segments > 10 * len(self.shards or [None]) + 10:
                raise DataError(f"stream {stream}: {empty_segments} shards in a row held no readable sample "
                                f"(e.g. among {[str(shard) for shard in (self.shards or [])[:3]]})")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The loader rotates workers on resume so the batch after the cut comes from the same stream as before.
        local = (worker + self.rotation) % num_workers
        start = tuple(self.resume_positions[local]) if self.resume_positions else None
        yield from self.iter_samples(self.rank * num_workers + local, self.world_size * num_workers, start=start)


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions (string seeding is SHA-512)."""
    return random.Random(":".join(str(part) for part in parts)).getrandbits(63)
