"""Per-pair clean estimates inside training: how likely each training pair is to be clean (its caption about its
image), from what every step already computes, and the weights they give each pair's loss.

Each step the loss leaves every pair's in-batch match probability (the softmax probability of its own partner,
mean of both directions; `ContrastiveLoss.last_match_probability`). A pair's estimate is an exponential moving
average of it over the pair's visits (one a epoch), kept per pair key. Every `mixture_every` steps a
two-component Gaussian mixture is fitted to the estimates' logits over all pairs seen; a pair's clean
probability is its posterior under the component with the higher mean, made non-decreasing in the estimate (a
wider low component must not claim the very best pairs). After the warm-up, with weighting on, each pair's loss
is weighted by its clean probability (`losses.weighted_mean`).

State and memory: one open-addressing table keyed by a 64-bit hash of the pair's key (BLAKE2b; two keys of
100M collide with probability about 3e-4), holding per slot the hash (8 bytes), the estimate (4), the visit
count (4) and the last epoch it was visited in (4): 20 bytes a slot, at most 0.7 full, so about 29 bytes a pair
(2.9 GB at 100M pairs, in RAM on every process). Every process holds the whole table and applies the whole
global batch's updates in rank order, so the state is the same on every rank and equal to one process's on
the same global batches; a checkpoint saves it once (`state_dict`, plain tensors under the trainer state).
Beyond a few hundred million pairs, sharding the table by hash over ranks (an all-to-all of keys and
probabilities per step) is the next step; it is not built.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from openalign.errors import ConfigError, OpenAlignError

WEIGHTINGS = ("off", "mixture")
_INITIAL_CAPACITY = 1 << 12
_MAX_LOAD = 0.7
_MIXTURE_SAMPLE = 1_000_000  # pairs the mixture is fitted on (a random sample beyond that)
_LOGIT_FLOOR = 1e-6


class PairKeyError(OpenAlignError, ValueError):
    """A pair key came twice in one epoch: per-pair estimates need every pair once an epoch."""


def key_hashes(keys: Sequence[str]) -> np.ndarray:
    """(n,) int64: a stable 64-bit hash of each key (BLAKE2b), the same in every process and run."""
    return np.array([int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                                    "little", signed=True) for key in keys], dtype=np.int64)


@dataclass
class Mixture:
    """A two-component 1-D Gaussian mixture over logit(estimate): the low (mismatched) and high (clean)
    components' weights, means and standard deviations, and whether the two are apart enough to weight by."""

    weights: tuple[float, float] = (0.5, 0.5)
    means: tuple[float, float] = (0.0, 0.0)
    stds: tuple[float, float] = (1.0, 1.0)
    separated: bool = False
    fitted_at_step: int = 0

    def clean_probability(self, estimates: np.ndarray) -> np.ndarray:
        """(n,) float32 posterior of the high component for each estimate, non-decreasing in the estimate;
        1 everywhere while the mixture is not separated."""
        if not self.separated:
            return np.ones(len(estimates), dtype=np.float32)
        x = _logit(estimates)
        order = np.argsort(x, kind="stable")
        posterior = _posterior_high(x[order], self)
        result = np.empty(len(x), dtype=np.float32)
        result[order] = np.maximum.accumulate(posterior)
        return result


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _LOGIT_FLOOR, 1.0 - _LOGIT_FLOOR)
    return np.log(p) - np.log1p(-p)


def _log_densities(x: np.ndarray, mixture: Mixture) -> np.ndarray:
    """(n, 2) log of each component's weighted density at x."""
    means, stds, weights = (np.asarray(value)[None, :] for value in (mixture.means, mixture.stds, mixture.weights))
    return np.log(weights) - np.log(stds) - 0.5 * ((x[:, None] - means) / stds) ** 2 - 0.5 * math.log(2 * math.pi)


def _posterior_high(x: np.ndarray, mixture: Mixture) -> np.ndarray:
    log_density = _log_densities(x, mixture)
    return np.exp(log_density[:, 1] - np.logaddexp(log_density[:, 0], log_density[:, 1]))


