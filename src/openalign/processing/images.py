"""Image loading: any source to an RGB PIL image, safely; plus the training augmentation.

`load_image` is the one door every image comes through. It accepts a path (str or `pathlib.Path`), bytes, a
binary file object, a PIL image, a numpy array (HW, HWC) or a torch tensor (CHW, HWC, HW), and returns an RGB
PIL image with EXIF orientation applied. Mode rules (transformers converts none of these):

- RGB: unchanged. L and 1: grey replicated to three channels.
- Anything with alpha (RGBA, LA, PA, RGBa, La) and P or L/RGB with a `transparency` entry: composited on a
  WHITE background, because transparent regions of logos and product photos are meant to be seen on a page,
  and dark line art on transparency disappears on black.
- CMYK, YCbCr, LAB, HSV: PIL's own `convert("RGB")` (CMYK uses PIL's naive formula, no ICC profile).
- I;16 (all byte orders) and I: read as 16-bit intensities, clipped to [0, 65535] and divided by 257 with
  rounding (65535 -> 255).
- F: values on the 0-1 scale when all lie in [0, 1], else on the 0-255 scale; clipped to [0, 255] and rounded.

Arrays and tensors: uint8 as is; bool refused; other integers must lie in [0, 255] (uint16 is read as
16-bit as above); floats must be finite, and are read on the 0-1 scale when all lie in [0, 1] and on the
0-255 scale when all lie in [0, 255], else refused (an already normalised tensor is a bug, not an image).
One channel is grey, two grey + alpha, three RGB, four RGBA.

Files are opened lazily and their header size checked against `max_pixels` before any pixel is decoded, so a
decompression bomb costs a few bytes of reading; with `reduce_to`, a JPEG is decoded at a reduced scale first
(libjpeg's DCT scaling) and the limit applies to the pixels actually decoded. I;16, I and F images are converted
a block of rows at a time, so a small file that decodes to a large high-depth image costs its decoded size plus
one 8-bit copy, never float64 copies of the whole. Every failure is an `ImageLoadError` naming the source.
"""

from __future__ import annotations

import io
import os
import pathlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from openalign.errors import ConfigError, ImageLoadError

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own warning threshold (about 9459 x 9459)

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
# Rows of a high-depth image converted at a time: a few MB of float64 for the widest images allowed.
_CONVERSION_ROWS = 128


def describe_source(source: Any) -> str:
    """A short human name for an image source, used in error messages."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"bytes object ({len(source)} bytes)"
    if isinstance(source, Image.Image):
        return f"PIL image (mode {source.mode}, size {source.size})"
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return f"{type(source).__name__} of shape {tuple(source.shape)} and dtype {source.dtype}"
    name = getattr(source, "name", None)
    if isinstance(name, str):
        return name
    return type(source).__name__


def load_image(
    source: Any,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    name: str | None = None,
    reduce_to: int | None = None,
) -> Image.Image:
    """Load one image from any supported source as an RGB PIL image (rules in the module docstring).

    `max_pixels` (None for no limit) refuses images whose header declares more pixels, before decoding.
    PIL's own global guard still refuses files above 2 * `PIL.Image.MAX_IMAGE_PIXELS` (about 179M pixels)
    at open time; raise that global too to accept larger images.
    `name` replaces the automatic description of the source in error messages (e.g. "item 3 (cat.jpg)").
    `reduce_to`: for a caller that shrinks the image to about that many pixels a side anyway (a model's input, a
    thumbnail), a JPEG file is decoded at 1/2, 1/4 or 1/8 scale as long as both sides stay at least reduce_to:
    a 48-megapixel photo then costs under a megapixel, and the pixels differ slightly from a full decode.
    """
    label = name or describe_source(source)
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (np.ndarray, torch.Tensor)):
        return _image_from_array(source, label)
    elif isinstance(source, (str, os.PathLike)):
        if not pathlib.Path(source).is_file():
            # A FIFO or device is never opened: the first would wait for a writer, the second never ends.
            what = "not a regular file" if os.path.exists(source) else "no such image file"
            raise ImageLoadError(f"{label}: {what}")
        image = _open_and_decode(source, label, max_pixels, reduce_to)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageLoadError(f"{label}: empty, not an image")
        image = _open_and_decode(io.BytesIO(bytes(source)), label, max_pixels, reduce_to)
    elif hasattr(source, "read"):
        image = _open_and_decode(source, label, max_pixels, reduce_to)
    else:
        raise ImageLoadError(
            f"{label}: unsupported image source type {type(source).__name__} "
            "(expected a path, bytes, file object, PIL image, numpy array or torch tensor)"
        )
    _check_size(image.size, label, max_pixels)
    try:
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except ImageLoadError as error:
        raise ImageLoadError(f"{label}: {error}") from error
    except Exception as error:  # PIL raises many unrelated types on corrupt data
        raise ImageLoadError(f"{label}: cannot convert image to RGB: {error}") from error


def load_images(
    sources: Sequence[Any],
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    num_workers: int | None = None,
) -> list[Image.Image]:
    """Load many images in a thread pool (PIL decodes without the GIL); order is preserved.

    Errors name the batch position, e.g. "item 3 (photos/cat.jpg)". `num_workers` defaults to the CPU count.
    """
    return map_in_threads(
        lambda index, source: load_image(source, max_pixels=max_pixels, name=batch_item_name(index, source)),
        sources,
        num_workers=num_workers,
    )


def batch_item_name(index: int, source: Any) -> str:
    """The name of a batch element in error messages: its position, and its path when it has one."""
    if isinstance(source, (str, os.PathLike)):
        return f"item {index} ({source})"
    return f"item {index} ({describe_source(source)})"


def map_in_threads(
    function: Callable[[int, Any], Any], items: Sequence[Any], *, num_workers: int | None = None
) -> list:
    """`[function(i, item) for i, item in enumerate(items)]` on a thread pool, in order; errors re-raised."""
    num_workers = num_workers or os.cpu_count() or 1
    if num_workers <= 1 or len(items) <= 1:
        return [function(index, item) for index, item in enumerate(items)]
    with ThreadPoolExecutor(max_workers=min(num_workers, len(items))) as pool:
        return list(pool.map(function, range(len(items)), items))


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to RGB by the rules in the module docstring."""
    mode = image.mode
    if mode == "RGB" and "transparency" not in image.info:
        return image
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in _SIXTEEN_BIT_MODES:
        return _grey_by_rows(image, lambda values: np.rint(np.clip(values, 0, 65535) / 257.0))
    if mode == "F":
        low, high = np.inf, -np.inf
        for block in _row_blocks(image):
            block_low, block_high = float(block.min()), float(block.max())  # NaN when any value is NaN
            if not (np.isfinite(block_low) and np.isfinite(block_high)):
                raise ImageLoadError(f"mode F image of size {image.size} holds NaN or infinite values")
            low, high = min(low, block_low), max(high, block_high)
        scale = 255.0 if low >= 0 and high <= 1 else 1.0
        return _grey_by_rows(image, lambda values: np.rint(np.clip(values * scale, 0, 255)))
    return image.convert("RGB")


