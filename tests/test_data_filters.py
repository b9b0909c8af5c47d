"""The paper's data filters on crafted manifests (exact kept / dropped sets), the streaming counters against
exact counts, and the `openalign filter` / `openalign data synth` commands."""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from openalign.cli import main
from openalign.data import counting, sources
from openalign.data.filters import RULES, FilterConfig, run_filter
from openalign.data.phash import min_hamming_distances, phash_bytes
from openalign.errors import ConfigError


def image_bytes(width: int, height: int, seed: int = 0, fmt: str = "PNG") -> bytes:
    """A smooth random pattern (distinct per seed, like a photo and unlike noise) of the given size."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
    image = Image.fromarray(low, "RGB").resize((width, height), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_corpus(folder: Path, rows: list[tuple[str, bytes, str]]) -> Path:
    """Write (file name, image bytes, caption) rows as images plus a manifest.jsonl; return the manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data, _ in rows:
        (folder / name).write_bytes(data)
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"image_path": name, "caption": caption}) + "\n"
                                for name, _, caption in rows))
    return manifest


def only(rule: str, **thresholds) -> FilterConfig:
    """A config with every rule but `rule` switched off, run in this process."""
    return FilterConfig(disabled=tuple(r for r in RULES if r != rule), workers=1, **thresholds)


def outcome(out: Path) -> tuple[set[str], dict[str, list[str]]]:
    """The kept image names and, per dropped image name, its rules."""
    kept = {Path(record.image_path).name for record in sources.iter_records(out / "manifest.jsonl")}
    dropped = {Path(line["key"]).name: line["rules"]
               for line in map(json.loads, (out / "dropped.jsonl").read_text().splitlines())}
    return kept, dropped


def test_min_side_keeps_shorter_side_strictly_over_threshold(tmp_path):
    rows = [("a.png", image_bytes(201, 300, 1), "x"), ("b.png", image_bytes(200, 300, 2), "x"),
            ("c.png", image_bytes(400, 150, 3), "x"), ("d.png", image_bytes(250, 250, 4), "x")]
    report = run_filter(write_corpus(tmp_path / "in", rows), tmp_path / "out", only("min_side"))
    assert outcome(tmp_path / "out") == ({"a.png", "d.png"}, {"b.png": ["min_side"], "c.png": ["min_side"]})
    assert report["dropped_by_rule"]["min_side"] == 2 and report["kept"] == 2


def test_aspect_keeps_ratio_strictly_under_threshold(tmp_path):
    rows = [("a.png", image_bytes(299, 100, 1), "x"), ("b.png", image_bytes(300, 100, 2), "x"),
            ("c.png", image_bytes(40, 200, 3), "x"), ("d.png", image_bytes(64, 64, 4), "x")]
    run_filter(write_corpus(tmp_path / "in", rows), tmp_path / "out", only("aspect"))
    assert outcome(tmp_path / "out") == ({"a.png", "d.png"}, {"b.png": ["aspect"], "c.png": ["aspect"]})


def test_captions_per_image_counts_identical_content_across_files(tmp_path):
    shared, other = image_bytes(16, 16, 1), image_bytes(16, 16, 2)
    # Four pairs hold the same image bytes (two of them under another file name): over the limit of 3.
    rows = [(f"s{i}.png", shared, f"caption {i}") for i in range(4)] + [
        (f"o{i}.png", other, f"caption {i}") for i in range(3)]
    config = only("captions_per_image", max_captions_per_image=3)
    run_filter(write_corpus(tmp_path / "in", rows), tmp_path / "out", config)
    kept, dropped = outcome(tmp_path / "out")
    assert kept == {"o0.png", "o1.png", "o2.png"}
    assert dropped == {f"s{i}.png": ["captions_per_image"] for i in range(4)}


def test_images_per_caption_counts_normalised_text(tmp_path):
    captions = ["click to enlarge", "Click  to ENLARGE", "click to enlarge ", "click to enlarge",
                "a red circle", "a red circle", "a red circle", "unique words here"]
    rows = [(f"{i}.png", image_bytes(8, 8, i), caption) for i, caption in enumerate(captions)]
    run_filter(write_corpus(tmp_path / "in", rows), tmp_path / "out",
               only("images_per_caption", max_images_per_caption=3))
    kept, dropped = outcome(tmp_path / "out")
    assert kept == {"4.png", "5.png", "6.png", "7.png"}
    assert dropped == {f"{i}.png": ["images_per_caption"] for i in range(4)}


