"""The shortened demo, end to end through the command: generate, filter, tokenize, train, evaluate, report.

It trains for a fixed number of steps (so a slow machine takes longer rather than learning less) and checks
that learning happened: held-out figures well above chance, a text search over an index of held-out images
that finds the right colour, and a checkpoint that openalign and transformers both load to the same outputs.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from openalign.data import captions
from openalign.demo import evaluate
from openalign.demo.pipeline import DemoConfig

METRIC_KEYS = ("colour_accuracy", "shape_accuracy", "shape_only_prompt_accuracy", "pair_accuracy",
               "image_to_text_r1", "image_to_text_r5", "text_to_image_r1", "text_to_image_r5")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Run `openalign demo` once, small: 3,000 pairs, 150 steps of 128 (40-120 s of training here, depending on
    what else runs; --minutes is only a cap, so that a slow machine trains as much, for longer)."""
    out = tmp_path_factory.mktemp("demo") / "out"
    # A process of its own, as the README runs it: torch is already loaded here, and OpenMP reads its wait
    # policy (which the command sets) only when torch loads.
    completed = subprocess.run(
        [sys.executable, "-m", "openalign", "demo", "--out", str(out), "--minutes", "6", "--n", "3000",
         "--heldout-n", "300", "--seen-n", "300", "--steps", "150", "--batch-size", "128", "--quiet"],
        capture_output=True, text=True, timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return out, json.loads((out / "metrics.json").read_text()), completed.stdout


def test_outputs_are_all_in_the_folder_and_printed(demo):
    out, metrics, printed = demo
    for name in ("model/config.json", "model/model.safetensors", "model/tokenizer.json",
                 "model/preprocessor_config.json", "plots/loss.png", "heatmap.png", "report.md", "metrics.json"):
        assert (out / name).is_file(), name
    assert set(METRIC_KEYS) | {"chance", "minutes", "bayes_ceiling"} <= set(metrics)
    for key in METRIC_KEYS[4:]:  # retrieval: chance < best possible <= the identical-caption ceiling
        assert metrics["chance"][key] < metrics["bayes_ceiling"][key] <= metrics["ceiling"][key] + 1e-9
        assert f"{metrics['bayes_ceiling'][key]:.3f} |" in (out / "report.md").read_text()
    assert set(METRIC_KEYS) <= set(metrics["chance"])
    # One schedule: no bootstrap scorer in the default curation, every step the training's
    assert metrics["training"]["steps_with_bootstrap"] == metrics["training"]["steps"] == 150
    assert metrics["training"]["stop_reason"] == "finished"
    assert metrics["config"]["image_ssl_weight"] == 0.0  # the default turns the image term off in so short a run
    for key in METRIC_KEYS:
        assert f"{metrics[key]:.3f}" in (out / "report.md").read_text()
    for name in ("model", "plots", "heatmap.png", "report.md", "metrics.json"):
        assert str(out / name) in printed
    drawn = metrics["data"]["clean_renderings"]  # the demo's default share of the clean images is grey
    assert sum(drawn.values()) == metrics["data"]["noise_counts"]["clean"]
    default = DemoConfig().grayscale_rate
    assert default - 0.1 < drawn["grey"] / sum(drawn.values()) < default + 0.1 and drawn["colour_background"] == 0
    report = (out / "report.md").read_text()
    assert f"clean pairs drawn as: coloured {drawn['coloured']}, grey {drawn['grey']}" in report


def test_seen_pairs_are_scored_beside_the_heldout_ones(demo):
    out, metrics, _ = demo
    seen = metrics["seen_pairs"]
    assert metrics["data"]["seen_pairs"] == 300
    assert set(METRIC_KEYS) <= set(seen)
    assert seen["predicted_pair_seen_in_training"] > 0.5  # familiar images get familiar pairs
    assert seen["colour_accuracy"] >= max(0.5, 3 * seen["chance"]["colour_accuracy"])
    report = (out / "report.md").read_text()
    assert "seen pairs |" in report and f"{seen['shape_accuracy']:.3f} |" in report
    composition = metrics["composition"]
    assert set(composition) == {"image_shape_accuracy_heldout", "image_shape_accuracy_seen",
                                "text_pairs_nearest_own_prototype"}
    assert f"{composition['image_shape_accuracy_heldout']:.3f}" in report


def test_learning_happened_on_unseen_colour_shape_pairs(demo):
    _, metrics, _ = demo
    chance = metrics["chance"]
    # Colour is the first thing learnt and generalises to unseen pairs at once; retrieval follows it.
    assert metrics["colour_accuracy"] >= max(0.5, 3 * chance["colour_accuracy"])
    assert metrics["text_to_image_r5"] >= 4 * chance["text_to_image_r5"]
    assert metrics["image_to_text_r5"] >= 4 * chance["image_to_text_r5"]
    assert metrics["pair_accuracy"] >= 2 * chance["pair_accuracy"]
    assert metrics["data"]["kept_after_filter"] < metrics["data"]["train_pairs"]  # the filters ran


def test_text_search_over_an_index_of_heldout_images_finds_the_colour(demo, tmp_path):
    from openalign.index.faiss_index import Index, build_index
    from openalign.inference.embed import embed_to_folder
    from openalign.inference.encoders import load_encoders

    out, metrics, _ = demo
    encoders = load_encoders(out / "model", device="cpu", batch_size=64)
    split = out / "data" / "heldout"
    rows = evaluate.read_rows(split / "manifest.jsonl")
    embed_to_folder([str(split / row["image_path"]) for row in rows], encoders.encode_loaded_images,
                    tmp_path / "embeddings", kind="image", progress=False)
    build_index(tmp_path / "embeddings", tmp_path / "index")
    index = Index.load(tmp_path / "index", encode_texts=encoders.encode_texts)
    pairs = sorted({(row["colour"], row["shape"]) for row in rows})
    results = index.search(texts=[f"a {colour} {shape}" for colour, shape in pairs], k=10)
    by_path = {str(split / row["image_path"]): row for row in rows}
    colour_hits, shape_hits = [], []
    for (colour, shape), hits in zip(pairs, results):
        truths = [by_path[hit["source"]] for hit in hits]
        colour_hits.append(np.mean([truth["colour"] == colour for truth in truths]))
        shape_hits.append(np.mean([truth["shape"] == shape for truth in truths]))
    # No colour is in more than two of the ten held-out pairs: a model that knew nothing would find the right
    # colour in about a fifth of the top ten.
    assert np.mean(colour_hits) >= 0.6, colour_hits
    if metrics["shape_accuracy"] >= 0.5:  # the short run learnt shape too: then search must show it
        assert np.mean(shape_hits) >= 0.4, shape_hits


def test_checkpoint_loads_in_openalign_and_transformers_alike(demo):
    transformers = pytest.importorskip("transformers")
    from openalign.models.align import AlignModel
    from openalign.processing.processor import AlignProcessor

    out, _, _ = demo
    processor = AlignProcessor.from_pretrained(out / "model")
    rows = evaluate.read_rows(out / "data" / "heldout" / "manifest.jsonl")[:4]
    inputs = processor(text=[row["caption"] for row in rows],
                       images=[out / "data" / "heldout" / row["image_path"] for row in rows])
    ours = AlignModel.from_pretrained(out / "model").eval()
    theirs = transformers.AlignModel.from_pretrained(out / "model").eval()
    with torch.no_grad():
        mine = ours(**inputs)
        other = theirs(**inputs)
    torch.testing.assert_close(mine.logits_per_image, other.logits_per_image, rtol=1e-4, atol=1e-4)


def test_recall_ceilings_count_identical_captions():
    ceilings = evaluate.recall_ceilings(["a red circle"] * 10 + ["a blue star"] * 2 + ["unique"], ks=(1, 5))
    # A caption shared by m images scores at best min(1, k / m) on text -> image.
    assert ceilings["text_to_image_r1"] == pytest.approx((10 * 0.1 + 2 * 0.5 + 1) / 13)
    assert ceilings["text_to_image_r5"] == pytest.approx((10 * 0.5 + 2 * 1 + 1) / 13)
    assert ceilings["image_to_text_r5"] == 1.0


def test_expected_recall_is_random_tie_breaking_by_brute_force():
    generator = np.random.default_rng(0)
    scores = generator.integers(0, 4, size=(30, 12)).astype(np.float64)  # many ties
    own = generator.integers(0, 12, size=30)
    exempt = generator.random((30, 12)) < 0.2
    trials, hits = 4000, {1: 0.0, 5: 0.0}
    for _ in range(trials):  # break ties by a random jitter; exempt candidates never outrank the right one
        jittered = np.where(exempt, -np.inf, scores + generator.random(scores.shape) * 1e-3)
        jittered[np.arange(30), own] = scores[np.arange(30), own] + generator.random(30) * 1e-3
        ranks = 1 + (jittered > jittered[np.arange(30), own][:, None]).sum(1)
        for k in hits:
            hits[k] += np.mean(ranks <= k) / trials
    for k, simulated in hits.items():
        assert evaluate.expected_recall(scores, own, k, exempt=exempt) == pytest.approx(simulated, abs=0.01)


def _row(caption, colour, shape, size, position, background, count=1):
    return {"caption": caption, "colour": colour, "shape": shape, "count": count, "size": size,
            "position": position, "background": background}


def test_bayes_ceiling_of_a_gallery_worked_out_by_hand():
    rows = [_row("a blue circle", "blue", "circle", "large", "right", "dark"),
            _row("a small blue circle", "blue", "circle", "small", "left", "light"),
            _row("a red square", "red", "square", "medium", "center", "mid"),
            _row("a blue circle", "blue", "circle", "medium", "top", "mid")]
    bayes = evaluate.bayes_retrieval(rows, gallery_size=4)
    # Text -> image: "a blue circle" fits the three blue circles equally (1/3 at rank 1, twice); the others
    # fit only their own image.
    assert bayes["text_to_image_r1"] == pytest.approx((1 / 3 + 1 + 1 + 1 / 3) / 4)
    assert bayes["text_to_image_r5"] == pytest.approx(1.0)
    # Image -> text: the small circle's own caption came from it for sure, while "a blue circle" may have come
    # from any blue circle, so the specific caption ranks first although the generic one is likelier under
    # the image (one template of 13 with canonical words, against the same times a 1-in-3 size word).
    assert bayes["image_to_text_r1"] == pytest.approx(1.0)
    generic = captions.clean_caption_distribution("blue", "circle", 1, "small", "left", "light")
    assert generic["a blue circle"] == pytest.approx(0.6 * 0.6 / 13)
    assert generic["a small blue circle"] == pytest.approx(0.6 * 0.6 / 13 / 3)
    # Without the identical caption of row 3 exempt, image 0 would tie with it at rank 1.
    assert evaluate.expected_recall(np.array([[0.5, 0.0, 0.0, 0.5]]), np.array([0]), 1) == pytest.approx(0.5)


def test_the_models_retrieval_and_the_best_possible_share_one_tie_rule():
    """A model that sees exactly the colour-shape pair (one-hot image and text embeddings) of a gallery whose
    captions name nothing else ranks as the best possible ranking does, ties and all: different captions of a
    pair tie, identical strings count as the right answer, images of a pair tie. Under the optimistic rule the
    model would score image -> text R@1 1.0, above the best possible."""
    pairs = [("blue", "circle")] * 3 + [("red", "square")] * 2 + [("green", "star")] * 2
    texts = ["a blue circle", "a photo of a blue circle", "a blue circle", "a red square",
             "close-up of a red square", "a green star", "a simple green star icon"]
    rows = [_row(text, colour, shape, "medium", "center", "mid") for text, (colour, shape) in zip(texts, pairs)]
    kinds = sorted(set(pairs))
    one_hot = torch.eye(len(kinds))

    def encode_texts(strings):
        return torch.stack([one_hot[next(kinds.index(p) for p in kinds if f"{p[0]} {p[1]}" in text)]
                            for text in strings])

    image_embeds = torch.stack([one_hot[kinds.index(pair)] for pair in pairs])
    model = evaluate.retrieval_figures(image_embeds, texts, encode_texts)
    best = evaluate.bayes_retrieval(rows, gallery_size=len(rows))
    assert model == pytest.approx(best, abs=1e-12)
    # By hand: the first blue circle's own string is also the third's (the same answer), so one other caption
    # ties with it: R@1 1/2. Text -> image: three blue circles tie, 1/3 at rank 1.
    assert model["image_to_text_r1"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2 + 1 / 2 + 1 / 2 + 1 / 2 + 1 / 2) / 7)
    assert model["text_to_image_r1"] == pytest.approx((3 * (1 / 3) + 4 * (1 / 2)) / 7)
    # A model that has learnt nothing (every score equal) scores chance, not a perfect recall.
    collapsed = evaluate.retrieval_figures(torch.ones(7, 2), texts, lambda strings: torch.ones(len(strings), 2))
    assert collapsed["text_to_image_r1"] == pytest.approx(1 / 7)
    assert collapsed["image_to_text_r1"] == pytest.approx((2 * (1 / 6) + 5 * (1 / 7)) / 7)


