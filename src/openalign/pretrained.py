"""Checkpoints in the transformers layout: `config.json` + `model.safetensors` (or sharded safetensors, or
`pytorch_model.bin` read with `weights_only=True`). Every foreign name is translated here and nowhere else.

The model modules use transformers' parameter names, so an ALIGN checkpoint maps one to one; the translations
are: a tower loaded from a full ALIGN checkpoint (strip `text_model.` / `vision_model.`), a text tower from a
plain BERT checkpoint (strip `bert.`, drop the pre-training heads, old `gamma`/`beta` LayerNorm names), and
buffers older files carry that the model computes itself (`position_ids`, `token_type_ids`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from openalign import hub
from openalign.errors import CheckpointError, ConfigError, InputLimitError
from openalign.files import atomic_write, atomic_write_bytes
from openalign.model_config import AlignConfig, AlignTextConfig, AlignVisionConfig
from openalign.untrusted import confined_path, parse_json, read_text_file

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "pytorch_model*.bin"]
MAX_CONFIG_BYTES = 2**20  # config.json: a few KB in practice
MAX_INDEX_BYTES = 64 * 2**20  # a shard index lists every tensor name

# Keys some checkpoints hold that carry no weights of ours.
_IGNORED_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")
_BERT_HEAD_PREFIXES = ("cls.",)  # masked-LM / next-sentence heads of a pre-training checkpoint


@dataclass
class LoadReport:
    """What a non-strict load could not match. A strict load raises instead of returning one."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (key, checkpoint, model)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, source: str) -> str:
        lines = [f"checkpoint {source} does not fit the model:"]
        if self.missing:
            lines.append(f"  missing keys ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected keys ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        for key, in_file, in_model in self.mismatched:
            lines.append(f"  shape mismatch for {key}: checkpoint {list(in_file)}, model {list(in_model)}")
        return "\n".join(lines)


def resolve_folder(path_or_hub_id: str | os.PathLike, *, allow_patterns: list[str] | None = None,
                   revision: str | None = None) -> Path:
    """A checkpoint folder: a local folder as is, a hub id (`owner/name`) downloaded with the checkpoint's files
    (HUB_PATTERNS unless allow_patterns is given)."""
    return hub.resolve_folder(path_or_hub_id, allow_patterns=allow_patterns or HUB_PATTERNS, revision=revision)


def read_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder, from whichever of the transformers layouts it holds."""
    folder = Path(folder)
    for index_name in (SAFETENSORS_INDEX_NAME, BIN_INDEX_NAME):
        index_path = folder / index_name
        if index_path.exists():
            return _read_sharded(index_path)
    for name in (SAFETENSORS_NAME, BIN_NAME):
        if (folder / name).exists():
            return read_weights_file(folder / name)
    raise CheckpointError(
        f"no weights in {folder}: expected {SAFETENSORS_NAME}, {SAFETENSORS_INDEX_NAME}, {BIN_NAME} or "
        f"{BIN_INDEX_NAME}"
    )


def _read_sharded(index_path: Path) -> dict[str, torch.Tensor]:
    """The tensors of every shard an index names; shard names must stay inside the index's folder."""
    try:
        weight_map = parse_json(read_text_file(index_path, MAX_INDEX_BYTES, "shard index"), str(index_path))
        weight_map = weight_map["weight_map"]
    except (InputLimitError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{index_path} is not a valid shard index: {error}") from None
    except (KeyError, TypeError):
        raise CheckpointError(f"{index_path} is not a valid shard index: no weight_map object") from None
    if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
        raise CheckpointError(f"{index_path}: weight_map must map tensor names to shard file names")
    state_dict: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        try:
            shard_path = confined_path(index_path.parent, shard, f"shard index {index_path}")
        except InputLimitError as error:
            raise CheckpointError(str(error)) from None
        if not shard_path.exists():
            raise CheckpointError(f"{index_path} lists shard {shard}, which is missing")
        state_dict.update(read_weights_file(shard_path))
    absent = sorted(set(weight_map) - set(state_dict))
    if absent:
        raise CheckpointError(f"{index_path} lists keys its shards do not hold: {', '.join(absent[:10])}")
    return state_dict


def read_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """One `.safetensors` or `.bin` file. Pickles are read with `weights_only=True`; a truncated or corrupt
    file raises `CheckpointError` naming it."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot read weights file {path} (truncated or corrupt?): {error}") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors")
    return state_dict


def write_checkpoint(folder: str | os.PathLike, config, state_dict: dict[str, torch.Tensor]) -> Path:
    """`config.json` + `model.safetensors`, each written atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    # shared: several processes may save the same folder at once (each writes its own temporary file).
    atomic_write(folder / SAFETENSORS_NAME, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}),
                 shared=True)
    config_dict = config.to_dict()
    config_dict.setdefault("architectures", [_ARCHITECTURES.get(type(config), "AlignModel")])
    atomic_write_bytes(folder / CONFIG_NAME, (json.dumps(config_dict, indent=2) + "\n").encode(), shared=True)
    return folder