def test_rare_token_uses_top_unigrams_bigrams_and_count_floor(tmp_path):
    # "zzqx" occurs once (under the count floor); "york", "new", "of" and "paris" are counted often enough
    # but fall outside the top 6 unigrams, and no top-3 bigram rescues them.
    captions = (["a red circle on grey"] * 6 + ["a new york photo"] * 3 + ["a photo of paris"] * 2
                + ["a red zzqx circle"] + ["york red circle"])
    rows = [(f"{i:02d}.png", image_bytes(8, 8, i), caption) for i, caption in enumerate(captions)]
    config = only("rare_token", top_unigrams=6, top_bigrams=3, min_token_count=2)
    report = run_filter(write_corpus(tmp_path / "in", rows), tmp_path / "out", config)
    kept, dropped = outcome(tmp_path / "out")
    # Unigram counts: a 12, red 8, circle 8, photo 5, on 6, grey 6, new 3, york 4, of 2, paris 2.
    # Top 6: a, red, circle, on, grey, photo. Top 3 bigrams: "red circle" 7, "a red" 7, "circle on" 6.
    assert dropped == {"09.png": ["rare_token"], "10.png": ["rare_token"], "11.png": ["rare_token"],
                       "12.png": ["rare_token"], "06.png": ["rare_token"], "07.png": ["rare_token"],
                       "08.png": ["rare_token"]}
    assert kept == {f"{i:02d}.png" for i in range(6)}
    assert report["vocabulary"] == {"unigrams": 6, "bigrams": 3, "token_count_error_bound": 0}


def test_rare_token_bigram_rescues_a_token_cut_from_unigrams(tmp_path):
    captions = ["a new york photo"] * 4 + ["a photo of a cat"] * 5 + ["new photo"]
    rows = [(f"{i}.png", image_bytes(8, 8, i), caption) for i, caption in enumerate(captions)]
    # Unigrams by count: a 14, photo 10, cat 5, new 5, of 5, york 4: the top 5 leave out "york", but the
    # top 10 bigrams hold "new york" (4), which lets it through; without bigrams it is rare.
    config = only("rare_token", top_unigrams=5, top_bigrams=10, min_token_count=2)
    run_filter(write_corpus(tmp_path / "in", rows), tmp_path / "out", config)
    kept, dropped = outcome(tmp_path / "out")
    assert dropped == {}
    assert len(kept) == 10
    config = only("rare_token", top_unigrams=5, top_bigrams=0, min_token_count=2)
    run_filter(write_corpus(tmp_path / "in", rows), tmp_path / "out2", config)
    assert set(outcome(tmp_path / "out2")[1]) == {f"{i}.png" for i in range(4)}


def test_length_counts_unigrams_between_bounds(tmp_path):
    captions = ["two words", "three words here", "IMG_0423.jpg", " ".join(["w"] * 20), " ".join(["w"] * 21),
                ""]
    rows = [(f"{i}.png", image_bytes(8, 8, i), caption) for i, caption in enumerate(captions)]
    run_filter(write_corpus(tmp_path / "in", rows), tmp_path / "out", only("length"))
    kept, dropped = outcome(tmp_path / "out")
    assert kept == {"1.png", "2.png", "3.png"}  # "IMG_0423.jpg" is img / 0423 / jpg: three unigrams
    assert dropped == {"0.png": ["length"], "4.png": ["length"], "5.png": ["length"]}


def test_near_duplicates_of_eval_images_are_dropped(tmp_path):
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    (evaluation / "e1.png").write_bytes(image_bytes(120, 90, 1))
    (evaluation / "e2.png").write_bytes(image_bytes(120, 90, 2))
    copy = Image.open(io.BytesIO(image_bytes(120, 90, 1))).resize((300, 225))  # resized, re-encoded copy
    buffer = io.BytesIO()
    copy.save(buffer, format="JPEG", quality=60)
    rows = [("copy.jpg", buffer.getvalue(), "x"), ("other.png", image_bytes(120, 90, 3), "x"),
            ("same.png", image_bytes(120, 90, 2), "x")]
    report = run_filter(write_corpus(tmp_path / "in", rows), tmp_path / "out",
                        only("near_duplicate", eval_images=str(evaluation)))
    assert outcome(tmp_path / "out") == ({"other.png"}, {"copy.jpg": ["near_duplicate"],
                                                         "same.png": ["near_duplicate"]})
    assert report["rules"]["near_duplicate"] is True


def test_phash_distances_separate_copies_from_distinct_images():
    original = phash_bytes(image_bytes(200, 150, 5, fmt="JPEG"))
    resized = phash_bytes(image_bytes(100, 75, 5, fmt="PNG"))
    others = np.array([phash_bytes(image_bytes(200, 150, seed)) for seed in range(6, 26)], dtype=np.uint64)
    assert bin(original ^ resized).count("1") <= 6
    assert min_hamming_distances(np.array([original], dtype=np.uint64), others)[0] > 10
    brute = [min(bin(int(h) ^ int(r)).count("1") for r in others[10:]) for h in others[:10]]
    assert min_hamming_distances(others[:10], others[10:], chunk=3).tolist() == brute


