"""Model configurations: typed dataclasses with transformers' field names, `config.json` I/O and named presets.

Field names and defaults follow transformers' `AlignTextConfig` / `AlignVisionConfig` / `AlignConfig`, so a
`config.json` written by either library loads in the other. Keys we do not use are kept in `extra` and written
back on save.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openalign.errors import ConfigError
from openalign.untrusted import read_json_object

ACTIVATIONS = ("gelu", "relu", "silu", "swish", "gelu_new", "gelu_pytorch_tanh", "tanh")
POOLING_TYPES = ("mean", "max")


class _Config:
    """Shared dict / JSON behaviour. Subclasses are dataclasses with an `extra` dict for unknown keys."""

    model_type: str = ""

    def __post_init__(self):
        self.validate()

    def check_fields(self) -> None:
        """Every field against its declared type and upper bound (FIELD_LIMITS), before any rule or model uses
        it: a config.json from anywhere may hold 2.5 layers, a list for a tower or a vocabulary of 10^12."""
        name = type(self).__name__
        for field_name, annotation in _annotations(type(self)).items():
            value = getattr(self, field_name)
            conformed = _conform(value, annotation)
            _require(conformed is not _WRONG, name, field_name, value, f"must be {_describe_type(annotation)}")
            limit = FIELD_LIMITS.get(field_name)
            if limit is not None:
                values = conformed if isinstance(conformed, list) else [conformed]
                _require(all(v is None or v <= limit for v in values), name, field_name, value,
                         f"must be at most {limit} (a bound on what a config file may ask to allocate)")
            setattr(self, field_name, conformed)

    def validate(self) -> None:  # pragma: no cover - overridden
        pass

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        """Build from a transformers-style dict; unknown keys land in `extra` (never an error)."""
        if not isinstance(values, dict):
            raise ConfigError(f"{cls.__name__} must be built from a JSON object, got {type(values).__name__}")
        values = dict(values)
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {name: values.pop(name) for name in list(values) if name in known}
        values.pop("model_type", None)
        extra = values.pop("extra", None) or {}
        if not isinstance(extra, dict):
            raise ConfigError(f"{cls.__name__}.extra must be an object, got {type(extra).__name__}")
        return cls(**kwargs, extra={**extra, **values})

    def to_dict(self) -> dict[str, Any]:
        """A transformers-style dict: our fields, then the kept unknown keys, then `model_type`."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, _Config) else copy.deepcopy(value)
        for key, value in self.extra.items():
            out.setdefault(key, copy.deepcopy(value))
        out["model_type"] = self.model_type
        return out

    def replace(self, **changes):
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json_file(cls, path: str | Path):
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"no config file at {path}")
        values = read_json_object(path)
        try:
            return cls.from_dict(values)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None


# Upper bounds on size fields, far above every published ALIGN / EfficientNet / BERT, so that a config file
# cannot ask for terabytes before anything checks it. Lists are bounded entry by entry.
FIELD_LIMITS = {
    "vocab_size": 2**22, "hidden_size": 2**15, "num_hidden_layers": 512, "num_attention_heads": 2**10,
    "intermediate_size": 2**17, "max_position_embeddings": 2**16, "type_vocab_size": 2**10,
    "num_channels": 64, "image_size": 2**13, "width_coefficient": 16, "depth_coefficient": 16,
    "depth_divisor": 2**10, "kernel_sizes": 31, "in_channels": 2**13, "out_channels": 2**13, "strides": 2,
    "num_block_repeats": 64, "expand_ratios": 64, "depthwise_padding": 2**10, "hidden_dim": 2**16,
    "projection_dim": 2**16,
}
_WRONG = object()


