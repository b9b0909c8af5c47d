"""Batches from an ImageTextDataset, and the data position that makes a resumed run exact.

Every batch is built by one worker from one stream and reports that stream's position after it. Batches
arrive round-robin from workers that all yield the same number of batches, so the loader's state is the
latest position of each worker stream plus which stream serves next. Restoring those positions, and rotating
the workers so the first batch comes from that stream, makes the resumed batches equal, key for key and pixel
for pixel, to an uninterrupted run's. The state is the same on every rank, since ranks move in lockstep.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

from openalign.errors import ConfigError

if TYPE_CHECKING:
    from openalign.data.dataset import ImageTextDataset

START = (0, 0, 0, 0)  # segment, records taken from it, records consumed, samples yielded


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
    """A DataLoader over an ImageTextDataset that knows its exact data position (see the module docstring).

    Iterating runs one epoch and moves to the next; `skipped` counts the samples skipped so far, by reason.
    """

    def __init__(self, dataset: ImageTextDataset, batch_size: int, num_workers: int = 0, **kwargs: Any):
        if kwargs.get("persistent_workers"):
            raise ConfigError("persistent_workers=True would keep stale resume positions in the workers")
        if kwargs.get("in_order") is False:
            raise ConfigError("in_order=False lets batches overtake each other, so positions would not be exact")
        # DataLoader draws a worker base seed per iterator; from its own generator, so a resume mid-epoch
        # leaves the trainer's global RNG where an uninterrupted run has it (samples are seeded per position).
        kwargs.setdefault("generator", torch.Generator().manual_seed(dataset.seed))
        super().__init__(dataset, batch_size=batch_size, num_workers=num_workers,
                         collate_fn=Collate(dataset.tokenize), **kwargs)
        self.num_streams = max(1, num_workers)
        # Settle rank, world size and the sample count here, once, before workers copy the dataset.
        dataset.resolve_placement()
        self.batches_per_epoch()
        self.epoch = dataset.epoch
        self.positions = [START] * self.num_streams
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
            stream, *position = batch["position"]
            local = stream % self.num_streams
            self.positions[local] = tuple(position)
            self.next_stream = (local + 1) % self.num_streams
            self.skipped.update(batch["skipped_reasons"])
            yield batch
        self.epoch += 1
        self.positions = [START] * self.num_streams
        self.next_stream = 0

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning at the next iteration."""
        self.epoch, self.positions, self.next_stream = epoch, [START] * self.num_streams, 0

    def state_dict(self) -> dict[str, Any]:
        """The data position after the last batch handed out (the same on every rank), and this rank's skips."""
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
        # "skipped" holds the saving rank's own counts: restored on rank 0 only, so a sum over ranks never
        # counts them twice (other ranks' counts from before the cut are not in a rank-0 checkpoint).
        self.skipped = Counter(state.get("skipped", {}) if self.dataset.rank == 0 else {})


def make_loader(dataset: ImageTextDataset, batch_size: int, num_workers: int = 0,
                **kwargs: Any) -> ResumableLoader:
    """A resumable DataLoader whose batches hold pixel_values (B, 3, H, W), token tensors, captions, keys,
    num_skipped, skipped_reasons and position; extra keyword arguments go to DataLoader."""
    return ResumableLoader(dataset, batch_size, num_workers, **kwargs)