def test_unreadable_images_are_dropped_and_named(tmp_path):
    rows = [("good.png", image_bytes(8, 8, 1), "a b c"), ("bad.png", b"not an image", "a b c")]
    run_filter(write_corpus(tmp_path / "in", rows), tmp_path / "out", FilterConfig(disabled=RULES, workers=1))
    kept, dropped = outcome(tmp_path / "out")
    assert kept == {"good.png"} and dropped == {"bad.png": ["unreadable"]}
    line = json.loads((tmp_path / "out" / "dropped.jsonl").read_text())
    assert "UnidentifiedImageError" in line["error"]


def test_report_counts_each_rule_and_the_total_once(tmp_path):
    rows = [("small_short.png", image_bytes(50, 50, 1), "tiny"),       # min_side and length
            ("small.png", image_bytes(50, 50, 2), "a good caption"),    # min_side
            ("wide.png", image_bytes(900, 250, 3), "a good caption"),   # aspect
            ("fine.png", image_bytes(300, 250, 4), "a good caption")]
    config = FilterConfig(disabled=("rare_token", "images_per_caption"), workers=1)
    report = run_filter(write_corpus(tmp_path / "in", rows), tmp_path / "out", config)
    assert report["dropped_by_rule"] == {"min_side": 2, "aspect": 1, "captions_per_image": 0, "length": 1,
                                         "unreadable": 0}
    assert report["dropped_only_by_rule"]["min_side"] == 1
    assert (report["total"], report["kept"], report["dropped"]) == (4, 1, 3)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["kept"] == 1
    table = (tmp_path / "out" / "report.txt").read_text()
    assert "min_side" in table and "dropped (any rule)" in table


def test_shards_in_shards_out_and_workers_agree(tmp_path):
    records = [sources.Record(key=str(i), caption=caption, image_bytes=image_bytes(*size, seed=i),
                              image_ext="png")
               for i, (size, caption) in enumerate([((64, 64), "a blue square"), ((30, 30), "a blue square"),
                                                    ((64, 300), "a red star"), ((64, 64), "hi")])]
    sources.write_shards(records, tmp_path / "shards", samples_per_shard=3)
    config = FilterConfig(min_side=48, disabled=("rare_token",), workers=1)
    first = run_filter(str(tmp_path / "shards"), tmp_path / "one", config)
    config.workers = 2
    second = run_filter(str(tmp_path / "shards"), tmp_path / "two", config)
    assert first["dropped_by_rule"] == second["dropped_by_rule"]
    kept = list(sources.iter_records(str(tmp_path / "two" / "shards")))
    assert [record.caption for record in kept] == ["a blue square"]
    assert (tmp_path / "one" / "dropped.jsonl").read_text() == (tmp_path / "two" / "dropped.jsonl").read_text()


def test_frequent_items_counter_matches_exact_counts_within_its_bound():
    rng = random.Random(0)
    stream = [f"w{int(rng.paretovariate(1.1))}" for _ in range(20000)]  # Zipf-like: a long tail
    exact = Counter(stream)
    roomy = counting.FrequentItemsCounter(capacity=len(exact))
    roomy.update(stream)
    assert roomy.counts == dict(exact) and roomy.error_bound == 0
    tight = counting.FrequentItemsCounter(capacity=20)
    for start in range(0, len(stream), 7):  # fed in caption-sized pieces, as the filter does
        tight.update(stream[start:start + 7])
    assert 0 < tight.error_bound <= len(stream) / 21
    assert len(tight.counts) <= 2 * 20 + 7
    for item, true_count in exact.items():
        assert true_count - tight.error_bound <= tight.estimate(item) <= true_count
        if true_count > tight.error_bound:
            assert item in tight.counts
    top = [item for item, _ in exact.most_common(5)]
    assert [item for item, _ in tight.most_common(5)] == top


def test_hash_counter_spilling_to_disk_is_exact():
    rng = random.Random(1)
    values = [counting.stable_hash(f"caption {int(rng.paretovariate(0.8))}") for _ in range(30000)]
    exact = Counter(values)
    spilled = counting.HashCounter(memory_items=1000)  # forces many spills into partition files
    for value in values:
        spilled.add(value)
    spilled.finish(threshold=10)
    heavy = {value: count for value, count in exact.items() if count > 10}
    assert heavy and {value: spilled.count_if_heavy(value) for value in exact} == {
        value: heavy.get(value, 0) for value in exact}
    assert spilled.total == len(values) and spilled.spills >= 30


