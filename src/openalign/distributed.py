"""torch.distributed helpers: process-group setup, feature gathering with gradient, model wrapping.

Where the world_size factor goes: ``all_gather_with_grad`` sums the gathered tensor's gradients over ranks in
its backward, so each rank's features receive the gradient of the *sum* of all ranks' local losses, i.e.
world_size times the gradient of their mean (the global loss). DDP and FSDP then *average* parameter gradients
over ranks, which divides by world_size again: the optimiser sees exactly the gradient of the single-process
loss over the global batch. Nothing has to be rescaled by hand; scalars outside the wrapped model (a loss that
owns its temperature) only receive their rank's local gradient, so ``average_gradients`` them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from openalign.errors import ConfigError


@dataclass(frozen=True)
class WorldInfo:
    """Where this process sits: world size, global rank, rank on its node, and its device."""

    world_size: int
    rank: int
    local_rank: int
    device: torch.device

    def __iter__(self):
        return iter((self.world_size, self.rank, self.local_rank, self.device))


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(backend: str | None = None, timeout_s: float = 1800.0) -> WorldInfo:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT).

    Backend: nccl when CUDA is available, gloo otherwise, unless given. Each rank takes cuda:LOCAL_RANK.
    Without torchrun's variables (a plain ``python train.py``) this joins nothing and returns world size 1.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not _is_distributed():
        from datetime import timedelta

        backend = backend or ("nccl" if use_cuda else "gloo")
        if backend not in ("nccl", "gloo"):
            raise ConfigError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
        if backend == "nccl" and not use_cuda:
            raise ConfigError("backend 'nccl' needs CUDA, and no CUDA device is visible")
        dist.init_process_group(
            backend=backend,
            timeout=timedelta(seconds=timeout_s),
            device_id=device if backend == "nccl" else None,
        )
    return world_info()


def rank_and_world_size(from_environment: bool = False) -> tuple[int, int]:
    """(rank, world size) of this process: the process group's when one is initialised, else (0, 1).

    ``from_environment``: without a process group, torchrun's RANK and WORLD_SIZE variables instead of (0, 1),
    for work that splits itself over ranks without collectives (the parts of an embedding folder).
    """
    if _is_distributed():
        return dist.get_rank(), dist.get_world_size()
    if from_environment:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return 0, 1


def world_info() -> WorldInfo:
    """World size, rank, local rank and device of this process; (1, 0, 0, cpu/cuda) when not distributed."""
    # The device init_distributed chose: the current CUDA device when there is one, whatever the backend.
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    device = device or torch.device("cpu")
    rank, world_size = rank_and_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank)) if _is_distributed() else 0
    return WorldInfo(world_size, rank, local_rank, device)


def is_main_process() -> bool:
    """True on global rank 0 (and when not distributed): the process that logs and writes files."""
    return world_info().rank == 0


def barrier() -> None:
    """Wait for every rank; a no-op in a single process."""
    if _is_distributed():
        dist.barrier()


def broadcast_object(value: Any, source_rank: int = 0) -> Any:
    """Return rank ``source_rank``'s ``value`` on every rank (any picklable object)."""
    if not _is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=source_rank)
    return holder[0]


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value`` (any picklable object), in rank order; ``[value]`` in a single process."""
    if not _is_distributed() or dist.get_world_size() == 1:
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _reduce_number(value: float, op: dist.ReduceOp) -> float:
    """A per-rank number reduced over ranks by ``op`` (in float64, on this process's device)."""
    if not _is_distributed() or dist.get_world_size() == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=world_info().device)
    dist.all_reduce(total, op=op)
    return float(total.item())


def sum_over_ranks(value: float) -> float:
    """A per-rank number summed over ranks (e.g. samples skipped); the number itself in a single process."""
    return _reduce_number(value, dist.ReduceOp.SUM)


def max_over_ranks(value: float) -> float:
    """A per-rank number's largest value over ranks (e.g. the slowest rank's step time)."""
    return _reduce_number(value, dist.ReduceOp.MAX)


