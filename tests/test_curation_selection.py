"""Selection by score, semantic deduplication and the report's figures, each against an oracle written out
here: crafted scores with ties and boundaries, a brute-force greedy loop, hand counts."""

from __future__ import annotations

import numpy as np
import pytest

from openalign.curation import report as reports
from openalign.curation.dedup import FolderRows, choose_method, deduplicate
from openalign.curation.selection import fraction_count, priority_order, select_by_score
from openalign.errors import ConfigError
from openalign.inference.embed import embed_to_folder

# ---------------------------------------------------------------- selection


def test_priority_order_breaks_ties_by_source_position():
    scores = np.array([0.5, 0.9, 0.5, 0.9, 0.1], dtype=np.float32)
    assert priority_order(scores).tolist() == [1, 3, 0, 2, 4]


@pytest.mark.parametrize("fraction, total, expected", [
    (1.0, 7, 7), (0.5, 7, 4), (0.5, 6, 3), (0.25, 10, 3), (0.3, 10, 3), (0.01, 10, 1), (0.04, 10, 1),
    (0.05, 10, 1), (0.15, 10, 2), (0.999, 3, 3), (0.5, 0, 0),
])
def test_fraction_count_rounds_half_up_and_keeps_at_least_one(fraction, total, expected):
    assert fraction_count(fraction, total) == expected


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.0001, 2, float("nan")])
def test_keep_fraction_outside_zero_one_is_refused_by_name(fraction):
    with pytest.raises(ConfigError, match="keep fraction .* must lie in \\(0, 1\\]"):
        fraction_count(fraction, 10)


def test_keep_fraction_with_ties_at_the_boundary_keeps_the_earlier_pairs():
    scores = np.array([0.2, 0.7, 0.7, 0.7, 0.9, 0.1], dtype=np.float32)
    selection = select_by_score(scores, keep_fraction=0.5)  # 3 of 6: 0.9, then the first two 0.7s
    assert selection.keep.tolist() == [False, True, True, False, True, False]
    assert selection.rule == "keep_fraction" and selection.kept_by_fraction == 3
    assert selection.lowest_kept_score == pytest.approx(0.7)


def test_min_similarity_keeps_every_pair_at_or_above_it():
    scores = np.array([0.3, 0.29999, 0.31, -0.5, 0.3], dtype=np.float32)
    selection = select_by_score(scores, min_similarity=0.3)
    assert selection.keep.tolist() == [True, False, True, False, True]  # equality kept, ties all kept
    assert selection.rule == "min_similarity" and selection.kept_by_threshold == 3


@pytest.mark.parametrize("fraction, threshold, rule, kept", [
    (0.5, 0.25, "keep_fraction", 4),    # 4 by fraction, 6 by threshold: the fraction binds
    (0.8, 0.45, "min_similarity", 3),   # 6 by fraction (round 6.4), 3 by threshold
    (0.3, 0.55, "both", 2),             # round(2.4) = 2, and 2 pairs score >= 0.55: the same pairs
])
def test_both_rules_keep_the_shorter_prefix_and_name_it(fraction, threshold, rule, kept):
    scores = np.array([0.1, 0.6, 0.3, 0.5, 0.2, 0.9, 0.4, 0.0], dtype=np.float32)
    selection = select_by_score(scores, keep_fraction=fraction, min_similarity=threshold)
    by_fraction = select_by_score(scores, keep_fraction=fraction).keep
    by_threshold = select_by_score(scores, min_similarity=threshold).keep
    assert selection.rule == rule and selection.kept == kept
    assert selection.keep.tolist() == (by_fraction & by_threshold).tolist()  # the intersection: the shorter prefix
    assert sorted(scores[selection.keep].tolist(), reverse=True) == sorted(scores.tolist(), reverse=True)[:kept]


def test_no_rule_keeps_everything():
    selection = select_by_score(np.array([0.1, -0.2], dtype=np.float32))
    assert selection.rule == "none" and selection.keep.all()


