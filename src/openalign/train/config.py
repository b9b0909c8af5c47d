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

from openalign.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: TOML configs need 3.11; YAML works everywhere
    tomllib = None


@dataclass
class ModelSection:
    """What to train: a preset or config.json, optionally started from checkpoints, towers frozen or not."""

    preset: str = "tiny"
    config: str | None = None  # a config.json (or a folder holding one); overrides `preset`
    init_from: str | None = None  # an ALIGN checkpoint folder for the whole model
    text_init: str | None = None  # an ALIGN checkpoint or a plain BERT folder, for the text tower only
    vision_init: str | None = None  # an ALIGN checkpoint, for the image tower only
    freeze_text: bool = False
    freeze_vision: bool = False
    temperature_init: float | None = None  # overrides the config's temperature_init_value (ALIGN: 1.0)
    gradient_checkpointing: str = "none"  # none | text | vision | both
    residual_gain: float = 0.2  # trainable_init's gain on residual branches, for towers trained from scratch
    # Keras meaning (decay of the running average; align-base: 0.99). Short runs want less, e.g. 0.9: with
    # 0.99 the running statistics that evaluation uses lag far behind the weights for thousands of steps.
    batch_norm_momentum: float | None = None


@dataclass
class DataSection:
    """Where pairs come from and how they are turned into tensors."""

    train: str = ""  # a manifest, an image folder or a WebDataset shard spec
    val: str | None = None  # held-out pairs for validation (a manifest or shards)
    tokenizer: str = ""  # a folder with tokenizer.json or vocab.txt
    image_size: int | None = None  # the crop; default: the model config's image_size
    resize: int | None = None  # the square resize before the crop; default: image_size * 346 / 289
    flip: bool | str = "auto"  # True, False or "auto" (no flip when the caption says left/right)
    max_length: int = 64
    num_workers: int = 0
    resampled: bool = False
    shuffle_buffer: int = 1000
    epoch_size: int | None = None
    cache_images: bool = False  # keep decoded images in memory after their first epoch (data that fits in RAM)
    group_by: str | None = None  # a manifest column: shuffle in runs of group_size rows sharing its value
    group_size: int = 128
    group_fraction: float = 1.0  # the share of rows that come in runs; the rest are shuffled singly
    group_from_epoch: int = 0  # plain shuffles before this epoch
    val_max_samples: int = 1000


@dataclass
class OptimSection:
    """Optimiser, schedule, batch and gradient handling."""

    name: str = "lamb"  # lamb | adamw
    lr: float = 1e-3
    weight_decay: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    warmup_steps: int = 0
    total_steps: int = 1000
    schedule: str = "linear"  # linear | cosine | constant (after the warmup)
    min_lr_ratio: float = 0.0
    grad_clip: float | None = None  # max global gradient norm; None: no clipping
    batch_size: int = 32  # per process; the global batch is batch_size * world_size
    accumulation: int = 1  # micro-batches per step, exact through feature caching when > 1


@dataclass
class LossSection:
    """The contrastive loss; negatives come from the global batch under torch.distributed."""

    name: str = "align"  # a key of openalign.losses.LOSSES (align, clip, siglip, and any registered there)
    label_smoothing: float = 0.1
    local_loss: bool = True
    gather_with_grad: bool = True
    # Hard-negative weighting (align and clip): each negative counts in proportion to exp(beta * its cosine),
    # normalised to average 1 (losses.py); 0 is the plain loss.
    hard_negative_beta: float = 0.0
    # A label-free second term (train/image_ssl.py, after SLIP): each image against a colour-scrambled, moved
    # view of itself, through an MLP head. 0 turns it off; images: how many per batch get a view (0: all).
    image_ssl_weight: float = 0.0
    image_ssl_images: int = 0
    image_ssl_temperature: float = 0.1
    image_ssl_warmup_steps: int = 0  # the weight rises linearly from 0 to image_ssl_weight over these steps


