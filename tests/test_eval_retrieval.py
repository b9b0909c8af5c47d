"""Retrieval metrics against a brute force: sort every candidate list, find the first correct one."""

import itertools

import numpy as np
import pytest
import torch

from openalign.eval.retrieval import RetrievalInputError, retrieval_metrics, retrieval_ranks


def _reference_ranks(images, texts, text_to_image):
    """Full score matrix; per query a sort that breaks ties in favour of correct candidates (optimistic)."""
    scores = images.astype(np.float64) @ texts.astype(np.float64).T  # (N_images, N_texts)
    image_ranks = []
    for image_index in range(len(images)):
        correct = text_to_image == image_index
        # lexsort: last key is primary. Sort by descending score, then correct before wrong.
        order = np.lexsort((~correct, -scores[image_index]))
        image_ranks.append(1 + int(np.nonzero(correct[order])[0][0]))
    text_ranks = []
    for text_index in range(len(texts)):
        correct = np.arange(len(images)) == text_to_image[text_index]
        order = np.lexsort((~correct, -scores[:, text_index]))
        text_ranks.append(1 + int(np.nonzero(correct[order])[0][0]))
    return np.array(image_ranks), np.array(text_ranks)


def _reference_recall(ranks, k):
    return sum(rank <= k for rank in ranks) / len(ranks)


@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_ranks_match_brute_force_with_ties_and_multiple_captions(chunk_size):
    rng = np.random.default_rng(0)
    num_images, dim = 40, 3
    # Small integer embeddings make exact ties common and dot products exact in float32.
    images = rng.integers(-2, 3, size=(num_images, dim)).astype(np.float32)
    captions_per_image = rng.integers(1, 6, size=num_images)  # 1 to 5 captions each
    text_to_image = np.repeat(np.arange(num_images), captions_per_image)
    rng.shuffle(text_to_image)
    texts = rng.integers(-2, 3, size=(len(text_to_image), dim)).astype(np.float32)

    image_ranks, text_ranks = retrieval_ranks(images, texts, text_to_image, chunk_size=chunk_size, normalize=False,
                                              ties="optimistic")
    expected_image_ranks, expected_text_ranks = _reference_ranks(images, texts, text_to_image)
    scores = images @ texts.T
    assert (scores[:, :, None] == scores[:, None, :]).sum() > scores.size * 3  # the set really has many ties
    np.testing.assert_array_equal(image_ranks, expected_image_ranks)
    np.testing.assert_array_equal(text_ranks, expected_text_ranks)

    metrics = retrieval_metrics(images, texts, text_to_image, chunk_size=chunk_size, normalize=False,
                                ties="optimistic")
    for k in (1, 5, 10):
        assert metrics[f"image_to_text_r{k}"] == pytest.approx(_reference_recall(expected_image_ranks, k))
        assert metrics[f"text_to_image_r{k}"] == pytest.approx(_reference_recall(expected_text_ranks, k))
    assert metrics["image_to_text_median_rank"] == pytest.approx(np.median(expected_image_ranks))
    assert metrics["text_to_image_mean_rank"] == pytest.approx(np.mean(expected_text_ranks))


def test_random_float_embeddings_normalized_match_reference():
    rng = np.random.default_rng(1)
    images = rng.standard_normal((30, 16)).astype(np.float32)
    text_to_image = np.repeat(np.arange(30), 5)
    texts = (images[text_to_image] + 1.5 * rng.standard_normal((150, 16))).astype(np.float32)
    image_ranks, text_ranks = retrieval_ranks(images, texts, text_to_image, chunk_size=8)
    unit_images = images / np.linalg.norm(images, axis=1, keepdims=True)
    unit_texts = texts / np.linalg.norm(texts, axis=1, keepdims=True)
    expected_image_ranks, expected_text_ranks = _reference_ranks(unit_images, unit_texts, text_to_image)
    np.testing.assert_array_equal(image_ranks, expected_image_ranks)
    np.testing.assert_array_equal(text_ranks, expected_text_ranks)


