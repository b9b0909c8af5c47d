"""A built-in noisy image-text dataset: coloured shapes rendered with Pillow, captions from templates, and the
kinds of noise real alt-text has, in configurable proportions.

Layout written under `out_dir`:
    train/manifest.jsonl, train/images/*.jpg      noisy training pairs
    heldout/manifest.jsonl, heldout/images/*.jpg  clean pairs, colour-shape combinations absent from train
    seen/manifest.jsonl, seen/images/*.jpg        clean pairs of training combinations, new images (optional)
    shards/{train,heldout}-*.tar                  the same records as WebDataset shards (optional)
    dataset.json                                  config, colours, shapes, held-out pairs, noise counts

Each manifest row carries the ground truth (`colour`, `shape`, `count`, `size`, `position`, `background`,
`noise`, `split`; `position` is None where several objects are spread across the image) so evaluation knows
the answers; for a `mismatch` row the caption describes another colour-shape pair than the image.

Every record draws from its own generator seeded by (seed, split, index), so the output is byte-identical for
a seed whatever the number of worker processes."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import os
import random
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from openalign.data import captions
from openalign.errors import ConfigError

# Distinct hues, far apart in RGB and from the grey backgrounds.
COLOURS = {
    "red": (215, 35, 35), "green": (40, 165, 60), "blue": (40, 75, 220), "yellow": (240, 215, 30),
    "purple": (130, 45, 175), "orange": (245, 135, 20), "pink": (250, 130, 200), "brown": (120, 75, 35),
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon")
BACKGROUNDS = {"light": 225, "mid": 150, "dark": 45}
SIZE_RANGES = {"small": (0.14, 0.19), "medium": (0.21, 0.28), "large": (0.30, 0.38)}  # radius / shorter side
SPLIT_IDS = {"train": 0, "heldout": 1, "seen": 2}  # part of every record's numpy seed
GREY_CONTRAST = 50  # least distance between a grey object and its background's base level, in 0-255 units
NOISE_KINDS = ("mismatch", "boilerplate", "junk", "short", "long", "undersized", "extreme_aspect")


@dataclass
class SynthConfig:
    """How the synthetic dataset looks. Rates are fractions of the training split; each noisy record gets
    exactly one noise kind, and the number of records of each kind is round(rate * n)."""

    image_size: int = 64
    colours: tuple[str, ...] = tuple(COLOURS)
    shapes: tuple[str, ...] = SHAPES
    num_heldout_pairs: int = 10
    heldout_seed: int = 0  # the held-out pairs depend on this only, not on the data seed
    count_weights: tuple[float, ...] = (0.8, 0.15, 0.05)  # P(1 object), P(2), P(3)
    pixel_noise: float = 6.0  # standard deviation of per-pixel Gaussian noise, in 0-255 units
    jpeg_quality: int = 92
    mismatch_rate: float = 0.05
    boilerplate_rate: float = 0.04
    junk_rate: float = 0.03
    short_rate: float = 0.02
    long_rate: float = 0.02
    undersized_rate: float = 0.02
    extreme_aspect_rate: float = 0.02
    # Of the clean training captions, the fraction that name only the shape or only the colour (half each), as
    # alt-text often does; it lets shape words be learnt apart from the colours they came with. Not noise.
    partial_caption_rate: float = 0.0
    # Of the clean training records, the fraction rendered in shades of grey (old photographs, scans) with a
    # caption that names the shape and no colour. Colour cannot stand in for shape in these images, so the
    # image tower learns shape features that every colour shares. Not noise; the manifest's colour is None.
    grayscale_rate: float = 0.0
    # Of the clean training records, the fraction drawn as grey objects on a background of a named colour
    # chosen at random (not tied to the shape), captioned with the shape and the background's colour. Every
    # shape then meets every colour at its outline, including the held-out pairs' colours, while no object of
    # a held-out colour-shape pair is ever drawn. Not noise; the manifest's colour is None and its
    # background_colour names the colour.
    colour_background_rate: float = 0.0

    def noise_rates(self) -> dict[str, float]:
        """Rate per noise kind, keyed by the kind's name in the manifest."""
        return {kind: getattr(self, f"{kind}_rate") for kind in NOISE_KINDS}

    def validate(self) -> None:
        """Raise ConfigError naming the first field that cannot work."""
        for name in self.colours:
            if name not in COLOURS:
                raise ConfigError(f"SynthConfig.colours: unknown colour {name!r}; known: {sorted(COLOURS)}")
        for name in self.shapes:
            if name not in SHAPES:
                raise ConfigError(f"SynthConfig.shapes: unknown shape {name!r}; known: {list(SHAPES)}")
        if self.image_size < 16:
            raise ConfigError(f"SynthConfig.image_size must be at least 16, got {self.image_size}")
        for kind, rate in self.noise_rates().items():
            if not 0.0 <= rate <= 1.0:
                raise ConfigError(f"SynthConfig.{kind}_rate must lie in [0, 1], got {rate}")
        for name in ("partial_caption_rate", "grayscale_rate", "colour_background_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"SynthConfig.{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.grayscale_rate + self.colour_background_rate > 1.0:
            raise ConfigError(f"SynthConfig.grayscale_rate + colour_background_rate = "
                              f"{self.grayscale_rate + self.colour_background_rate} > 1")
        if sum(self.noise_rates().values()) > 1.0:
            raise ConfigError(f"SynthConfig noise rates sum to {sum(self.noise_rates().values())} > 1")
        if not 0 <= self.num_heldout_pairs <= len(self.colours) * len(self.shapes) - max(
            len(self.colours), len(self.shapes)
        ):
            raise ConfigError(f"SynthConfig.num_heldout_pairs={self.num_heldout_pairs} leaves some colour or "
                              f"shape without a training pair")


def heldout_pairs(config: SynthConfig) -> list[tuple[str, str]]:
    """A seeded set of colour-shape pairs kept out of training. No colour or shape is held out more than
    ceil(k / #colours) or ceil(k / #shapes) times, so every colour and shape keeps training partners."""
    k = config.num_heldout_pairs
    if k == 0:
        return []
    all_pairs = [(c, s) for c in config.colours for s in config.shapes]
    colour_cap = math.ceil(k / len(config.colours)) if k else 0
    shape_cap = math.ceil(k / len(config.shapes)) if k else 0
    rng = random.Random(f"heldout:{config.heldout_seed}")
    for _ in range(1000):  # a greedy pass over a shuffle; reshuffle if it gets stuck
        rng.shuffle(all_pairs)
        chosen, per_colour, per_shape = [], Counter(), Counter()
        for colour, shape in all_pairs:
            if per_colour[colour] < colour_cap and per_shape[shape] < shape_cap:
                chosen.append((colour, shape))
                per_colour[colour] += 1
                per_shape[shape] += 1
                if len(chosen) == k:
                    return sorted(chosen)
    raise ConfigError(f"cannot hold out {k} balanced colour-shape pairs")


# ---------------------------------------------------------------- rendering


def shape_polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a shape centred at (cx, cy) whose outer radius is `radius`, rotated by `angle` radians."""
    if shape == "star":
        radii = [radius if i % 2 == 0 else radius * 0.45 for i in range(10)]
        angles = [angle - math.pi / 2 + i * math.pi / 5 for i in range(10)]
    elif shape == "cross":
        arm = radius * 0.36
        corners = [(arm, radius), (arm, arm), (radius, arm), (radius, -arm), (arm, -arm),
                   (arm, -radius), (-arm, -radius), (-arm, -arm), (-radius, -arm), (-radius, arm),
                   (-arm, arm), (-arm, radius)]
        cos, sin = math.cos(angle), math.sin(angle)
        return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in corners]
    else:
        sides = {"triangle": 3, "square": 4, "hexagon": 6}[shape]
        # Squares sit on an edge, triangles on their base; the triangle's centroid is lowered to look centred.
        offset = -math.pi / 2 + (math.pi / 4 if sides == 4 else 0.0)
        cy = cy + (radius * 0.15 if sides == 3 else 0.0)
        radius = radius * (1.2 if sides == 3 else 1.0)
        radii = [radius] * sides
        angles = [angle + offset + i * 2 * math.pi / sides for i in range(sides)]
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for r, a in zip(radii, angles)]


def render_image(rng: random.Random, numpy_rng: np.random.Generator, width: int, height: int, colour: str | None,
                 shape: str, count: int, size: str, position: str, background: str, pixel_noise: float,
                 background_colour: str | None = None) -> Image.Image:
    """Objects of one colour and shape on a textured grey background: a brightness gradient plus Gaussian
    pixel noise, so that no two backgrounds are identical. With `colour=None` the objects are a shade of grey
    at least GREY_CONTRAST from the background and the pixel noise is grey too. `background_colour` paints
    the background in that named colour instead of grey (objects grey, `colour` must be None)."""
    if background_colour is not None and colour is not None:
        raise ValueError("a coloured background goes with grey objects (colour=None)")
    scale = 2  # draw the mask at twice the size and downsample: cheap antialiasing
    mask = Image.new("L", (width * scale, height * scale), 0)
    draw = ImageDraw.Draw(mask)
    short_side = min(width, height)
    low, high = SIZE_RANGES[size]
    if count > 1:
        low, high = low * 0.7, high * 0.6  # several objects must fit side by side
    centres = object_centres(rng, width, height, count, position, high * short_side)
    for cx, cy in centres:
        radius = rng.uniform(low, high) * short_side
        angle = rng.uniform(-0.25, 0.25)
        if shape == "circle":
            draw.ellipse([((cx - radius) * scale, (cy - radius) * scale),
                          ((cx + radius) * scale, (cy + radius) * scale)], fill=255)
        else:
            draw.polygon([(x * scale, y * scale) for x, y in shape_polygon(shape, cx, cy, radius, angle)],
                         fill=255)
    alpha = np.asarray(mask.reduce(scale), dtype=np.float32)[..., None] / 255.0  # (H, W, 1)

    base = BACKGROUNDS[background] + rng.uniform(-12, 12)
    direction = rng.uniform(0, 2 * math.pi)
    xs, ys = _unit_grid(height, width)
    gradient = (math.cos(direction) * xs + math.sin(direction) * ys) * rng.uniform(-20, 20)  # (H, W, 1)
    if background_colour is not None:
        tint = np.array(COLOURS[background_colour], dtype=np.float32) + numpy_rng.uniform(-10, 10, size=3)
        base = tint.astype(np.float32)  # (3,): broadcast over the canvas like the grey level
    if colour is None:
        luminance = float(np.dot(np.broadcast_to(base, 3), (0.299, 0.587, 0.114)))
        level = rng.uniform(0, 255 - 2 * GREY_CONTRAST)
        fill = np.full(3, level if level < luminance - GREY_CONTRAST else level + 2 * GREY_CONTRAST,
                       dtype=np.float32)
        noise_shape = (height, width, 1)
    else:
        fill = np.array(COLOURS[colour], dtype=np.float32) + numpy_rng.uniform(-10, 10, size=3).astype(np.float32)
        noise_shape = (height, width, 3)
    canvas = (base + gradient) * (1 - alpha) + fill * alpha  # (H, W, 3)
    canvas += numpy_rng.standard_normal(size=noise_shape, dtype=np.float32) * pixel_noise
    return Image.fromarray(np.clip(canvas + 0.5, 0, 255).astype(np.uint8), "RGB")


@functools.lru_cache(maxsize=16)
def _unit_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """x / width and y / height at every pixel, each (H, W, 1); cached because most images share a size."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    return (xs / width)[..., None], (ys / height)[..., None]


def object_centres(rng: random.Random, width: int, height: int, count: int, position: str,
                   max_radius: float) -> list[tuple[float, float]]:
    """Centres for `count` objects: one object goes near the named position, several spread along the
    longer side in equal cells, each jittered within its cell."""
    margin = max_radius + 1
    if count == 1:
        anchors = {"center": (0.5, 0.5), "left": (0.3, 0.5), "right": (0.7, 0.5), "top": (0.5, 0.3),
                   "bottom": (0.5, 0.7)}
        fx, fy = anchors[position]
        cx = min(max(fx * width + rng.uniform(-0.06, 0.06) * width, margin), width - margin)
        cy = min(max(fy * height + rng.uniform(-0.06, 0.06) * height, margin), height - margin)
        return [(cx, cy)]
    horizontal = width >= height
    length = width if horizontal else height
    cell = length / count
    centres = []
    for i in range(count):
        along = (i + 0.5) * cell + rng.uniform(-0.1, 0.1) * cell
        across = (height if horizontal else width) * rng.uniform(0.4, 0.6)
        centres.append((along, across) if horizontal else (across, along))
    return centres


# ---------------------------------------------------------------- records


def make_record(seed: int, split: str, index: int, pair: tuple[str, str], noise: str, config: SynthConfig,
                train_pairs: list[tuple[str, str]]) -> tuple[dict, bytes]:
    """One manifest row (without `image_path`) and the JPEG bytes of its image."""
    rng = random.Random(f"{seed}:{split}:{index}")
    numpy_rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    colour, shape = pair
    count = rng.choices(range(1, len(config.count_weights) + 1), weights=config.count_weights)[0]
    size = rng.choice(list(SIZE_RANGES) if count == 1 else ["small", "medium"])
    position = rng.choice(list(captions.POSITION_WORDS))
    background = rng.choice(list(BACKGROUNDS))
    width = height = config.image_size
    if noise == "undersized":
        # Both sides under 60% of the normal size, so a shorter-side threshold between them drops these.
        width = rng.randint(config.image_size // 4, int(config.image_size * 0.6))
        height = rng.randint(config.image_size // 4, int(config.image_size * 0.6))
    elif noise == "extreme_aspect":
        long_side = int(config.image_size * rng.uniform(3.2, 5.0))
        width, height = (long_side, config.image_size)
        if rng.random() < 0.5:
            width, height = height, width

    caption = captions.clean_caption(rng, colour, shape, count, size, position, background)
    if noise == "mismatch":
        # Another training pair, so the mismatched text never names a held-out combination.
        other = rng.choice([p for p in train_pairs if p != pair])
        caption = captions.clean_caption(rng, other[0], other[1], count, size, position, background)
    elif noise == "boilerplate":
        caption = captions.boilerplate_caption(rng)
    elif noise == "junk":
        caption = captions.junk_caption(rng)
    elif noise == "short":
        caption = captions.short_caption(rng, colour, shape)
    elif noise == "long":
        caption = captions.long_caption(rng, caption)
    # From a generator of its own, so that the option changes captions only, never the images.
    elif noise == "clean" and split == "train" and config.partial_caption_rate > 0:
        partial_rng = random.Random(f"{seed}:{split}:{index}:partial")
        if partial_rng.random() < config.partial_caption_rate:
            keep = "shape" if partial_rng.random() < 0.5 else "colour"
            caption = captions.partial_caption(partial_rng, colour, shape, count, size, position, background, keep)
    background_colour = None
    if noise == "clean" and split == "train" and config.grayscale_rate + config.colour_background_rate > 0:
        # One draw decides both options, so records made grey stay the same whichever other rate is set.
        draw = random.Random(f"{seed}:{split}:{index}:grey").random()
        if draw < config.grayscale_rate:
            caption = captions.partial_caption(rng, colour, shape, count, size, position, background, "shape")
            colour = None
        elif draw < config.grayscale_rate + config.colour_background_rate:
            background_colour = random.Random(f"{seed}:{split}:{index}:background").choice(config.colours)
            caption = captions.background_colour_caption(rng, background_colour, shape, count, size, position)
            colour = None

    image = render_image(rng, numpy_rng, width, height, colour, shape, count, size, position, background,
                         config.pixel_noise, background_colour=background_colour)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=config.jpeg_quality)
    row = {"key": f"{split}-{index:08d}", "caption": caption, "colour": colour, "shape": shape,
           "count": count, "size": size, "position": position if count == 1 else None,
           "background": background, "noise": noise,
           "split": split, "width": width, "height": height}
    if background_colour is not None:
        row["background_colour"] = background_colour
    return row, buffer.getvalue()


def _render_chunk(arguments) -> list[dict]:
    """Worker: render records, write their images, return their rows (with `image_path` relative to the
    split folder)."""
    seed, split, jobs, config, train_pairs, image_dir = arguments
    rows = []
    for index, pair, noise in jobs:
        row, data = make_record(seed, split, index, pair, noise, config, train_pairs)
        relative = f"images/{row['key']}.jpg"
        (Path(image_dir) / f"{row['key']}.jpg").write_bytes(data)
        rows.append({"key": row["key"], "image_path": relative,
                     **{name: value for name, value in row.items() if name != "key"}})
    return rows


def assign_noise(n: int, config: SynthConfig, seed: int) -> list[str]:
    """Exactly round(rate * n) records of each noise kind, at seeded random positions; the rest "clean"."""
    labels = []
    for kind, rate in config.noise_rates().items():
        labels += [kind] * int(round(rate * n))
    if len(labels) > n:
        raise ConfigError(f"noise rates {config.noise_rates()} ask for {len(labels)} noisy records "
                          f"out of {n}")
    labels += ["clean"] * (n - len(labels))
    random.Random(f"{seed}:noise").shuffle(labels)
    return labels


def balanced_pairs(pairs: list[tuple[str, str]], n: int, rng: random.Random) -> list[tuple[str, str]]:
    """n pairs in seeded random order, each pair used n / len(pairs) times (give or take one)."""
    chosen = [pairs[i % len(pairs)] for i in range(n)]
    rng.shuffle(chosen)
    return chosen


def generate(out_dir: str | os.PathLike, n: int, config: SynthConfig | None = None, seed: int = 0,
             heldout_n: int | None = None, workers: int | None = None, shards: bool = False,
             samples_per_shard: int = 1000, manifest_format: str = "jsonl", progress: bool = False,
             seen_n: int = 0) -> dict:
    """Write `n` noisy training pairs and `heldout_n` clean held-out pairs (default max(n // 10, number of
    held-out pairs)) under `out_dir`, and return the summary also saved as dataset.json.

    `seen_n` > 0 also writes a `seen` split: clean pairs of the training combinations on new images, the
    yardstick that tells how much of the held-out error is composition (same figures, familiar pairs).

    `manifest_format` is "jsonl" or "parquet"; `shards=True` also writes WebDataset tars under shards/."""
    from openalign.data import sources

    config = config or SynthConfig()
    config.validate()
    if manifest_format not in ("jsonl", "parquet"):
        raise ConfigError(f"manifest_format must be 'jsonl' or 'parquet', got {manifest_format!r}")
    if n < 1:
        raise ConfigError(f"n must be positive, got {n}")
    out = Path(out_dir)
    held = heldout_pairs(config)
    train_pairs = [(c, s) for c in config.colours for s in config.shapes if (c, s) not in held]
    if heldout_n is None:
        heldout_n = max(n // 10, len(held)) if held else 0
    plans = {
        "train": list(zip(range(n), balanced_pairs(train_pairs, n, random.Random(f"{seed}:train-pairs")),
                          assign_noise(n, config, seed))),
        "heldout": list(zip(range(heldout_n), balanced_pairs(held, heldout_n, random.Random(f"{seed}:h")),
                            ["clean"] * heldout_n)) if held else [],
    }
    if seen_n > 0:
        plans["seen"] = list(zip(range(seen_n), balanced_pairs(train_pairs, seen_n, random.Random(f"{seed}:s")),
                                 ["clean"] * seen_n))
    workers = workers or (os.cpu_count() or 1)
    manifests = {}
    for split, jobs in plans.items():
        image_dir = out / split / "images"
        image_dir.mkdir(parents=True, exist_ok=True)
        chunk = 500
        tasks = [(seed, split, jobs[i:i + chunk], config, train_pairs, str(image_dir))
                 for i in range(0, len(jobs), chunk)]
        rows: list[dict] = []
        bar = _progress(total=len(jobs), description=f"synth {split}", enabled=progress)
        if workers > 1 and len(tasks) > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for part in pool.map(_render_chunk, tasks):  # map keeps task order: deterministic output
                    rows += part
                    bar.update(len(part))
        else:
            for task in tasks:
                part = _render_chunk(task)
                rows += part
                bar.update(len(part))
        bar.close()
        manifests[split] = sources.write_manifest(rows, out / split / f"manifest.{manifest_format}")
        if shards:
            _write_split_shards(rows, out / split, out / "shards", split, samples_per_shard)
        if split == "train":
            train_rows = rows

    summary = {
        "seed": seed, "n": n, "heldout_n": heldout_n, "seen_n": seen_n, "config": dataclasses.asdict(config),
        "colours": {name: list(COLOURS[name]) for name in config.colours}, "shapes": list(config.shapes),
        "heldout_pairs": [list(p) for p in held], "train_pairs": [list(p) for p in train_pairs],
        "noise_counts": dict(sorted(Counter(row["noise"] for row in train_rows).items())),
        "clean_renderings": clean_renderings(train_rows),
        "manifests": {split: str(path.relative_to(out)) for split, path in manifests.items()},
    }
    summary.update(suggest_filter(train_rows, config))
    (out / "dataset.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def clean_renderings(rows: list[dict]) -> dict[str, int]:
    """How the clean training records are drawn: coloured objects, grey objects, grey objects on a colour."""
    counts = Counter("colour_background" if "background_colour" in row else "grey" if row["colour"] is None
                     else "coloured" for row in rows if row["noise"] == "clean")
    return {kind: counts[kind] for kind in ("coloured", "grey", "colour_background")}


def suggest_filter(rows: list[dict], config: SynthConfig) -> dict:
    """Filter thresholds that fit this corpus's scale (the paper's suit a billion real photos): a shorter
    side between undersized and normal images, and a caption-sharing limit halfway between the most-shared
    describing caption and the least-shared boilerplate string, so that every describing caption is kept
    and every boilerplate string dropped. When the corpus is too small to separate them, the limit only
    keeps every describing caption."""
    repeats = Counter(row["caption"] for row in rows)
    # Short and junk captions are caught by other rules; only captions that describe the image count here.
    describing = [r for r in rows if r["noise"] not in ("boilerplate", "short", "junk")]
    clean_max = max((repeats[r["caption"]] for r in describing), default=0)
    boilerplate_min = min((repeats[r["caption"]] for r in rows if r["noise"] == "boilerplate"), default=0)
    if clean_max < boilerplate_min:
        sharing_limit = (clean_max + boilerplate_min) // 2
    else:
        sharing_limit = max(10, clean_max)
    return {
        "caption_repeats": {"clean_max": clean_max, "boilerplate_min": boilerplate_min},
        "suggested_filter": {"min_side": int(config.image_size * 0.75), "max_aspect": 3.0,
                             "max_images_per_caption": sharing_limit},
    }


def _write_split_shards(rows: list[dict], split_dir: Path, shard_dir: Path, split: str,
                        samples_per_shard: int) -> None:
    """WebDataset shards of one split, through the shared writer in openalign.data.sources."""
    from openalign.data import sources

    def records():
        for row in rows:
            extra = {k: v for k, v in row.items() if k not in ("key", "caption", "image_path")}
            yield sources.Record(key=row["key"], caption=row["caption"],
                                 image_path=str(split_dir / row["image_path"]), extra=extra)

    shard_dir.mkdir(parents=True, exist_ok=True)
    sources.write_shards(records(), shard_dir, samples_per_shard=samples_per_shard, prefix=split)


def _progress(total: int, description: str, enabled: bool):
    """A tqdm bar when asked for, otherwise an object with the same two methods that does nothing."""
    if enabled:
        from tqdm import tqdm

        return tqdm(total=total, desc=description, unit="img")

    class _Silent:
        def update(self, _count: int) -> None:
            pass

        def close(self) -> None:
            pass

    return _Silent()