def _row_blocks(image: Image.Image):
    """The image's pixels as float64 arrays of at most _CONVERSION_ROWS rows, top to bottom."""
    width, height = image.size
    for top in range(0, height, _CONVERSION_ROWS):
        yield np.asarray(image.crop((0, top, width, min(top + _CONVERSION_ROWS, height))), dtype=np.float64)


def _grey_by_rows(image: Image.Image, to_byte_values: Callable[[np.ndarray], np.ndarray]) -> Image.Image:
    """RGB from a one-channel high-depth image, to_byte_values mapping float64 pixels to [0, 255], a block of
    rows at a time: float64 copies are of one block, the whole image is copied only as 8-bit grey and RGB."""
    grey = Image.new("L", image.size)
    for number, block in enumerate(_row_blocks(image)):
        grey.paste(Image.fromarray(to_byte_values(block).astype(np.uint8), mode="L"), (0, number * _CONVERSION_ROWS))
    return grey.convert("RGB")


def _open_and_decode(file: Any, label: str, max_pixels: int | None, reduce_to: int | None = None) -> Image.Image:
    try:
        image = Image.open(file)
    except Image.DecompressionBombError as error:
        raise ImageLoadError(f"{label}: refused, too many pixels ({error})") from error
    except Image.UnidentifiedImageError as error:
        # PIL's own message names an in-memory file by its address, which would differ from run to run (and
        # break the byte-identical resume of an embedding run, whose skipped lists hold these messages).
        raise ImageLoadError(f"{label}: not a readable image (PIL cannot identify its format)") from error
    except Exception as error:
        raise ImageLoadError(f"{label}: not a readable image ({error})") from error
    # The header is read; the pixels are not. This is the moment to refuse a bomb.
    if reduce_to and image.format == "JPEG":
        image.draft(None, (reduce_to, reduce_to))  # the size becomes the one that will be decoded
    _check_size(image.size, label, max_pixels)
    try:
        image.load()
    except Exception as error:
        raise ImageLoadError(f"{label}: corrupt or truncated image data ({error})") from error
    return image


def _check_size(size: tuple[int, int], label: str, max_pixels: int | None) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageLoadError(f"{label}: image has zero width or height ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageLoadError(
            f"{label}: refused, {width}x{height} = {width * height} pixels is above the limit of {max_pixels}"
        )


def _image_from_array(array: np.ndarray | torch.Tensor, label: str) -> Image.Image:
    if isinstance(array, torch.Tensor):
        tensor = array.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()
        # Tensors follow torch's channels-first convention unless their last axis looks like channels.
        if tensor.ndim == 3 and tensor.shape[0] in (1, 2, 3, 4) and tensor.shape[-1] not in (1, 2, 3, 4):
            tensor = tensor.permute(1, 2, 0)
        values = tensor.numpy()
    else:
        values = array
        if values.ndim == 3 and values.shape[0] in (1, 2, 3, 4) and values.shape[-1] not in (1, 2, 3, 4):
            values = np.moveaxis(values, 0, -1)
    if values.ndim == 3 and values.shape[-1] == 1:
        values = values[..., 0]
    if values.ndim not in (2, 3) or (values.ndim == 3 and values.shape[-1] not in (2, 3, 4)):
        raise ImageLoadError(f"{label}: expected an image of shape (H, W), (H, W, C) or (C, H, W), C <= 4")
    height, width = values.shape[:2]
    if height == 0 or width == 0:
        raise ImageLoadError(f"{label}: image has zero width or height ({width}x{height})")
    pixels = _to_uint8(values, label)
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[pixels.shape[-1]] if pixels.ndim == 3 else "L"
    if pixels.ndim == 3 and pixels.shape[-1] == 2:
        mode = "LA"
    return to_rgb(Image.fromarray(np.ascontiguousarray(pixels), mode=mode))


