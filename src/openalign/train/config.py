"""The training configuration: nested dataclasses read from YAML/TOML, overridable field by field.

Every value, from a file or the command line, is coerced to its field's declared type, so `--optim.lr 1e-3`
and `lr: 1e-3` in YAML (which YAML 1.1 reads as a string) both give a float. Unknown sections and keys are
errors naming the key; the resolved configuration is what `save` writes into the run folder.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from openalign.data.shards import COMMAND_PREFIX  # a string value starting so names a command the reader runs
from openalign.errors import ConfigError, did_you_mean
from openalign.untrusted import refuse_links

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: TOML configs need 3.11; YAML works everywhere
    tomllib = None


def documented(default: Any, help: str) -> Any:
    """A config field with its description, which `openalign train --help` shows beside its type, default and
    choices (`field_help`)."""
    return field(default=default, metadata={"help": help})


@dataclass
class ModelSection:
    """What to train: a preset or config.json, optionally started from checkpoints, towers frozen or not."""

    preset: str = documented("tiny", "architecture: align-base, align-l2-large, tiny, or VISION+TEXT such as "
                                     "efficientnet-b0+bert-mini (openalign summary PRESET describes it)")
    config: str | None = documented(None, "a config.json (or a folder holding one); overrides model.preset")
    init_from: str | None = documented(None, "an ALIGN checkpoint folder or hub id to start the whole model from")
    text_init: str | None = documented(None, "an ALIGN checkpoint or a plain BERT folder, for the text tower only")
    vision_init: str | None = documented(None, "an ALIGN checkpoint, for the image tower only")
    freeze_text: bool = documented(False, "keep the text tower fixed (LiT-style: eval mode, no gradient)")
    freeze_vision: bool = documented(False, "keep the image tower fixed")
    temperature_init: float | None = documented(None, "starting temperature, a raw divisor of the cosines "
                                                      "(default: the config's temperature_init_value; ALIGN: 1.0; "
                                                      "short runs learn much faster from 0.07)")
    gradient_checkpointing: str = documented("none", "recompute activations in the backward pass of these towers, "
                                                     "to fit larger batches")
    residual_gain: float = documented(0.2, "initial gain of the residual branches of towers trained from scratch")
    # Short runs want less than align-base's 0.99: with it the running statistics that evaluation uses lag
    # far behind the weights for thousands of steps.
    batch_norm_momentum: float | None = documented(None, "BatchNorm running-average decay, Keras meaning "
                                                         "(align-base: 0.99; short runs want about 0.9)")


@dataclass
class DataSection:
    """Where pairs come from and how they are turned into tensors."""

    train: str = documented("", "training pairs: a manifest (.jsonl/.csv/.tsv/.parquet), an image folder or a "
                                "WebDataset shard spec; `openalign data synth` writes one")
    val: str | None = documented(None, "held-out pairs for validation recall (a manifest or shards)")
    tokenizer: str = documented("", "a folder with tokenizer.json or vocab.txt (`openalign tokenizer train`)")
    image_size: int | None = documented(None, "the training crop in pixels (default: the model config's "
                                              "image_size)")
    resize: int | None = documented(None, "the square resize before the crop (default: image_size * 346 / 289)")
    flip: bool | str = documented("auto", "random horizontal flips; auto: none when the caption says left or right")
    max_length: int = documented(64, "tokens per caption, [CLS] and [SEP] included; longer captions are cut")
    num_workers: int = documented(0, "data loader processes per training process (0: load in the main process)")
    resampled: bool = documented(False, "draw shards with replacement, endlessly (large shard sets)")
    shuffle_buffer: int = documented(1000, "samples held for shuffling a shard stream")
    epoch_size: int | None = documented(None, "samples per epoch (default: the whole source)")
    cache_images: bool = documented(False, "keep decoded images in memory after their first epoch (data that fits "
                                           "in RAM)")
    group_by: str | None = documented(None, "a manifest column: shuffle in runs of group_size rows sharing its "
                                            "value, so in-batch negatives share it (hard negatives)")
    group_size: int = documented(128, "rows per run with data.group_by")
    group_fraction: float = documented(1.0, "the share of rows that come in runs; the rest are shuffled singly")
    group_from_epoch: int = documented(0, "plain shuffles before this epoch, grouped ones from it on")
    val_max_samples: int = documented(1000, "validate on at most this many pairs")


@dataclass
class OptimSection:
    """Optimiser, schedule, batch and gradient handling."""

    name: str = documented("lamb", "optimiser (LAMB is the paper's)")
    lr: float = documented(1e-3, "peak learning rate, reached at the end of the warm-up")
    weight_decay: float = documented(1e-5, "decoupled weight decay (not on biases, norms or the temperature)")
    betas: tuple[float, float] = documented((0.9, 0.999), "Adam moments' decay rates, as [b1, b2]")
    eps: float = documented(1e-6, "the optimiser's epsilon")
    warmup_steps: int = documented(0, "steps of linear warm-up from 0 to optim.lr")
    total_steps: int = documented(1000, "steps of the whole schedule; with run.max_minutes re-planned to fit the "
                                        "time (run.fit_steps_to_time)")
    schedule: str = documented("linear", "the decay after the warm-up")
    min_lr_ratio: float = documented(0.0, "the learning rate at the end, as a fraction of optim.lr")
    grad_clip: float | None = documented(None, "largest global gradient norm (default: no clipping)")
    batch_size: int = documented(32, "pairs per step per process; the global batch is batch_size x processes")
    accumulation: int = documented(1, "micro-batches per step, exact through feature caching when > 1")


@dataclass
class LossSection:
    """The contrastive loss; negatives come from the global batch under torch.distributed."""

    name: str = documented("align", "the contrastive loss, by its name in openalign.losses.LOSSES")
    label_smoothing: float = documented(0.1, "label smoothing of the softmax losses (ALIGN: 0.1)")
    local_loss: bool = documented(True, "under torch.distributed, score each rank's rows against the global batch "
                                        "(open_clip's local_loss) instead of the full matrix on every rank")
    gather_with_grad: bool = documented(True, "let gradients flow through the features gathered from other ranks")
    hard_negative_beta: float = documented(0.0, "weight each negative by exp(beta x its cosine), normalised (align "
                                                "and clip); 0: the plain loss")
    image_ssl_weight: float = documented(0.0, "weight of the label-free image term (each image against a "
                                              "colour-scrambled view of itself); 0: off")
    image_ssl_images: int = documented(0, "images per batch that get a second view for that term (0: all)")
    image_ssl_temperature: float = documented(0.1, "temperature of that term's InfoNCE")
    image_ssl_warmup_steps: int = documented(0, "steps over which that term's weight rises from 0")
    fixed_temperature: bool = documented(False, "keep the model's temperature at its start value (align, rcl, "
                                                "rince) instead of learning it")
    robust_q: float = documented(0.5, "rince: q in (0, 1]; towards 0 it is InfoNCE, 1 the most robust to wrong "
                                      "positives")
    robust_lambda: float = documented(0.01, "rince: lambda, the weight of the denominator term")
    pair_estimates: bool = documented(False, "keep per training pair an estimate of how likely it is clean (an "
                                             "average of its in-batch match probability over its visits) and "
                                             "write them as scores.parquet beside model/ and in checkpoints")
    pair_weighting: str = documented("off", "weight each pair's loss by its clean probability (mixture: a "
                                            "two-component mixture over the estimates); turns the estimates on")
    pair_weighting_warmup: float = documented(0.2, "fraction of the steps, in [0, 1), before the weighting starts")
    pair_ema_momentum: float = documented(0.5, "weight of a pair's previous estimate at each visit, in [0, 1)")
    pair_mixture_every: int = documented(50, "steps between fits of the mixture over every pair's estimate")

    @property
    def tracks_pairs(self) -> bool:
        """Whether the run keeps per-pair estimates: asked for, or needed by a weighting."""
        return self.pair_estimates or self.pair_weighting != "off"


@dataclass
class RunSection:
    """Where the run lives and how it is watched, saved and guarded."""

    out_dir: str = documented("runs/align", "the run folder: config.yaml, metrics.jsonl, checkpoints, model/, "
                                             "plots/")
    seed: int = documented(0, "seed of the weights, the data order and the augmentation")
    device: str = documented("auto", "auto: CUDA when present (cuda:LOCAL_RANK under torchrun), else the CPU")
    dtype: str = documented("fp32", "autocast precision (fp16 with a grad scaler, CUDA only)")
    channels_last: bool | str = documented("auto", "memory format of the image tower; auto: on for the CPU")
    compile: bool = documented(False, "torch.compile the model's forward")
    ema_decay: float | None = documented(None, "keep an exponential moving average of the weights with this decay "
                                               "(e.g. 0.9999), saved as model-ema/")
    checkpoint_every: int = documented(1000, "steps between checkpoints (and one at the end)")
    keep_last: int = documented(3, "checkpoints kept; older ones are deleted")
    val_every: int = documented(0, "steps between validations (0: only at the end); needs data.val")
    log_every: int = documented(10, "steps between metrics.jsonl lines")
    nan_policy: str = documented("halt", "on a NaN or infinite loss: stop, or skip the step")
    # A run that skips this many steps in a row, or in all, has diverged: it stops with an error instead of
    # reporting success.
    max_consecutive_skipped_steps: int = documented(10, "with nan_policy skip: stop with an error after this many "
                                                        "skipped steps in a row")
    max_skipped_steps: int | None = documented(None, "with nan_policy skip: stop with an error after this many "
                                                     "skipped steps in all (default: a tenth of optim.total_steps, "
                                                     "at least 10)")
    max_minutes: float | None = documented(None, "a time budget: stop (with a checkpoint) once this much wall time "
                                                 "has passed")
    fit_steps_to_time: bool = documented(True, "with run.max_minutes: re-plan optim.total_steps from the measured "
                                               "step time so the schedule ends with the time (false: the time "
                                               "budget cuts the schedule wherever it is)")
    progress: bool = documented(True, "show a progress bar")
    tensorboard: bool = documented(True, "also log to TensorBoard when the tensorboard package is importable")
    plots: bool = documented(True, "write PNG plots of the metrics into plots/ at the end")

    @property
    def time_fitted(self) -> bool:
        """Whether the step count follows the time budget: fit_steps_to_time, and a budget to fit."""
        return self.fit_steps_to_time and self.max_minutes is not None


@dataclass
class DistributedSection:
    """How several processes share the work (only used under torchrun)."""

    strategy: str = documented("ddp", "ddp: every process holds the model; fsdp: parameters sharded (FSDP2)")
    sync_batchnorm: bool = documented(False, "BatchNorm statistics over the global batch")
    backend: str | None = documented(None, "process-group backend (default: nccl on GPU, gloo on CPU)")


def field_choices() -> dict[str, tuple]:
    """The fields that take one of a few values, and those values; loss names come from the loss registry."""
    # Imported here, not at the top: building the command line reads this module and should not load torch.
    from openalign.losses import LOSSES
    from openalign.train.pair_estimates import WEIGHTINGS

    return {
        "model.gradient_checkpointing": ("none", "text", "vision", "both"),
        "data.flip": (True, False, "auto"),
        "optim.name": ("lamb", "adamw"),
        "optim.schedule": ("linear", "cosine", "constant"),
        "loss.name": tuple(LOSSES),
        "loss.pair_weighting": WEIGHTINGS,
        "run.device": ("auto", "cpu", "cuda"),
        "run.dtype": ("fp32", "bf16", "fp16"),
        "run.channels_last": (True, False, "auto"),
        "run.nan_policy": ("halt", "skip"),
        "distributed.strategy": ("ddp", "fsdp"),
    }


POSITIVE = ("data.max_length", "data.group_size", "optim.lr", "optim.total_steps", "optim.batch_size",
            "optim.accumulation", "run.checkpoint_every", "run.keep_last", "run.log_every", "loss.robust_lambda",
            "run.max_consecutive_skipped_steps")
# Fields that change how a run is watched, saved, timed or placed, but not the updates it computes: a resumed run
# may change them freely. Any other difference from the checkpoint's configuration needs --force.
TRAJECTORY_NEUTRAL = {
    "run.out_dir", "run.device", "run.compile", "run.checkpoint_every", "run.keep_last", "run.val_every",
    "run.log_every", "run.nan_policy", "run.max_consecutive_skipped_steps", "run.max_skipped_steps",
    "run.max_minutes", "run.progress", "run.tensorboard", "run.plots", "data.val", "data.val_max_samples",
    "data.num_workers", "data.cache_images", "distributed.backend",
}


@dataclass
class TrainConfig:
    """Everything a training run needs; `openalign train` builds one from a file plus overrides."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    loss: LossSection = field(default_factory=LossSection)
    run: RunSection = field(default_factory=RunSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)

    def validate(self) -> TrainConfig:
        """Raise ConfigError naming the first field whose value cannot work; return self."""
        from openalign.losses import LOSSES

        for key, choices in field_choices().items():
            value = self.get(key)
            if not any(value is choice or (value == choice and type(value) is type(choice)) for choice in choices):
                raise ConfigError(f"{key} = {value!r} is invalid; choose one of {list(choices)}")
        for key in POSITIVE:
            if not self.get(key) > 0:
                raise ConfigError(f"{key} = {self.get(key)!r} must be positive")
        if self.optim.warmup_steps < 0 or self.run.val_every < 0:
            raise ConfigError("optim.warmup_steps and run.val_every must not be negative")
        if self.optim.batch_size % self.optim.accumulation:
            raise ConfigError(f"optim.batch_size = {self.optim.batch_size} does not split into "
                              f"optim.accumulation = {self.optim.accumulation} equal micro-batches")
        if self.run.ema_decay is not None and not 0.0 < self.run.ema_decay < 1.0:
            raise ConfigError(f"run.ema_decay = {self.run.ema_decay} must lie in (0, 1)")
        if self.optim.accumulation > 1 and (self.model.freeze_text or self.model.freeze_vision):
            raise ConfigError("optim.accumulation > 1 with a frozen tower is not supported: the feature cache "
                              "backpropagates through both towers; use accumulation 1")
        if (self.loss.image_ssl_weight < 0 or self.loss.image_ssl_images < 0 or self.loss.image_ssl_warmup_steps < 0
                or self.loss.image_ssl_temperature <= 0):
            raise ConfigError("loss.image_ssl_weight, loss.image_ssl_images and loss.image_ssl_warmup_steps must not "
                              "be negative and loss.image_ssl_temperature must be positive")
        if self.loss.image_ssl_weight > 0 and (self.optim.accumulation > 1 or self.model.freeze_vision):
            raise ConfigError("loss.image_ssl_weight > 0 needs optim.accumulation = 1 and a trainable image tower "
                              "(model.freeze_vision = false)")
        beta = self.loss.hard_negative_beta
        if beta < 0 or (beta > 0 and not LOSSES[self.loss.name].hard_negatives):
            takes = " or ".join(name for name, loss in LOSSES.items() if loss.hard_negatives)
            others = " or ".join(name for name, loss in LOSSES.items() if not loss.hard_negatives)
            raise ConfigError(f"loss.hard_negative_beta = {beta} must not be negative, and works with loss.name "
                              f"{takes} (the softmax losses), not {others}")
        self._validate_pair_settings()
        if self.run.max_skipped_steps is not None and self.run.max_skipped_steps < 1:
            raise ConfigError(f"run.max_skipped_steps = {self.run.max_skipped_steps} must be positive (or null)")
        if self.model.freeze_text and self.model.freeze_vision:
            raise ConfigError("model.freeze_text and model.freeze_vision are both set: nothing left to train")
        return self

    def _validate_pair_settings(self) -> None:
        """The robust losses' and per-pair estimates' settings, each refused with the key and why."""
        from openalign.losses import LOSSES

        loss = self.loss
        if not 0.0 < loss.robust_q <= 1.0:
            raise ConfigError(f"loss.robust_q = {loss.robust_q} must lie in (0, 1]")
        if not 0.0 <= loss.pair_weighting_warmup < 1.0:
            raise ConfigError(f"loss.pair_weighting_warmup = {loss.pair_weighting_warmup} is a fraction of the "
                              "steps and must lie in [0, 1)")
        if not 0.0 <= loss.pair_ema_momentum < 1.0:
            raise ConfigError(f"loss.pair_ema_momentum = {loss.pair_ema_momentum} must lie in [0, 1)")
        if loss.pair_mixture_every < 1:
            raise ConfigError(f"loss.pair_mixture_every = {loss.pair_mixture_every} must be positive")
        if loss.tracks_pairs and not LOSSES[loss.name].pair_weights:
            takes = " or ".join(name for name, known in LOSSES.items() if known.pair_weights)
            raise ConfigError(f"loss.pair_weighting = {loss.pair_weighting!r} / loss.pair_estimates need a loss that "
                              f"gives per-pair match probabilities and takes per-pair weights ({takes}), not "
                              f"loss.name = {loss.name!r}")
        if loss.tracks_pairs and self.data.resampled:
            raise ConfigError("loss.pair_estimates / loss.pair_weighting need every pair once an epoch, which "
                              "data.resampled = true (shards drawn with replacement) does not give")

    def get(self, key: str) -> Any:
        """A value by its dotted name, e.g. `get("optim.lr")`."""
        section, name = _split_key(key)
        return getattr(getattr(self, section), name)

    def set(self, key: str, value: Any) -> None:
        """Set a value by its dotted name, coerced to the field's type (a string is parsed as YAML first)."""
        section, name = _split_key(key)
        target = getattr(self, section)
        setattr(target, name, _coerce(value, _field_types(type(target))[name], key))

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain nested dict (tuples as lists), as written to config.yaml."""
        out = {}
        for section in dataclasses.fields(self):
            values = dataclasses.asdict(getattr(self, section.name))
            out[section.name] = {key: list(value) if isinstance(value, tuple) else value
                                 for key, value in values.items()}
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build from a nested dict; an unknown section or key is a ConfigError naming it and `source`."""
        config = cls()
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: expected a mapping of sections, got {type(values).__name__}")
        for section, entries in values.items():
            if section not in _section_names():
                raise ConfigError(f"{source}: unknown section {section!r}; known: {sorted(_section_names())}")
            if not isinstance(entries, dict):
                raise ConfigError(f"{source}: section {section!r} must be a mapping, got {entries!r}")
            for name, value in entries.items():
                config.set(f"{section}.{name}", value)
        return config

    def to_yaml(self) -> str:
        """The resolved configuration as YAML, sections and fields in their declared order."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def skip_limits(self) -> tuple[int, int]:
        """(most skipped steps in a row, most in all) before a run with nan_policy skip counts as diverged."""
        total = self.run.max_skipped_steps
        if total is None:
            total = max(10, self.optim.total_steps // 10)
        return self.run.max_consecutive_skipped_steps, total

    def save(self, path: str | Path) -> Path:
        """Write the resolved configuration as YAML."""
        path = Path(path)
        path.write_text(self.to_yaml())
        return path


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None,
                base: dict[str, Any] | None = None, *, trusted: bool = True) -> TrainConfig:
    """Defaults, then `base` (a recipe dict), then the YAML/TOML file at `path`, then `overrides`
    ("section.key=value" strings or a {dotted key: value} dict); validated.

    `trusted=False` is for a file nobody vouched for (a run folder's config.yaml): a value in it that names a
    command (a `pipe:` source) is a ConfigError, unless an override replaces it.
    """
    config = TrainConfig.from_dict(base or {}, source="recipe")
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = [parse_override(text) for text in overrides or []]
    if path is not None:
        file_config = read_config_file(path)
        for section, entries in file_config.items():
            if not isinstance(entries, dict):
                raise ConfigError(f"{path}: section {section!r} must be a mapping, got {entries!r}")
            for name, value in entries.items():
                key = f"{section}.{name}"
                if not trusted and key not in dict(items) and commands_in(value):
                    raise ConfigError(
                        f"{path}: {key} = {value!r} runs a command ({COMMAND_PREFIX}), and a run folder's "
                        "configuration is not trusted to run commands: give the source again on the command "
                        f"line (--{key} ...), or pass --trust-run-config if you trust this folder")
                _set_checked(config, key, value, str(path))
    for key, value in items:
        _set_checked(config, key, value, "override")
    return config.validate()


def commands_in(value: Any) -> list[str]:
    """The strings in a config value (a string or a list of them) that name a command to run."""
    values = value if isinstance(value, (list, tuple)) else [value]
    return [item for item in values if isinstance(item, str) and item.strip().startswith(COMMAND_PREFIX)]


def resolve_run_config(config_path: str | Path | None, resume: str | None, overrides: dict[str, Any],
                       base: dict[str, Any] | None = None, *, trust_run_config: bool = False) -> TrainConfig:
    """The configuration `openalign train` runs with: defaults < recipe (`base`) < a config file < overrides.

    The file is `config_path` when the user names one (trusted: the user chose it). When resuming without one,
    it is the run folder's own config.yaml (the folder of the checkpoint, or for "latest" run.out_dir as the
    command line, recipe or default gives it, never the current folder), which is not trusted to run commands
    unless `trust_run_config`: a run folder may come from anyone.
    """
    if config_path is not None or not resume:
        return load_config(config_path, overrides, base)
    run_dir = Path(resume).parent if resume != "latest" else Path(load_config(None, overrides, base).run.out_dir)
    refuse_links(run_dir, ["config.yaml"], "run folder")  # read from elsewhere, then overwritten there by the run
    run_config = run_dir / "config.yaml"
    return load_config(run_config if run_config.is_file() else None, overrides, base, trusted=trust_run_config)


def trajectory_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """"section.key: saved -> current" for each field of two `to_dict()` results that differs and changes the
    updates a resumed run computes (every field but TRAJECTORY_NEUTRAL); fields only one side knows are left
    out (a checkpoint from another version)."""
    differences = []
    for section, entries in current.items():
        for name, value in entries.items():
            key = f"{section}.{name}"
            before = saved.get(section, {}).get(name, value) if isinstance(saved.get(section), dict) else value
            if key not in TRAJECTORY_NEUTRAL and _comparable(before) != _comparable(value):
                differences.append(f"{key}: {before!r} -> {value!r}")
    return differences


def _comparable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or TOML (.toml) file as a dict; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no config file at {path}")
    text = path.read_text()
    if path.suffix == ".toml" and tomllib is None:
        raise ConfigError(f"{path}: reading TOML needs Python 3.11 or later (tomllib); use YAML instead")
    try:
        values = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        raise ConfigError(f"{path} cannot be parsed: {error}") from None
    values = values or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, found {type(values).__name__}")
    return values


def parse_override(text: str) -> tuple[str, str]:
    """"section.key=value" -> (key, value text); the value is coerced later, against the field's type."""
    key, separator, value = text.partition("=")
    if not separator or "." not in key:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    return key.strip(), value


