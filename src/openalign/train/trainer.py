"""`train(config)`: build the model, data, loss, optimiser and schedule a TrainConfig describes, then run it.

The order matters: the model is built and (on resume) loaded before it is wrapped for DDP/FSDP, the optimiser
is built over the wrapped parameters, and the data position, RNG states and step come back last, so a resumed
run continues the same sequence of batches, dropout masks and updates as a run never interrupted.

In parts, in that order: `_start` (checks, run folder, seeds), `build_model`, `_read_checkpoint`, `_build` (loss,
wrapper, optimiser, loaders, stepper), `_restore`, then `_loop` (with `_log_window`, `_validate` and `_save`)
over a `_RunState`: the step counters a checkpoint holds and the logging window.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from openalign.distributed import (
    WorldInfo,
    all_gather_objects,
    barrier,
    broadcast_object,
    destroy_distributed,
    init_distributed,
    max_over_ranks,
    mean_over_ranks,
    sum_over_ranks,
    wrap_model,
)
from openalign.errors import CheckpointError, ConfigError
from openalign.losses import ContrastiveLoss
from openalign.models.align import AlignModel
from openalign.pretrained import load_into, read_state_dict
from openalign.processing.processor import AlignProcessor
from openalign.processing.tokenizer import AlignTokenizer
from openalign.train import checkpointing
from openalign.train.builders import build_contrastive_loss, build_loaders, build_model, run_processor
from openalign.train.checkpointing import (
    StateDictWriter,
    gather_model_state,
    gather_optimizer_state,
    load_optimizer_state,
)
from openalign.train.config import TrainConfig, trajectory_differences
from openalign.train.ema import ModelEma
from openalign.train.image_ssl import ImageSelfSupervision, build_image_ssl
from openalign.train.interrupt import StopRequest
from openalign.train.loop import DualEncoderFeatures, Stepper, StepResult, build_stepper, validate
from openalign.train.optim import build_optimizer, freeze_tower
from openalign.train.pair_estimates import SCORES_FOLDER, PairEstimates, write_scores
from openalign.train.run_log import MetricsLog, Progress
from openalign.train.schedule import TimeFit, build_scheduler, restore_schedule, schedule_state, set_total_steps

logger = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainResult:
    """What a run ended with: its folder, last step, why it stopped, and its last logged metrics."""

    run_dir: Path
    step: int
    stop_reason: str  # "finished", "time_budget" or "interrupted" (a signal: the last checkpoint resumes it)
    last_checkpoint: Path | None
    metrics: dict[str, Any] = field(default_factory=dict)
    skipped_steps: int = 0
    skipped_samples: int = 0


# -- the run -------------------------------------------------------------------------------------------------


def train(config: TrainConfig, resume: str | None = None, *, overwrite: bool = False,
          force: bool = False) -> TrainResult:
    """Train as `config` says, resuming from a checkpoint ("latest" or a folder) when `resume` is given.

    A fresh run refuses a run.out_dir holding another run's checkpoints unless `overwrite` (which removes
    them); a resume refuses a checkpoint written with a configuration that differs in anything changing the
    updates (train.config.trajectory_differences, listed in the error) unless `force`.

    Works in one process and under torchrun (one process per device; DDP, or FSDP2 with
    distributed.strategy=fsdp). Writes config.yaml, metrics.jsonl, checkpoint-*/ folders, model/ (the final
    weights; model-ema/ too with an EMA) and plots/ into run.out_dir. model/ and every checkpoint hold the
    processor too (tokenizer files and the image settings the run validated with), so each is a folder every
    command and `AlignProcessor.from_pretrained` take as it is.
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


