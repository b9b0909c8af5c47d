"""Image loading and the eval image transform, against transformers' PIL EfficientNetImageProcessor."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skimage_data
from transformers.models.efficientnet.image_processing_pil_efficientnet import EfficientNetImageProcessorPil

from openalign.errors import ImageLoadError
from openalign.processing.image_processor import AlignImageProcessor
from openalign.processing.images import load_image, load_images, train_transform


def reference_processor(processor: AlignImageProcessor) -> EfficientNetImageProcessorPil:
    settings = {key: value for key, value in processor.to_dict().items() if key != "image_processor_type"}
    return EfficientNetImageProcessorPil(**settings)


def reference_pixels(processor: AlignImageProcessor, images: list[Image.Image]) -> torch.Tensor:
    # PIL inputs leave transformers no channel-order guessing, which is wrong for tiny arrays.
    return reference_processor(processor)(images, return_tensors="pt")["pixel_values"]


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [Image.fromarray(skimage_data.astronaut()), Image.fromarray(skimage_data.chelsea()),
            Image.fromarray(skimage_data.coffee())]  # fmt: skip


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_photos_match_transformers(photos):
    processor = AlignImageProcessor()
    ours = processor(photos)
    assert ours.shape == (3, 3, 289, 289) and ours.dtype == torch.float32
    assert (ours - reference_pixels(processor, photos)).abs().max().item() <= 1e-6


SIZES = [(1, 1), (2, 3), (5, 7), (17, 1000), (1000, 17), (100, 50), (288, 288), (289, 290), (346, 346),
         (347, 345), (500, 700)]  # fmt: skip


def test_generated_sizes_match_transformers():
    processor = AlignImageProcessor()
    images = [random_image(height, width, seed) for seed, (height, width) in enumerate(SIZES)]
    difference = (processor(images) - reference_pixels(processor, images)).abs().max().item()
    assert difference <= 1e-6


OPTION_SETS = [
    {"do_center_crop": False},
    {"do_resize": False, "crop_size": {"height": 64, "width": 48}},
    {"do_normalize": True, "include_top": True},
    {"do_normalize": True, "rescale_offset": False, "rescale_factor": 1 / 255, "image_mean": [0.1, 0.2, 0.3]},
    {"do_rescale": False, "do_normalize": True, "resample": 3},
    {"resample": 0, "size": {"height": 120, "width": 90}, "crop_size": {"height": 150, "width": 60}},
    {"resample": 1, "size": 80, "crop_size": 64, "include_top": True},
    {"resample": 4, "size": {"shortest_edge": 70}, "crop_size": 64},
    {"resample": 5, "do_rescale": False},
]


@pytest.mark.parametrize("settings", OPTION_SETS, ids=lambda settings: ",".join(settings))
def test_every_option_matches_transformers(settings, photos):
    processor = AlignImageProcessor(**settings)
    images = [photos[1], random_image(61, 83), random_image(7, 5)] if settings.get("do_resize", True) else [
        random_image(61, 83), random_image(61, 83, seed=1)]  # fmt: skip
    difference = (processor(images) - reference_pixels(processor, images)).abs().max().item()
    assert difference <= 1e-6


def test_every_source_type_gives_the_same_pixels(photos, tmp_path):
    photo = photos[1]
    array = np.array(photo)
    photo.save(tmp_path / "cat.png")
    expected = reference_pixels(AlignImageProcessor(), [photo])[0]
    sources = [
        photo, array, array.astype(np.float32), array / 255.0, str(tmp_path / "cat.png"), tmp_path / "cat.png",
        (tmp_path / "cat.png").read_bytes(), io.BytesIO((tmp_path / "cat.png").read_bytes()),
        torch.from_numpy(array).permute(2, 0, 1), torch.from_numpy(array),
    ]  # fmt: skip
    result = AlignImageProcessor(num_workers=2)(sources)
    assert result.shape == (len(sources), 3, 289, 289)
    assert (result - expected).abs().max().item() <= 1e-6
    batched = AlignImageProcessor()(np.stack([array, array]))
    assert (batched - expected).abs().max().item() <= 1e-6


def test_thread_pool_preserves_order_and_values(photos):
    images = photos + [random_image(40 + index, 90 - index, index) for index in range(5)]
    serial = AlignImageProcessor(num_workers=1)(images)
    parallel = AlignImageProcessor(num_workers=4)(images)
    assert torch.equal(serial, parallel)
    loaded = load_images(images, num_workers=3)
    assert [np.asarray(image).tobytes() for image in loaded] == [np.asarray(image).tobytes() for image in images]


def grey_values(size=(7, 5), seed=0, high=256, dtype=np.uint8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, size[::-1]).astype(dtype)


def composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    # PIL's alpha_composite rounds (c * a + 255 * (255 - a)) / 255 to nearest; allow 1 level of difference.
    weight = alpha[..., None].astype(np.float64) / 255
    return rgb.astype(np.float64) * weight + 255 * (1 - weight)


def test_mode_l_and_1_replicate_grey():
    grey = grey_values()
    result = np.asarray(load_image(Image.fromarray(grey, mode="L")))
    assert result.shape == (5, 7, 3) and all(np.array_equal(result[..., c], grey) for c in range(3))
    bits = Image.fromarray(grey > 127).convert("1")
    assert np.array_equal(np.asarray(load_image(bits))[..., 0], np.where(grey > 127, 255, 0))


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_modes_composite_on_white(mode):
    rng = np.random.default_rng(1)
    channels = 4 if mode == "RGBA" else 2
    pixels = rng.integers(0, 256, (5, 7, channels), dtype=np.uint8)
    colour = pixels[..., :3] if mode == "RGBA" else np.repeat(pixels[..., :1], 3, axis=-1)
    result = np.asarray(load_image(Image.fromarray(pixels, mode=mode))).astype(np.float64)
    assert np.abs(result - composite_on_white(colour, pixels[..., -1])).max() <= 1.0


def test_palette_with_transparency_composites_on_white():
    palette_image = Image.new("P", (4, 3), 0)
    palette_image.putpalette([200, 10, 10, 10, 200, 10] + [0] * 762)
    palette_image.putpixel((1, 1), 1)
    palette_image.info["transparency"] = 0
    result = np.asarray(load_image(palette_image))
    assert result[1, 1].tolist() == [10, 200, 10]
    assert result[0, 0].tolist() == [255, 255, 255]
    palette_image.info.pop("transparency")
    assert np.asarray(load_image(palette_image))[0, 0].tolist() == [200, 10, 10]


def test_cmyk_uses_the_naive_ink_formula():
    inks = np.random.default_rng(2).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    expected = (255 - inks[..., :3].astype(np.float64)) * (255 - inks[..., 3:].astype(np.float64)) / 255
    result = np.asarray(load_image(Image.fromarray(inks, mode="CMYK"))).astype(np.float64)
    assert np.abs(result - expected).max() <= 1.0


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_modes_scale_to_eight_bit(mode):
    values = grey_values(high=65536, dtype=np.uint16)
    image = Image.fromarray(values.astype(np.int32) if mode == "I" else values)
    assert image.mode == mode
    result = np.asarray(load_image(image))
    assert np.array_equal(result[..., 1], np.rint(values / 257.0).astype(np.uint8))


def test_float_mode_reads_unit_and_byte_scales():
    unit = np.random.default_rng(3).random((5, 7)).astype(np.float32)
    assert np.array_equal(np.asarray(load_image(Image.fromarray(unit, mode="F")))[..., 0],
                          np.rint(unit.astype(np.float64) * 255).astype(np.uint8))  # fmt: skip
    byte_scale = unit * 300 - 20
    expected = np.rint(np.clip(byte_scale.astype(np.float64), 0, 255)).astype(np.uint8)
    assert np.array_equal(np.asarray(load_image(Image.fromarray(byte_scale, mode="F")))[..., 2], expected)


def test_high_depth_images_convert_a_block_of_rows_at_a_time_as_a_whole_would():
    # 300 rows span three blocks; the scale of a float image is decided on all of them, and a NaN in the last
    # block is found.
    rng = np.random.default_rng(4)
    sixteen = rng.integers(0, 65536, (300, 7)).astype(np.uint16)
    assert np.array_equal(np.asarray(load_image(Image.fromarray(sixteen)))[..., 0],
                          np.rint(sixteen / 257.0).astype(np.uint8))
    floats = rng.random((300, 7)).astype(np.float32)
    floats[290, 3] = 1.5  # one value above 1 in the last block: the whole image is on the 0-255 scale
    expected = np.rint(np.clip(floats.astype(np.float64), 0, 255)).astype(np.uint8)
    assert np.array_equal(np.asarray(load_image(Image.fromarray(floats, mode="F")))[..., 1], expected)
    floats[299, 0] = np.nan
    with pytest.raises(ImageLoadError, match="NaN or infinite"):
        load_image(Image.fromarray(floats, mode="F"))


def test_reduce_to_decodes_a_jpeg_at_reduced_scale_and_the_limit_counts_what_is_decoded(tmp_path):
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (4000, 3000), (200, 40, 40)).save(photo, quality=80)
    with pytest.raises(ImageLoadError, match="above the limit of 1000000"):
        load_image(photo, max_pixels=1_000_000)
    reduced = load_image(photo, max_pixels=1_000_000, reduce_to=300)  # 1/8 scale keeps both sides >= 300
    assert reduced.size == (500, 375) and np.abs(np.asarray(reduced, dtype=int) - (200, 40, 40)).max() <= 3
    assert load_image(photo.read_bytes(), reduce_to=1000).size == (2000, 1500)  # 1/2: 1/4 would be under 1000
    drawing = tmp_path / "drawing.png"  # only JPEG decoders can scale
    Image.new("RGB", (800, 600)).save(drawing)
    assert load_image(drawing, reduce_to=100).size == (800, 600)


# Display transform for each EXIF orientation, written from the EXIF specification with numpy.
EXIF_DISPLAY = {
    1: lambda x: x,
    2: np.fliplr,
    3: lambda x: np.rot90(x, 2),
    4: np.flipud,
    5: lambda x: np.swapaxes(x, 0, 1),
    6: lambda x: np.rot90(x, -1),
    7: lambda x: np.rot90(np.fliplr(x), -1),
    8: lambda x: np.rot90(x, 1),
}


@pytest.mark.parametrize("orientation", sorted(EXIF_DISPLAY))
def test_exif_orientation_is_applied(orientation, tmp_path):
    stored = np.random.default_rng(orientation).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"oriented{orientation}.png"
    Image.fromarray(stored).save(path, exif=exif)
    assert np.array_equal(np.asarray(load_image(path)), EXIF_DISPLAY[orientation](stored))


def png_with_header_size(width: int, height: int) -> bytes:
    """A PNG whose header claims `width` x `height` but which holds almost no data."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    content = bytearray(buffer.getvalue())
    header_start = 8 + 8  # signature, then IHDR length and type
    content[header_start : header_start + 8] = struct.pack(">II", width, height)
    checksum = zlib.crc32(bytes(content[12 : header_start + 13]))
    content[header_start + 13 : header_start + 17] = struct.pack(">I", checksum)
    return bytes(content)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_with_header_size(12_000, 12_000))
    # The file holds one pixel of data: only a header check can say "refused" rather than "truncated".
    with pytest.raises(ImageLoadError, match=r"bomb\.png: refused"):
        load_image(bomb)
    with pytest.raises(ImageLoadError, match="item 0.*refused"):
        AlignImageProcessor()([bomb.read_bytes()])
    photo_path = tmp_path / "photo.png"
    random_image(50, 50).save(photo_path)
    with pytest.raises(ImageLoadError, match=r"photo\.png: refused.*above the limit of 1000"):
        load_image(photo_path, max_pixels=1000)
    assert load_image(photo_path, max_pixels=2500).size == (50, 50)