def test_bayes_ceiling_needs_the_attributes_and_a_caption_they_could_produce():
    rows = [_row("a blue circle", "blue", "circle", "large", "right", "dark"),
            _row("a red square", "red", "square", "medium", "center", "mid")]
    assert evaluate.bayes_retrieval(rows, gallery_size=2)["text_to_image_r1"] == pytest.approx(1.0)
    assert evaluate.bayes_retrieval([{k: v for k, v in rows[0].items() if k != "size"}, rows[1]]) is None
    assert evaluate.bayes_retrieval([{**rows[0], "colour": None}, rows[1]]) is None  # a grey image
    assert evaluate.bayes_retrieval([{**rows[0], "caption": "click to enlarge"}, rows[1]]) is None


def test_prompt_templates_come_from_the_caption_templates():
    pair = [evaluate.fill(t, "orange", "circle") for t in evaluate.pair_templates()]
    shape = [evaluate.fill(t, None, "circle") for t in evaluate.shape_only_templates()]
    assert "an orange circle" in pair and "a photo of an orange circle" in pair
    assert "a circle" in shape and all("orange" not in text and "  " not in text for text in shape)


def test_train_overrides_reach_the_training_config(tmp_path):
    from openalign.demo.pipeline import DemoConfig, training_config

    config = DemoConfig(train_overrides={"data.group_by": "colour", "data.group_size": 64})
    train_config = training_config(config, tmp_path / "m.jsonl", tmp_path / "tok", tmp_path / "c.json",
                                   tmp_path / "run", total_steps=10, minutes=1.0)
    assert (train_config.data.group_by, train_config.data.group_size) == ("colour", 64)
    assert train_config.data.cache_images and train_config.optim.total_steps == 10  # the demo's own still apply