# ---------------------------------------------------------------- deduplication


def brute_force_greedy(vectors: np.ndarray, threshold: float) -> list[int]:
    """The rule as written: walk the pairs in order; keep one unless a kept one is within `threshold`; a
    duplicate points at its most similar kept pair."""
    kept, duplicate_of = [], []
    for row, vector in enumerate(vectors):
        similarities = [float(vectors[other] @ vector) for other in kept]
        if similarities and max(similarities) >= threshold:
            duplicate_of.append(kept[int(np.argmax(similarities))])
        else:
            duplicate_of.append(-1)
            kept.append(row)
    return duplicate_of


def planted_groups(seed: int, groups: int, per_group: int, noise: float, dim: int = 16, spread: bool = False):
    """Unit vectors: `groups` random centres with `per_group` noisy copies each, shuffled. With `spread`, the
    centres are the first `groups` basis vectors (far apart, so k-means separates them)."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[:groups] if spread else rng.normal(size=(groups, dim))
    vectors = np.repeat(centres, per_group, axis=0) + noise * rng.normal(size=(groups * per_group, dim))
    vectors = vectors[rng.permutation(len(vectors))]
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("seed, threshold", [(0, 0.9), (1, 0.95), (2, 0.5), (3, 0.99)])
def test_exact_dedup_equals_the_brute_force_greedy_rule(seed, threshold):
    vectors = planted_groups(seed, groups=7, per_group=9, noise=0.15)
    expected = brute_force_greedy(vectors, threshold)
    found = deduplicate(vectors, threshold, method="exact")
    assert found.duplicate_of.tolist() == expected
    duplicates = found.duplicate_of >= 0
    assert duplicates.any() and (~duplicates).any()  # the case exercises both outcomes
    cosines = np.einsum("nd,nd->n", vectors[duplicates], vectors[found.duplicate_of[duplicates]])
    np.testing.assert_allclose(found.cosine[duplicates], cosines, atol=1e-6)
    kept = vectors[~duplicates]
    gram = kept @ kept.T
    assert (gram[~np.eye(len(kept), dtype=bool)] < threshold).all()  # no two kept images within T


def test_exact_dedup_across_blocks_equals_brute_force():
    from openalign.curation.dedup import greedy_duplicates

    vectors = planted_groups(4, groups=5, per_group=12, noise=0.2)
    # Blocks of 7: the kept pairs of earlier blocks come from the FAISS index, later ones from the block's Gram.
    duplicate_of, _ = greedy_duplicates(vectors, 0.9, block_size=7)
    assert duplicate_of.tolist() == brute_force_greedy(vectors, 0.9)


def test_clustered_dedup_equals_exact_when_groups_are_far_apart():
    vectors = planted_groups(5, groups=6, per_group=20, noise=0.05, spread=True)
    exact = deduplicate(vectors, 0.9, method="exact")
    clustered = deduplicate(vectors, 0.9, method="clusters", num_clusters=6)
    assert clustered.method == "clusters" and clustered.num_clusters == 6
    assert clustered.duplicate_of.tolist() == exact.duplicate_of.tolist() == brute_force_greedy(vectors, 0.9)
    assert exact.kept.sum() == 6  # one per planted group


def test_clustered_dedup_keeps_no_two_images_of_a_cluster_within_the_threshold():
    vectors = planted_groups(6, groups=12, per_group=15, noise=0.3)
    clustered = deduplicate(vectors, 0.8, method="clusters", num_clusters=4)
    from openalign.curation.dedup import cluster_assignment

    assignment = cluster_assignment(vectors, 4)
    for cluster in range(4):
        members = np.flatnonzero((assignment == cluster) & clustered.kept)
        gram = vectors[members] @ vectors[members].T
        assert (gram[~np.eye(len(members), dtype=bool)] < 0.8).all()
    # Within a cluster the rule is the exact one: brute force on the cluster's members in priority order.
    for cluster in range(4):
        members = np.flatnonzero(assignment == cluster)
        local = brute_force_greedy(vectors[members], 0.8)
        assert clustered.duplicate_of[members].tolist() == [-1 if j < 0 else int(members[j]) for j in local]


def test_auto_picks_exact_for_small_sets_and_clusters_beyond():
    assert choose_method(1000) == ("exact", 1)
    assert choose_method(450_000) == ("clusters", 45)
    assert choose_method(1000, "clusters", 3) == ("clusters", 3)
    with pytest.raises(ConfigError, match="dedup method"):
        choose_method(10, "fast")
    with pytest.raises(ConfigError, match="dedup similarity"):
        deduplicate(np.eye(3, dtype=np.float32), 1.5)


def test_folder_rows_read_the_rows_asked_for_across_parts(tmp_path):
    vectors = planted_groups(7, groups=3, per_group=5, noise=0.4)
    items = [{"source": f"item-{i}", "caption": f"caption {i}"} for i in range(len(vectors))]
    embed_to_folder(items, lambda texts: vectors[[int(t.split()[1]) for t in texts]], tmp_path, kind="text",
                    part_size=4, batch_size=3, progress=False)
    rows = FolderRows(tmp_path, "text")
    stored = vectors.astype(np.float16).astype(np.float32)  # what the parts hold
    assert len(rows) == len(vectors)
    order = np.array([14, 0, 5, 4, 3, 9])
    np.testing.assert_allclose(rows.take(order), stored[order], atol=1e-3)
    np.testing.assert_array_equal(rows.view(order)[np.array([1, 4])], rows.take(order[[1, 4]]))


# ---------------------------------------------------------------- the report's figures


def test_precision_and_recall_equal_hand_counts():
    # 10 pairs: 4 clean, 3 mismatch, 2 junk, 1 without a label; statuses chosen by hand.
    vocabulary = ["clean", "mismatch", "junk"]
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, -1])
    K, B, D = reports.KEPT, reports.BELOW, reports.DUPLICATE
    status = np.array([K, K, B, D, B, B, K, B, K, B], dtype=np.int8)
    scores = np.arange(10, dtype=np.float32) / 10
    figures = reports.label_figures(status, labels, vocabulary, scores)
    by_label = figures["by_label"]
    # Dropped by score: pairs 2, 4, 5, 7, 9 (5 pairs): clean 1, mismatch 2, junk 1, unlabelled 1.
    mismatch = by_label["mismatch"]
    assert (mismatch["pairs"], mismatch["kept"], mismatch["dropped_by_score"], mismatch["dropped_as_duplicate"]) == (
        3, 1, 2, 0)
    assert mismatch["mean_score"] == pytest.approx(0.5)
    assert mismatch["precision"] == 2 / 5 and mismatch["recall"] == pytest.approx(2 / 3, abs=1e-6)
    assert by_label["junk"]["precision"] == 1 / 5 and by_label["junk"]["recall"] == 1 / 2
    assert by_label["any noise"]["precision"] == 3 / 5 and by_label["any noise"]["recall"] == 3 / 5
    assert by_label["clean"]["precision"] is None and by_label["clean"]["dropped_as_duplicate"] == 1
    assert figures["clean_share"] == {"scored": 4 / 10, "kept": 2 / 4}


def test_quantiles_are_numpy_quantiles():
    scores = np.random.default_rng(0).normal(size=101).astype(np.float32)
    quantiles = reports.score_quantiles(scores)
    assert quantiles["p00"] == pytest.approx(float(scores.min()), abs=1e-6)
    assert quantiles["p50"] == pytest.approx(float(np.median(scores)), abs=1e-6)
    assert quantiles["p99"] == pytest.approx(float(np.quantile(scores, 0.99)), abs=1e-6)
    assert reports.score_quantiles(np.zeros(0)) == {}
