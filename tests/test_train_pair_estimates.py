"""Per-pair clean estimates: the hash table against a dict, the mixture against known components, the weights'
warm-up, the refusals, and a run whose estimates `openalign filter --scores-from` keeps pairs by."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from openalign.errors import ConfigError
from openalign.train.config import TrainConfig
from openalign.train.pair_estimates import PairEstimates, PairKeyError, fit_mixture, key_hashes
from tests.train_data import make_data, tiny_config


def test_the_table_holds_each_keys_moving_average_as_a_dict_would_through_growth():
    estimates = PairEstimates(momentum=0.25)
    rng = np.random.default_rng(0)
    keys = [f"images/{index:06d}.jpg" for index in range(20_000)]  # several doublings of the table
    expected: dict[str, float] = {}
    for epoch in range(3):
        order = rng.permutation(len(keys))
        for start in range(0, len(keys), 512):
            batch = [keys[index] for index in order[start:start + 512]]
            probabilities = rng.random(len(batch)).astype(np.float32)
            estimates.observe(batch, probabilities, epoch)
            for key, p in zip(batch, probabilities):
                expected[key] = p if key not in expected else np.float32(0.25 * expected[key] + 0.75 * p)
    assert len(estimates) == len(keys)
    estimate, _, visits = estimates.lookup(keys + ["never seen"])
    np.testing.assert_allclose(estimate[:-1], [expected[key] for key in keys], rtol=1e-6)
    assert (visits[:-1] == 3).all() and visits[-1] == 0 and np.isnan(estimate[-1])
    assert len(set(key_hashes(keys).tolist())) == len(keys)


def test_a_key_twice_in_one_epoch_is_refused_naming_it():
    estimates = PairEstimates()
    estimates.observe(["a.jpg", "b.jpg"], np.array([0.1, 0.2]), epoch=0)
    with pytest.raises(PairKeyError, match="'b.jpg' comes twice in epoch 0"):
        estimates.observe(["c.jpg", "b.jpg"], np.array([0.1, 0.2]), epoch=0)
    with pytest.raises(PairKeyError, match="'d.jpg'"):
        estimates.observe(["d.jpg", "d.jpg"], np.array([0.1, 0.2]), epoch=0)
    estimates.observe(["b.jpg"], np.array([0.3]), epoch=1)  # the next epoch visits it again


def test_the_mixture_finds_two_known_components_and_orders_the_pairs():
    rng = np.random.default_rng(1)
    # logits of the estimates: 60% mismatched around -5, 40% clean around -2
    logits = np.concatenate([rng.normal(-5.0, 0.6, 6000), rng.normal(-2.0, 0.8, 4000)])
    estimates = 1 / (1 + np.exp(-logits))
    mixture = fit_mixture(estimates)
    assert mixture.separated
    assert mixture.weights[1] == pytest.approx(0.4, abs=0.02)
    assert mixture.means == pytest.approx((-5.0, -2.0), abs=0.1)
    assert mixture.stds == pytest.approx((0.6, 0.8), abs=0.06)
    clean = mixture.clean_probability(estimates)
    assert (np.diff(clean[np.argsort(estimates)]) >= 0).all()  # non-decreasing in the estimate
    assert clean[6000:].mean() > 0.9 and clean[:6000].mean() < 0.1
    # One population: nothing to separate, every weight 1.
    alike = fit_mixture(1 / (1 + np.exp(-rng.normal(-3.0, 1.0, 5000))))
    assert not alike.separated and (alike.clean_probability(estimates) == 1).all()


def test_weights_start_after_the_warm_up_and_only_with_weighting_on():
    estimates = PairEstimates(weighting="mixture", warmup_fraction=0.5, total_steps=100, mixture_every=10)
    rng = np.random.default_rng(2)
    keys = [f"k{index}" for index in range(2000)]
    clean = rng.random(2000) < 0.5
    for epoch in range(2):
        probabilities = np.where(clean, 0.2, 0.01) * rng.uniform(0.8, 1.2, 2000)
        estimates.observe(keys, probabilities, epoch)
    assert estimates.maybe_refit(10) and estimates.mixture.separated
    assert estimates.weights(keys, step=50) is None  # still warming up (0.5 x 100 steps)
    weights = estimates.weights(keys, step=51)
    assert weights[clean].min() > 0.9 and weights[~clean].max() < 0.1
    assert PairEstimates(weighting="off").weights(keys, step=1000) is None


def test_settings_that_cannot_work_are_one_line_each():
    for key, value, message in (("loss.pair_weighting_warmup", 1.0, "pair_weighting_warmup"),
                                ("loss.pair_weighting_warmup", -0.1, "pair_weighting_warmup"),
                                ("loss.pair_ema_momentum", 1.0, "pair_ema_momentum"),
                                ("loss.pair_weighting", "always", "pair_weighting")):
        config = TrainConfig()
        config.set(key, value)
        with pytest.raises(ConfigError, match=message):
            config.validate()
    config = TrainConfig()
    config.set("loss.name", "siglip")
    config.set("loss.pair_weighting", "mixture")
    with pytest.raises(ConfigError, match="per-pair weights .*siglip"):
        config.validate()
    config = TrainConfig()
    config.set("loss.pair_estimates", True)
    config.set("data.resampled", True)
    with pytest.raises(ConfigError, match="resampled"):
        config.validate()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"), num_pairs=96)


def test_a_run_is_a_curation_pass_that_filter_scores_from_keeps_pairs_by(data, tmp_path):
    from openalign.curation.similarity_filter import SimilarityConfig, filter_by_scores
    from openalign.train.trainer import train

    config = tiny_config(data, tmp_path / "run", **{"optim.total_steps": 12, "run.checkpoint_every": 6,
                                                    "loss.pair_estimates": True})
    result = train(config)
    scores = pq.read_table(result.run_dir / "pair-scores" / "scores.parquet").to_pylist()
    manifest = [json.loads(line) for line in open(data["train"])]
    assert [row["index"] for row in scores] == list(range(len(manifest)))  # every pair, in source order
    assert [row["caption"] for row in scores] == [row["caption"] for row in manifest]
    assert all(row["visits"] == 2 and 0 < row["score"] < 1 for row in scores)  # 12 steps of 16: two epochs
    # Each checkpoint carries the estimates of its step, hashed in its files.json like every file there.
    checkpoint = result.run_dir / "checkpoint-00000006"
    assert "scores.parquet" in json.loads((checkpoint / "files.json").read_text())["sha256"]
    assert all(row["visits"] == 1 for row in pq.read_table(checkpoint / "scores.parquet").to_pylist())

    report = filter_by_scores(data["train"], tmp_path / "kept", SimilarityConfig(keep_fraction=0.5),
                              scores_from=result.run_dir / "pair-scores")
    assert report["kept"] == 48 and report["scored"] == 96
    kept = [json.loads(line)["caption"] for line in open(tmp_path / "kept" / "manifest.jsonl")]
    best = sorted(scores, key=lambda row: -row["score"])[:48]
    assert sorted(kept) == sorted(row["caption"] for row in best)