@pytest.mark.parametrize("loss_name", ["align", "clip"])
def test_the_step_probe_steps_with_the_loss_the_trainer_would_use(loss_name, tmp_path):
    """The probe's loss at the start is ALIGN's at the model's temperature, for CLIP too (whose scale is its
    reciprocal), and it trains the scalars the trainer trains."""
    from openalign.demo.pipeline import probe_stepper, training_config
    from openalign.losses import AlignLoss

    # Curation "none": the loss as the override names it (the default "robust" keeps the temperature fixed).
    config = DemoConfig(curation="none", train_overrides={"loss.name": loss_name})
    train_config = training_config(config, tmp_path / "m.jsonl", tmp_path / "tok", tmp_path / "c.json",
                                   tmp_path / "run", total_steps=10, minutes=1.0)
    model, stepper = probe_stepper(config.model_config(vocab_size=50), train_config)
    generator = torch.Generator().manual_seed(0)
    image, text = torch.randn(8, 16, generator=generator), torch.randn(8, 16, generator=generator)
    expected = AlignLoss(label_smoothing=config.label_smoothing)(image, text, torch.tensor(config.temperature_init))
    torch.testing.assert_close(stepper.loss_fn(image, text), expected)
    assert model.temperature.requires_grad == (loss_name == "align")  # CLIP trains a scale of its own
    trained = {id(parameter) for group in stepper.optimizer.param_groups for parameter in group["params"]}
    assert all(id(scalar) in trained for scalar in stepper.loss_parameters) and stepper.loss_parameters