def _annotations(cls) -> dict[str, Any]:
    """Field name -> resolved type of a config dataclass (`extra` aside)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name != "extra"}


def _conform(value: Any, annotation: Any) -> Any:
    """`value` as `annotation` says (an integral float is an int; a tower may be a dict), or _WRONG."""
    options = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        else (annotation,)
    if value is None:
        return None if type(None) in options else _WRONG
    for option in options:
        if option is int and not isinstance(value, bool):
            if isinstance(value, int):
                return value
            if isinstance(value, float) and math.isfinite(value) and value.is_integer():
                return int(value)
        elif option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                return value
        elif option is str and isinstance(value, str):
            return value
        elif typing.get_origin(option) is list and isinstance(value, (list, tuple)):
            items = [_conform(item, typing.get_args(option)[0]) for item in value]
            if all(item is not _WRONG for item in items):
                return items
        elif isinstance(option, type) and issubclass(option, _Config) and isinstance(value, (dict, option)):
            return value
    return _WRONG


def _describe_type(annotation: Any) -> str:
    if isinstance(annotation, type) and issubclass(annotation, _Config):
        return f"an object of {annotation.__name__} fields"
    text = str(annotation).replace("typing.", "").replace("openalign.model_config.", "")
    return {"<class 'int'>": "an integer", "<class 'float'>": "a finite number", "<class 'str'>": "a string",
            "int | None": "an integer or null", "list[int]": "a list of integers"}.get(text, text)


def _require(condition: bool, config_name: str, field_name: str, value: Any, rule: str) -> None:
    if not condition:
        raise ConfigError(f"{config_name}.{field_name} = {value!r} is invalid: {rule}")


def _check_positive(config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        _require(
            isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
            type(config).__name__, name, value, "must be a positive number",
        )


def _check_probability(config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        _require(0.0 <= value < 1.0, type(config).__name__, name, value, "must be in [0, 1)")


@dataclass
class AlignTextConfig(_Config):
    """BERT text tower. Defaults are BERT-base (bert-base-uncased vocabulary), as in kakaobrain/align-base."""

    model_type = "align_text_model"

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def validate(self) -> None:
        self.check_fields()
        _check_positive(
            self, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "type_vocab_size", "layer_norm_eps",
        )
        _check_probability(self, "hidden_dropout_prob", "attention_probs_dropout_prob")
        _require(
            self.hidden_size % self.num_attention_heads == 0, "AlignTextConfig", "hidden_size", self.hidden_size,
            f"must be divisible by num_attention_heads ({self.num_attention_heads})",
        )
        _require(self.hidden_act in ACTIVATIONS, "AlignTextConfig", "hidden_act", self.hidden_act,
                 f"must be one of {ACTIVATIONS}")
        if self.pad_token_id is not None:
            _require(0 <= self.pad_token_id < self.vocab_size, "AlignTextConfig", "pad_token_id",
                     self.pad_token_id, f"must be in [0, vocab_size={self.vocab_size})")


@dataclass
class AlignVisionConfig(_Config):
    """EfficientNet image tower. Defaults are EfficientNet-B7 at 600 px (transformers' defaults);
    align-base overrides image_size=289 and hidden_dim=640.

    The seven-entry lists are the stage table of EfficientNet-B0; width_coefficient and depth_coefficient scale
    it to B1..B7 and L2. `batch_norm_momentum` keeps its Keras meaning (decay of the running average, 0.99):
    openalign passes `1 - batch_norm_momentum` to PyTorch. transformers passes 0.99 straight through, which in
    PyTorch's convention keeps almost only the last batch; this only changes running statistics in training.
    """

    model_type = "align_vision_model"

    num_channels: int = 3
    image_size: int = 600
    width_coefficient: float = 2.0
    depth_coefficient: float = 3.1
    depth_divisor: int = 8
    kernel_sizes: list[int] = field(default_factory=lambda: [3, 3, 5, 3, 5, 5, 3])
    in_channels: list[int] = field(default_factory=lambda: [32, 16, 24, 40, 80, 112, 192])
    out_channels: list[int] = field(default_factory=lambda: [16, 24, 40, 80, 112, 192, 320])
    depthwise_padding: list[int] = field(default_factory=list)
    strides: list[int] = field(default_factory=lambda: [1, 2, 2, 2, 1, 2, 1])
    num_block_repeats: list[int] = field(default_factory=lambda: [1, 2, 2, 3, 3, 4, 1])
    expand_ratios: list[int] = field(default_factory=lambda: [1, 6, 6, 6, 6, 6, 6])
    squeeze_expansion_ratio: float = 0.25
    hidden_act: str = "swish"
    hidden_dim: int = 2560
    pooling_type: str = "mean"
    initializer_range: float = 0.02
    batch_norm_eps: float = 0.001
    batch_norm_momentum: float = 0.99
    drop_connect_rate: float = 0.2
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    STAGE_FIELDS = ("kernel_sizes", "in_channels", "out_channels", "strides", "num_block_repeats", "expand_ratios")

    def validate(self) -> None:
        if isinstance(self.image_size, (list, tuple)):
            sizes = set(self.image_size)
            _require(len(sizes) == 1, "AlignVisionConfig", "image_size", self.image_size, "must be square")
            self.image_size = self.image_size[0]
        self.check_fields()
        _check_positive(
            self, "num_channels", "image_size", "width_coefficient", "depth_coefficient", "depth_divisor",
            "squeeze_expansion_ratio", "hidden_dim", "batch_norm_eps",
        )
        _check_probability(self, "drop_connect_rate")
        _require(0.0 <= self.batch_norm_momentum <= 1.0, "AlignVisionConfig", "batch_norm_momentum",
                 self.batch_norm_momentum, "must be in [0, 1]")
        num_stages = len(self.kernel_sizes)
        _require(num_stages > 0, "AlignVisionConfig", "kernel_sizes", self.kernel_sizes, "needs at least one stage")
        for name in self.STAGE_FIELDS:
            values = getattr(self, name)
            _require(len(values) == num_stages, "AlignVisionConfig", name, values,
                     f"must have one entry per stage ({num_stages}, as kernel_sizes)")
            _require(all(v > 0 for v in values), "AlignVisionConfig", name, values, "entries must be positive")
        _require(all(k % 2 == 1 for k in self.kernel_sizes), "AlignVisionConfig", "kernel_sizes",
                 self.kernel_sizes, "kernel sizes must be odd")
        _require(all(s in (1, 2) for s in self.strides), "AlignVisionConfig", "strides", self.strides,
                 "strides must be 1 or 2")
        _require(self.pooling_type in POOLING_TYPES, "AlignVisionConfig", "pooling_type", self.pooling_type,
                 f"must be one of {POOLING_TYPES}")
        _require(self.hidden_act in ACTIVATIONS, "AlignVisionConfig", "hidden_act", self.hidden_act,
                 f"must be one of {ACTIVATIONS}")

    @property
    def num_hidden_layers(self) -> int:
        """Number of MBConv blocks after depth scaling."""
        return sum(math.ceil(self.depth_coefficient * n) for n in self.num_block_repeats)

    @property
    def output_channels(self) -> int:
        """Width of the last block: the image embedding size (there is no top conv)."""
        return round_filters(self.out_channels[-1], self.width_coefficient, self.depth_divisor)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["num_hidden_layers"] = self.num_hidden_layers  # transformers writes it; it is derived here
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        values = {k: v for k, v in values.items() if k != "num_hidden_layers"}
        return super().from_dict(values)


def round_filters(channels: int, width_coefficient: float, divisor: int) -> int:
    """EfficientNet's channel rounding: scale by width, round to a multiple of divisor, never lose over 10%."""
    scaled = channels * width_coefficient
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


@dataclass
class AlignConfig(_Config):
    """The dual encoder: a text tower, an image tower, the text projection and the temperature."""

    model_type = "align"

    text_config: AlignTextConfig = field(default_factory=AlignTextConfig)
    vision_config: AlignVisionConfig = field(default_factory=AlignVisionConfig)
    projection_dim: int = 640
    temperature_init_value: float = 1.0
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def validate(self) -> None:
        self.check_fields()
        if isinstance(self.text_config, dict):
            self.text_config = AlignTextConfig.from_dict(self.text_config)
        if isinstance(self.vision_config, dict):
            self.vision_config = AlignVisionConfig.from_dict(self.vision_config)
        _check_positive(self, "projection_dim", "temperature_init_value")
        image_dim = self.vision_config.output_channels
        _require(
            self.projection_dim == image_dim, "AlignConfig", "projection_dim", self.projection_dim,
            f"must equal the image embedding size ({image_dim}: the image tower has no projection)",
        )

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.setdefault("architectures", ["AlignModel"])
        return out


# ---------------------------------------------------------------------------------------------------------------
# Presets: the family the paper and its reproduction use. EfficientNet variants differ only in width, depth and
# resolution; BERT variants in layers, width and heads.
# ---------------------------------------------------------------------------------------------------------------

EFFICIENTNET_SCALING = {  # name: (width_coefficient, depth_coefficient, image_size)
    "efficientnet-b0": (1.0, 1.0, 224),
    "efficientnet-b1": (1.0, 1.1, 240),
    "efficientnet-b2": (1.1, 1.2, 260),
    "efficientnet-b3": (1.2, 1.4, 300),
    "efficientnet-b4": (1.4, 1.8, 380),
    "efficientnet-b5": (1.6, 2.2, 456),
    "efficientnet-b6": (1.8, 2.6, 528),
    "efficientnet-b7": (2.0, 3.1, 600),
    "efficientnet-l2": (4.3, 5.3, 800),
}

BERT_SIZES = {  # name: (num_hidden_layers, hidden_size, num_attention_heads)
    "bert-tiny": (2, 128, 2),
    "bert-mini": (4, 256, 4),
    "bert-small": (4, 512, 8),
    "bert-medium": (8, 512, 8),
    "bert-base": (12, 768, 12),
    "bert-large": (24, 1024, 16),
}


def vision_preset(name: str, **overrides) -> AlignVisionConfig:
    """An EfficientNet image tower by name (efficientnet-b0 .. b7, efficientnet-l2); `hidden_dim` is the width
    of the last block, which is what ALIGN pools."""
    if name not in EFFICIENTNET_SCALING:
        raise ConfigError(f"unknown image tower {name!r}; known: {sorted(EFFICIENTNET_SCALING)}")
    width, depth, image_size = EFFICIENTNET_SCALING[name]
    config = AlignVisionConfig(width_coefficient=width, depth_coefficient=depth, image_size=image_size)
    config = config.replace(hidden_dim=config.output_channels)
    return config.replace(**overrides) if overrides else config


def text_preset(name: str, **overrides) -> AlignTextConfig:
    """A BERT text tower by name (bert-tiny, -mini, -small, -medium, -base, -large); FFN width is 4x hidden."""
    if name not in BERT_SIZES:
        raise ConfigError(f"unknown text tower {name!r}; known: {sorted(BERT_SIZES)}")
    layers, hidden, heads = BERT_SIZES[name]
    config = AlignTextConfig(
        num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, intermediate_size=4 * hidden
    )
    return config.replace(**overrides) if overrides else config


def _combine(vision: AlignVisionConfig, text: AlignTextConfig, **overrides) -> AlignConfig:
    return AlignConfig(text_config=text, vision_config=vision, projection_dim=vision.output_channels, **overrides)


def _align_base() -> AlignConfig:
    # kakaobrain/align-base: B7 trunk evaluated at 289 px, BERT-base, 640-d embeddings.
    return _combine(vision_preset("efficientnet-b7", image_size=289, hidden_dim=640), text_preset("bert-base"))


def _align_l2_large() -> AlignConfig:
    # The paper's largest model: EfficientNet-L2 + BERT-large, trained at 289 px.
    return _combine(vision_preset("efficientnet-l2", image_size=289), text_preset("bert-large"))


def _tiny() -> AlignConfig:
    # For tests and demos: a narrow, shallow EfficientNet at 64 px and a 2-layer, 64-wide BERT.
    vision = AlignVisionConfig(
        image_size=64, width_coefficient=0.25, depth_coefficient=0.34, hidden_dim=80, drop_connect_rate=0.0
    )
    vision = vision.replace(hidden_dim=vision.output_channels)
    text = AlignTextConfig(
        vocab_size=1024, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        max_position_embeddings=64,
    )
    return _combine(vision, text)


MODEL_PRESETS = {
    "align-base": _align_base,
    "align-l2-large": _align_l2_large,
    "tiny": _tiny,
}


def get_preset(name: str) -> AlignConfig:
    """A named AlignConfig: `align-base`, `align-l2-large`, `tiny`, or `<efficientnet-bN>+<bert-size>`
    (e.g. `efficientnet-b0+bert-mini`)."""
    if name in MODEL_PRESETS:
        return MODEL_PRESETS[name]()
    if "+" in name:
        vision_name, text_name = name.split("+", 1)
        return _combine(vision_preset(vision_name), text_preset(text_name))
    known = sorted(MODEL_PRESETS) + [f"{v}+{t}" for v in ("efficientnet-b0",) for t in ("bert-mini",)]
    raise ConfigError(f"unknown preset {name!r}; known: {known[:-1]} or VISION+TEXT such as {known[-1]}")


def list_presets() -> list[str]:
    """Names accepted by `get_preset`, the combinations written out."""
    combos = [f"{v}+{t}" for v in EFFICIENTNET_SCALING for t in BERT_SIZES]
    return sorted(MODEL_PRESETS) + combos
