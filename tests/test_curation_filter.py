"""`openalign filter --similarity`: scores equal `embed`'s embeddings' dot products and the model called
directly, the kept and dropped pairs and the per-label figures agree with the generator's labels, saved scores
re-threshold without a model, an interrupted run resumes to the same bytes, two torchrun processes keep what
one keeps, near-duplicates go as brute force says, and bad input ends in one line."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from openalign.cli import main
from openalign.curation.scorer_check import check_scorer, mann_whitney_auc, shuffled_partners
from openalign.curation.scores import score_corpus
from openalign.curation.similarity_filter import load_scoring_encoders
from openalign.data.sources import iter_records, write_manifest
from openalign.data.synth import SynthConfig, generate
from openalign.inference.embed import read_embedding_folder
from openalign.inference.embedding_folder import embeddings_path
from tests.cli_fixtures import direct_image_embeddings, direct_text_embeddings

PAIRS = 24


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """24 generated pairs at 32 px, a quarter with mismatched captions, as a manifest and as shards."""
    folder = tmp_path_factory.mktemp("corpus")
    generate(folder, PAIRS, SynthConfig(image_size=32, mismatch_rate=0.25), seed=3, heldout_n=0, workers=1,
             shards=True, samples_per_shard=10)
    rows = [json.loads(line) for line in (folder / "train" / "manifest.jsonl").read_text().splitlines()]
    return {"manifest": folder / "train" / "manifest.jsonl", "shards": folder / "shards" / "train-{00000..00002}.tar",
            "rows": rows}


def _filter(source, out, *extra) -> int:
    return main(["filter", str(source), "--out", str(out), "--quiet", "--part-size", "7", "--batch-size", "4",
                 *[str(value) for value in extra]])


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def scored(checkpoint, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("scored") / "out"
    assert _filter(corpus["manifest"], out, "--similarity", "--model", checkpoint, "--keep-fraction", 0.5) == 0
    return out


def test_scores_are_the_dot_products_of_embed_and_of_the_model(scored, checkpoint, corpus, tmp_path):
    assert main(["embed", str(corpus["manifest"]), "--kind", "both", "--model", str(checkpoint), "--out",
                 str(tmp_path / "embedded"), "--part-size", "7", "--batch-size", "4", "--no-progress"]) == 0
    image, metadata = read_embedding_folder(tmp_path / "embedded", "image")
    text, _ = read_embedding_folder(tmp_path / "embedded", "text")
    table = pq.read_table(scored / "scores.parquet")
    assert table.column("index").to_pylist() == list(range(PAIRS))
    assert table.column("key").to_pylist() == [row["image_path"] for row in corpus["rows"]]
    assert table.column("caption").to_pylist() == [row["caption"] for row in corpus["rows"]]
    scores = table.column("score").to_numpy()
    np.testing.assert_allclose(scores, (image.astype(np.float32) * text.astype(np.float32)).sum(1), atol=1e-6)

    folder = corpus["manifest"].parent
    images = direct_image_embeddings(checkpoint, [folder / row["image_path"] for row in corpus["rows"]])
    texts = direct_text_embeddings(checkpoint, [row["caption"] for row in corpus["rows"]])
    np.testing.assert_allclose(scores, (images * texts).sum(1).numpy(), atol=3e-3)


def test_shuffled_scores_pair_each_image_with_another_caption_of_its_part(scored):
    image, metadata = read_embedding_folder(scored / "embeddings", "image")
    text, _ = read_embedding_folder(scored / "embeddings", "text")
    shuffled = pq.read_table(scored / "scores.parquet").column("shuffled_score").to_numpy()
    for part, start in enumerate(range(0, PAIRS, 7)):  # --part-size 7: parts of 7, 7, 7 and 3 pairs
        rows = np.arange(start, min(start + 7, PAIRS))
        partners = shuffled_partners(len(rows), part)
        assert sorted(partners) == list(range(len(rows))) and not (partners == np.arange(len(rows))).any()
        expected = (image[rows].astype(np.float32) * text[rows][partners].astype(np.float32)).sum(1)
        np.testing.assert_allclose(shuffled[rows], expected, atol=1e-6)


def test_the_scorer_check_finds_a_random_model_weak_and_says_what_to_do(scored, capsys):
    report = json.loads((scored / "report.json").read_text())
    check = report["scorer_check"]  # `checkpoint` is a randomly initialised model: it has learnt nothing
    assert check["weak"] and check["pairs"] == PAIRS and abs(check["auc"] - 0.5) < 0.15
    scores = pq.read_table(scored / "scores.parquet").column("score").to_numpy()
    assert check["spread"] == pytest.approx(float(scores.std()), abs=1e-4)
    text = (scored / "report.txt").read_text()
    assert "scorer check: WEAK" in text and "train the scorer longer" in text and "better model" in text


def test_the_auc_is_the_share_of_given_shuffled_pairs_in_order():
    rng = np.random.default_rng(0)
    given, shuffled = rng.normal(0.2, 1, 50).round(1), rng.normal(0, 1, 40).round(1)  # rounded: ties too
    brute = np.mean([(g > s) + 0.5 * (g == s) for g in given for s in shuffled])
    assert mann_whitney_auc(given, shuffled) == pytest.approx(brute, abs=1e-12)
    learnt = check_scorer(given + 3, given)  # every given pair well above its shuffled one
    assert not learnt["weak"] and learnt["auc"] > 0.9
    assert check_scorer(np.full(30, 0.3), np.full(30, 0.3))["weak"]  # a collapsed scorer: no spread, no gap


def test_kept_and_dropped_pairs_and_the_label_figures_match_the_generator(scored, corpus):
    report = json.loads((scored / "report.json").read_text())
    scores = pq.read_table(scored / "scores.parquet").column("score").to_numpy()
    order = np.argsort(-scores, kind="stable")
    expected_kept = {corpus["rows"][position]["image_path"] for position in order[:PAIRS // 2]}
    kept = _jsonl(scored / "manifest.jsonl")  # rows keep the generator's fields: its key names the image
    assert {f"images/{row['key']}.jpg" for row in kept} == expected_kept
    for row in kept:  # each kept row carries its score
        position = int(row["key"].split("-")[1])
        assert row["similarity"] == pytest.approx(float(scores[position]), abs=1e-6)
    dropped = _jsonl(scored / "dropped.jsonl")
    assert {line["key"] for line in dropped} == {row["image_path"] for row in corpus["rows"]} - expected_kept
    assert {line["reason"] for line in dropped} == {"score"}

    noise = {row["image_path"]: row["noise"] for row in corpus["rows"]}
    dropped_keys = {line["key"] for line in dropped}
    by_label = report["labels"]["by_label"]
    for label in set(noise.values()):
        members = {key for key, value in noise.items() if value == label}
        assert by_label[label]["pairs"] == len(members)
        assert by_label[label]["dropped_by_score"] == len(members & dropped_keys)
        if label != "clean":
            assert by_label[label]["recall"] == pytest.approx(len(members & dropped_keys) / len(members), abs=1e-6)
            assert by_label[label]["precision"] == pytest.approx(len(members & dropped_keys) / len(dropped_keys),
                                                                 abs=1e-6)
    assert by_label["mismatch"]["pairs"] == 6  # round(0.25 x 24)
    clean_kept = sum(noise[key] == "clean" for key in expected_kept)
    assert report["labels"]["clean_share"]["kept"] == pytest.approx(clean_kept / (PAIRS // 2), abs=1e-6)
    assert report["kept"] == PAIRS // 2 and report["selection"]["rule"] == "keep_fraction"
    assert report["score_quantiles"]["p100"] == pytest.approx(float(scores.max()), abs=1e-6)
    assert (scored / "scores.png").stat().st_size > 0
    text = (scored / "report.txt").read_text()
    assert "mismatch" in text and "keep_fraction" in text and "precision" in text


def test_shards_keep_the_same_pairs_as_the_manifest(scored, checkpoint, corpus, tmp_path):
    assert _filter(corpus["shards"], tmp_path / "out", "--similarity", "--model", checkpoint,
                   "--keep-fraction", 0.5) == 0
    shards = sorted((tmp_path / "out" / "shards").glob("filtered-*.tar"))
    assert shards and not (tmp_path / "out" / "manifest.jsonl").exists()
    from_shards = {record.extra["key"] for record in iter_records(shards)}
    assert from_shards == {row["key"] for row in _jsonl(scored / "manifest.jsonl")}
    shard_scores = pq.read_table(tmp_path / "out" / "scores.parquet").column("score").to_numpy()
    np.testing.assert_array_equal(shard_scores, pq.read_table(scored / "scores.parquet").column("score").to_numpy())


def test_saved_scores_rethreshold_without_a_model(scored, corpus, tmp_path):
    scores = pq.read_table(scored / "scores.parquet").column("score").to_numpy()
    threshold = float(np.sort(scores)[PAIRS // 3])
    assert _filter(corpus["manifest"], tmp_path / "again", "--scores-from", scored, "--min-similarity",
                   threshold, "--keep-fraction", 0.9) == 0
    report = json.loads((tmp_path / "again" / "report.json").read_text())
    assert report["kept"] == int((scores >= np.float32(threshold)).sum()) == PAIRS - PAIRS // 3
    assert report["selection"]["rule"] == "min_similarity" and report["selection"]["kept_by_fraction"] == 22
    assert not (tmp_path / "again" / "embeddings").exists() and report["scores_from"] == str(scored)


def test_the_closing_line_names_the_files_written_and_scores_read_as_they_matter(scored, corpus, tmp_path,
                                                                                   capsys):
    assert _filter(corpus["manifest"], tmp_path / "again", "--scores-from", scored, "--keep-fraction", 0.5) == 0
    printed = capsys.readouterr().out
    closing = printed.strip().splitlines()[-1]
    assert closing.startswith("wrote ")
    written = closing.removeprefix("wrote ").split(", ")
    assert {Path(name).name for name in written} == {"manifest.jsonl", "dropped.jsonl", "scores.parquet",
                                                     "scores.png", "report.json", "report.txt"}
    assert all(Path(name).is_file() for name in written)
    lowest = json.loads((tmp_path / "again" / "report.json").read_text())["selection"]["lowest_kept_score"]
    assert lowest == round(lowest, 6)  # not float32's value widened to 17 digits
    assert f"lowest kept score {lowest:.4f}\n" in printed


def test_an_interrupted_scoring_resumes_to_the_bytes_of_an_uninterrupted_one(checkpoint, corpus, tmp_path):
    encoders = load_scoring_encoders(checkpoint, device="cpu", batch_size=4)
    score_corpus(corpus["manifest"], tmp_path / "straight", encoders, part_size=5)

    failing = copy.copy(encoders)
    calls = []

    def encode_texts(texts):  # parts of 5 take two batches of (at most) 4: the fourth call is inside part 1
        calls.append(len(texts))
        if len(calls) == 4:
            raise RuntimeError("killed")
        return encoders.encode_texts(texts)

    failing.encode_texts = encode_texts
    with pytest.raises(RuntimeError, match="killed"):
        score_corpus(corpus["manifest"], tmp_path / "resumed", failing, part_size=5)
    done = tmp_path / "resumed" / "embeddings" / "part-00000.done"
    assert done.exists() and not (tmp_path / "resumed" / "embeddings" / "part-00001.done").exists()
    first_part = os.stat(embeddings_path(tmp_path / "resumed" / "embeddings", 0, "image")).st_mtime_ns
    assert not (tmp_path / "resumed" / "scores.parquet").exists()

    summary = score_corpus(corpus["manifest"], tmp_path / "resumed", encoders, part_size=5)
    assert summary["scored"] == PAIRS and summary["skipped"] == 0
    assert os.stat(embeddings_path(tmp_path / "resumed" / "embeddings", 0, "image")).st_mtime_ns == first_part
    straight, resumed = _folder_bytes(tmp_path / "straight"), _folder_bytes(tmp_path / "resumed")
    assert sorted(straight) == sorted(resumed) and "scores.parquet" in straight
    for name in straight:
        assert resumed[name] == straight[name], name


def test_two_torchrun_processes_keep_the_pairs_one_keeps(checkpoint, corpus, tmp_path):
    arguments = ["filter", str(corpus["manifest"]), "--similarity", "--model", str(checkpoint), "--keep-fraction",
                 "0.4", "--dedup-similarity", "0.999", "--part-size", "5", "--batch-size", "4", "--quiet"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "openalign", *arguments, "--out", str(tmp_path / "ranks")]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 1 of 2: scored its parts" in result.stdout
    parts = sorted((tmp_path / "ranks" / "embeddings").glob("part-*.done"))
    assert len(parts) == 5  # parts 0, 2, 4 from rank 0 and 1, 3 from rank 1

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank ran
    try:
        assert main([*arguments, "--out", str(tmp_path / "single")]) == 0
    finally:
        torch.set_num_threads(threads)
    ranks, single = _folder_bytes(tmp_path / "ranks"), _folder_bytes(tmp_path / "single")
    assert ranks["scores.parquet"] == single["scores.parquet"]
    assert ranks["manifest.jsonl"] == single["manifest.jsonl"] and ranks["dropped.jsonl"] == single["dropped.jsonl"]
    assert len(_jsonl(tmp_path / "single" / "manifest.jsonl")) <= round(0.4 * PAIRS)


def test_dedup_drops_what_brute_force_drops_and_every_copy_of_an_image(checkpoint, corpus, tmp_path):
    folder = corpus["manifest"].parent
    rows = [dict(row, image_path=str(folder / row["image_path"])) for row in corpus["rows"][:12]]
    copies = []
    for name, index in (("copy-a", 2), ("copy-b", 2), ("copy-c", 5)):  # the same bytes under other names
        shutil.copy(rows[index]["image_path"], tmp_path / f"{name}.jpg")
        copies.append(dict(rows[index], image_path=str(tmp_path / f"{name}.jpg"), caption=f"another {name}"))
    manifest = write_manifest(rows + copies, tmp_path / "with_copies.jsonl")
    threshold = 0.995
    assert _filter(manifest, tmp_path / "out", "--similarity", "--model", checkpoint, "--keep-fraction", 1.0,
                   "--dedup-similarity", threshold) == 0
    images, _ = read_embedding_folder(tmp_path / "out" / "embeddings", "image")
    table = pq.read_table(tmp_path / "out" / "scores.parquet")
    scores, keys = table.column("score").to_numpy(), table.column("key").to_pylist()
    order = np.argsort(-scores, kind="stable")
    vectors = images.astype(np.float32)[order]
    kept, expected = [], {}
    for rank, vector in enumerate(vectors):  # the rule, by brute force, in priority order
        similarities = [float(vectors[other] @ vector) for other in kept]
        if similarities and max(similarities) >= threshold:
            expected[keys[order[rank]]] = keys[order[kept[int(np.argmax(similarities))]]]
        else:
            kept.append(rank)
    dropped = {line["key"]: line for line in _jsonl(tmp_path / "out" / "dropped.jsonl")}
    assert {key: line["duplicate_of"] for key, line in dropped.items()} == expected
    assert all(line["reason"] == "duplicate" and line["image_cosine"] >= threshold for line in dropped.values())
    kept_images = {(tmp_path / "out" / row["image_path"]).resolve()
                   for row in _jsonl(tmp_path / "out" / "manifest.jsonl")}
    for group in ((2, "copy-a", "copy-b"), (5, "copy-c")):  # an image and its copies leave one pair behind
        paths = {Path(rows[group[0]]["image_path"]).resolve()} | {(tmp_path / f"{name}.jpg").resolve()
                                                                  for name in group[1:]}
        assert len(paths & kept_images) == 1
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["dropped_as_duplicate"] == len(expected) >= 3
    assert report["dedup"]["method"] == "exact" and report["kept"] == 15 - len(expected)


def test_unreadable_images_and_missing_captions_are_skipped_counted_and_named(checkpoint, corpus, tmp_path):
    folder = corpus["manifest"].parent
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    rows = [dict(row, image_path=str(folder / row["image_path"])) for row in corpus["rows"][:6]]
    rows[1]["image_path"] = str(tmp_path / "broken.jpg")
    rows[3]["image_path"] = str(tmp_path / "missing.jpg")
    rows[4]["caption"] = None
    manifest = write_manifest(rows, tmp_path / "damaged.jsonl")
    assert _filter(manifest, tmp_path / "out", "--similarity", "--model", checkpoint, "--keep-fraction", 0.5) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["scored"] == 3 and report["unscored"] == 3 and report["kept"] == 2
    unreadable = {line["key"]: line["error"] for line in _jsonl(tmp_path / "out" / "dropped.jsonl")
                  if line["reason"] == "unreadable"}
    assert set(unreadable) == {str(tmp_path / "broken.jpg"), str(tmp_path / "missing.jpg"), rows[4]["image_path"]}
    assert "caption" in unreadable[rows[4]["image_path"]]
    text = (tmp_path / "out" / "report.txt").read_text()
    assert "unreadable (skipped)" in text and "broken.jpg" in text and "missing.jpg" in text


def _one_line_error(capsys, arguments) -> str:
    assert main(arguments) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and len(captured.err.strip().splitlines()) == 1, captured.err
    return captured.err


def test_bad_input_ends_in_one_line(checkpoint, corpus, tmp_path, capsys):
    base = ["filter", str(corpus["manifest"]), "--out", str(tmp_path / "out"), "--similarity", "--quiet"]
    no_tokenizer, no_settings = tmp_path / "no_tokenizer", tmp_path / "no_settings"
    image_settings = ("preprocessor_config.json", "processor_config.json")
    for folder, missing in ((no_tokenizer, ("tokenizer.json", "vocab.txt")), (no_settings, image_settings)):
        shutil.copytree(checkpoint, folder)
        for name in missing:
            (folder / name).unlink(missing_ok=True)
    assert "no tokenizer" in _one_line_error(capsys, [*base, "--model", str(no_tokenizer), "--keep-fraction", "0.5"])
    assert "no image settings" in _one_line_error(capsys, [*base, "--model", str(no_settings),
                                                            "--keep-fraction", "0.5"])
    for fraction in ("0", "1.5", "-0.2"):
        assert "must lie in (0, 1]" in _one_line_error(capsys, [*base, "--model", str(checkpoint),
                                                                 "--keep-fraction", fraction])
    assert "needs --model" in _one_line_error(capsys, [*base, "--keep-fraction", "0.5"])
    assert "rule flags" in _one_line_error(capsys, [*base, "--model", str(checkpoint), "--min-side", "10"])

    (tmp_path / "bad.jpg").write_bytes(b"\x00" * 10)
    unreadable = write_manifest([{"image_path": str(tmp_path / "bad.jpg"), "caption": "a red circle"}] * 3,
                                tmp_path / "unreadable.jsonl")
    error = _one_line_error(capsys, ["filter", str(unreadable), "--out", str(tmp_path / "none"), "--similarity",
                                     "--model", str(checkpoint), "--keep-fraction", "0.5", "--quiet"])
    assert "no pair could be scored (3 unreadable" in error
    (tmp_path / "empty.jsonl").write_text("")
    assert "empty.jsonl" in _one_line_error(capsys, ["filter", str(tmp_path / "empty.jsonl"), "--out",
                                                     str(tmp_path / "empty"), "--similarity", "--model",
                                                     str(checkpoint), "--keep-fraction", "0.5", "--quiet"])
