"""`AlignProcessor`: images and captions to model inputs, loaded from and saved to transformers' folder layouts.

Folders read: the hub layout of kakaobrain/align-base (flat `preprocessor_config.json`, `vocab.txt` and/or
`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`) and the one transformers 5 writes
(`processor_config.json` with the image settings nested under "image_processor", `tokenizer.json`,
`tokenizer_config.json`). `save_pretrained` writes the image settings in both (the same settings twice), so
every reader finds them where it looks first: transformers 4 and 5, openalign, and tools that read only one.

A folder without image settings is loaded with the settings of its model's own `image_size` (config.json
beside the processor files), said in a warning; with neither, loading refuses rather than guess align-base's.
"""

from __future__ import annotations

import json
import pathlib
import warnings
from typing import Any

import torch

from openalign.errors import ConfigError
from openalign.hub import resolve_folder
from openalign.processing.image_processor import AlignImageProcessor
from openalign.processing.tokenizer import AlignTokenizer
from openalign.untrusted import read_json_object

PROCESSOR_FILES = [
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
]


class BatchEncoding(dict):
    """A dict of tensors that also allows attribute access (`batch.pixel_values`) and `.to(device)`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"no {name!r} in this batch (keys: {sorted(self)})") from None

    def to(self, device: str | torch.device) -> BatchEncoding:
        """Move every tensor to `device`."""
        return BatchEncoding(
            {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in self.items()}
        )


class AlignProcessor:
    """Preprocesses images (`AlignImageProcessor`) and text (`AlignTokenizer`) for `AlignModel`."""

    def __init__(self, tokenizer: AlignTokenizer, image_processor: AlignImageProcessor | None = None) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor or AlignImageProcessor()

    @classmethod
    def from_pretrained(
        cls, folder_or_hub_id: str | pathlib.Path, *, revision: str | None = None, **image_settings: Any
    ) -> AlignProcessor:
        """Load from a local folder (either layout) or a hub id such as "kakaobrain/align-base".

        Hub ids are fetched with `huggingface_hub.snapshot_download`, processor files only (CheckpointError
        when neither works). Keyword arguments override image settings (e.g. `max_pixels=...`, `num_workers=4`).
        """
        folder = resolve_folder(folder_or_hub_id, allow_patterns=PROCESSOR_FILES, revision=revision)
        settings = read_image_settings(folder)
        if settings is None and not {"size", "crop_size"} <= set(image_settings):
            settings = _model_image_settings(folder)
        image_processor = AlignImageProcessor.from_dict({**(settings or {}), **image_settings})
        return cls(AlignTokenizer.from_pretrained(folder), image_processor)

    def save_pretrained(self, folder: str | pathlib.Path) -> None:
        """Write the tokenizer files and the image settings, in preprocessor_config.json (the hub layout) and
        processor_config.json (transformers 5's); openalign and transformers 4 and 5 load the folder."""
        folder = pathlib.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(folder)
        settings = self.image_processor.to_dict()
        layouts = {"preprocessor_config.json": {**settings, "processor_class": "AlignProcessor"},
                   "processor_config.json": {"image_processor": settings, "processor_class": "AlignProcessor"}}
        for name, content in layouts.items():
            (folder / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def __call__(
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        *,
        padding: bool | str = "max_length",
        max_length: int | None = None,
        truncation: bool = True,
        return_tensors: str | None = "pt",
    ) -> BatchEncoding:
        """Images -> `pixel_values` (B, 3, H, W) float32; text -> `input_ids`, `token_type_ids`,
        `attention_mask` (B, T) int64. Either or both may be given; text options are `AlignTokenizer`'s."""
        if images is None and text is None:
            raise ValueError("AlignProcessor needs images, text or both; got neither")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        batch = BatchEncoding()
        if text is not None:
            batch.update(
                self.tokenizer(
                    text,
                    padding=padding,
                    max_length=max_length,
                    truncation=truncation,
                    return_tensors=return_tensors,
                )
            )
        if images is not None:
            batch["pixel_values"] = self.image_processor(images)
        return batch

    def decode(self, token_ids: Any, *, skip_special_tokens: bool = True) -> str:
        """Token ids back to text (see `AlignTokenizer.decode`)."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Any, *, skip_special_tokens: bool = True) -> list[str]:
        """Each row of token ids back to text."""
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)


def _model_image_settings(folder: pathlib.Path) -> dict:
    """The image settings of the model saved beside the processor files (config.json's vision image_size, at
    align-base's resize ratio), with a warning that says so; ConfigError when there is no model to ask."""
    from openalign.model_config import AlignConfig

    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"{folder} has no image settings (preprocessor_config.json or processor_config.json) and no model "
            "config.json to take the image size from; save the processor there (AlignProcessor.save_pretrained) "
            "or pass size= and crop_size="
        )
    image_size = AlignConfig.from_json_file(folder / "config.json").vision_config.image_size
    settings = AlignImageProcessor.for_image_size(image_size).to_dict()
    warnings.warn(
        f"{folder}: no preprocessor_config.json or processor_config.json; using the model's own image size "
        f"(config.json: {image_size} px, resized to {settings['size']['height']} first)",
        stacklevel=3,
    )
    return settings


def read_image_settings(folder: str | pathlib.Path) -> dict | None:
    """Image settings of a processor folder, from either layout; None when the folder has neither file."""
    folder = pathlib.Path(folder)
    nested = folder / "processor_config.json"
    if nested.is_file():
        content = read_json_object(nested)
        if isinstance(content.get("image_processor"), dict):
            return content["image_processor"]
    flat = folder / "preprocessor_config.json"
    if flat.is_file():
        return read_json_object(flat)
    return None