def fit_mixture(estimates: np.ndarray, step: int = 0, iterations: int = 100, min_separation: float = 1.0,
                seed: int = 0) -> Mixture:
    """EM for two 1-D Gaussians on logit(estimates), started at the quartiles. `separated` when the means are at
    least `min_separation` pooled standard deviations apart and each component holds at least 2% of the pairs:
    otherwise the pairs look alike and weighting by the posterior would only add noise."""
    x = _logit(estimates)
    if len(x) > _MIXTURE_SAMPLE:
        x = np.random.default_rng(seed).choice(x, _MIXTURE_SAMPLE, replace=False)
    if len(x) < 10 or float(x.std()) < 1e-6:
        return Mixture(fitted_at_step=step)
    low, high = np.quantile(x, [0.25, 0.75])
    spread = max(float(x.std()), 1e-3)
    mixture = Mixture((0.5, 0.5), (float(low), float(high)), (spread / 2, spread / 2), True, step)
    for _ in range(iterations):
        log_density = _log_densities(x, mixture)
        responsibility = np.exp(log_density - np.logaddexp(log_density[:, :1], log_density[:, 1:]))  # (n, 2)
        mass = responsibility.sum(axis=0) + 1e-12
        means = (responsibility * x[:, None]).sum(axis=0) / mass
        variances = (responsibility * (x[:, None] - means) ** 2).sum(axis=0) / mass
        stds = np.sqrt(np.maximum(variances, (1e-3 * spread) ** 2))
        mixture = Mixture(tuple(float(m) / len(x) for m in mass), tuple(float(m) for m in means),
                          tuple(float(s) for s in stds), True, step)
    if mixture.means[0] > mixture.means[1]:  # component 1 is the clean (high) one
        mixture = Mixture(mixture.weights[::-1], mixture.means[::-1], mixture.stds[::-1], True, step)
    pooled = math.sqrt((mixture.stds[0] ** 2 + mixture.stds[1] ** 2) / 2)
    separated = (mixture.means[1] - mixture.means[0]) >= min_separation * pooled and min(mixture.weights) >= 0.02
    return Mixture(mixture.weights, mixture.means, mixture.stds, bool(separated), step)


