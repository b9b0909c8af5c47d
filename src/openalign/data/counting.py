"""Counting over corpora larger than memory, for the data filters.

Two counters, for two questions:

* `FrequentItemsCounter` answers "which tokens are the most frequent?" (the rare-token rule's vocabulary) in
  bounded memory. It is Misra-Gries in its batched form: at most 2 * capacity counters are kept; when the table
  overflows, the (capacity + 1)-th largest count v is subtracted from every counter and those at or below zero
  are dropped. Each reduction removes at least (capacity + 1) * v from a total of N additions, so the summed
  reductions, `error_bound`, never exceed N / (capacity + 1); every estimate lies in
  [true - error_bound, true], and every item whose true count exceeds error_bound is still in the table.
  With more distinct items than capacity never seen, the counts are exact (error_bound stays 0).

* `HashCounter` answers "which captions (or images) occur more than t times?" exactly, for the sharing
  rules, where an undercount would let boilerplate through. It counts 64-bit hashes: in memory up to
  `memory_items` hashes, beyond that spilled to disk in 16 partition files by the hash's top bits and
  counted one partition at a time with numpy, so memory holds one sixteenth of the hashes at most. Two
  distinct texts share a 64-bit hash with probability about N^2 / 2^65 (0.03 expected pairs for a billion
  distinct texts), which would merge their counts.
"""

from __future__ import annotations

import hashlib
import heapq
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

_TOKEN = re.compile(r"[^\W_]+")


def tokenize(caption: str | None) -> list[str]:
    """Lower-cased runs of letters and digits: "IMG_0423.jpg" -> ["img", "0423", "jpg"]. Used for both the
    vocabulary and the unigram count of the length rule."""
    return _TOKEN.findall(caption.lower()) if caption else []


def bigrams(tokens: list[str]) -> list[str]:
    """Adjacent token pairs joined by a space."""
    return [f"{first} {second}" for first, second in zip(tokens, tokens[1:])]


def stable_hash(data: bytes | str) -> int:
    """A 64-bit hash that is the same in every process and run (unlike Python's `hash`)."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class FrequentItemsCounter:
    """Approximate counts of the most frequent items in at most 2 * capacity counters (batched
    Misra-Gries; see the module docstring for the error bound)."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"FrequentItemsCounter capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self.counts: dict[str, int] = {}
        self.total = 0
        self.error_bound = 0

    def update(self, items: Iterable[str]) -> None:
        """Count each item once per occurrence."""
        counts = self.counts
        for item in items:
            counts[item] = counts.get(item, 0) + 1
            self.total += 1
        if len(counts) > 2 * self.capacity:
            self._reduce()

    def _reduce(self) -> None:
        # Subtracting the (capacity+1)-th largest count leaves at most `capacity` counters alive.
        cut = heapq.nlargest(self.capacity + 1, self.counts.values())[-1]
        self.error_bound += cut
        self.counts = {item: count - cut for item, count in self.counts.items() if count > cut}

    def estimate(self, item: str) -> int:
        """A lower bound on the item's count, at most `error_bound` below the truth."""
        return self.counts.get(item, 0)

    def most_common(self, k: int, min_count: int = 1) -> list[tuple[str, int]]:
        """The k items with the largest estimates among those estimated at least `min_count`; ties broken
        by the item itself so the answer does not depend on insertion order."""
        candidates = [(item, count) for item, count in self.counts.items() if count >= min_count]
        return heapq.nsmallest(k, candidates, key=lambda pair: (-pair[1], pair[0]))


class HashCounter:
    """Exact occurrence counts of 64-bit hashes, spilled to disk past `memory_items` (see the module
    docstring); `finish(threshold)` then tells which hashes occur more than `threshold` times."""

    PARTITIONS = 16

    def __init__(self, memory_items: int = 50_000_000, spill_dir: str | Path | None = None):
        self.memory_items = memory_items
        self.spill_dir = spill_dir
        self._buffer: list[int] = []
        self._chunks: list[np.ndarray] = []
        self._in_memory = 0
        self._temporary: tempfile.TemporaryDirectory | None = None
        self._partition_files: list[Path] = []
        self.total = 0
        self.spills = 0
        self.heavy_hashes = np.empty(0, dtype=np.uint64)
        self.heavy_counts = np.empty(0, dtype=np.int64)

    def add(self, value: int) -> None:
        """Count one occurrence of a hash."""
        self._buffer.append(value)
        if len(self._buffer) >= min(65536, self.memory_items):
            self._flush_buffer()

    def _flush_buffer(self) -> None:
        if not self._buffer:
            return
        chunk = np.array(self._buffer, dtype=np.uint64)
        self._buffer = []
        self.total += len(chunk)
        self._chunks.append(chunk)
        self._in_memory += len(chunk)
        if self._in_memory >= self.memory_items:
            self._spill()

    def _spill(self) -> None:
        if self._temporary is None:
            self._temporary = tempfile.TemporaryDirectory(prefix="openalign-count-", dir=self.spill_dir)
            self._partition_files = [Path(self._temporary.name) / f"part-{i:02d}.u64"
                                     for i in range(self.PARTITIONS)]
        if not self._chunks:
            return
        values = np.concatenate(self._chunks)
        self.spills += 1
        partition = (values >> np.uint64(60)).astype(np.int64)  # top 4 bits pick one of 16 partitions
        for index, path in enumerate(self._partition_files):
            with open(path, "ab") as handle:
                values[partition == index].tofile(handle)
        self._chunks, self._in_memory = [], 0

    def finish(self, threshold: int) -> None:
        """Count everything added and keep the hashes occurring more than `threshold` times."""
        self._flush_buffer()
        heavy_hashes, heavy_counts = [], []
        if self._temporary is None:
            parts = [np.concatenate(self._chunks)] if self._chunks else []
        else:
            self._spill()
            parts = (np.fromfile(path, dtype=np.uint64) for path in self._partition_files if path.exists())
        for values in parts:
            unique, counts = np.unique(values, return_counts=True)
            heavy_hashes.append(unique[counts > threshold])
            heavy_counts.append(counts[counts > threshold])
        self._chunks = []
        if self._temporary is not None:
            self._temporary.cleanup()
            self._temporary = None
        if heavy_hashes:
            order_hashes = np.concatenate(heavy_hashes)
            order = np.argsort(order_hashes)
            self.heavy_hashes = order_hashes[order]
            self.heavy_counts = np.concatenate(heavy_counts)[order]

    def count_if_heavy(self, value: int) -> int:
        """The exact count of a hash that occurs more than the threshold given to `finish`, else 0."""
        position = int(np.searchsorted(self.heavy_hashes, np.uint64(value)))
        if position < len(self.heavy_hashes) and int(self.heavy_hashes[position]) == value:
            return int(self.heavy_counts[position])
        return 0
