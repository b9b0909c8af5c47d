"""The synthetic dataset generator: determinism by seed, exact noise proportions, held-out pairs, ground truth."""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from openalign.data import captions, sources
from openalign.data.synth import NOISE_KINDS, SynthConfig, generate, heldout_pairs
from openalign.errors import ConfigError


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, keyed by relative path."""
    return {path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """One dataset of 400 pairs with every noise kind at 5%, generated once for the module."""
    out = tmp_path_factory.mktemp("synth")
    config = SynthConfig(**{f"{kind}_rate": 0.05 for kind in NOISE_KINDS})
    summary = generate(out, 400, config, seed=3, workers=1)
    return out, config, summary


def test_same_seed_gives_byte_identical_output_whatever_the_workers(tmp_path):
    config = SynthConfig()
    generate(tmp_path / "a", 1200, config, seed=7, workers=1, heldout_n=20)
    generate(tmp_path / "b", 1200, config, seed=7, workers=2, heldout_n=20)  # 3 chunks over 2 processes
    generate(tmp_path / "c", 1200, config, seed=8, workers=1, heldout_n=20)
    first, second, other = (tree_digest(tmp_path / name) for name in "abc")
    assert len(first) == 1200 + 20 + 3  # images, two manifests, dataset.json
    assert first == second
    changed = [name for name in first if first[name] != other.get(name)]
    assert len(changed) > 1000  # a different seed changes nearly every image


def test_noise_proportions_are_exact(generated):
    out, config, summary = generated
    rows = read_rows(out / "train" / "manifest.jsonl")
    counts = Counter(row["noise"] for row in rows)
    assert counts == {**{kind: 20 for kind in NOISE_KINDS}, "clean": 400 - 20 * len(NOISE_KINDS)}
    assert summary["noise_counts"] == dict(counts)


def test_noise_kinds_look_like_their_names(generated):
    out, config, _ = generated
    rows = read_rows(out / "train" / "manifest.jsonl")
    words = {row["key"]: len(row["caption"].split()) for row in rows}
    for row in rows:
        with Image.open(out / "train" / row["image_path"]) as image:
            assert image.size == (row["width"], row["height"])
        short_side, long_side = sorted((row["width"], row["height"]))
        if row["noise"] == "undersized":
            assert long_side <= 0.6 * config.image_size
        elif row["noise"] == "extreme_aspect":
            assert short_side == config.image_size and long_side / short_side >= 3.2
        else:
            assert (row["width"], row["height"]) == (config.image_size, config.image_size), row
        if row["noise"] == "short":
            assert words[row["key"]] < 3
        elif row["noise"] == "long":
            assert words[row["key"]] > 20
        elif row["noise"] == "boilerplate":
            assert row["caption"] in captions.BOILERPLATE
        elif row["noise"] == "junk":
            assert all(re.fullmatch(f"[{captions.JUNK_ALPHABET}]+", token) for token in row["caption"].split())
        elif row["noise"] in ("clean", "undersized", "extreme_aspect"):
            assert 3 <= words[row["key"]] <= 20
            assert names_pair(row["caption"], row["colour"], row["shape"]), row
        elif row["noise"] == "mismatch":
            assert not names_pair(row["caption"], row["colour"], row["shape"]), row


def names_pair(caption: str, colour: str, shape: str) -> bool:
    """Whether the caption names this colour (or a synonym) and this shape (or a synonym)."""
    has_colour = any(re.search(rf"\b{word}\b", caption) for word in captions.COLOUR_WORDS[colour])
    has_shape = any(re.search(rf"\b{singular}\b|\b{plural}\b", caption)
                    for singular, plural in captions.SHAPE_WORDS[shape])
    return has_colour and has_shape


def test_heldout_pairs_never_appear_in_training_and_every_colour_and_shape_still_does(generated):
    out, config, summary = generated
    held = {tuple(pair) for pair in summary["heldout_pairs"]}
    assert len(held) == config.num_heldout_pairs == 10
    train_rows = read_rows(out / "train" / "manifest.jsonl")
    heldout_rows = read_rows(out / "heldout" / "manifest.jsonl")
    train_pairs = {(row["colour"], row["shape"]) for row in train_rows}
    assert not train_pairs & held
    assert {colour for colour, _ in train_pairs} == set(config.colours)
    assert {shape for _, shape in train_pairs} == set(config.shapes)
    assert {(row["colour"], row["shape"]) for row in heldout_rows} == held
    assert len(heldout_rows) == 40 and {row["noise"] for row in heldout_rows} == {"clean"}
    assert {row["split"] for row in heldout_rows} == {"heldout"}
    # Mismatched captions describe training pairs only: no held-out combination leaks through the text.
    for row in train_rows:
        for colour, shape in held:
            assert not names_pair(row["caption"], colour, shape) or row["noise"] != "mismatch"


def test_heldout_pairs_depend_on_heldout_seed_only():
    config = SynthConfig()
    assert heldout_pairs(config) == heldout_pairs(SynthConfig())
    assert heldout_pairs(config) != heldout_pairs(SynthConfig(heldout_seed=1))
    per_colour = Counter(colour for colour, _ in heldout_pairs(config))
    assert max(per_colour.values()) <= 2


def test_no_heldout_pairs_trains_on_every_pair(tmp_path):
    config = SynthConfig(colours=("red", "blue"), shapes=("circle",), num_heldout_pairs=0)
    assert heldout_pairs(config) == []
    summary = generate(tmp_path, 8, config, workers=1)
    assert summary["heldout_pairs"] == [] and sorted(map(tuple, summary["train_pairs"])) == [("blue", "circle"),
                                                                                              ("red", "circle")]


def test_manifest_reads_back_through_sources(generated):
    out, _, _ = generated
    records = list(sources.iter_records(out / "heldout" / "manifest.jsonl"))
    assert len(records) == 40
    assert records[0].image_path.is_file() and records[0].extra["split"] == "heldout"


def test_shards_hold_the_same_records(tmp_path):
    generate(tmp_path, 30, SynthConfig(), seed=1, heldout_n=10, shards=True, samples_per_shard=16,
             manifest_format="parquet")
    assert sorted(path.name for path in (tmp_path / "shards").iterdir()) == [
        "heldout-00000.tar", "train-00000.tar", "train-00001.tar"]
    manifest = list(sources.iter_records(tmp_path / "train" / "manifest.parquet"))
    sharded = list(sources.iter_records(str(tmp_path / "shards" / "train-{00000..00001}.tar")))
    assert [r.caption for r in sharded] == [r.caption for r in manifest]
    assert [r.image_bytes for r in sharded] == [r.open_image_bytes() for r in manifest]
    assert [r.extra["noise"] for r in sharded] == [r.extra["noise"] for r in manifest]


def test_invalid_config_names_the_field():
    with pytest.raises(ConfigError, match="junk_rate"):
        SynthConfig(junk_rate=1.5).validate()
    with pytest.raises(ConfigError, match="'teal'"):
        SynthConfig(colours=("red", "teal")).validate()
    with pytest.raises(ConfigError, match="sum"):
        SynthConfig(mismatch_rate=0.6, junk_rate=0.6).validate()


def vocabulary(table: dict) -> set[str]:
    """Every word or phrase of a synonym table (shape entries are (singular, plural) pairs)."""
    return {word for synonyms in table.values() for entry in synonyms
            for word in (entry if isinstance(entry, tuple) else (entry,))}


COLOUR_VOCABULARY, SHAPE_VOCABULARY = vocabulary(captions.COLOUR_WORDS), vocabulary(captions.SHAPE_WORDS)


def names(caption: str, words: set[str]) -> bool:
    return any(re.search(rf"\b{re.escape(word)}\b", caption) for word in words)


def test_partial_captions_name_only_the_shape_or_only_the_colour(tmp_path):
    colour_words, shape_words = COLOUR_VOCABULARY, SHAPE_VOCABULARY
    generate(tmp_path / "plain", 400, SynthConfig(), seed=3, heldout_n=20, workers=1)
    generate(tmp_path / "partial", 400, SynthConfig(partial_caption_rate=0.5), seed=3, heldout_n=20, workers=1)
    plain = read_rows(tmp_path / "plain" / "train" / "manifest.jsonl")
    partial = read_rows(tmp_path / "partial" / "train" / "manifest.jsonl")
    clean = [(a, b) for a, b in zip(plain, partial) if a["noise"] == "clean"]
    changed = [b["caption"] for a, b in clean if a["caption"] != b["caption"]]
    assert 0.35 < len(changed) / len(clean) < 0.65
    shape_only = [c for c in changed if names(c, shape_words) and not names(c, colour_words)]
    colour_only = [c for c in changed if names(c, colour_words) and not names(c, shape_words)]
    assert len(shape_only) + len(colour_only) == len(changed) and shape_only and colour_only
    assert all(3 <= len(c.split()) <= 20 for c in changed)
    # Held-out captions stay complete, and so does every noisy record.
    assert read_rows(tmp_path / "plain" / "heldout" / "manifest.jsonl") == \
        read_rows(tmp_path / "partial" / "heldout" / "manifest.jsonl")
    assert all(a == b for a, b in zip(plain, partial) if a["noise"] != "clean")
    # Captions only: every image is byte-identical.
    images = [tree_digest(tmp_path / name / "train" / "images") for name in ("plain", "partial")]
    assert images[0] == images[1]


def test_grayscale_records_are_grey_images_with_colourless_captions(tmp_path):
    generate(tmp_path / "plain", 400, SynthConfig(), seed=3, heldout_n=20, workers=1)
    generate(tmp_path / "grey", 400, SynthConfig(grayscale_rate=0.3), seed=3, heldout_n=20, workers=1)
    plain = read_rows(tmp_path / "plain" / "train" / "manifest.jsonl")
    grey = read_rows(tmp_path / "grey" / "train" / "manifest.jsonl")
    clean = [(a, b) for a, b in zip(plain, grey) if a["noise"] == "clean"]
    turned = [b for a, b in clean if b["colour"] is None]
    assert 0.2 < len(turned) / len(clean) < 0.4
    for row in turned:
        assert names(row["caption"], SHAPE_VOCABULARY) and not names(row["caption"], COLOUR_VOCABULARY), row
        assert 3 <= len(row["caption"].split()) <= 20
        pixels = np.asarray(Image.open(tmp_path / "grey" / "train" / row["image_path"]).convert("RGB"), np.int16)
        assert np.abs(pixels - pixels.mean(axis=2, keepdims=True)).max() <= 3  # grey up to JPEG rounding
    # Every other record, noisy or clean, and the held-out split are unchanged, pixels included.
    kept = {a["key"] for a, b in zip(plain, grey) if b["colour"] is not None}
    assert all(a == b for a, b in zip(plain, grey) if a["key"] in kept)
    digests = [tree_digest(tmp_path / name / "train" / "images") for name in ("plain", "grey")]
    assert all(digests[0][f"{key}.jpg"] == digests[1][f"{key}.jpg"] for key in kept)
    assert tree_digest(tmp_path / "plain" / "heldout") == tree_digest(tmp_path / "grey" / "heldout")
    with pytest.raises(ConfigError, match="grayscale_rate"):
        SynthConfig(grayscale_rate=-0.1).validate()


def test_colour_backgrounds_put_grey_objects_of_every_shape_on_named_colours(tmp_path):
    generate(tmp_path / "grey", 400, SynthConfig(grayscale_rate=0.2), seed=3, heldout_n=20, workers=1)
    summary = generate(tmp_path / "both", 400, SynthConfig(grayscale_rate=0.2, colour_background_rate=0.3),
                       seed=3, heldout_n=20, workers=1)
    grey = read_rows(tmp_path / "grey" / "train" / "manifest.jsonl")
    both = read_rows(tmp_path / "both" / "train" / "manifest.jsonl")
    painted = [b for a, b in zip(grey, both) if "background_colour" in b]
    clean = [b for b in both if b["noise"] == "clean"]
    assert 0.2 < len(painted) / len(clean) < 0.4
    assert all(b["noise"] == "clean" and a["colour"] is not None for a, b in zip(grey, both) if b in painted)
    for row in painted:
        colour = row["background_colour"]
        assert row["colour"] is None and colour in summary["colours"]
        assert names(row["caption"], SHAPE_VOCABULARY), row
        named = {c for c, words in captions.COLOUR_WORDS.items() if names(row["caption"], set(words))}
        assert named == {colour}, row
        assert 3 <= len(row["caption"].split()) <= 20
        pixels = np.asarray(Image.open(tmp_path / "both" / "train" / row["image_path"]).convert("RGB"), np.float32)
        corners = np.concatenate([pixels[:3, :3], pixels[:3, -3:], pixels[-3:, :3], pixels[-3:, -3:]]).reshape(-1, 3)
        palette = {name: np.array(value, np.float32) for name, value in summary["colours"].items()}
        nearest = min(palette, key=lambda name: np.abs(corners.mean(0) - palette[name]).sum())
        assert nearest == colour, (row, corners.mean(0))
    greys = [row for row in both if row["noise"] == "clean" and row["colour"] is None]
    assert summary["clean_renderings"] == {"coloured": len(clean) - len(greys), "grey": len(greys) - len(painted),
                                           "colour_background": len(painted)}
    # Shapes meet background colours regardless of the held-out pairs (the point of the option)...
    heldout = {tuple(pair) for pair in summary["heldout_pairs"]}
    assert {(row["background_colour"], row["shape"]) for row in painted} & heldout
    # ...while grey records, every other record and the held-out split stay as they were.
    assert all(a == b for a, b in zip(grey, both) if "background_colour" not in b)
    assert tree_digest(tmp_path / "grey" / "heldout") == tree_digest(tmp_path / "both" / "heldout")
    with pytest.raises(ConfigError, match="colour_background_rate"):
        SynthConfig(grayscale_rate=0.6, colour_background_rate=0.5).validate()


def test_seen_split_holds_clean_training_combinations_on_new_images(tmp_path):
    generate(tmp_path / "plain", 300, SynthConfig(), seed=3, heldout_n=20, workers=1)
    summary = generate(tmp_path / "seen", 300, SynthConfig(), seed=3, heldout_n=20, workers=1, seen_n=60)
    rows = read_rows(tmp_path / "seen" / "seen" / "manifest.jsonl")
    train_pairs = {tuple(pair) for pair in summary["train_pairs"]}
    assert len(rows) == summary["seen_n"] == 60
    assert {(row["colour"], row["shape"]) for row in rows} <= train_pairs
    assert {row["noise"] for row in rows} == {"clean"} and {row["split"] for row in rows} == {"seen"}
    assert all(names_pair(row["caption"], row["colour"], row["shape"]) for row in rows)
    # New images, not copies of training ones; and the other splits are unchanged by adding it.
    train_digests = set(tree_digest(tmp_path / "seen" / "train" / "images").values())
    assert not set(tree_digest(tmp_path / "seen" / "seen" / "images").values()) & train_digests
    for split in ("train", "heldout"):
        assert tree_digest(tmp_path / "plain" / split) == tree_digest(tmp_path / "seen" / split)


@pytest.mark.parametrize("template, fields, expected", [
    ("{a} {colour} {shape}", {"colour": "orange", "shape": "star"}, "an orange star"),
    ("{a} {size} {colour} {shape}", {"size": "big", "colour": "orange", "shape": "star"}, "a big orange star"),
    ("a photo of {a} {shape}", {"shape": "hexagon"}, "a photo of a hexagon"),
    ("{count} {shapes}", {"count": "two", "shapes": "stars"}, "two stars"),  # no article to choose
])
def test_templates_get_the_article_of_the_word_after_it(template, fields, expected):
    assert captions.fill_template(template, **fields) == expected


def test_rows_carry_the_attributes_their_captions_were_drawn_from(generated):
    out, _, _ = generated
    rows = read_rows(out / "train" / "manifest.jsonl") + read_rows(out / "heldout" / "manifest.jsonl")
    clean = [row for row in rows if row["noise"] in ("clean", "undersized", "extreme_aspect")]
    assert len(clean) > 300
    for row in rows:
        assert row["size"] in ("small", "medium", "large") and row["background"] in ("light", "mid", "dark")
        assert (row["position"] is None) == (row["count"] > 1), row
    for row in clean:  # the caption is one the generator could have written for exactly these attributes
        attributes = (row["colour"], row["shape"], row["count"], row["size"], row["position"], row["background"])
        assert row["caption"] in captions.clean_caption_distribution(*attributes), row
    # A caption that names a size fits no other size: the recorded size is the drawn one.
    sized = [row for row in clean if any(f" {word} " in f" {row['caption']} " for words in
                                         captions.SIZE_WORDS.values() for word in words)]
    assert len(sized) > 30
    for row in sized:
        for other in {"small", "medium", "large"} - {row["size"]}:
            attributes = (row["colour"], row["shape"], row["count"], other, row["position"], row["background"])
            assert row["caption"] not in captions.clean_caption_distribution(*attributes)


@pytest.mark.parametrize("attributes", [("blue", "circle", 1, "large", "right", "dark"),
                                        ("red", "cross", 2, "small", None, "mid")])
def test_caption_distribution_is_the_samplers(attributes):
    distribution = captions.clean_caption_distribution(*attributes)
    assert sum(distribution.values()) == pytest.approx(1.0)
    colour, shape, count, size, position, background = attributes
    draws = 30_000
    counts = Counter(captions.clean_caption(random.Random(f"draw:{i}"), colour, shape, count, size,
                                            position or "center", background) for i in range(draws))
    assert set(counts) <= set(distribution)
    for caption, probability in distribution.items():  # within 5 standard errors of its probability
        assert abs(counts[caption] / draws - probability) <= 5 * (probability * (1 - probability) / draws) ** 0.5 + 1e-4