@dataclass
class _Run:
    """What a run is given and never changes: its configuration, folder, place among the ranks and device."""

    config: TrainConfig
    run_dir: Path
    info: WorldInfo
    device: torch.device
    fsdp: bool

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes files and logs."""
        return self.info.rank == 0


@dataclass
class _Parts:
    """What a run trains with, built once by `_build`."""

    model: AlignModel
    features: nn.Module  # the model's DualEncoderFeatures as wrapped for DDP / FSDP (and compiled)
    loss: ContrastiveLoss
    image_ssl: ImageSelfSupervision | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: ModelEma | None
    stepper: Stepper
    train_loader: Any
    val_loader: Any
    state_holder: nn.Module  # what the optimiser state is keyed through (under FSDP, the sharded root)
    fsdp: bool
    processor: AlignProcessor  # saved beside the weights, so model/ and every checkpoint work as they are
    pairs: PairEstimates | None = None  # per-pair clean estimates (loss.pair_estimates / loss.pair_weighting)


@dataclass
class _Window:
    """The steps since the last metrics line: their losses and when the window began."""

    losses: list[float] = field(default_factory=list)
    ssl_losses: list[float] = field(default_factory=list)
    start: float = field(default_factory=time.monotonic)
    steps: int = 0


@dataclass
class _RunState:
    """Where a run stands: the counters a checkpoint saves, the logging window, and what the run returns."""

    total_steps: int
    step: int = 0
    skipped_steps: int = 0
    window: _Window = field(default_factory=_Window)
    last_record: dict[str, Any] = field(default_factory=dict)
    last_checkpoint: Path | None = None
    stop_reason: str = "finished"  # or "time_budget", or "interrupted"

    def count(self, result: StepResult) -> None:
        """Book one step: its number, whether it was skipped, and its losses into the window."""
        self.step += 1
        self.skipped_steps += result.skipped
        if not result.skipped:
            self.window.losses.append(result.loss)
            if result.image_ssl_loss is not None:
                self.window.ssl_losses.append(result.image_ssl_loss)
        self.window.steps += 1


def _train(config: TrainConfig, resume: str | None, info: WorldInfo, *, overwrite: bool, force: bool) -> TrainResult:
    _check_data(config)
    run = _start(config, info, fresh=not resume, overwrite=overwrite)
    tokenizer = AlignTokenizer.from_pretrained(config.data.tokenizer, max_length=config.data.max_length)
    model = build_model(config, tokenizer.vocab_size)
    checkpoint_folder, trainer_state = _read_checkpoint(run, model, resume, force)
    if run.main:  # only once the run is accepted: a refused resume leaves the folder's config as it was
        config.save(run.run_dir / checkpointing.CONFIG_NAME)
    parts = _build(run, model, tokenizer)
    torch.manual_seed(config.run.seed + 1_000_003 * info.rank)  # dropout differs across ranks
    state = _RunState(total_steps=config.optim.total_steps, last_checkpoint=checkpoint_folder)
    if trainer_state is not None:
        _restore(run, parts, state, trainer_state, checkpoint_folder)
    return _train_and_write(run, parts, state, resumed=trainer_state is not None)


def _check_data(config: TrainConfig) -> None:
    """Refuse a run without pairs or a tokenizer, naming both and how a first run gets them."""
    missing = [key for key in ("data.train", "data.tokenizer") if not config.get(key)]
    if missing:
        raise ConfigError(
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} empty: a run needs image-text pairs "
            "(a manifest, image folder or shards) and a WordPiece tokenizer folder. For a first run: "
            "`openalign data synth --out data --n 2000`, `openalign tokenizer train data/train/manifest.jsonl "
            "--vocab-size 400 --out tokenizer`, then `--data.train data/train/manifest.jsonl --data.tokenizer "
            "tokenizer`"
        )


def _start(config: TrainConfig, info: WorldInfo, fresh: bool, overwrite: bool) -> _Run:
    """Check what the config asks of the device, that nothing the run writes in its folder is a symbolic link
    (checkpointing.refuse_linked_entries) and, for a fresh run, that the folder holds no other run
    (checkpointing.prepare_fresh_run); create the run folder (rank 0) and seed every generator, so that every
    rank starts from the same initial weights."""
    run = config.run
    device = info.device if run.device == "auto" else torch.device(run.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device = 'cuda' but no CUDA device is visible")
    if run.dtype == "fp16" and device.type != "cuda":
        raise ConfigError("run.dtype = 'fp16' needs CUDA (a grad scaler on CPU is not supported); use bf16")
    fsdp = config.distributed.strategy == "fsdp" and info.world_size > 1
    if fsdp and run.ema_decay is not None:
        raise ConfigError("run.ema_decay is not supported with distributed.strategy = 'fsdp'")
    started = _Run(config, Path(run.out_dir), info, device, fsdp)
    checkpointing.refuse_linked_entries(started.run_dir)
    if fresh:
        checkpointing.prepare_fresh_run(started.run_dir, overwrite, remove=started.main)
    if started.main:
        started.run_dir.mkdir(parents=True, exist_ok=True)
        checkpointing.remove_stale_temporaries(started.run_dir)
    random.seed(run.seed)
    np.random.seed(run.seed)
    torch.manual_seed(run.seed)
    return started


def _read_checkpoint(run: _Run, model: AlignModel, resume: str | None,
                     force: bool) -> tuple[Path | None, dict | None]:
    """On resume: the checkpoint folder (rank 0's choice, on every rank) and its trainer state, with its weights
    loaded into `model`, after checking that the run's configuration changes nothing that changes the updates
    (unless `force`); (None, None) otherwise."""
    if not resume:
        return None, None
    folder = Path(broadcast_object(
        str(checkpointing.resolve_checkpoint(run.run_dir, resume)) if run.main else None))
    load_into(model, read_state_dict(folder), source=str(folder))
    trainer_state = checkpointing.load_trainer_state(folder)
    logger.info("resuming from %s (step %d)", folder, trainer_state["step"])
    differences = trajectory_differences(trainer_state.get("config") or {}, run.config.to_dict())
    if differences and not force:
        raise ConfigError(f"{folder} was written with another configuration: {'; '.join(differences)}. Resume "
                          "with the run's own settings, or pass --force to continue with these")
    for difference in differences:
        logger.warning("resuming with a changed setting (--force): %s", difference)
    return folder, trainer_state


def _prepare_model(config: TrainConfig, model: AlignModel, device: torch.device, fsdp: bool) -> bool:
    """Freeze what does not train, switch gradient checkpointing on, move the model to `device`; returns whether
    the image tower runs channels-last."""
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
    run = config.run
    channels_last = run.channels_last if isinstance(run.channels_last, bool) else device.type == "cpu" and not fsdp
    if channels_last and fsdp:
        raise ConfigError("run.channels_last = true does not work with distributed.strategy = 'fsdp' "
                          "(FSDP2 shards only contiguous parameters); use 'auto' or false")
    model.to(device)
    if channels_last:
        model.vision_model.to(memory_format=torch.channels_last)
    return channels_last


def _build(run: _Run, model: AlignModel, tokenizer: AlignTokenizer) -> _Parts:
    """Loss, image term, DDP/FSDP wrapper, optimiser, schedule, EMA, loaders and the stepper, in the order that
    makes them right: the loss settles which scalars train before the wrapper and the optimiser look."""
    config, device, fsdp, optim = run.config, run.device, run.fsdp, run.config.optim
    channels_last = _prepare_model(config, model, device, fsdp)
    loss = build_contrastive_loss(config.loss, model).to(device)
    image_ssl = build_image_ssl(config.loss, model.config.projection_dim)
    if image_ssl is not None:
        image_ssl.to(device)
    features = DualEncoderFeatures(model, config.model.freeze_text, config.model.freeze_vision)
    shard_modules = [model.text_model, model.vision_model] if fsdp else None
    features = wrap_model(features, config.distributed.strategy, config.distributed.sync_batchnorm,
                          shard_modules=shard_modules)
    training_only = [loss] if image_ssl is None else [loss, image_ssl]
    holder = nn.ModuleList([model, *training_only])  # every trainable parameter, for the optimiser
    # The optimiser state under FSDP is keyed through the sharded root (the wrapped features module).
    state_holder = nn.ModuleList([features, *training_only]) if fsdp else holder
    optimizer = build_optimizer(optim.name, holder, optim.lr, optim.weight_decay, optim.betas, optim.eps)
    scheduler = build_scheduler(optimizer, optim.warmup_steps, optim.total_steps, optim.schedule,
                                optim.min_lr_ratio)
    scaler = torch.amp.GradScaler(device.type, enabled=config.run.dtype == "fp16")
    ema = ModelEma(model, config.run.ema_decay) if config.run.ema_decay is not None else None
    if config.run.compile:
        features = torch.compile(features)
    train_loader, val_loader = build_loaders(config, tokenizer, model.config.vision_config.image_size,
                                             pin_memory=device.type == "cuda")
    pairs = PairEstimates.from_config(config.loss, optim.total_steps) if config.loss.tracks_pairs else None
    stepper = build_stepper(
        model, loss, optimizer, features=features, scheduler=scheduler, scaler=scaler, image_ssl=image_ssl,
        device=device, autocast_dtype=AUTOCAST_DTYPES[config.run.dtype], channels_last=channels_last,
        accumulation=optim.accumulation, grad_clip=optim.grad_clip, nan_policy=config.run.nan_policy,
        skip_limits=config.skip_limits(),
    )
    if pairs is not None and pairs.weighting != "off":
        stepper.pair_weights = lambda keys, step: pairs.weight_tensor(keys, step, device)
    processor = run_processor(config, tokenizer, model.config.vision_config.image_size)
    return _Parts(model, features, loss, image_ssl, optimizer, scheduler, scaler, ema, stepper, train_loader,
                  val_loader, state_holder, fsdp, processor, pairs)


def _restore(run: _Run, parts: _Parts, state: _RunState, trainer_state: dict, folder: Path) -> None:
    """Put the counters and every part back where the checkpoint left them, this rank's RNG states last."""
    state.step, state.skipped_steps = trainer_state["step"], trainer_state["skipped_steps"]
    parts.stepper.skipped_steps = state.skipped_steps  # the skip limit counts from the run's start
    if run.config.run.time_fitted:  # go on with the plan as re-planned, not the config's first guess
        state.total_steps = trainer_state.get("total_steps", state.total_steps)
        restore_schedule(parts.scheduler, trainer_state.get("schedule") or {"total_steps": state.total_steps})
    load_optimizer_state(parts.state_holder, parts.optimizer, trainer_state["optimizer"], parts.fsdp)
    parts.scheduler.load_state_dict(trainer_state["scheduler"])
    parts.scaler.load_state_dict(trainer_state["scaler"])
    parts.loss.load_state_dict(trainer_state["loss"])
    saved_ssl = trainer_state.get("image_ssl")
    if (saved_ssl is None) != (parts.image_ssl is None):
        raise CheckpointError(f"{folder} was written with loss.image_ssl_weight "
                              f"{'> 0' if saved_ssl is not None else '= 0'}; resume with the same setting")
    if parts.image_ssl is not None:
        parts.image_ssl.load_state_dict(saved_ssl)
    if parts.ema is not None:
        parts.ema.load_state_dict(trainer_state["ema"])
    if parts.pairs is not None:
        _restore_pairs(parts.pairs, trainer_state.get("pair_estimates"), state.total_steps, folder)
    parts.train_loader.load_state_dict(trainer_state["data"])
    rng_states = trainer_state["rng"]
    if len(rng_states) != run.info.world_size:
        raise CheckpointError(f"{folder} was written by {len(rng_states)} processes, this run has "
                              f"{run.info.world_size}: an exact resume needs the same number")
    checkpointing.set_rng_state(rng_states[run.info.rank])


def _restore_pairs(pairs: PairEstimates, saved: dict | None, total_steps: int, folder: Path) -> None:
    """The per-pair estimates as the checkpoint left them; a checkpoint without them (a run that did not keep
    them, resumed with --force) starts them afresh, with a warning."""
    pairs.total_steps = total_steps
    if saved is None:
        logger.warning("%s holds no per-pair estimates: they start afresh from this step", folder)
        return
    pairs.load_state_dict(saved)


def _pair_scores_writer(run: _Run, parts: _Parts, state: _RunState):
    """What writes the per-pair estimates into a folder as a scoring folder, or None without estimates."""
    if parts.pairs is None:
        return None
    description = f"per-pair estimates of the run {run.run_dir} at step {state.step}"
    return lambda folder: write_scores(parts.pairs, run.config.data.train, folder, description)


def _save(run: _Run, parts: _Parts, state: _RunState) -> Path:
    """Write checkpoint-<step>/ (rank 0, with every rank's RNG states and, under FSDP, the gathered shards);
    every rank takes part and waits for the write."""
    trainer_state = {
        "step": state.step, "skipped_steps": state.skipped_steps, "total_steps": state.total_steps,
        "schedule": schedule_state(parts.scheduler),
        "optimizer": gather_optimizer_state(parts.state_holder, parts.optimizer, parts.fsdp),
        "scheduler": parts.scheduler.state_dict(), "scaler": parts.scaler.state_dict(),
        "loss": parts.loss.state_dict(),
        "image_ssl": parts.image_ssl.state_dict() if parts.image_ssl is not None else None,
        "ema": parts.ema.state_dict() if parts.ema is not None else None, "data": parts.train_loader.state_dict(),
        "rng": all_gather_objects(checkpointing.rng_state()), "config": run.config.to_dict(),
        "pair_estimates": parts.pairs.state_dict() if parts.pairs is not None else None,
    }
    write_pair_scores = _pair_scores_writer(run, parts, state)
    weights = StateDictWriter(parts.model.config, gather_model_state(parts.model, parts.fsdp), parts.processor,
                              extras=[write_pair_scores] if write_pair_scores else None)
    folder = run.run_dir / checkpointing.checkpoint_name(state.step)
    if run.main:
        folder = checkpointing.save_checkpoint(run.run_dir, state.step, weights, trainer_state,
                                               keep_last=run.config.run.keep_last)
    barrier()
    return folder


def _train_and_write(run: _Run, parts: _Parts, state: _RunState, resumed: bool) -> TrainResult:
    """The loop, then the final weights (model/, and model-ema/ with an EMA) and the plots; an interrupted run
    ends with its checkpoint alone, since it has not finished."""
    settings = run.config.run
    log = MetricsLog(run.run_dir, enabled=run.main, tensorboard=settings.tensorboard,
                     resume_step=state.step if resumed else None)
    progress = Progress(state.total_steps, state.step, enabled=run.main and settings.progress)
    try:
        with StopRequest() as stop:
            _loop(run, parts, state, log, progress, stop)
        if state.stop_reason == "interrupted":
            return TrainResult(run.run_dir, state.step, state.stop_reason, state.last_checkpoint, state.last_record,
                               state.skipped_steps, sum(parts.train_loader.skipped.values()))
        final_weights = gather_model_state(parts.model, parts.fsdp)  # a collective under FSDP: every rank calls it
        if run.main:
            StateDictWriter(parts.model.config, final_weights, parts.processor).save_pretrained(run.run_dir / "model")
            if parts.ema is not None:
                parts.ema.module.save_pretrained(run.run_dir / "model-ema")
                parts.processor.save_pretrained(run.run_dir / "model-ema")
            write_pair_scores = _pair_scores_writer(run, parts, state)
            if write_pair_scores is not None:  # the run as a curation pass: filter --scores-from RUN/pair-scores
                write_pair_scores(run.run_dir / SCORES_FOLDER)
    finally:
        progress.close()
        log.close()
    if run.main and settings.plots:
        from openalign.train.plots import plot_run

        plot_run(run.run_dir)
    return TrainResult(run.run_dir, state.step, state.stop_reason, state.last_checkpoint, state.last_record,
                       state.skipped_steps, sum(parts.train_loader.skipped.values()))


def _loop(run: _Run, parts: _Parts, state: _RunState, log: MetricsLog, progress: Progress,
          stop: StopRequest) -> None:
    """Step until the total (which a time fit may move), the time budget or a stop request (a signal: then
    checkpoint and stop); log, validate and checkpoint on the way. Every decision to stop is taken by all ranks
    together."""
    settings = run.config.run
    start_time = time.monotonic()
    state.window = _Window()
    fit = (TimeFit(60 * settings.max_minutes, run.config.optim.warmup_steps, every=settings.log_every)
           if settings.time_fitted else None)
    data_iterator = iter(parts.train_loader)
    while state.step < state.total_steps:
        try:
            batch = next(data_iterator)
        except StopIteration:  # an epoch ended: the loader moved to the next one
            data_iterator = iter(parts.train_loader)
            continue
        learning_rate = parts.optimizer.param_groups[0]["lr"]
        result = parts.stepper.step(batch, state.step + 1)
        state.count(result)
        if parts.pairs is not None and not result.skipped:
            parts.pairs.observe_step(batch["keys"], parts.loss.last_match_probability, parts.train_loader.epoch,
                                     state.step)
        if parts.ema is not None and not result.skipped:
            parts.ema.update(parts.model)
        out_of_time, interrupted = _stop_votes(
            settings.max_minutes is not None and time.monotonic() - start_time > 60 * settings.max_minutes,
            stop.requested)
        if fit is not None:
            planned = fit.replan(state.step, state.total_steps, time.monotonic() - start_time)
            if planned != state.total_steps:
                state.total_steps = planned
                set_total_steps(parts.scheduler, planned, from_step=state.step)
                progress.set_total(planned)
                if parts.pairs is not None:
                    parts.pairs.total_steps = planned
        last_step = state.step == state.total_steps or out_of_time
        checkpoint_now = state.step % settings.checkpoint_every == 0 or last_step or interrupted
        if state.step % settings.log_every == 0 or checkpoint_now:
            _log_window(run, parts, state, result, learning_rate, time.monotonic() - start_time, log, progress)
        if parts.val_loader is not None and ((settings.val_every and state.step % settings.val_every == 0)
                                             or last_step):
            _validate(parts, state, log)
        if checkpoint_now:
            state.last_checkpoint = _save(run, parts, state)
        if fit is not None:
            fit.resume_clock()  # validation and checkpoints are not step time
        if interrupted:
            state.stop_reason = "interrupted"
            break
        if out_of_time:
            state.stop_reason = "time_budget"
            logger.info("run.max_minutes = %s reached at step %d; stopping", settings.max_minutes, state.step)
            break


def _stop_votes(out_of_time: bool, interrupted: bool) -> tuple[bool, bool]:
    """(out of time, interrupted) on any rank, in one collective, so that every rank stops at the same step. An
    interrupt outranks the budget: either way the run checkpoints and stops."""
    vote = max_over_ranks(2.0 if interrupted else float(out_of_time))
    return vote == 1.0, vote == 2.0


def _log_window(run: _Run, parts: _Parts, state: _RunState, result: StepResult, learning_rate: float,
                elapsed_s: float, log: MetricsLog, progress: Progress) -> None:
    """Write one metrics line for the steps since the last (losses averaged over them and over ranks), then
    start the next window."""
    window = state.window
    seconds = time.monotonic() - window.start
    temperature = parts.loss.temperature_in_use(parts.model)
    record = {
        "step": state.step, "epoch": parts.train_loader.epoch, "loss": _window_mean(window.losses),
        "temperature": temperature, "lr": learning_rate, "grad_norm": result.grad_norm,
        "samples_per_s": run.config.optim.batch_size * run.info.world_size * window.steps / max(seconds, 1e-9),
        "skipped_samples": int(sum_over_ranks(sum(parts.train_loader.skipped.values()))),
        "skipped_steps": state.skipped_steps, "elapsed_s": elapsed_s, "total_steps": state.total_steps,
    }
    if parts.image_ssl is not None:  # its share of `loss`, averaged like it
        record["image_ssl_loss"] = _window_mean(window.ssl_losses)
    if parts.pairs is not None:
        summary = parts.pairs.summary()
        record.update(pairs_seen=summary["pairs"], pairs_mean_estimate=summary["mean_estimate"],
                      pairs_mixture_separated=summary["mixture_separated"],
                      pairs_clean_weight=summary["mixture_clean_weight"])
    log.write(record)
    progress.update(window.steps, loss=record["loss"], temp=temperature, samples_s=record["samples_per_s"])
    state.last_record = record
    state.window = _Window()


def _validate(parts: _Parts, state: _RunState, log: MetricsLog) -> None:
    """Validate, log the figures and keep them in the run's last record."""
    record = {"step": state.step, **validate(parts.stepper, parts.features, parts.val_loader)}
    log.write(record)
    state.last_record = {**state.last_record, **record}
    state.window.start = time.monotonic()  # validation time is not training throughput


def _window_mean(values: list[float]) -> float:
    """The mean over the logging window's steps (NaN for none), then over ranks (see `mean_over_ranks`)."""
    return mean_over_ranks(sum(values) / len(values) if values else float("nan"))