@pytest.mark.parametrize("image_format", ["JPEG", "PNG"])
def test_truncated_files_raise_naming_the_file(image_format, tmp_path, photos):
    buffer = io.BytesIO()
    photos[0].save(buffer, format=image_format)
    path = tmp_path / f"cut.{image_format.lower()}"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match=rf"cut\.{image_format.lower()}"):
        load_image(path)


def test_non_image_empty_and_missing_files(tmp_path):
    text_file = tmp_path / "notes.jpg"
    text_file.write_text("this is not an image\n")
    empty_file = tmp_path / "empty.png"
    empty_file.write_bytes(b"")
    for path in (text_file, empty_file, tmp_path / "missing.jpg"):
        with pytest.raises(ImageLoadError, match=path.name):
            load_image(path)
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(b"")
    with pytest.raises(ImageLoadError, match=r"item 1 \(.*notes\.jpg\)"):
        AlignImageProcessor()([random_image(9, 9), text_file])


BAD_ITEMS = {
    "zero width": lambda: np.zeros((8, 0, 3), dtype=np.uint8),
    "NaN": lambda: np.full((8, 8, 3), np.nan, dtype=np.float32),
    "normalised": lambda: np.full((8, 8, 3), -0.5, dtype=np.float32),
    "mask": lambda: np.ones((8, 8), dtype=bool),
    "zero-size PIL": lambda: Image.new("RGB", (0, 5)),
    "not an image": lambda: 3.5,
}