@dataclass
class RunSection:
    """Where the run lives and how it is watched, saved and guarded."""

    out_dir: str = "runs/align"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 with a grad scaler, CUDA only)
    channels_last: bool | str = "auto"  # memory format of the image tower; auto: on for CPU
    compile: bool = False
    ema_decay: float | None = None
    checkpoint_every: int = 1000
    keep_last: int = 3
    val_every: int = 0  # 0: validate only at the end (when a val set is given)
    log_every: int = 10
    nan_policy: str = "halt"  # halt | skip
    # With nan_policy skip, a run that skips this many steps in a row, or this many in all (None: a tenth of
    # optim.total_steps, at least 10), has diverged: it stops with an error instead of reporting success.
    max_consecutive_skipped_steps: int = 10
    max_skipped_steps: int | None = None
    max_minutes: float | None = None  # stop (with a checkpoint) once this much wall time has passed
    # With max_minutes: re-plan optim.total_steps from the measured step time while the decay is in its first
    # quarter, so that the schedule ends when the time does (instead of being cut by it, or ending early).
    fit_steps_to_time: bool = False
    progress: bool = True
    tensorboard: bool = True  # used when the tensorboard package is importable
    plots: bool = True


@dataclass
class DistributedSection:
    """How several processes share the work (only used under torchrun)."""

    strategy: str = "ddp"  # ddp | fsdp
    sync_batchnorm: bool = False
    backend: str | None = None  # default: nccl on GPU, gloo on CPU


def field_choices() -> dict[str, tuple]:
    """The fields that take one of a few values, and those values; loss names come from the loss registry."""
    # Imported here, not at the top: building the command line reads this module and should not load torch.
    from openalign.losses import LOSSES

    return {
        "model.gradient_checkpointing": ("none", "text", "vision", "both"),
        "data.flip": (True, False, "auto"),
        "optim.name": ("lamb", "adamw"),
        "optim.schedule": ("linear", "cosine", "constant"),
        "loss.name": tuple(LOSSES),
        "run.device": ("auto", "cpu", "cuda"),
        "run.dtype": ("fp32", "bf16", "fp16"),
        "run.channels_last": (True, False, "auto"),
        "run.nan_policy": ("halt", "skip"),
        "distributed.strategy": ("ddp", "fsdp"),
    }


POSITIVE = ("data.max_length", "data.group_size", "optim.lr", "optim.total_steps", "optim.batch_size",
            "optim.accumulation", "run.checkpoint_every", "run.keep_last", "run.log_every",
            "run.max_consecutive_skipped_steps")
# Fields that change how a run is watched, saved, timed or placed, but not the updates it computes: a resumed run
# may change them freely. Any other difference from the checkpoint's configuration needs --force.
TRAJECTORY_NEUTRAL = {
    "run.out_dir", "run.device", "run.compile", "run.checkpoint_every", "run.keep_last", "run.val_every",
    "run.log_every", "run.nan_policy", "run.max_consecutive_skipped_steps", "run.max_skipped_steps",
    "run.max_minutes", "run.progress", "run.tensorboard", "run.plots", "data.val", "data.val_max_samples",
    "data.num_workers", "data.cache_images", "distributed.backend",
}
# A string value starting so is a command that a shard reader runs (WebDataset's "pipe:" URLs).
COMMAND_PREFIX = "pipe:"


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
        if self.run.max_skipped_steps is not None and self.run.max_skipped_steps < 1:
            raise ConfigError(f"run.max_skipped_steps = {self.run.max_skipped_steps} must be positive (or null)")
        if self.run.fit_steps_to_time and self.run.max_minutes is None:
            raise ConfigError("run.fit_steps_to_time needs run.max_minutes: the time to fit the steps to")
        if self.model.freeze_text and self.model.freeze_vision:
            raise ConfigError("model.freeze_text and model.freeze_vision are both set: nothing left to train")
        return self

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

    def skip_limits(self) -> tuple[int, int]:
        """(most skipped steps in a row, most in all) before a run with nan_policy skip counts as diverged."""
        total = self.run.max_skipped_steps
        if total is None:
            total = max(10, self.optim.total_steps // 10)
        return self.run.max_consecutive_skipped_steps, total

    def save(self, path: str | Path) -> Path:
        """Write the resolved configuration as YAML."""
        path = Path(path)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
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
        raise ConfigError(f"unknown config section {section!r} in {key!r}; known: {sorted(_section_names())}")
    known = _field_types(_section_class(section))
    if name not in known:
        raise ConfigError(f"unknown config key {key!r}; {section} has {sorted(known)}")
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