def test_step_time_probe_runs_real_batches_of_the_training_data(demo):
    from openalign.demo.pipeline import DemoConfig, measure_step_seconds, training_config
    from openalign.model_config import AlignConfig
    from openalign.processing.tokenizer import AlignTokenizer

    out, metrics, _ = demo
    config = DemoConfig(batch_size=64)
    model_config = AlignConfig.from_json_file(out / "model_config.json")
    train_config = training_config(config, out / "filtered" / "manifest.jsonl", out / "tokenizer",
                                   out / "model_config.json", out / "probe-run", total_steps=1, minutes=1.0)
    seconds = measure_step_seconds(model_config, train_config, AlignTokenizer.from_pretrained(out / "tokenizer"))
    assert set(seconds) == {"load", "decode", "model"}
    assert 0 < seconds["decode"] <= seconds["load"] < 30 and 0 < seconds["model"] < 30
    assert not (out / "probe-run").exists()  # measuring writes nothing


def test_the_image_term_reaches_the_training_config_and_the_step_probe_pays_for_it(demo, monkeypatch):
    from openalign.demo.pipeline import DemoConfig, measure_step_seconds, training_config
    from openalign.model_config import AlignConfig
    from openalign.processing.tokenizer import AlignTokenizer
    from openalign.train.image_ssl import ImageSelfSupervision

    out, _, _ = demo
    config = DemoConfig(batch_size=32, image_ssl_weight=0.5, image_ssl_images=16)
    train_config = training_config(config, out / "filtered" / "manifest.jsonl", out / "tokenizer",
                                   out / "model_config.json", out / "probe-run", total_steps=1, minutes=1.0)
    assert (train_config.loss.image_ssl_weight, train_config.loss.image_ssl_images) == (0.5, 16)
    longer = training_config(dataclasses.replace(config, image_ssl_warmup=0.25), out / "filtered" / "manifest.jsonl",
                             out / "tokenizer", out / "model_config.json", out / "probe-run", total_steps=200,
                             minutes=1.0)
    assert longer.loss.image_ssl_warmup_steps == 50  # a quarter of the run's steps
    views = []
    original = ImageSelfSupervision.second_views
    monkeypatch.setattr(ImageSelfSupervision, "second_views",
                        lambda self, pixels: views.append(len(pixels)) or original(self, pixels))
    model_config = AlignConfig.from_json_file(out / "model_config.json")
    measure_step_seconds(model_config, train_config, AlignTokenizer.from_pretrained(out / "tokenizer"), batches=2)
    assert views == [32] * 4  # every timed step (two warm-up, two measured) made its second views


