"""`train(config)`: build the model, data, loss, optimiser and schedule a TrainConfig describes, then run it.

The order matters: the model is built and (on resume) loaded before it is wrapped for DDP/FSDP, the optimiser
is built over the wrapped parameters, and the data position, RNG states and step come back last, so a resumed
run continues the same sequence of batches, dropout masks and updates as a run never interrupted.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from openalign.distributed import (
    barrier,
    broadcast_object,
    destroy_distributed,
    init_distributed,
    is_main_process,
    world_info,
    wrap_model,
)
from openalign.errors import CheckpointError, ConfigError
from openalign.model_config import AlignConfig
from openalign.models.align import AlignModel
from openalign.pretrained import load_into, read_state_dict
from openalign.processing.tokenizer import AlignTokenizer
from openalign.train import checkpointing
from openalign.train.builders import build_contrastive_loss, build_loaders, build_model
from openalign.train.config import TrainConfig, trajectory_differences
from openalign.train.ema import ModelEma
from openalign.train.image_ssl import build_image_ssl
from openalign.train.loop import DualEncoderFeatures, Stepper, temperature_of, validate
from openalign.train.optim import build_optimizer, freeze_tower
from openalign.train.run_log import MetricsLog, Progress
from openalign.train.schedule import build_scheduler, set_total_steps

logger = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainResult:
    """What a run ended with: its folder, last step, why it stopped, and its last logged metrics."""

    run_dir: Path
    step: int
    stop_reason: str  # "finished" or "time_budget"
    last_checkpoint: Path | None
    metrics: dict[str, Any] = field(default_factory=dict)
    skipped_steps: int = 0
    skipped_samples: int = 0


def _norm_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [buffer for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)
            for buffer in (module.running_mean, module.running_var, module.num_batches_tracked)
            if buffer is not None]


# -- state ---------------------------------------------------------------------------------------------------


def _all_ranks(value: Any, world_size: int) -> list[Any]:
    if world_size == 1:
        return [value]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, value)
    return gathered


def _optimizer_state(holder: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool) -> dict:
    if not fsdp:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(holder, optimizer, options=options)


def _load_optimizer_state(holder: nn.Module, optimizer: torch.optim.Optimizer, state: dict, fsdp: bool) -> None:
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(holder, optimizer, state, options=StateDictOptions(full_state_dict=True))


def _model_state(model: AlignModel, fsdp: bool) -> dict[str, torch.Tensor]:
    if not fsdp:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class _ModelWriter:
    """What `save_checkpoint` needs of a model (save_pretrained), for a state dict gathered from shards."""

    def __init__(self, config: AlignConfig, state_dict: dict[str, torch.Tensor]):
        self.config, self.state_dict = config, state_dict

    def save_pretrained(self, folder) -> None:
        from openalign.pretrained import write_checkpoint

        write_checkpoint(folder, self.config, self.state_dict)


# -- the run -------------------------------------------------------------------------------------------------


def train(config: TrainConfig, resume: str | None = None, *, overwrite: bool = False,
          force: bool = False) -> TrainResult:
    """Train as `config` says, resuming from a checkpoint ("latest" or a folder) when `resume` is given.

    A fresh run refuses a run.out_dir holding another run's checkpoints unless `overwrite` (which removes
    them); a resume refuses a checkpoint written with a configuration that differs in anything changing the
    updates (train.config.trajectory_differences, listed in the error) unless `force`.

    Works in one process and under torchrun (one process per device; DDP, or FSDP2 with
    distributed.strategy=fsdp). Writes config.yaml, metrics.jsonl, checkpoint-*/ folders, model/ (the final
    weights; model-ema/ too with an EMA) and plots/ into run.out_dir.
    """
    config.validate()
    info = init_distributed(config.distributed.backend)
    try:
        result = _train(config, resume, info, overwrite=overwrite, force=force)
        # Leave the group together: rank 0 is still writing the model and plots when the others finish, and a
        # rank that tears its gloo connections down while a peer still holds them open can abort the process.
        barrier()
        return result
    finally:
        destroy_distributed()


def _train(config: TrainConfig, resume: str | None, info, *, overwrite: bool, force: bool) -> TrainResult:
    run, optim = config.run, config.optim
    world_size, rank = info.world_size, info.rank
    main = is_main_process()
    device = info.device if run.device == "auto" else torch.device(run.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device = 'cuda' but no CUDA device is visible")
    if run.dtype == "fp16" and device.type != "cuda":
        raise ConfigError("run.dtype = 'fp16' needs CUDA (a grad scaler on CPU is not supported); use bf16")
    fsdp = config.distributed.strategy == "fsdp" and world_size > 1
    if fsdp and run.ema_decay is not None:
        raise ConfigError("run.ema_decay is not supported with distributed.strategy = 'fsdp'")
    run_dir = Path(run.out_dir)
    if not resume:
        checkpointing.prepare_fresh_run(run_dir, overwrite, remove=main)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpointing.remove_stale_temporaries(run_dir)

    random.seed(run.seed)
    np.random.seed(run.seed)
    torch.manual_seed(run.seed)  # the same initial weights on every rank
    if not config.data.tokenizer:
        raise ConfigError("data.tokenizer is empty: give a folder with tokenizer.json or vocab.txt")
    tokenizer = AlignTokenizer.from_pretrained(config.data.tokenizer, max_length=config.data.max_length)
    model = build_model(config, tokenizer.vocab_size)

    checkpoint_folder, trainer_state = None, None
    if resume:
        checkpoint_folder = Path(broadcast_object(
            str(checkpointing.resolve_checkpoint(run_dir, resume)) if main else None))
        load_into(model, read_state_dict(checkpoint_folder), source=str(checkpoint_folder))
        trainer_state = checkpointing.load_trainer_state(checkpoint_folder)
        logger.info("resuming from %s (step %d)", checkpoint_folder, trainer_state["step"])
        differences = trajectory_differences(trainer_state.get("config") or {}, config.to_dict())
        if differences and not force:
            raise ConfigError(f"{checkpoint_folder} was written with another configuration: {'; '.join(differences)}"
                              ". Resume with the run's own settings, or pass --force to continue with these")
        for difference in differences:
            logger.warning("resuming with a changed setting (--force): %s", difference)
    if main:  # only once the run is accepted: a refused resume leaves the folder's config as it was
        config.save(run_dir / "config.yaml")

    pooler = getattr(model.text_model, "pooler", None)
    if pooler is not None:
        pooler.requires_grad_(False)  # ALIGN embeds [CLS] without the pooler: it never gets a gradient
    if config.model.freeze_text:
        freeze_tower(model, "text_model")
        model.text_projection.requires_grad_(False)
    if config.model.freeze_vision:
        freeze_tower(model, "vision_model")
    checkpointing_mode = config.model.gradient_checkpointing
    model.gradient_checkpointing_enable(text=checkpointing_mode in ("text", "both"),
                                        vision=checkpointing_mode in ("vision", "both"))
    # FSDP2 cannot shard channels-last (non-contiguous) conv weights.
    channels_last = run.channels_last if isinstance(run.channels_last, bool) else device.type == "cpu" and not fsdp
    if channels_last and fsdp:
        raise ConfigError("run.channels_last = true does not work with distributed.strategy = 'fsdp' "
                          "(FSDP2 shards only contiguous parameters); use 'auto' or false")
    model.to(device)
    if channels_last:
        model.vision_model.to(memory_format=torch.channels_last)

    loss_name = config.loss.name
    loss_module = build_contrastive_loss(config.loss, float(model.temperature.detach())).to(device)
    if loss_name == "align":
        loss_parameters = [model.temperature] if model.temperature.requires_grad else []
        outside_parameters = []

        def loss_fn(image_features, text_features):
            return loss_module(image_features, text_features, model.temperature)
    else:
        model.temperature.requires_grad_(False)  # the loss owns its scale
        loss_parameters = outside_parameters = [p for p in loss_module.parameters() if p.requires_grad]
        loss_fn = loss_module

    image_ssl = build_image_ssl(config.loss, model.config.projection_dim)
    if image_ssl is not None:
        image_ssl.to(device)
        outside_parameters = [*outside_parameters, *image_ssl.parameters()]  # no DDP wrapper averages them

    features = DualEncoderFeatures(model, config.model.freeze_text, config.model.freeze_vision)
    shard_modules = [model.text_model, model.vision_model] if fsdp else None
    features = wrap_model(features, config.distributed.strategy, config.distributed.sync_batchnorm,
                          shard_modules=shard_modules)
    training_only = [loss_module] if image_ssl is None else [loss_module, image_ssl]
    holder = nn.ModuleList([model, *training_only])  # every trainable parameter, for the optimiser
    # The optimiser state under FSDP is keyed through the sharded root (the wrapped features module).
    state_holder = nn.ModuleList([features, *training_only]) if fsdp else holder
    optimizer = build_optimizer(optim.name, holder, optim.lr, optim.weight_decay, optim.betas, optim.eps)
    scheduler = build_scheduler(optimizer, optim.warmup_steps, optim.total_steps, optim.schedule,
                                optim.min_lr_ratio)
    scaler = torch.amp.GradScaler(device.type, enabled=run.dtype == "fp16")
    ema = ModelEma(model, run.ema_decay) if run.ema_decay is not None else None
    if run.compile:
        features = torch.compile(features)

    train_loader, val_loader = build_loaders(config, tokenizer, model.config.vision_config.image_size,
                                             pin_memory=device.type == "cuda")
    after_step = (lambda: loss_module.clamp_()) if loss_name == "clip" else None
    stepper = Stepper(
        features=features, loss_fn=loss_fn, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
        parameters=[p for p in holder.parameters() if p.requires_grad], loss_parameters=loss_parameters,
        outside_parameters=outside_parameters, device=device, autocast_dtype=AUTOCAST_DTYPES[run.dtype],
        channels_last=channels_last, accumulation=optim.accumulation, grad_clip=optim.grad_clip,
        nan_policy=run.nan_policy, after_step=after_step, norm_buffers=_norm_buffers(holder), image_ssl=image_ssl,
    )
    stepper.max_consecutive_skips, stepper.max_skips = config.skip_limits()

    step, skipped_steps, total_steps = 0, 0, optim.total_steps
    torch.manual_seed(run.seed + 1_000_003 * rank)  # dropout differs across ranks
    if trainer_state is not None:
        step, skipped_steps = trainer_state["step"], trainer_state["skipped_steps"]
        stepper.skipped_steps = skipped_steps
        if run.fit_steps_to_time:  # go on with the plan as re-planned, not the config's first guess
            total_steps = trainer_state.get("total_steps", total_steps)
            set_total_steps(scheduler, total_steps)
        _load_optimizer_state(state_holder, optimizer, trainer_state["optimizer"], fsdp)
        scheduler.load_state_dict(trainer_state["scheduler"])
        scaler.load_state_dict(trainer_state["scaler"])
        loss_module.load_state_dict(trainer_state["loss"])
        saved_ssl = trainer_state.get("image_ssl")
        if (saved_ssl is None) != (image_ssl is None):
            raise CheckpointError(f"{checkpoint_folder} was written with loss.image_ssl_weight "
                                  f"{'> 0' if saved_ssl is not None else '= 0'}; resume with the same setting")
        if image_ssl is not None:
            image_ssl.load_state_dict(saved_ssl)
        if ema is not None:
            ema.load_state_dict(trainer_state["ema"])
        train_loader.load_state_dict(trainer_state["data"])
        rng_states = trainer_state["rng"]
        if len(rng_states) != world_size:
            raise CheckpointError(f"{checkpoint_folder} was written by {len(rng_states)} processes, this run has "
                                  f"{world_size}: an exact resume needs the same number")
        checkpointing.set_rng_state(rng_states[rank])

    log = MetricsLog(run_dir, enabled=main, tensorboard=run.tensorboard,
                     resume_step=step if trainer_state is not None else None)
    progress = Progress(total_steps, step, enabled=main and run.progress)
    global_batch = optim.batch_size * world_size
    start_time = time.monotonic()
    window = {"losses": [], "ssl_losses": [], "start": time.monotonic(), "steps": 0}
    fit = _TimeFit(60 * run.max_minutes, optim.warmup_steps, world_size) if run.fit_steps_to_time else None
    last_record: dict[str, Any] = {}
    last_checkpoint, stop_reason = checkpoint_folder, "finished"

    def save(step_number: int) -> Path:
        state = {
            "step": step_number, "skipped_steps": skipped_steps, "total_steps": total_steps,
            "optimizer": _optimizer_state(state_holder, optimizer, fsdp), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "loss": loss_module.state_dict(),
            "image_ssl": image_ssl.state_dict() if image_ssl is not None else None,
            "ema": ema.state_dict() if ema is not None else None, "data": train_loader.state_dict(),
            "rng": _all_ranks(checkpointing.rng_state(), world_size), "config": config.to_dict(),
        }
        weights = _ModelWriter(model.config, _model_state(model, fsdp))
        folder = run_dir / checkpointing.checkpoint_name(step_number)
        if main:
            folder = checkpointing.save_checkpoint(run_dir, step_number, weights, state, keep_last=run.keep_last)
        barrier()
        return folder

    data_iterator = iter(train_loader)
    try:
        while step < total_steps:
            try:
                batch = next(data_iterator)
            except StopIteration:  # an epoch ended: the loader moved to the next one
                data_iterator = iter(train_loader)
                continue
            learning_rate = optimizer.param_groups[0]["lr"]
            result = stepper.step(batch, step + 1)
            step += 1
            skipped_steps += result.skipped
            if ema is not None and not result.skipped:
                ema.update(model)
            if not result.skipped:
                window["losses"].append(result.loss)
                if result.image_ssl_loss is not None:
                    window["ssl_losses"].append(result.image_ssl_loss)
            window["steps"] += 1
            out_of_time = run.max_minutes is not None and _agree(
                time.monotonic() - start_time > 60 * run.max_minutes, world_size)
            if fit is not None:
                planned = fit.replan(step, total_steps, time.monotonic() - start_time)
                if planned != total_steps:
                    total_steps = planned
                    set_total_steps(scheduler, total_steps)
                    progress.set_total(total_steps)
            checkpoint_now = step % run.checkpoint_every == 0 or step == total_steps or out_of_time
            temperature = temperature_of(loss_name, model, loss_module)
            if step % run.log_every == 0 or checkpoint_now:
                elapsed = time.monotonic() - window["start"]
                last_record = {
                    "step": step, "epoch": train_loader.epoch,
                    "loss": _window_mean(window["losses"], world_size),
                    "temperature": temperature, "lr": learning_rate, "grad_norm": result.grad_norm,
                    "samples_per_s": global_batch * window["steps"] / max(elapsed, 1e-9),
                    "skipped_samples": int(_sum_over_ranks(sum(train_loader.skipped.values()), world_size)),
                    "skipped_steps": skipped_steps, "elapsed_s": time.monotonic() - start_time,
                    "total_steps": total_steps,
                }
                if image_ssl is not None:  # its share of `loss`, averaged like it
                    last_record["image_ssl_loss"] = _window_mean(window["ssl_losses"], world_size)
                log.write(last_record)
                progress.update(window["steps"], loss=last_record["loss"], temp=temperature,
                                samples_s=last_record["samples_per_s"])
                window = {"losses": [], "ssl_losses": [], "start": time.monotonic(), "steps": 0}
            if val_loader is not None and ((run.val_every and step % run.val_every == 0)
                                           or step == total_steps or out_of_time):
                val_record = {"step": step, **validate(stepper, features, val_loader)}
                log.write(val_record)
                last_record = {**last_record, **val_record}
                window["start"] = time.monotonic()  # validation time is not training throughput
            if checkpoint_now:
                last_checkpoint = save(step)
            if fit is not None:
                fit.resume_clock()  # validation and checkpoints are not step time
            if out_of_time:
                stop_reason = "time_budget"
                logger.info("run.max_minutes = %s reached at step %d; stopping", run.max_minutes, step)
                break
        final_weights = _model_state(model, fsdp)  # a collective under FSDP: every rank takes part
        if main:
            _ModelWriter(model.config, final_weights).save_pretrained(run_dir / "model")
            if ema is not None:
                ema.module.save_pretrained(run_dir / "model-ema")
    finally:
        progress.close()
        log.close()
    if main and run.plots:
        from openalign.train.plots import plot_run

        plot_run(run_dir)
    return TrainResult(run_dir, step, stop_reason, last_checkpoint, last_record, skipped_steps,
                       sum(train_loader.skipped.values()))


class _TimeFit:
    """`run.fit_steps_to_time`: the total step count that ends the schedule with the time budget.

    Every step is timed (data loading included; validation and checkpointing not). After the warm-up, while
    the decay is in its first quarter, every step re-plans: total = step + (margin x budget - elapsed) / (mean
    of the last WINDOW step times), the slowest rank's mean under torch.distributed so that every rank plans
    the same. Near the start of a cosine or linear decay the learning rate hardly depends on the total, so the
    re-plans move it by little; a first epoch slowed by decoding (images cached after it) is outgrown by the
    window before the plan settles."""

    WINDOW = 30
    MARGIN = 0.98  # of the budget: the last checkpoint and the model files are written after the last step

    def __init__(self, budget_seconds: float, warmup_steps: int, world_size: int, clock=time.monotonic):
        self.budget, self.warmup_steps, self.world_size, self.clock = budget_seconds, warmup_steps, world_size, clock
        self.durations: collections.deque[float] = collections.deque(maxlen=self.WINDOW)
        self.last = clock()

    def resume_clock(self) -> None:
        """Start the next step's timing now."""
        self.last = self.clock()

    def replan(self, step: int, total_steps: int, elapsed: float) -> int:
        """The total step count after step `step` (1-based) with `elapsed` seconds gone."""
        now = self.clock()
        self.durations.append(now - self.last)
        self.last = now
        decaying = step - self.warmup_steps
        if decaying < 0 or decaying > 0.25 * (total_steps - self.warmup_steps) or len(self.durations) < self.WINDOW:
            return total_steps
        seconds = _max_over_ranks(sum(self.durations) / len(self.durations), self.world_size)
        remaining = max(0.0, self.MARGIN * self.budget - elapsed)
        return max(step + 1, self.warmup_steps, step + math.floor(remaining / seconds))


def _agree(flag: bool, world_size: int) -> bool:
    """True on every rank when it is true on any (all ranks must stop at the same step)."""
    return _max_over_ranks(float(flag), world_size) > 0


def _max_over_ranks(value: float, world_size: int) -> float:
    """A per-rank number's largest value over ranks."""
    return _sum_over_ranks(value, world_size, op=dist.ReduceOp.MAX)


def _window_mean(values: list[float], world_size: int) -> float:
    """The mean over the logging window's steps (NaN for none) and over ranks: each rank's loss covers its rows
    of the global batch, so the mean of the ranks' losses is the global loss."""
    return _sum_over_ranks(sum(values) / len(values) if values else float("nan"), world_size) / world_size


def _sum_over_ranks(value: float, world_size: int, op=dist.ReduceOp.SUM) -> float:
    """A per-rank number summed over ranks (or reduced by another `op`)."""
    if world_size == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=world_info().device)
    dist.all_reduce(total, op=op)
    return float(total.item())