def _to_uint8(values: np.ndarray, label: str) -> np.ndarray:
    if values.dtype == np.uint8:
        return values
    if values.dtype == np.bool_:
        raise ImageLoadError(f"{label}: boolean arrays are masks, not images")
    if values.dtype == np.uint16:
        return np.rint(values / 257.0).astype(np.uint8)
    if np.issubdtype(values.dtype, np.integer):
        if values.min() < 0 or values.max() > 255:
            raise ImageLoadError(
                f"{label}: integer pixel values must lie in [0, 255], got [{values.min()}, {values.max()}]"
            )
        return values.astype(np.uint8)
    if not np.issubdtype(values.dtype, np.floating):
        raise ImageLoadError(f"{label}: unsupported pixel dtype {values.dtype}")
    if not np.all(np.isfinite(values)):
        raise ImageLoadError(f"{label}: pixel values contain NaN or infinity")
    low, high = float(values.min()), float(values.max())
    if low >= 0 and high <= 1:
        return np.rint(values.astype(np.float64) * 255.0).astype(np.uint8)
    if low >= 0 and high <= 255:
        return np.rint(values).astype(np.uint8)
    raise ImageLoadError(
        f"{label}: float pixel values must lie in [0, 1] or [0, 255], got [{low:.4g}, {high:.4g}] "
        "(is the array already normalised?)"
    )


def train_transform(
    image: Image.Image,
    *,
    resize: int = 346,
    crop: int = 289,
    flip: bool = False,
    generator: torch.Generator | None = None,
    resample: int = Image.Resampling.BILINEAR,
    rescale_factor: float = 1 / 127.5,
    rescale_offset: bool = True,
) -> torch.Tensor:
    """ALIGN's training augmentation: square resize, random `crop` x `crop` window, and with `flip` a random
    horizontal flip.

    The flip is off by default because the training dataset (`data.dataset.ImageTextDataset`, whose default
    transform this is) flips after reading the caption, which may veto it ("on the left"). Returns float32
    (3, crop, crop) with the eval rescale (x * rescale_factor - 1 by default). Deterministic for a seeded
    `generator`; the image must already be RGB (see `load_image`). `TrainTransform` is the same in two stages.
    """
    return TrainTransform(resize, crop, flip, resample, rescale_factor, rescale_offset)(image, generator=generator)


@dataclass(frozen=True)
class TrainTransform:
    """`train_transform` with its settings bound, in two stages: `prepare`, the square resize, which is the
    same every epoch, so a dataset that keeps images in memory keeps its uint8 result (`data.cache_images`)
    and skips both decoding and resizing after the first epoch; and `augment`, the random crop (and flip)
    scaled to float. `transform(image, generator=g)` is `augment(prepare(image), g)`: the same pixels as
    `train_transform` for the same draws."""

    resize: int = 346
    crop: int = 289
    flip: bool = False
    resample: int = Image.Resampling.BILINEAR
    rescale_factor: float = 1 / 127.5
    rescale_offset: bool = True

    def __post_init__(self):
        if self.crop > self.resize:
            raise ConfigError(f"the training crop {self.crop} is larger than its resize {self.resize} (data.image_size "
                              "and data.resize)")

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.augment(self.prepare(image), generator=generator)

    def prepare(self, image: Image.Image) -> np.ndarray:
        """The RGB image resized to (resize, resize, 3) uint8."""
        return np.asarray(image.resize((self.resize, self.resize), resample=self.resample), dtype=np.uint8)

    def augment(self, prepared: np.ndarray, generator: torch.Generator | None = None) -> torch.Tensor:
        """A `prepare`d image -> float32 (3, crop, crop): a random window (and a random mirror with `flip`),
        x * rescale_factor (in float64, then rounded) - 1."""
        size, crop = self.resize, self.crop
        top = int(torch.randint(0, size - crop + 1, (1,), generator=generator))
        left = int(torch.randint(0, size - crop + 1, (1,), generator=generator))
        window = prepared[top : top + crop, left : left + crop]  # (crop, crop, 3), a view
        if self.flip and bool(torch.rand((), generator=generator) < 0.5):
            window = window[:, ::-1]
        pixels = torch.from_numpy(np.ascontiguousarray(window.transpose(2, 0, 1)))  # (3, crop, crop) uint8
        values = (pixels.to(torch.float64) * self.rescale_factor).to(torch.float32)
        return values - 1 if self.rescale_offset else values
