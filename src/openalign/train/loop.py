"""One training step and one validation pass, given the pieces `trainer.py` builds.

A step: both towers -> features -> contrastive loss against the global batch -> backward (exact feature-cached
accumulation when the batch is split) -> a finiteness check -> clip -> optimiser step. The finiteness check runs
before the optimiser touches the weights, so a NaN or inf loss or gradient never reaches them: the step is
skipped (gradients dropped, BatchNorm statistics restored) or the run halts with the step and the loss value.

`build_stepper` wires a Stepper for a model and its loss; the trainer, the demo's step-time probe and the
training benchmark all take their step from it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from openalign.distributed import average_gradients, gather_features, world_info
from openalign.errors import OpenAlignError
from openalign.eval.retrieval import retrieval_metrics
from openalign.losses import ContrastiveLoss
from openalign.train.gradcache import accumulated_step, split_batch

logger = logging.getLogger(__name__)

TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


class NonFiniteLossError(OpenAlignError, FloatingPointError):
    """The loss or the gradient norm of a step was NaN or infinite and the run is set to halt."""


class DualEncoderFeatures(nn.Module):
    """The model as one module that maps a batch to (image_features, text_features), each (B, D), unnormalised.

    This is what DDP / FSDP / torch.compile wrap, so both towers run inside one wrapped forward. A frozen tower
    runs without a graph.
    """

    def __init__(self, model: nn.Module, freeze_text: bool = False, freeze_vision: bool = False):
        super().__init__()
        self.model = model
        self.freeze_text, self.freeze_vision = freeze_text, freeze_vision

    def forward(self, pixel_values, input_ids, attention_mask, token_type_ids):
        with torch.no_grad() if self.freeze_vision else contextlib.nullcontext():
            image_features = self.model.get_image_features(pixel_values)  # (B, D)
        with torch.no_grad() if self.freeze_text else contextlib.nullcontext():
            text_features = self.model.get_text_features(input_ids, attention_mask, token_type_ids)  # (B, D)
        return image_features, text_features


@dataclass
class StepResult:
    """What one step did: its loss (nan when not finite), gradient norm, and whether the update was skipped."""

    loss: float
    grad_norm: float
    skipped: bool
    image_ssl_loss: float | None = None  # the self-supervised term's share of `loss`, when it is on


@dataclass
class Stepper:
    """Runs training steps; built once by the trainer.

    `features`: the (wrapped) DualEncoderFeatures; `loss_fn(image_features, text_features)` -> 0-d loss over the
    global batch; `loss_parameters`: the scalars the loss uses that need gradients (the temperature), and
    `outside_parameters` those of them no DDP/FSDP wrapper reduces (a loss's own logit scale).
    """

    features: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    parameters: list[torch.Tensor]
    loss_parameters: list[torch.Tensor] = field(default_factory=list)
    outside_parameters: list[torch.Tensor] = field(default_factory=list)
    device: torch.device = torch.device("cpu")
    autocast_dtype: torch.dtype | None = None
    channels_last: bool = False
    accumulation: int = 1
    grad_clip: float | None = None
    nan_policy: str = "halt"
    after_step: Callable[[], None] | None = None  # e.g. the CLIP scale clamp, the EMA update
    norm_buffers: list[torch.Tensor] = field(default_factory=list)  # BatchNorm statistics to restore on skip
    image_ssl: nn.Module | None = None  # an ImageSelfSupervision: a label-free second term (train/image_ssl.py)
    # With nan_policy skip: this many skipped steps in a row, or this many since the run began (skipped_steps,
    # restored on resume), mean the run diverged, and stop it with NonFiniteLossError. None: no limit.
    max_consecutive_skips: int | None = None
    max_skips: int | None = None
    skipped_steps: int = 0
    # Per-pair weights of a batch's losses from its keys and the step number (train/pair_estimates.py), or None
    # for an unweighted step; None: never weighted.
    pair_weights: Callable[[list[str], int], torch.Tensor | None] | None = None

    def __post_init__(self):
        self._saved_buffers = [buffer.clone() for buffer in self.norm_buffers] if self.nan_policy == "skip" else []
        self._consecutive_skips = 0

    def autocast(self):
        """Mixed precision for the towers' forward (the loss runs in float32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def to_device(self, batch: dict) -> tuple[torch.Tensor, ...]:
        """(pixel_values, input_ids, attention_mask, token_type_ids) on the training device."""
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        pixel_values = batch["pixel_values"].to(self.device, non_blocking=True, memory_format=memory_format)
        text = [batch[key].to(self.device, non_blocking=True) for key in TEXT_KEYS]
        return (pixel_values, *text)

    def encode(self, tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of a (micro-)batch, cast to float32 for the loss."""
        with self.autocast():
            image_features, text_features = self.features(*tensors)
        return image_features.float(), text_features.float()

    def step(self, batch: dict, step_number: int) -> StepResult:
        """One optimiser step on `batch`; `step_number` (1-based) names the step in messages and sets the
        image term's weight while it warms up."""
        if self._saved_buffers:
            torch._foreach_copy_(self._saved_buffers, self.norm_buffers)
        tensors = self.to_device(batch)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        weights = None if self.pair_weights is None else self.pair_weights(batch["keys"], step_number)
        loss_fn = self.loss_fn if weights is None else functools.partial(self.loss_fn, pair_weights=weights)
        image_ssl_loss = None
        if self.accumulation == 1:
            loss, image_ssl_loss = self._loss(tensors, step_number, loss_fn)
            self.scaler.scale(loss).backward()
            loss = loss.detach()
        else:
            loss = accumulated_step(
                self.encode, lambda image, text: loss_fn(image, text) * scale,
                split_batch(tensors, self.accumulation), self.loss_parameters, model=self.features,
            ) / scale
        average_gradients(self.outside_parameters)
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        with_gradients = [parameter for parameter in self.parameters if parameter.grad is not None]
        gradients = [parameter.grad for parameter in with_gradients]
        grad_norm = torch.nn.utils.get_total_norm(gradients) if gradients else torch.zeros((), device=self.device)
        # Under FSDP2 the norm is a DTensor (already reduced over shards): clip with it, check its plain value.
        plain_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        # With a grad scaler, inf gradients are its business (it lowers the scale and skips); only the loss counts.
        finite = torch.isfinite(loss) if self.scaler.is_enabled() else torch.isfinite(loss) & torch.isfinite(plain_norm)
        bad = (~finite).float()
        if world_info().world_size > 1:
            dist.all_reduce(bad)  # every rank must take the same decision, or DDP deadlocks at the next step
        skipped = bool(bad.item())
        if skipped:
            self._non_finite(step_number, float(loss), float(plain_norm))
        else:
            self._consecutive_skips = 0
            if self.grad_clip:
                # It takes the parameters: given their gradients, it would scale the gradients' (absent) .grad.
                torch.nn.utils.clip_grads_with_norm_(with_gradients, self.grad_clip, grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.after_step is not None:
                self.after_step()
        self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            # A skipped first step trips PyTorch's "scheduler before optimizer" heuristic; the schedule still
            # follows the step count, which is what we want.
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.scheduler.step()
        return StepResult(float(loss), float(plain_norm), skipped,
                          None if image_ssl_loss is None else float(image_ssl_loss))

    def _loss(self, tensors: tuple[torch.Tensor, ...], step_number: int | None = None, loss_fn=None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the loss of a whole batch, its self-supervised part or None). With the image term on, the second
        views ride in the same image-tower forward as the batch (one forward per step, as DDP expects).
        `loss_fn`: the step's (weighted) loss, default the stepper's."""
        loss_fn = self.loss_fn if loss_fn is None else loss_fn
        if self.image_ssl is None:
            return loss_fn(*self.encode(tensors)), None
        pixels = tensors[0]
        views = self.image_ssl.second_views(pixels)  # (n, 3, H, W)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        both = torch.cat([pixels, views]).contiguous(memory_format=memory_format)
        image_features, text_features = self.encode((both, *tensors[1:]))  # (B + n, D), (B, D)
        first, second = image_features[:len(pixels)], image_features[len(pixels):]
        image_ssl_loss = self.image_ssl(first[:len(second)], second, step_number)
        return loss_fn(first, text_features) + image_ssl_loss, image_ssl_loss.detach()

    def _non_finite(self, step_number: int, loss: float, grad_norm: float) -> None:
        message = (f"step {step_number}: non-finite loss or gradient (loss {loss}, gradient norm {grad_norm}); "
                   "the weights were not updated")
        if self.nan_policy == "halt":
            raise NonFiniteLossError(message + "; resume from the last checkpoint, perhaps with a lower "
                                     "optim.lr or run.nan_policy=skip")
        self.skipped_steps += 1
        self._consecutive_skips += 1
        for count, limit, what in ((self._consecutive_skips, self.max_consecutive_skips, "in a row"),
                                   (self.skipped_steps, self.max_skips, "since the run began")):
            if limit is not None and count > limit:
                raise NonFiniteLossError(
                    f"{message}; {count} steps skipped {what}, over the limit of {limit} "
                    "(run.max_consecutive_skipped_steps / run.max_skipped_steps): the run has diverged. Resume "
                    "from a checkpoint before it with a lower optim.lr, or raise the limit")
        logger.warning("%s; skipping it (run.nan_policy=skip)", message)
        if self._saved_buffers:
            torch._foreach_copy_(self.norm_buffers, self._saved_buffers)  # the bad batch's statistics too


@torch.no_grad()
def validate(stepper: Stepper, model: nn.Module, loader, max_batches: int | None = None) -> dict[str, float]:
    """Contrastive loss (the training loss, global batches) and image<->text R@1/5/10 on a held-out loader.

    Every rank reads its share; features are gathered so every rank returns the same numbers. The model runs
    in eval mode (BatchNorm running statistics, no dropout) and is put back in training mode after.
    """
    was_training = model.training
    model.eval()
    losses, image_parts, text_parts = [], [], []
    try:
        for index, batch in enumerate(loader):
            if max_batches is not None and index >= max_batches:
                break
            image_features, text_features = stepper.encode(stepper.to_device(batch))
            losses.append(stepper.loss_fn(image_features, text_features))
            all_image, all_text = gather_features(image_features, text_features, gather_with_grad=False)
            image_parts.append(all_image.cpu())
            text_parts.append(all_text.cpu())
    finally:
        model.train(was_training)
        if hasattr(model, "reshard"):
            # FSDP2 keeps the root's parameters gathered after a forward without backward; the optimiser and
            # its state dict know the sharded ones.
            model.reshard()
    if not losses:
        raise OpenAlignError("the validation set yielded no batch; give more samples or a smaller batch size")
    loss = torch.stack(losses).mean()
    if world_info().world_size > 1:
        dist.all_reduce(loss)
        loss /= world_info().world_size
    image_embeds, text_embeds = torch.cat(image_parts), torch.cat(text_parts)  # (N, D) each, pairs aligned
    metrics = retrieval_metrics(image_embeds, text_embeds, torch.arange(len(text_embeds)))
    result = {"val_loss": float(loss), "val_num_pairs": int(len(text_embeds))}
    for direction in ("image_to_text", "text_to_image"):
        for k in (1, 5, 10):
            result[f"val_{direction}_r{k}"] = float(metrics[f"{direction}_r{k}"])
    result["val_chance_r1"] = 1.0 / len(text_embeds)  # recall is a fraction, as everywhere
    return result


def norm_buffers(module: nn.Module) -> list[torch.Tensor]:
    """Every BatchNorm layer's running statistics and batch count in `module`."""
    return [buffer for layer in module.modules() if isinstance(layer, nn.modules.batchnorm._BatchNorm)
            for buffer in (layer.running_mean, layer.running_var, layer.num_batches_tracked)
            if buffer is not None]


def build_stepper(
    model: nn.Module,
    loss: ContrastiveLoss,
    optimizer: torch.optim.Optimizer,
    *,
    features: nn.Module | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    image_ssl: nn.Module | None = None,
    device: torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    accumulation: int = 1,
    grad_clip: float | None = None,
    nan_policy: str = "halt",
    skip_limits: tuple[int | None, int | None] = (None, None),
) -> Stepper:
    """The Stepper that trains `model` with `loss` (attached to it, see `ContrastiveLoss.attach`) and optionally
    the image term, as the trainer runs it: the loss called with the scalars it declares, the scalars that need
    gradients differentiated through accumulation, the loss's and the image term's own parameters averaged over
    ranks by hand, the loss's `after_step` after each update, and the gradient norm taken over every trainable
    parameter of the three. `features`: the model's (wrapped, compiled) DualEncoderFeatures (default: a plain
    one); `scheduler`: default a constant learning rate; `scaler`: default off; `device`: default the CPU;
    `skip_limits`: (most skipped steps in a row, most in all) under nan_policy skip (TrainConfig.skip_limits)."""
    device = torch.device("cpu") if device is None else device
    modules = nn.ModuleList([model, loss] if image_ssl is None else [model, loss, image_ssl])
    outside = loss.own_parameters() + ([] if image_ssl is None else list(image_ssl.parameters()))
    return Stepper(
        features=DualEncoderFeatures(model) if features is None else features, loss_fn=loss.bind(model),
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0) if scheduler is None else scheduler,
        scaler=torch.amp.GradScaler(device.type, enabled=False) if scaler is None else scaler,
        parameters=[parameter for parameter in modules.parameters() if parameter.requires_grad],
        loss_parameters=loss.trained_scalars(model), outside_parameters=outside, device=device,
        autocast_dtype=autocast_dtype, channels_last=channels_last, accumulation=accumulation, grad_clip=grad_clip,
        nan_policy=nan_policy, after_step=loss.after_step, norm_buffers=norm_buffers(modules), image_ssl=image_ssl,
        max_consecutive_skips=skip_limits[0], max_skips=skip_limits[1],
    )