def field_names() -> list[str]:
    """Every dotted key a TrainConfig accepts, e.g. "optim.lr" (used to build command-line flags)."""
    names = []
    for section in dataclasses.fields(TrainConfig):
        names += [f"{section.name}.{entry.name}" for entry in dataclasses.fields(_section_class(section.name))]
    return names


def field_type_name(key: str) -> str:
    """A field's type as a command line shows it: INT, FLOAT, TEXT, BOOL, unions joined by |, e.g. FLOAT|none."""
    section, name = _split_key(key)
    annotation = _field_types(_section_class(section))[name]
    origin = typing.get_origin(annotation)
    options = typing.get_args(annotation) if origin in (typing.Union, types.UnionType) else (annotation,)
    names = {int: "INT", float: "FLOAT", str: "TEXT", bool: "BOOL", type(None): "none"}
    return "|".join(names.get(option, "[FLOAT,FLOAT]") for option in options)


def describe_field(key: str) -> str:
    """A field's description, choices and default in one line, for `openalign train --help`."""
    section, name = _split_key(key)
    entry = next(entry for entry in dataclasses.fields(_section_class(section)) if entry.name == name)
    choices = field_choices().get(key)
    details = [f"one of {', '.join(_shown(choice) for choice in choices)}"] if choices else []
    help_text = entry.metadata.get("help", "")
    if "default" not in help_text:
        details.append(f"default: {_shown(entry.default)}")
    return f"{help_text} ({'; '.join(details)})" if details else help_text