class PairEstimates:
    """The per-pair estimates of one run (module docstring): `observe` each step's keys and match
    probabilities, `weights` for a batch's keys, `refit` the mixture, `state_dict` / `load_state_dict` with the
    run's checkpoints, `lookup` to write them out."""

    def __init__(self, momentum: float = 0.5, weighting: str = "off", warmup_fraction: float = 0.0,
                 mixture_every: int = 50, total_steps: int = 1, check_repeats: bool = True):
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"loss.pair_ema_momentum must lie in [0, 1), got {momentum}")
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"loss.pair_weighting = {weighting!r}; choose one of {list(WEIGHTINGS)}")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ConfigError(f"loss.pair_weighting_warmup must lie in [0, 1), got {warmup_fraction}")
        self.momentum, self.weighting, self.warmup_fraction = momentum, weighting, warmup_fraction
        self.mixture_every, self.total_steps, self.check_repeats = mixture_every, total_steps, check_repeats
        self.mixture = Mixture()
        self._allocate(_INITIAL_CAPACITY)

    def _allocate(self, capacity: int) -> None:
        self.hashes = np.zeros(capacity, dtype=np.int64)
        self.used = np.zeros(capacity, dtype=bool)
        self.estimate = np.zeros(capacity, dtype=np.float32)
        self.visits = np.zeros(capacity, dtype=np.int32)
        self.epoch = np.full(capacity, -1, dtype=np.int32)
        self.count = 0

    def __len__(self) -> int:
        return self.count

    @property
    def warmup_steps(self) -> int:
        """Steps before the weighting starts: the warm-up fraction of the run's (possibly re-planned) total."""
        return round(self.warmup_fraction * self.total_steps)

    @classmethod
    def from_config(cls, loss, total_steps: int) -> PairEstimates:
        """The estimates a TrainConfig's loss section asks for (`loss.tracks_pairs`)."""
        return cls(momentum=loss.pair_ema_momentum, weighting=loss.pair_weighting,
                   warmup_fraction=loss.pair_weighting_warmup, mixture_every=loss.pair_mixture_every,
                   total_steps=total_steps)

    # -- the table ----------------------------------------------------------------------------------------

    def _find(self, hashes: np.ndarray, insert: bool) -> np.ndarray:
        """(n,) slot of each hash (-1 where absent and not inserting); linear probing from hash mod capacity."""
        capacity = len(self.hashes)
        slots = np.full(len(hashes), -1, dtype=np.int64)
        probe = (hashes.view(np.uint64) % np.uint64(capacity)).astype(np.int64)
        pending = np.arange(len(hashes))
        while pending.size:
            at = probe[pending]
            match = self.used[at] & (self.hashes[at] == hashes[pending])
            slots[pending[match]] = at[match]
            empty = ~self.used[at]
            if insert and empty.any():
                # Each empty slot goes to the first pending hash that reached it; another hash that reached it
                # looks at it again next round (and finds its own hash there if it is the same key).
                free, first = np.unique(at[empty], return_index=True)
                claim = pending[empty][first]
                self.used[free], self.hashes[free] = True, hashes[claim]
                self.count += len(claim)
                slots[claim] = free
            occupied_by_another = ~match & ~empty
            probe[pending[occupied_by_another]] = (at[occupied_by_another] + 1) % capacity
            # Without inserting, an empty slot ends the search: the hash is absent.
            pending = pending[slots[pending] < 0] if insert else pending[occupied_by_another]
        return slots

    def _grow_for(self, new_keys: int) -> None:
        if self.count + new_keys <= _MAX_LOAD * len(self.hashes):
            return
        capacity = len(self.hashes)
        while self.count + new_keys > _MAX_LOAD * capacity:
            capacity *= 2
        old = self.hashes[self.used], self.estimate[self.used], self.visits[self.used], self.epoch[self.used]
        self._allocate(capacity)
        slots = self._find(old[0], insert=True)
        self.estimate[slots], self.visits[slots], self.epoch[slots] = old[1], old[2], old[3]

    # -- training -------------------------------------------------------------------------------------------

    def observe(self, keys: Sequence[str], match_probability: np.ndarray, epoch: int) -> None:
        """Fold one global batch's match probabilities into its pairs' estimates (the first visit sets it).
        A key seen before in the same `epoch` is a PairKeyError naming it."""
        hashes = key_hashes(keys)
        if len(np.unique(hashes)) != len(hashes):
            repeated = next(key for key, count in zip(keys, np.unique(hashes, return_counts=True)[1]) if count > 1)
            raise PairKeyError(self._repeat_message(keys, hashes, epoch, repeated))
        self._grow_for(len(hashes))
        slots = self._find(hashes, insert=True)
        if self.check_repeats:
            again = self.epoch[slots] == epoch
            if again.any():
                raise PairKeyError(self._repeat_message(keys, hashes, epoch, keys[int(np.argmax(again))]))
        first = self.visits[slots] == 0
        probability = np.asarray(match_probability, dtype=np.float32)
        self.estimate[slots] = np.where(first, probability,
                                        self.momentum * self.estimate[slots] + (1 - self.momentum) * probability)
        self.visits[slots] += 1
        self.epoch[slots] = epoch

    @staticmethod
    def _repeat_message(keys: Sequence[str], hashes: np.ndarray, epoch: int, repeated: str | None) -> str:
        return (f"pair key {repeated!r} comes twice in epoch {epoch}: per-pair estimates (loss.pair_estimates, "
                "loss.pair_weighting) need every pair's key once an epoch; give the rows distinct keys (image "
                "paths, shard sample keys), or turn the estimates off")

    def weights(self, keys: Sequence[str], step: int) -> np.ndarray | None:
        """(n,) float32 weights of these pairs' losses at `step` (1-based), or None for unweighted: before the
        warm-up ends, with weighting off, or while the mixture does not separate the pairs. A pair not seen
        yet weighs 1."""
        if self.weighting == "off" or step <= self.warmup_steps or not self.mixture.separated:
            return None
        slots = self._find(key_hashes(keys), insert=False)
        seen = slots >= 0
        weights = np.ones(len(keys), dtype=np.float32)
        weights[seen] = self.mixture.clean_probability(self.estimate[slots[seen]])
        return weights

    def weight_tensor(self, keys: Sequence[str], step: int, device: torch.device) -> torch.Tensor | None:
        """`weights` as a float32 tensor on `device` (what the loss takes), or None."""
        weights = self.weights(keys, step)
        return None if weights is None else torch.from_numpy(weights).to(device)

    def observe_step(self, keys: Sequence[str], match_probability: torch.Tensor, epoch: int, step: int) -> None:
        """After a step: fold the global batch's match probabilities in (this rank's keys and probabilities
        gathered from every rank, in rank order, so every rank's table stays the same) and refit the mixture when
        it is time."""
        from openalign.distributed import all_gather_objects, world_info

        probabilities = match_probability.detach().float().cpu().numpy()
        if world_info().world_size > 1:
            gathered = all_gather_objects((list(keys), probabilities.tolist()))
            keys = [key for rank_keys, _ in gathered for key in rank_keys]
            probabilities = np.array([p for _, rank_probabilities in gathered for p in rank_probabilities],
                                     dtype=np.float32)
        self.observe(keys, probabilities, epoch)
        self.maybe_refit(step)

    def maybe_refit(self, step: int) -> bool:
        """Fit the mixture again every `mixture_every` steps; True when it did."""
        if self.mixture_every <= 0 or step % self.mixture_every or self.count == 0:
            return False
        self.refit(step)
        return True

    def refit(self, step: int) -> Mixture:
        """Fit the mixture to every seen pair's estimate now."""
        seen = self.used & (self.visits > 0)
        self.mixture = fit_mixture(self.estimate[seen], step=step, seed=step)
        return self.mixture

    # -- reading out ----------------------------------------------------------------------------------------

    def lookup(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(estimate, clean probability, visits) of each key, NaN / NaN / 0 for keys never seen."""
        slots = self._find(key_hashes(keys), insert=False)
        seen = slots >= 0
        estimate = np.full(len(keys), np.nan, dtype=np.float32)
        estimate[seen] = self.estimate[slots[seen]]
        clean = np.full(len(keys), np.nan, dtype=np.float32)
        if seen.any():
            clean[seen] = self.mixture.clean_probability(estimate[seen])
        visits = np.zeros(len(keys), dtype=np.int32)
        visits[seen] = self.visits[slots[seen]]
        return estimate, clean, visits

    def summary(self) -> dict:
        """What the log records: pairs seen, mean estimate and the mixture (means as probabilities)."""
        seen = self.used & (self.visits > 0)
        mixture = self.mixture
        return {"pairs": int(seen.sum()), "mean_estimate": float(self.estimate[seen].mean()) if seen.any() else None,
                "mixture_separated": mixture.separated, "mixture_clean_weight": mixture.weights[1],
                "mixture_means": [float(1 / (1 + math.exp(-m))) for m in mixture.means]}

    # -- checkpoints ----------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Plain tensors and numbers (loadable with torch.load(weights_only=True)): the used slots only."""
        used = np.flatnonzero(self.used)
        mixture = self.mixture
        return {"slots": torch.from_numpy(used), "hashes": torch.from_numpy(self.hashes[used].copy()),
                "estimate": torch.from_numpy(self.estimate[used].copy()),
                "visits": torch.from_numpy(self.visits[used].copy()),
                "epoch": torch.from_numpy(self.epoch[used].copy()),
                "capacity": len(self.hashes),
                "mixture": {"weights": list(mixture.weights), "means": list(mixture.means),
                            "stds": list(mixture.stds), "separated": mixture.separated,
                            "fitted_at_step": mixture.fitted_at_step}}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` saved, slot for slot: the same table, so the same sums in the same order."""
        self._allocate(int(state["capacity"]))
        slots = state["slots"].numpy()
        self.used[slots], self.hashes[slots] = True, state["hashes"].numpy()
        self.count = len(slots)
        self.estimate[slots] = state["estimate"].numpy()
        self.visits[slots] = state["visits"].numpy()
        self.epoch[slots] = state["epoch"].numpy()
        saved = state["mixture"]
        self.mixture = Mixture(tuple(saved["weights"]), tuple(saved["means"]), tuple(saved["stds"]),
                               bool(saved["separated"]), int(saved["fitted_at_step"]))


# -- the run as a curation pass -------------------------------------------------------------------------------

SCORES_FOLDER = "pair-scores"  # RUN/pair-scores/: the estimates at the end of the run, a scoring folder
_ROWS_PER_GROUP = 65_536
_UNSCORED_LISTED = 20


def write_scores(estimates: PairEstimates, source: str, folder: str | Path, description: str) -> dict:
    """Write the estimates of every pair of the training `source` into `folder` as a scoring folder
    (openalign.data.score_files): scores.parquet in source order (index, key, caption, score = the estimate,
    then clean_probability and visits) and scoring.json; pairs never visited are left out and counted as
    unscored. Returns scoring.json's content."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from openalign.data.score_files import SCORES_FILE, SCORES_SCHEMA, SCORING_FILE
    from openalign.data.sources import iter_records
    from openalign.files import atomic_write

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    schema = SCORES_SCHEMA.append(pa.field("clean_probability", pa.float32())).append(pa.field("visits", pa.int32()))
    counts = {"scored": 0, "unscored": 0}
    unscored: list[dict] = []

    def write_group(writer, indices: list[int], keys: list[str], captions: list) -> None:
        estimate, clean, visits = estimates.lookup(keys)
        seen = visits > 0
        counts["scored"] += int(seen.sum())
        counts["unscored"] += int((~seen).sum())
        unscored.extend({"source": key, "error": "not visited by the run"}
                        for key in np.asarray(keys, dtype=object)[~seen][:_UNSCORED_LISTED - len(unscored)])
        writer.write_table(pa.table({
            "index": pa.array(np.asarray(indices, dtype=np.int64)[seen]),
            "key": pa.array(np.asarray(keys, dtype=object)[seen].tolist(), type=pa.string()),
            "caption": pa.array(np.asarray(captions, dtype=object)[seen].tolist(), type=pa.string()),
            "score": pa.array(estimate[seen]), "clean_probability": pa.array(clean[seen]),
            "visits": pa.array(visits[seen]),
        }, schema=schema))

    def write(temporary: Path) -> None:
        with pq.ParquetWriter(temporary, schema) as writer:
            indices, keys, captions = [], [], []
            for index, record in enumerate(iter_records(source)):
                indices.append(index)
                keys.append(record.key)
                captions.append(record.caption)
                if len(keys) == _ROWS_PER_GROUP:
                    write_group(writer, indices, keys, captions)
                    indices, keys, captions = [], [], []
            if keys or counts["scored"] + counts["unscored"] == 0:
                write_group(writer, indices, keys, captions)

    atomic_write(folder / SCORES_FILE, write)
    mixture = estimates.mixture
    scoring = {"kind": "pair_estimates", "model": description, "source": str(source), **counts,
               "unscored_pairs": unscored,
               "score": "each pair's average in-batch match probability over its visits (loss.pair_ema_momentum)",
               "mixture": {"separated": mixture.separated, "fitted_at_step": mixture.fitted_at_step,
                           "clean_weight": mixture.weights[1]}}
    atomic_write(folder / SCORING_FILE, lambda path: path.write_text(json.dumps(scoring, indent=1) + "\n"))
    return scoring
