"""A toy dual encoder and the worker that multi-process tests run in each rank (gloo, CPU, float64).

Each rank trains one step on its slice of a fixed global batch and saves its loss and gradients; the test
process compares them with a single process computing on the whole batch.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import torch
from torch import nn

from tests.parity import randomise_batchnorm

IMAGE_DIM, VOCAB_SIZE, TOKENS_PER_TEXT, EMBED_DIM = 6, 30, 4, 5


class ToyDualEncoder(nn.Module):
    """An MLP image tower with BatchNorm and dropout, an embedding-bag text tower; unnormalised features."""

    def __init__(self, dropout: float = 0.0, temperature: float = 0.5):
        super().__init__()
        self.image_tower = nn.Sequential(
            nn.Linear(IMAGE_DIM, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, EMBED_DIM)
        )
        self.text_tower = nn.EmbeddingBag(VOCAB_SIZE, 8, mode="mean")
        self.text_projection = nn.Linear(8, EMBED_DIM)
        self.temperature = nn.Parameter(torch.tensor(temperature))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_tower(images)  # (B, D)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text_projection(self.text_tower(tokens))  # (B, T) -> (B, D)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(images), self.encode_text(tokens)


def make_model(seed: int = 0, dropout: float = 0.0) -> ToyDualEncoder:
    """The same float64 toy model on every rank; BatchNorm statistics randomised so eval mode matters."""
    torch.manual_seed(seed)
    model = ToyDualEncoder(dropout=dropout).double()
    return randomise_batchnorm(model, torch.Generator().manual_seed(seed), spread=0.5)


def make_batch(batch_size: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed global batch: images (B, IMAGE_DIM) float64, tokens (B, TOKENS_PER_TEXT)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, IMAGE_DIM, generator=generator, dtype=torch.float64)
    tokens = torch.randint(0, VOCAB_SIZE, (batch_size, TOKENS_PER_TEXT), generator=generator)
    return images, tokens


def free_port() -> int:
    """A TCP port nobody listens on now (bound to port 0 and released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(worker: Callable, world_size: int, args: tuple, timeout_s: float = 60.0) -> None:
    """Run ``worker(rank, world_size, port, *args)`` in ``world_size`` processes; fail rather than hang."""
    import torch.multiprocessing as mp

    port = free_port()
    context = mp.start_processes(worker, args=(world_size, port, *args), nprocs=world_size, join=False)
    import time

    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.terminate()
            raise TimeoutError(f"distributed workers did not finish within {timeout_s} s")


def setup(rank: int, world_size: int, port: int) -> None:
    """Join a gloo group on localhost, one thread per process (2 cores shared)."""
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size), RANK=str(rank),
        LOCAL_RANK=str(rank),
    )  # fmt: skip
    from openalign.distributed import init_distributed

    info = init_distributed(backend="gloo", timeout_s=60)
    assert info.world_size == world_size and info.rank == rank