def test_tokenize_and_config_errors():
    assert counting.tokenize("IMG_0423.jpg, a Five-pointed STAR!") == ["img", "0423", "jpg", "a", "five",
                                                                      "pointed", "star"]
    assert counting.tokenize(None) == []
    with pytest.raises(ConfigError, match="'colour'"):
        FilterConfig(disabled=("colour",)).validate()
    with pytest.raises(ConfigError, match="max_aspect"):
        FilterConfig(max_aspect=0.5).validate()


def test_commands_generate_then_filter(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "synth"), "--n", "300", "--heldout-n", "20",
                 "--grayscale-rate", "0.2", "--colour-background-rate", "0.2", "--workers", "1", "--quiet"]) == 0
    summary = json.loads((tmp_path / "synth" / "dataset.json").read_text())
    assert summary["n"] == 300 and len(summary["heldout_pairs"]) == 10
    assert summary["config"]["grayscale_rate"] == summary["config"]["colour_background_rate"] == 0.2
    assert summary["clean_renderings"]["grey"] > 0 and summary["clean_renderings"]["colour_background"] > 0
    assert main(["filter", str(tmp_path / "synth" / "train" / "manifest.jsonl"), "--out", str(tmp_path / "f"),
                 "--min-side", "48", "--no-rare-token", "--no-images-per-caption", "--workers", "1",
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "kept" in printed and "rare_token" not in printed
    report = json.loads((tmp_path / "f" / "report.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "synth" / "train" / "manifest.jsonl").read_text().splitlines()]
    noise = Counter(row["noise"] for row in rows)
    # Size and aspect noise are exactly what the image rules drop on the generated set.
    assert report["dropped_by_rule"]["min_side"] == noise["undersized"]
    assert report["dropped_by_rule"]["aspect"] == noise["extreme_aspect"]
    assert report["dropped_by_rule"]["length"] == noise["short"] + noise["long"] + sum(
        len(counting.tokenize(row["caption"])) < 3 for row in rows if row["noise"] == "boilerplate")


def test_suggested_filter_drops_the_generated_noise_and_no_clean_pair(tmp_path):
    from openalign.data.synth import SynthConfig, generate

    # A boilerplate rate high enough that boilerplate outnumbers any describing caption even at this size.
    summary = generate(tmp_path / "synth", 600, SynthConfig(boilerplate_rate=0.1), seed=0, heldout_n=10,
                       workers=1)
    assert summary["caption_repeats"]["clean_max"] <= summary["suggested_filter"]["max_images_per_caption"] \
        < summary["caption_repeats"]["boilerplate_min"]
    config = FilterConfig(**summary["suggested_filter"], min_token_count=2, workers=1)
    run_filter(tmp_path / "synth" / "train" / "manifest.jsonl", tmp_path / "f", config)
    kept, dropped = outcome(tmp_path / "f")
    rows = [json.loads(line) for line in (tmp_path / "synth" / "train" / "manifest.jsonl").read_text().splitlines()]
    noise = {Path(row["image_path"]).name: row["noise"] for row in rows}
    assert {noise[name] for name in kept} == {"clean", "mismatch"}  # a wrong caption is no filter's business
    assert {name for name in noise if noise[name] in ("clean", "mismatch")} == kept
    rules_by_kind = {kind: {rule for name, rules in dropped.items() if noise[name] == kind for rule in rules}
                     for kind in set(noise.values()) - {"clean", "mismatch"}}
    assert rules_by_kind["junk"] == {"rare_token"}
    assert rules_by_kind["undersized"] == {"min_side"} and rules_by_kind["extreme_aspect"] == {"aspect"}
    assert rules_by_kind["long"] == {"length"} and "length" in rules_by_kind["short"]
    assert "images_per_caption" in rules_by_kind["boilerplate"]


def test_progress_bars_change_nothing_but_the_terminal(tmp_path, capsys):
    # The counting pass has no total; a bar without one must still be treated as a bar (it once raised).
    rows = [("a.png", image_bytes(201, 300, 1), "x"), ("b.png", image_bytes(200, 300, 2), "x")]
    corpus = write_corpus(tmp_path / "in", rows)
    quiet = run_filter(corpus, tmp_path / "quiet", only("min_side"))
    shown = run_filter(corpus, tmp_path / "shown", only("min_side"), progress=True)
    assert outcome(tmp_path / "shown") == outcome(tmp_path / "quiet") == ({"a.png"}, {"b.png": ["min_side"]})
    assert shown["dropped_by_rule"] == quiet["dropped_by_rule"]
    assert "filter: counting" in capsys.readouterr().err