def mean_over_ranks(value: float) -> float:
    """The mean of a per-rank number over ranks: with equal local batches, the mean of the ranks' losses is the
    loss of the global batch."""
    return sum_over_ranks(value) / world_info().world_size


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any, so that all ranks take the same branch (stopping at the
    same step: a rank that stops alone leaves the others waiting in a collective)."""
    return max_over_ranks(float(flag)) > 0


def destroy_distributed() -> None:
    """Leave the process group, if one was joined."""
    if _is_distributed():
        dist.destroy_process_group()


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's tensor along dim 0; backward hands each rank the sum of all ranks' gradients
    for its own slice, since every rank's loss may depend on it."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        world_size, rank = dist.get_world_size(), dist.get_rank()
        ctx.rank, ctx.batch_size = rank, tensor.shape[0]
        gathered = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(gathered, tensor.contiguous())
        return torch.cat(gathered, dim=0)  # (W * B, ...)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        # all_reduce + slice rather than reduce_scatter: gloo has no reduce_scatter.
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.batch_size
        return grad[start : start + ctx.batch_size]


def _check_equal_batches(tensor: torch.Tensor) -> None:
    sizes = torch.tensor([tensor.shape[0]], device=tensor.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(dist.get_world_size())]
    dist.all_gather(all_sizes, sizes)
    all_sizes = [int(size) for size in all_sizes]
    if len(set(all_sizes)) != 1:
        raise ValueError(f"every rank must hold the same batch size to gather features, got {all_sizes}")


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' (B, ...) tensors concatenated to (world_size * B, ...), differentiable.

    The backward sums the gradients of all ranks (see the module docstring for the world_size factor).
    Every rank must hold the same B; this is checked and a mismatch raises ValueError naming the sizes.
    Returns the tensor itself in a single process.
    """
    if not _is_distributed() or dist.get_world_size() == 1:
        return tensor
    _check_equal_batches(tensor)
    return _AllGatherWithGrad.apply(tensor)


def _all_gather_no_grad(tensor: torch.Tensor) -> torch.Tensor:
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.detach().contiguous())
    # Keep the local slice in the graph, so each rank still gets the gradient of its own loss terms.
    gathered[dist.get_rank()] = tensor
    return torch.cat(gathered, dim=0)