def test_the_image_term_is_on_by_default_only_in_runs_long_enough_for_it(tmp_path):
    from openalign.demo.pipeline import IMAGE_SSL_MIN_STEPS, IMAGE_SSL_WEIGHT, image_ssl_weight_for, training_config

    default = DemoConfig()
    assert image_ssl_weight_for(default, IMAGE_SSL_MIN_STEPS - 1) == 0.0
    assert image_ssl_weight_for(default, IMAGE_SSL_MIN_STEPS) == IMAGE_SSL_WEIGHT > 0
    assert image_ssl_weight_for(DemoConfig(image_ssl_weight=0.2), 10) == 0.2  # a given weight always holds
    assert image_ssl_weight_for(DemoConfig(image_ssl_weight=0.0), 10**6) == 0.0

    def loss_section(total_steps):
        return training_config(default, tmp_path / "manifest.jsonl", tmp_path / "tokenizer", tmp_path / "model.json",
                               tmp_path / "run", total_steps=total_steps, minutes=10.0).loss

    long_run, short_run = loss_section(1000), loss_section(200)
    assert (long_run.image_ssl_weight, long_run.image_ssl_images, long_run.image_ssl_warmup_steps) == (
        IMAGE_SSL_WEIGHT, default.batch_size // 2, round(default.image_ssl_warmup * 1000))
    assert short_run.image_ssl_weight == 0.0


def test_composition_figures_tell_an_additive_image_tower_from_an_entangled_one():
    colours, shapes = ["red", "green", "blue"], ["circle", "square", "star"]
    held = [("red", "circle"), ("green", "square"), ("blue", "star")]
    seen = [(c, s) for c in colours for s in shapes if (c, s) not in held]
    summary = {"colours": colours, "shapes": shapes, "heldout_pairs": [list(p) for p in held]}
    basis = torch.eye(len(colours) + len(shapes))

    def embed(colour, shape):  # a tower that composes: the sum of a colour and a shape direction
        return basis[colours.index(colour)] + basis[len(colours) + shapes.index(shape)]

    def encode_texts(texts):  # prompts composed the same way, read from the canonical words
        return torch.stack([embed(next(c for c in colours if f" {c} " in f" {t} "),
                                  next(s for s in shapes if f" {s}" in f" {t}")) for t in texts])

    seen_rows = [{"colour": c, "shape": s} for c, s in seen for _ in range(3)]
    held_rows = [{"colour": c, "shape": s} for c, s in held for _ in range(2)]
    seen_embeds = torch.stack([embed(r["colour"], r["shape"]) for r in seen_rows])
    additive = torch.stack([embed(r["colour"], r["shape"]) for r in held_rows])
    figures = evaluate.composition_figures(seen_embeds, seen_rows, additive, held_rows, summary, encode_texts)
    assert figures == {"image_shape_accuracy_heldout": 1.0, "image_shape_accuracy_seen": 1.0,
                       "text_pairs_nearest_own_prototype": 1.0}
    # An entangled tower puts each unseen pair's image on a pair its colour was seen with.
    familiar = {c: next(s for s in shapes if (c, s) in seen) for c in colours}
    entangled = torch.stack([embed(r["colour"], familiar[r["colour"]]) for r in held_rows])
    figures = evaluate.composition_figures(seen_embeds, seen_rows, entangled, held_rows, summary, encode_texts)
    assert figures["image_shape_accuracy_heldout"] == 0.0 and figures["text_pairs_nearest_own_prototype"] == 1.0


def test_planned_steps_charge_decoding_to_the_first_epoch_only_when_images_are_cached():
    from openalign.demo.pipeline import planned_steps

    step = {"model": 0.4, "load": 0.15, "decode": 0.05}
    # 10 first-epoch steps at 0.55 s take 5.5 s; the other 94.5 s hold 189 steps at 0.5 s.
    assert planned_steps(100.0, step, steps_per_epoch=10, cached=True, margin=1.0) == 199
    assert planned_steps(100.0, step, steps_per_epoch=10, cached=False, margin=1.0) == 181  # 100 / 0.55
    assert planned_steps(3.0, step, steps_per_epoch=10, cached=True, margin=1.0) == 5  # within the first epoch
    assert planned_steps(0.1, step, steps_per_epoch=10, cached=True) == 1


def test_embed_dim_widens_the_last_block_which_is_the_embedding():
    from openalign.errors import ConfigError

    default = DemoConfig().model_config(100)
    wide = DemoConfig(embed_dim=320).model_config(100)
    assert default.projection_dim == default.vision_config.output_channels == 160
    assert wide.projection_dim == wide.vision_config.output_channels == 320
    assert wide.vision_config.out_channels[:-1] == default.vision_config.out_channels[:-1]
    with pytest.raises(ConfigError, match="embed_dim=161"):
        DemoConfig(embed_dim=161).model_config(100)


def test_the_default_run_is_its_own_curation_pass_measured_against_the_labels(demo):
    """The default curation: the rules, then one schedule that keeps an estimate per pair; the estimates are
    written as a scoring folder covering every pair trained on, and measured against the generator's labels."""
    import pyarrow.parquet as pq

    from openalign.demo.curation import detection_figures

    out, metrics, _ = demo
    curation = metrics["curation"]
    assert curation["mode"] == "robust" and metrics["training"].get("bootstrap_steps", 0) == 0
    scores = pq.read_table(out / "run" / "pair-scores" / "scores.parquet").to_pydict()
    kept = metrics["data"]["kept_after_filter"]
    assert len(scores["score"]) == kept and min(scores["visits"]) >= 1  # 150 x 128 samples cover the kept pairs
    detection = curation["detection"]
    assert detection == detection_figures(out / "run" / "pair-scores", out / "filtered" / "manifest.jsonl")
    labels = [json.loads(line)["noise"] for line in (out / "filtered" / "manifest.jsonl").read_text().splitlines()]
    assert detection["mismatched"] == labels.count("mismatch") > 0
    assert detection["pairs"] == labels.count("mismatch") + labels.count("clean")
    assert 0.0 <= detection["roc_auc"] <= 1.0 and detection["precision"] == detection["recall"]
    assert "per-pair estimates" in (out / "report.md").read_text()
    for key in ("image_to_text_r5", "text_to_image_r5"):  # every retrieval figure against its best possible
        assert metrics[f"{key}_of_best"] == pytest.approx(metrics[key] / metrics["bayes_ceiling"][key])


def test_a_busy_machine_is_said_plainly_with_the_steps_it_cost():
    from openalign.demo import report
    from openalign.demo.pipeline import machine_sharing

    quiet = machine_sharing({"share": 0.97, "others_cores": 0.05, "wall_seconds": 300.0}, 0.02, 1000)
    assert not quiet["busy"] and quiet["steps_at_full_share"] == 1000
    busy = machine_sharing({"share": 0.5, "others_cores": 1.0, "wall_seconds": 300.0}, 1.1, 300)
    assert busy["busy"] and busy["steps_at_full_share"] == 600
    assert report._machine_lines(quiet)[0].startswith("- machine: quiet")
    line = report._machine_lines(busy)[0]
    assert "BUSY" in line and "50%" in line and "300 steps" in line and "about 600" in line


def test_the_demo_records_how_the_machine_was_shared(demo):
    _, metrics, _ = demo
    machine = metrics["machine"]
    assert 0 < machine["cpu_share"] <= 1 and machine["steps"] == metrics["training"]["steps_with_bootstrap"]
    assert "- machine: " in (demo[0] / "report.md").read_text()


def test_the_precision_reaches_the_training_config_and_the_step_probe():
    from openalign.demo.pipeline import probe_stepper, training_config

    for precision, dtype, autocast in (("auto", "fp32", None), ("fp32", "fp32", None),
                                       ("bf16", "bf16", torch.bfloat16)):
        config = DemoConfig(precision=precision)
        train_config = training_config(config, "m.jsonl", "tok", "c.json", "run", total_steps=10, minutes=1.0)
        assert train_config.run.dtype == dtype  # "auto" is float32 until resolve_precision decides
        _, stepper = probe_stepper(config.model_config(vocab_size=50), train_config)
        assert stepper.autocast_dtype == autocast


def test_the_demo_chose_its_precision_by_measuring_and_recorded_it(demo):
    from openalign.runtime import native_reduced_precision

    _, metrics, _ = demo
    precision = metrics["training"]["precision"]
    assert precision["chosen_by"] == "measurement" and precision["precision"] in ("fp32", "bf16")
    assert metrics["config"]["precision"] == precision["precision"]
    assert precision["native_bf16"] == native_reduced_precision(torch.bfloat16)
    if precision["native_bf16"]:  # both measured; bfloat16 only where it was the faster
        seconds = precision["seconds"]
        assert set(seconds) == {"fp32", "bf16"} and all(0 < value < 60 for value in seconds.values())
        assert (precision["precision"] == "bf16") == (seconds["bf16"] * 1.05 <= seconds["fp32"])
    else:
        assert precision["precision"] == "fp32" and precision["seconds"] == {}


def test_a_precision_given_is_kept_without_measuring(tmp_path):
    from openalign.demo.pipeline import resolve_precision

    config = DemoConfig(precision="fp32")
    # Nothing is read: the manifest and the model config do not exist.
    assert resolve_precision(config, tmp_path / "none.jsonl", None, tmp_path / "none.json", None, tmp_path) == (
        config, {"precision": "fp32", "chosen_by": "configuration"})