@pytest.mark.parametrize("label", sorted(BAD_ITEMS))
def test_bad_array_raises_naming_the_item(label):
    good = np.zeros((8, 8, 3), dtype=np.uint8)
    with pytest.raises(ImageLoadError, match="item 1"):
        AlignImageProcessor()([good, BAD_ITEMS[label]()])


def test_none_item_and_empty_batch():
    good = np.zeros((8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="item 2 is None"):
        AlignImageProcessor()([good, good, None])
    with pytest.raises(ValueError, match="empty"):
        AlignImageProcessor()([])


def windows_matching(resized: torch.Tensor, crop: torch.Tensor, flipped: bool) -> list[tuple[int, int]]:
    """Every (top, left) at which `crop` equals a (flipped) window of `resized`, by brute force."""
    size, span = crop.shape[-1], resized.shape[-1] - crop.shape[-1] + 1
    corner = resized[:, :span, size - 1 :] if flipped else resized[:, :span, :span]
    candidates = (corner == crop[:, 0, 0][:, None, None]).all(0).nonzero().tolist()  # cheap pre-filter
    matches = []
    for top, left in candidates:
        window = resized[:, top : top + size, left : left + size]
        if torch.equal(window.flip(-1) if flipped else window, crop):
            matches.append((top, left))
    return matches


def test_train_transform_is_a_seeded_window_of_the_eval_resize(photos):
    resized = AlignImageProcessor(do_center_crop=False)(photos[0])[0]  # (3, 346, 346) by transformers' rules
    first = train_transform(photos[0], flip=True, generator=torch.Generator().manual_seed(7))
    again = train_transform(photos[0], flip=True, generator=torch.Generator().manual_seed(7))
    assert first.shape == (3, 289, 289) and torch.equal(first, again)
    found = set()
    for seed in range(6):
        crop = train_transform(photos[0], flip=True, generator=torch.Generator().manual_seed(seed))
        matches = [
            (flipped, *window) for flipped in (False, True) for window in windows_matching(resized, crop, flipped)
        ]
        assert matches, f"seed {seed}: the crop is not a window of the resized image"
        found.add(matches[0])
    assert len(found) > 1 and {flipped for flipped, _, _ in found} == {False, True}
    unflipped = train_transform(photos[0], flip=False, generator=torch.Generator().manual_seed(1))
    assert windows_matching(resized, unflipped, flipped=False)


def test_changing_a_setting_after_a_call_takes_effect(photos):
    processor = AlignImageProcessor()
    processor(photos[0])
    processor.do_normalize, processor.rescale_offset = True, False
    difference = (processor(photos[0]) - reference_pixels(processor, [photos[0]])).abs().max().item()
    assert difference <= 1e-6


def test_nan_float_mode_image_names_the_item():
    nan_image = Image.fromarray(np.full((4, 4), np.nan, dtype=np.float32), mode="F")
    with pytest.raises(ImageLoadError, match=r"item 1 .*NaN"):
        AlignImageProcessor()([random_image(8, 8), nan_image])


def test_jpeg_exif_rotation_swaps_width_and_height(tmp_path, photos):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: the camera was turned 90 degrees clockwise
    stored = photos[1].resize((64, 40))
    stored.save(tmp_path / "sideways.jpg", exif=exif, quality=95)
    loaded = load_image(tmp_path / "sideways.jpg")
    assert loaded.size == (40, 64)
    expected = np.rot90(np.asarray(stored, dtype=np.int16), -1)
    assert np.abs(np.asarray(loaded, dtype=np.int16) - expected).mean() < 4  # JPEG loss only