_ARCHITECTURES = {AlignConfig: "AlignModel", AlignTextConfig: "AlignTextModel", AlignVisionConfig: "AlignVisionModel"}
_TOWER_PREFIX = {AlignTextConfig: "text_model.", AlignVisionConfig: "vision_model."}


def read_config(folder: Path, config_class):
    """The config for `config_class` from a folder's config.json: a full ALIGN config gives its tower's part to a
    tower, and a plain BERT config (model_type "bert") is read as a text tower."""
    config_path = folder / CONFIG_NAME
    if not config_path.exists():
        raise CheckpointError(f"no {CONFIG_NAME} in {folder}")
    try:
        values = parse_json(read_text_file(config_path, MAX_CONFIG_BYTES, "model config"), str(config_path))
    except InputLimitError as error:
        raise CheckpointError(str(error)) from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_path} is not valid JSON: {error}") from None
    if not isinstance(values, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object, found a {type(values).__name__}")
    model_type = values.get("model_type")
    try:
        if config_class is not AlignConfig and model_type == "align":
            key = "text_config" if config_class is AlignTextConfig else "vision_config"
            if not isinstance(values.get(key, {}), dict):
                raise ConfigError(f"{key} = {values[key]!r} is invalid: must be an object of the tower's fields")
            return config_class.from_dict(values.get(key, {}))
        if config_class is AlignConfig and model_type not in (None, "align"):
            raise CheckpointError(f"{config_path} has model_type {model_type!r}; AlignModel needs 'align'")
        if config_class is AlignVisionConfig and model_type not in (None, "align_vision_model"):
            raise CheckpointError(f"{config_path} has model_type {model_type!r}; not an ALIGN image tower")
        return config_class.from_dict(values)
    except ConfigError as error:
        raise CheckpointError(f"{config_path}: {error}") from None
    except TypeError as error:  # an unexpected keyword: the field types themselves are checked by the config
        raise CheckpointError(f"{config_path} has a field of the wrong type: {error}") from None


def translate_state_dict(state_dict: dict[str, torch.Tensor], config_class) -> dict[str, torch.Tensor]:
    """Foreign key names -> ours, for the model built from `config_class`."""
    prefix = _TOWER_PREFIX.get(config_class)
    keys = list(state_dict)
    if prefix and any(k.startswith(prefix) for k in keys):
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    elif config_class is AlignTextConfig:
        if any(k.startswith("bert.") for k in keys):
            state_dict = {k[len("bert."):]: v for k, v in state_dict.items() if k.startswith("bert.")}
        else:
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(_BERT_HEAD_PREFIXES)}
        state_dict = {_modern_layer_norm_name(k): v for k, v in state_dict.items()}
    return {k: v for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIXES)}


def _modern_layer_norm_name(key: str) -> str:
    if ".LayerNorm." in key:
        return key.replace(".gamma", ".weight").replace(".beta", ".bias")
    return key


def load_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], *, source: str, strict: bool = True):
    """Copy tensors into `model`, checking every key and shape first. Strict: one error listing all problems.
    Non-strict: load what fits and return the LoadReport. BatchNorm batch counters may be absent."""
    own = model.state_dict()
    report = LoadReport()
    for key, tensor in own.items():
        if key not in state_dict:
            if not key.endswith("num_batches_tracked"):
                report.missing.append(key)
        elif state_dict[key].shape != tensor.shape:
            report.mismatched.append((key, tuple(state_dict[key].shape), tuple(tensor.shape)))
    report.unexpected = sorted(k for k in state_dict if k not in own)
    if not report.ok:
        if strict:
            raise CheckpointError(report.describe(source))
        logger.warning(report.describe(source))
    bad = {k for k, _, _ in report.mismatched}
    loadable = {k: v for k, v in state_dict.items() if k in own and k not in bad}
    model.load_state_dict(loadable, strict=False)
    return report


class PretrainedMixin:
    """`from_pretrained` / `save_pretrained` for a module with a `config` and a `config_class`."""

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        *,
        config=None,
        strict: bool = True,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ):
        """Load a transformers-format folder (or hub id). `strict=False` loads what fits, logs the rest and
        leaves the report on `model.load_report`."""
        folder = resolve_folder(path_or_hub_id)
        config = config if config is not None else read_config(folder, cls.config_class)
        model = cls(config)
        state_dict = translate_state_dict(read_state_dict(folder), cls.config_class)
        model.load_report = load_into(model, state_dict, source=str(folder), strict=strict)
        model.to(device=device, dtype=dtype)
        return model.eval()

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write `config.json` + `model.safetensors` that transformers loads with no missing or unexpected keys."""
        return write_checkpoint(folder, self.config, self.state_dict())