def gather_features(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    gather_with_grad: bool = True,
    local_loss: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text features (B, D) of this rank -> those of the global batch (N, D), in rank order.

    ``gather_with_grad=True`` is exact: DDP's averaged gradients equal the single-process gradients of the loss
    over the global batch, with ``local_loss`` either way. Without it only the local slice carries gradient,
    which drops the terms other ranks' losses contribute (and, for a full N x N loss, scales the gradient by
    1/world_size): cheaper, not exact. ``local_loss`` is accepted so callers can pass their loss config
    through; the gathered tensors are the same either way. Returns the inputs in a single process.
    """
    del local_loss  # only changes how the caller uses the result
    if not _is_distributed() or dist.get_world_size() == 1:
        return image_features, text_features
    if gather_with_grad:
        return all_gather_with_grad(image_features), all_gather_with_grad(text_features)
    _check_equal_batches(image_features)
    return _all_gather_no_grad(image_features), _all_gather_no_grad(text_features)


def average_gradients(parameters: Iterable[torch.Tensor]) -> None:
    """Average ``.grad`` over ranks in place, for parameters no DDP/FSDP wrapper reduces (a loss's own
    temperature); a no-op in a single process and for parameters without a gradient."""
    if not _is_distributed():
        return
    world_size = dist.get_world_size()
    for parameter in parameters:
        if parameter.grad is not None:
            dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
            parameter.grad.div_(world_size)


class CrossReplicaBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training-mode statistics cover the global batch, on any backend (gloo/CPU included).

    Each rank sends (count, mean, sum of squared deviations) per channel through ``all_gather_with_grad`` and
    combines them with the parallel-variance formula, so the gradient also flows through the other ranks'
    statistics and DDP's average gives the single-process gradient on the concatenated batch. Running
    statistics get the global mean and unbiased variance, the same on every rank. Accepts (B, C) and
    (B, C, ...) inputs; outside training or a process group it is plain BatchNorm. Ranks may hold different B.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of 2 or more dimensions (B, C, ...), got shape {tuple(input.shape)}")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not (self.training and _is_distributed() and dist.get_world_size() > 1):
            return super().forward(input)
        dims = [0, *range(2, input.dim())]  # every dimension but the channels
        shape = [1, -1] + [1] * (input.dim() - 2)  # broadcasts (C,) over (B, C, ...)
        count = input.numel() // input.shape[1]
        mean = input.mean(dims)  # (C,)
        squared_deviations = (input - mean.view(shape)).square().sum(dims)  # (C,)
        counts = torch.full((1,), float(count), dtype=mean.dtype, device=mean.device)
        stats = all_gather_with_grad(torch.cat([counts, mean, squared_deviations]).unsqueeze(0))  # (W, 1 + 2C)
        rank_counts, rank_means, rank_squared = stats[:, :1], *stats[:, 1:].chunk(2, dim=1)  # (W, 1), (W, C)
        total = rank_counts.sum()
        global_mean = (rank_counts * rank_means).sum(0) / total  # (C,)
        deviations = rank_squared + rank_counts * (rank_means - global_mean).square()  # (W, C)
        global_var = deviations.sum(0) / total  # (C,), biased, as used to normalise
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = global_var * total / (total - 1).clamp(min=1)
                self.running_mean.lerp_(global_mean.detach().to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), momentum)
        output = (input - global_mean.view(shape)) * torch.rsqrt(global_var.view(shape) + self.eps)
        if self.affine:
            output = output * self.weight.view(shape) + self.bias.view(shape)
        return output


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer of ``module`` by a ``CrossReplicaBatchNorm`` sharing its weights."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CrossReplicaBatchNorm):
        converted = CrossReplicaBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
        )
        # Share the very tensors (dtype, device, and the Parameters an optimiser built earlier may hold).
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            setattr(converted, name, getattr(module, name))
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_batchnorm(child))
    return module


def wrap_model(
    model: nn.Module,
    strategy: str = "ddp",
    sync_batchnorm: bool = False,
    find_unused_parameters: bool = False,
    shard_modules: Iterable[nn.Module] | None = None,
    **ddp_kwargs: Any,
) -> nn.Module:
    """Wrap a model for data parallelism: "ddp" (default), "fsdp" (FSDP2 ``fully_shard``) or "none".

    In a single process every strategy returns the model unchanged (after the BatchNorm conversion).
    BatchNorm: per-replica statistics by default, as the ALIGN paper; ``sync_batchnorm=True`` synchronises
    them: ``nn.SyncBatchNorm`` on CUDA (PyTorch implements it only on GPU), ``CrossReplicaBatchNorm`` on CPU.
    DDP keeps its defaults (``broadcast_buffers=True``: BatchNorm running statistics follow rank 0).
    FSDP2: ``fully_shard`` is applied to each module of ``shard_modules`` (e.g. the two towers, or their
    blocks; default: every direct child that holds parameters), then to the root; 0-d parameters stay
    replicated, their gradients averaged by a hook (FSDP2 cannot shard them). DDP and FSDP2 both average
    gradients over ranks; see the module docstring for why that gives the global-batch gradient.
    """
    if strategy not in ("ddp", "fsdp", "none"):
        raise ConfigError(f"strategy must be 'ddp', 'fsdp' or 'none', got {strategy!r}")
    if sync_batchnorm:
        on_gpu = world_info().device.type == "cuda"
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model) if on_gpu else convert_batchnorm(model)
    if strategy == "none" or not _is_distributed():
        return model
    if strategy == "ddp":
        device = world_info().device
        device_ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=find_unused_parameters, **ddp_kwargs
        )
    from torch.distributed.fsdp import fully_shard

    if shard_modules is None:
        shard_modules = [child for child in model.children() if any(True for _ in child.parameters())]
    # FSDP2 refuses 0-d parameters (the temperature): keep them replicated and average their gradients in a
    # hook, which is linear, so accumulating over several backward passes stays correct.
    scalars = {parameter for parameter in model.parameters() if parameter.ndim == 0}
    for module in shard_modules:
        fully_shard(module, ignored_params=scalars)
    fully_shard(model, ignored_params=scalars)
    for parameter in scalars:
        parameter.register_post_accumulate_grad_hook(_average_gradient_hook)
    return model


def _average_gradient_hook(parameter: torch.Tensor) -> None:
    dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
    parameter.grad.div_(dist.get_world_size())


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 shards in place, so its model is already the module)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
