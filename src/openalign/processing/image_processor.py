"""The evaluation image transform, numerically equal to transformers' PIL `EfficientNetImageProcessor`.

Pipeline per image: RGB uint8 -> PIL resize -> center crop (zero padded when the image is smaller) -> rescale
(float64 multiply, cast to float32, optional "- 1" offset) -> optional normalise -> optional divide by std
(`include_top`) -> (3, H, W) float32.

Every step after the resize is an element-wise function of one uint8 value and its channel, so the whole
float tail is a (3, 256) lookup table built once with exactly transformers' sequence of float operations; the
result is bit-identical and the per-pixel work is a single gather.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from openalign.errors import ConfigError
from openalign.processing.images import DEFAULT_MAX_PIXELS, batch_item_name, load_image, map_in_threads

IMAGE_PROCESSOR_TYPE = "EfficientNetImageProcessor"


@dataclasses.dataclass
class AlignImageProcessor:
    """Image settings under transformers' field names; align-base's values are the defaults.

    Call it on one image or a list of images (any source `load_image` accepts, or a 4-D array / tensor) to get
    `pixel_values` float32 (B, 3, H, W). `max_pixels` and `num_workers` are openalign's own (not saved).
    """

    do_resize: bool = True
    size: dict = dataclasses.field(default_factory=lambda: {"height": 346, "width": 346})
    resample: int = int(Image.Resampling.BILINEAR)
    do_center_crop: bool = True
    crop_size: dict = dataclasses.field(default_factory=lambda: {"height": 289, "width": 289})
    do_rescale: bool = True
    rescale_factor: float = 1 / 127.5
    rescale_offset: bool = True
    do_normalize: bool = False
    image_mean: list = dataclasses.field(default_factory=lambda: [0.485, 0.456, 0.406])
    image_std: list = dataclasses.field(default_factory=lambda: [0.229, 0.224, 0.225])
    include_top: bool = False
    max_pixels: int | None = dataclasses.field(default=DEFAULT_MAX_PIXELS, compare=False)
    num_workers: int | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.size = _size_dict(self.size, "size")
        self.crop_size = _size_dict(self.crop_size, "crop_size")
        self.resample = int(self.resample)
        self.image_mean = _per_channel(self.image_mean, "image_mean")
        self.image_std = _per_channel(self.image_std, "image_std")
        if self.do_normalize or self.include_top:
            if any(value == 0 for value in self.image_std):
                raise ConfigError(f"image_std must not contain 0, got {self.image_std}")
        self._lookup = None

    @classmethod
    def from_dict(cls, settings: dict) -> AlignImageProcessor:
        """Build from a preprocessor_config.json dictionary, ignoring keys that are not settings."""
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in settings.items() if key in names})

    @classmethod
    def for_image_size(cls, image_size: int, resize: int | None = None) -> AlignImageProcessor:
        """align-base's settings scaled to another crop: a square resize to `resize` (default image_size *
        346 / 289, align-base's ratio), then the centre crop of image_size. What a model trained at that size
        (`openalign train`, whose validation uses exactly this) is evaluated with."""
        resize = resize or round(image_size * 346 / 289)
        return cls(size={"height": resize, "width": resize}, crop_size={"height": image_size, "width": image_size})

    def to_dict(self) -> dict:
        """The settings as transformers writes them in preprocessor_config.json."""
        settings = {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if field.name not in ("max_pixels", "num_workers")
        }
        settings["image_processor_type"] = IMAGE_PROCESSOR_TYPE
        return settings

    def __call__(self, images: Any) -> torch.Tensor:
        """Preprocess one image or a batch into float32 pixel_values (B, 3, H, W), on a thread pool."""
        batch = split_image_batch(images)
        if self.do_resize and "height" not in self.size and "shortest_edge" not in self.size:
            raise ConfigError(f"size must hold 'height' and 'width' or 'shortest_edge', got {self.size}")
        crops = map_in_threads(self._load_and_crop, batch, num_workers=self.num_workers)  # each (H, W, 3) uint8
        shapes = {crop.shape for crop in crops}
        if len(shapes) > 1:
            raise ValueError(
                f"processed images have different shapes {sorted(shapes)}; "
                "enable do_center_crop or use a fixed size"
            )
        height, width, _ = crops[0].shape
        # Filled in place: torch.stack of many (3, H, W) tensors is far slower than this on CPU.
        pixel_values = np.empty((len(crops), 3, height, width), dtype=np.float32)
        for index, crop in enumerate(crops):
            self._rescale_into(crop, pixel_values[index])
        return torch.from_numpy(pixel_values)

    def preprocess_image(self, image: Image.Image) -> torch.Tensor:
        """Process one RGB PIL image into (3, H, W) float32."""
        crop = self._resize_and_crop(image)
        values = np.empty((3,) + crop.shape[:2], dtype=np.float32)
        self._rescale_into(crop, values)
        return torch.from_numpy(values)

    def _load_and_crop(self, index: int, source: Any) -> np.ndarray:
        image = load_image(source, max_pixels=self.max_pixels, name=batch_item_name(index, source))
        return self._resize_and_crop(image)

    def _resize_and_crop(self, image: Image.Image) -> np.ndarray:
        if self.do_resize:
            height, width = self._output_size(image.height, image.width)
            image = image.resize((width, height), resample=self.resample)
        pixels = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
        if self.do_center_crop:
            pixels = center_crop(pixels, self.crop_size["height"], self.crop_size["width"])
        return pixels

    def _rescale_into(self, pixels: np.ndarray, out: np.ndarray) -> None:
        lookup = self._value_lookup()
        planes = pixels.transpose(2, 0, 1)  # (3, H, W), a view
        for channel in range(3):
            np.take(lookup[channel], planes[channel], out=out[channel])

    def _output_size(self, height: int, width: int) -> tuple[int, int]:
        if "height" in self.size:
            return self.size["height"], self.size["width"]
        # Shortest-edge resize keeps the aspect ratio; the long side is truncated, as torchvision does.
        shortest = self.size["shortest_edge"]
        if height <= width:
            return shortest, int(shortest * width / height)
        return int(shortest * height / width), shortest

    def _value_lookup(self) -> np.ndarray:
        # Keyed on the settings so that changing a field after a call cannot serve a stale table.
        key = (self.do_rescale, self.rescale_factor, self.rescale_offset, self.do_normalize,
               tuple(self.image_mean), tuple(self.image_std), self.include_top)  # fmt: skip
        if self._lookup is None or self._lookup[0] != key:
            self._lookup = (key, self._build_value_lookup())
        return self._lookup[1]

    def _build_value_lookup(self) -> np.ndarray:
        # The same dtypes and operation order as transformers, so that each entry is bit-identical.
        values = np.tile(np.arange(256, dtype=np.uint8)[:, None], (1, 3))  # (256, 3)
        if self.do_rescale:
            values = (values.astype(np.float64) * self.rescale_factor).astype(np.float32)
            if self.rescale_offset:
                values -= 1
        values = values.astype(np.float32)
        if self.do_normalize:
            mean = np.array(self.image_mean, dtype=np.float32)
            std = np.array(self.image_std, dtype=np.float32)
            values = (values - mean) / std
        if self.include_top:
            values = (values - np.zeros(3, dtype=np.float32)) / np.array(self.image_std, dtype=np.float32)
        return np.ascontiguousarray(values.T)  # (3, 256)


def center_crop(pixels: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    """Crop (H, W, C) around the centre; a side shorter than the crop is zero padded (odd pixel before)."""
    height, width = pixels.shape[:2]
    top = (height - crop_height) // 2
    left = (width - crop_width) // 2
    if top >= 0 and left >= 0:
        return pixels[top : top + crop_height, left : left + crop_width]
    padded_height, padded_width = max(height, crop_height), max(width, crop_width)
    pad_top = math.ceil((padded_height - height) / 2)
    pad_left = math.ceil((padded_width - width) / 2)
    padded = np.zeros((padded_height, padded_width) + pixels.shape[2:], dtype=pixels.dtype)
    padded[pad_top : pad_top + height, pad_left : pad_left + width] = pixels
    top, left = top + pad_top, left + pad_left
    return padded[max(0, top) : top + crop_height, max(0, left) : left + crop_width]


def split_image_batch(images: Any) -> list:
    """Turn one image or a batch (list, tuple, 4-D array or tensor) into a list of single images."""
    if images is None:
        raise ValueError("no images given")
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        batch = list(images)
    elif isinstance(images, (list, tuple)):
        batch = list(images)
    else:
        batch = [images]
    if not batch:
        raise ValueError("the image batch is empty")
    for index, item in enumerate(batch):
        if item is None:
            raise ValueError(f"image item {index} is None")
    return batch


def _size_dict(size: Any, field_name: str) -> dict:
    if isinstance(size, int):
        return {"height": size, "width": size}
    if isinstance(size, dict):
        if {"height", "width"} <= size.keys():
            return {"height": int(size["height"]), "width": int(size["width"])}
        if "shortest_edge" in size:
            return {"shortest_edge": int(size["shortest_edge"])}
    raise ConfigError(
        f"{field_name} must be an int or hold 'height' and 'width' (or 'shortest_edge'), got {size}"
    )


def _per_channel(values: float | Sequence[float], field_name: str) -> list:
    if isinstance(values, (int, float)):
        return [float(values)] * 3
    values = [float(value) for value in values]
    if len(values) != 3:
        raise ConfigError(f"{field_name} must have 3 values (one per RGB channel), got {values}")
    return values