def _shown(value: Any) -> str:
    """A value as it is written on the command line or in YAML: true, none, [0.9, 0.999], empty."""
    if value is None or value == "":
        return "none" if value is None else "empty"
    if isinstance(value, bool):
        return str(value).lower()
    return str(list(value)) if isinstance(value, tuple) else str(value)


def _set_checked(config: TrainConfig, key: str, value: Any, source: str) -> None:
    try:
        config.set(key, value)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None


def _section_names() -> set[str]:
    return {section.name for section in dataclasses.fields(TrainConfig)}


def _section_class(name: str) -> type:
    return typing.get_type_hints(TrainConfig)[name]


def _field_types(section_class: type) -> dict[str, Any]:
    return typing.get_type_hints(section_class)


def _split_key(key: str) -> tuple[str, str]:
    section, _, name = key.partition(".")
    if section not in _section_names():
        raise ConfigError(f"unknown config section {section!r} in {key!r}{did_you_mean(key, field_names())}; "
                          f"known: {sorted(_section_names())}")
    known = _field_types(_section_class(section))
    if name not in known:
        raise ConfigError(f"unknown config key {key!r}{did_you_mean(key, field_names())}; {section} has "
                          f"{sorted(known)}")
    return section, name


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """`value` (a string from the command line is read as YAML) as the declared type, or a ConfigError."""
    origin = typing.get_origin(annotation)
    options = typing.get_args(annotation) if origin in (typing.Union, types.UnionType) else (annotation,)
    text = value if isinstance(value, str) else None
    if text is not None:
        if text.strip().lower() in ("none", "null", "~") and type(None) in options:
            value = None
        elif text.strip().lower() not in ("none", "null", "~"):
            try:
                parsed = yaml.safe_load(text)
            except yaml.YAMLError:
                parsed = text
            value = text if parsed is None else parsed
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{key} may not be null")
    for option in options:
        converted = _convert(value, option)
        if converted is not _FAIL:
            return converted
    if text is not None and str in options:  # a path such as "2024" that YAML read as a number
        return text
    names = " | ".join(getattr(option, "__name__", str(option)) for option in options)
    raise ConfigError(f"{key} = {value!r} is not a {names}")


_FAIL = object()


def _convert(value: Any, option: Any) -> Any:
    if option is bool:
        return value if isinstance(value, bool) else _FAIL
    if option is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _FAIL
    if option is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return _FAIL
        return _FAIL
    if option is str:
        return value if isinstance(value, str) else _FAIL
    if typing.get_origin(option) is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(typing.get_args(option)):
            return _FAIL
        items = [_convert(item, kind) for item, kind in zip(value, typing.get_args(option))]
        return _FAIL if any(item is _FAIL for item in items) else tuple(items)
    return _FAIL