def test_tie_rule_is_optimistic():
    # Every caption scores the same against every image: each query's correct answer ties with all others.
    images = np.ones((3, 2), dtype=np.float32)
    texts = np.ones((6, 2), dtype=np.float32)
    text_to_image = np.array([0, 0, 1, 1, 2, 2])
    image_ranks, text_ranks = retrieval_ranks(images, texts, text_to_image, normalize=False, ties="optimistic")
    assert image_ranks.tolist() == [1, 1, 1]
    assert text_ranks.tolist() == [1] * 6
    # One wrong candidate strictly higher pushes the correct one to rank 2; a tie alongside it does not.
    images = np.array([[1.0, 0.0], [2.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    texts = np.array([[1.0, 0.0]] * 3, dtype=np.float32)
    _, text_ranks = retrieval_ranks(images, texts, np.array([0, 1, 2]), normalize=False, ties="optimistic")
    assert text_ranks.tolist() == [2, 1, 2]


def _every_tie_order(scores, correct, k):
    """Brute force over every order of the candidates: a stable sort by descending score of each permutation puts
    tied candidates in that permutation's order. Returns (mean rank, min rank, max rank, hit rate at k) of the
    first correct candidate."""
    ranks = []
    for permutation in itertools.permutations(range(len(scores))):
        order = sorted(permutation, key=lambda index: -scores[index])  # stable: ties keep the permutation's order
        ranks.append(1 + next(position for position, index in enumerate(order) if correct[index]))
    ranks = np.array(ranks)
    return ranks.mean(), ranks.min(), ranks.max(), np.mean(ranks <= k)


def test_tie_rules_match_every_order_of_the_tied_candidates():
    rng = np.random.default_rng(4)
    images = rng.integers(-1, 2, size=(5, 2)).astype(np.float32)  # few values: many exact ties
    text_to_image = np.array([0, 0, 1, 2, 3, 4, 4])
    texts = rng.integers(-1, 2, size=(7, 2)).astype(np.float32)
    scores = images @ texts.T
    by_rule = {ties: retrieval_ranks(images, texts, text_to_image, normalize=False, ties=ties)
               for ties in ("expected", "optimistic", "pessimistic")}
    for k in (1, 2, 3):
        metrics = retrieval_metrics(images, texts, text_to_image, normalize=False, ks=(k,))
        image_hits, text_hits = [], []
        for image in range(5):
            mean, low, high, hit = _every_tie_order(scores[image], text_to_image == image, k)
            assert by_rule["expected"][0][image] == pytest.approx(mean)
            assert (by_rule["optimistic"][0][image], by_rule["pessimistic"][0][image]) == (low, high)
            image_hits.append(hit)
        for text in range(7):
            mean, low, high, hit = _every_tie_order(scores[:, text], np.arange(5) == text_to_image[text], k)
            assert by_rule["expected"][1][text] == pytest.approx(mean)
            assert (by_rule["optimistic"][1][text], by_rule["pessimistic"][1][text]) == (low, high)
            text_hits.append(hit)
        assert metrics[f"image_to_text_r{k}"] == pytest.approx(np.mean(image_hits))
        assert metrics[f"text_to_image_r{k}"] == pytest.approx(np.mean(text_hits))
    assert (scores[:, :, None] == scores[:, None, :]).sum() > scores.size * 2  # ties were really there


def test_a_collapsed_model_scores_chance_not_a_perfect_recall():
    images = np.ones((4, 3), dtype=np.float32)  # every embedding the same: every score ties
    texts = np.ones((8, 3), dtype=np.float32)
    metrics = retrieval_metrics(images, texts, np.repeat(np.arange(4), 2), ks=(1, 5))
    assert metrics["text_to_image_r1"] == pytest.approx(1 / 4)  # one right image among 4 in random order
    assert metrics["image_to_text_r1"] == pytest.approx(2 / 8)  # two right captions among 8
    assert metrics["text_to_image_r5"] == 1.0
    assert metrics["text_to_image_mean_rank"] == pytest.approx(2.5)
    pessimistic = retrieval_metrics(images, texts, np.repeat(np.arange(4), 2), ks=(1,), ties="pessimistic")
    assert pessimistic["text_to_image_r1"] == 0.0 and pessimistic["image_to_text_mean_rank"] == 7.0


def test_without_ties_every_rule_agrees_with_topk_as_clip_benchmark_ranks():
    rng = np.random.default_rng(5)
    images = rng.standard_normal((30, 8)).astype(np.float32)
    text_to_image = np.repeat(np.arange(30), 3)
    texts = (images[text_to_image] + 2.0 * rng.standard_normal((90, 8))).astype(np.float32)
    unit_images = torch.nn.functional.normalize(torch.from_numpy(images), dim=-1)
    unit_texts = torch.nn.functional.normalize(torch.from_numpy(texts), dim=-1)
    scores = unit_texts @ unit_images.T  # (N_texts, N_images), as CLIP_benchmark scores them
    positives = torch.zeros_like(scores, dtype=torch.bool)
    positives[torch.arange(90), torch.from_numpy(text_to_image)] = True
    metrics = {ties: retrieval_metrics(images, texts, text_to_image, ties=ties, chunk_size=7)
               for ties in ("expected", "optimistic", "pessimistic")}
    for k in (1, 5, 10):
        # CLIP_benchmark's recall_at_k: a hit when any positive is among torch.topk's k indices.
        text_hits = positives.gather(1, scores.topk(k, dim=1).indices).any(dim=1).float().mean()
        image_hits = positives.T.gather(1, scores.T.topk(k, dim=1).indices).any(dim=1).float().mean()
        for ties in metrics:
            assert metrics[ties][f"text_to_image_r{k}"] == pytest.approx(float(text_hits))
            assert metrics[ties][f"image_to_text_r{k}"] == pytest.approx(float(image_hits))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_embeddings_are_refused_naming_the_row(bad):
    images = np.ones((3, 2), dtype=np.float32)
    texts = np.ones((3, 2), dtype=np.float32)
    texts[2, 1] = bad
    with pytest.raises(RetrievalInputError, match=r"text_embeds .* row 2"):
        retrieval_metrics(images, texts, np.arange(3))
    with pytest.raises(RetrievalInputError, match="ties="):
        retrieval_metrics(images, images, np.arange(3), ties="best")


def test_bad_inputs_name_the_offender():
    images = np.zeros((2, 4), dtype=np.float32)
    texts = np.zeros((3, 4), dtype=np.float32)
    with pytest.raises(RetrievalInputError, match="image 1 has no caption"):
        retrieval_ranks(images, texts, np.array([0, 0, 0]))
    with pytest.raises(RetrievalInputError, match="image index 5"):
        retrieval_ranks(images, texts, np.array([0, 1, 5]))
    with pytest.raises(RetrievalInputError, match="dim 3"):
        retrieval_ranks(images, np.zeros((3, 3)), np.array([0, 1, 1]))


def test_report_table_and_json(tmp_path, capsys):
    import json

    from openalign.eval.report import format_rows, report

    rng = np.random.default_rng(3)
    metrics = retrieval_metrics(rng.standard_normal((4, 3)), rng.standard_normal((8, 3)), np.repeat(np.arange(4), 2))
    metrics["confusion_matrix"] = np.eye(2, dtype=np.int64)
    metrics["per_class_accuracy"] = [100.0, float("nan")]
    table = report(metrics, title="retrieval", json_path=tmp_path / "out" / "metrics.json")
    assert capsys.readouterr().out.strip() == table
    assert "image_to_text_r1" in table and "confusion_matrix" not in table
    loaded = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert loaded["confusion_matrix"] == [[1, 0], [0, 1]] and loaded["per_class_accuracy"] == [100.0, None]
    assert loaded["text_to_image_r5"] == pytest.approx(metrics["text_to_image_r5"])
    lines = format_rows([{"name": "a", "top1": 1.0}, {"name": "bb", "top1": 22.5}]).splitlines()
    assert lines[0].split() == ["name", "top1"] and lines[3].split() == ["bb", "22.50"]