def gradients(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """The gradient of every parameter that has one, by name (tests compare the sets of names too)."""
    return {prefix + name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


SCENARIOS = ("align_local", "align_global", "align_gather_no_grad", "clip", "siglip", "bn_per_replica",
             "bn_synced", "gradcache", "rcl", "rince_weighted", "align_weighted_global")  # fmt: skip


def pair_weights_of(images: torch.Tensor) -> torch.Tensor:
    """A weight in (0, 1) for each sample, a function of the sample alone (so a rank's slice gets its rows')."""
    return torch.sigmoid(images.flatten(1).sum(dim=1))


def run_step(scenario: str, images: torch.Tensor, tokens: torch.Tensor, num_shards: int = 1) -> dict:
    """One training step of a fresh toy model on (images, tokens); returns loss, gradients, BatchNorm buffers.

    In a process group the model is DDP-wrapped and the batch is this rank's slice; in a single process it is
    the oracle. ``num_shards`` > 1 (single process only) encodes the batch in that many slices, so BatchNorm
    in training mode sees the same per-replica statistics as the ranks.
    """
    from openalign.distributed import average_gradients, wrap_model
    from openalign.losses import AlignLoss, ClipLoss, ComplementaryContrastiveLoss, RobustInfoNCELoss, SigLipLoss
    from openalign.train.gradcache import accumulated_step, split_batch

    model = make_model()
    # Otherwise eval: BatchNorm is then the same function on any split of the batch.
    model.train(scenario in ("bn_per_replica", "bn_synced"))
    wrapped = wrap_model(model, "ddp", sync_batchnorm=scenario == "bn_synced")
    loss_module: nn.Module
    if scenario == "clip":
        loss_module = ClipLoss()
        loss_fn = lambda i, t: loss_module(i, t, model.temperature)  # noqa: E731  (as the log-scale)
    elif scenario == "siglip":
        loss_module = SigLipLoss(logit_scale_init=None)  # scale from the model (DDP), bias owned by the loss
        loss_fn = lambda i, t: loss_module(i, t, model.temperature)  # noqa: E731
    elif scenario == "rcl":
        loss_module = ComplementaryContrastiveLoss()
        loss_fn = lambda i, t: loss_module(i, t, model.temperature)  # noqa: E731
    elif scenario in ("rince_weighted", "align_weighted_global"):
        loss_module = (RobustInfoNCELoss(q=0.5, lam=0.05) if scenario == "rince_weighted"
                       else AlignLoss(local_loss=False))
        weights = pair_weights_of(images)
        loss_fn = lambda i, t: loss_module(i, t, model.temperature, pair_weights=weights)  # noqa: E731
    else:
        loss_module = AlignLoss(
            local_loss=scenario != "align_global", gather_with_grad=scenario != "align_gather_no_grad"
        )
        loss_fn = lambda i, t: loss_module(i, t, model.temperature)  # noqa: E731

    if scenario == "gradcache":
        micro_batches = split_batch((images, tokens), 2)
        loss = accumulated_step(
            lambda batch: wrapped(*batch), loss_fn, micro_batches, [model.temperature], model=wrapped
        )
    else:
        shards = zip(images.chunk(num_shards), tokens.chunk(num_shards))
        image_features, text_features = (torch.cat(parts) for parts in zip(*(wrapped(*s) for s in shards)))
        loss = loss_fn(image_features, text_features)
        loss.backward()
    average_gradients(loss_module.parameters())
    batch_norm = model.image_tower[1]
    return {
        "loss": loss.detach(),
        "grads": gradients(model) | gradients(loss_module, prefix="loss."),
        "running_mean": batch_norm.running_mean.clone(),
        "running_var": batch_norm.running_var.clone(),
    }


def worker(rank: int, world_size: int, port: int, global_batch: int, out_dir: str) -> None:
    """Run every scenario on this rank's slice of the global batch and save the results per rank."""
    setup(rank, world_size, port)
    images, tokens = make_batch(global_batch)
    local = slice(rank * global_batch // world_size, (rank + 1) * global_batch // world_size)
    results = {scenario: run_step(scenario, images[local], tokens[local]) for scenario in SCENARIOS}
    results["fsdp"] = try_fsdp(images[local], tokens[local])
    results["helpers"] = helpers(rank)
    results["pairs"] = pair_estimates_over_ranks(global_batch, local)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    from openalign.distributed import destroy_distributed

    destroy_distributed()


def pair_estimates_over_ranks(global_batch: int, local: slice) -> dict:
    """Per-pair estimates after three steps in which each rank observes its slice of the global batch (keys and
    match probabilities gathered in rank order): the state every rank holds."""
    from openalign.train.pair_estimates import PairEstimates

    estimates = PairEstimates(momentum=0.5, mixture_every=3)
    for step in range(1, 4):
        keys, probabilities = pair_batch(global_batch, step)
        estimates.observe_step(keys[local], probabilities[local], epoch=step, step=step)
    return estimates.state_dict()


def pair_batch(global_batch: int, step: int) -> tuple[list[str], torch.Tensor]:
    """The keys and match probabilities of step `step`'s global batch (a different order each step)."""
    generator = torch.Generator().manual_seed(step)
    order = torch.randperm(global_batch, generator=generator).tolist()
    return [f"pair-{index}" for index in order], torch.rand(global_batch, generator=generator)


def helpers(rank: int) -> dict:
    """What the small helpers return on this rank, and the error for unequal batch sizes across ranks."""
    from openalign import distributed

    distributed.barrier()
    try:
        distributed.all_gather_with_grad(torch.zeros(rank + 1, 2))  # rank 0 holds 1 row, rank 1 holds 2
        unequal_error = None
    except ValueError as error:
        unequal_error = str(error)
    return {
        "world": tuple(distributed.world_info())[:3],
        "rank_and_world_size": distributed.rank_and_world_size(),
        "is_main": distributed.is_main_process(),
        "broadcast": distributed.broadcast_object({"from": rank}),
        "unequal_error": unequal_error,
        "objects": distributed.all_gather_objects({"rank": rank}),
        "sum": distributed.sum_over_ranks(rank + 1.5),
        "max": distributed.max_over_ranks(float(rank)),
        "mean": distributed.mean_over_ranks(rank + 1.5),
        "any": (distributed.any_rank(rank == 1), distributed.any_rank(False)),
    }


def try_fsdp(images: torch.Tensor, tokens: torch.Tensor) -> dict:
    """One FSDP2 step on gloo/CPU: its loss and full gradients, or the error that stopped it."""
    from openalign.distributed import wrap_model
    from openalign.losses import AlignLoss

    try:
        model = make_model()
        model.eval()
        wrapped = wrap_model(model, "fsdp", shard_modules=[model.image_tower, model.text_tower])
        image_features, text_features = wrapped(images, tokens)
        loss = AlignLoss()(image_features, text_features, model.temperature)
        loss.backward()
        grads = {}
        for name, parameter in model.named_parameters():
            grad = parameter.grad
            grads[name] = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
        return {"loss": loss.detach(), "grads": grads}
    except Exception as error:  # reported by the test, which says FSDP2 cannot run here
        return {"error": f"{type(error).__name__}: {error}"}
