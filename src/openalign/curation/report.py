"""The similarity filter's report: counts, score quantiles, per-label figures, a histogram, a readable table.

Where the source carries noise labels (the built-in generator writes a `noise` field: "clean" or the kind of
noise), the report says for each kind how many of its pairs the score rule dropped: recall is the share of
the kind's pairs dropped by score, precision the share of the pairs dropped by score that are of that kind
(so for "any noise" precision is how often a dropped pair was really noisy). Pairs dropped as duplicates are
counted apart: deduplication removes redundancy, not noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from openalign.curation.scorer_check import describe_check

QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
CLEAN_LABEL = "clean"
ANY_NOISE = "any noise"
KEPT, BELOW, DUPLICATE = 0, 1, 2  # a scored pair's status


def score_quantiles(scores: np.ndarray) -> dict[str, float]:
    """{"p00": min, "p01": ..., "p50": median, ..., "p100": max} of the scores (empty for no scores)."""
    if len(scores) == 0:
        return {}
    values = np.quantile(np.asarray(scores, dtype=np.float64), QUANTILES)
    return {f"p{round(q * 100):02d}": round(float(v), 6) for q, v in zip(QUANTILES, values)}


def _ratio(numerator: int, denominator: int) -> float | None:
    return round(numerator / denominator, 6) if denominator else None


def label_figures(status: np.ndarray, labels: np.ndarray, vocabulary: list[str], scores: np.ndarray) -> dict:
    """Per label: pairs, kept, dropped by score, dropped as duplicates, mean score, and precision / recall of
    the score-dropped set for that label (module docstring); plus "any noise" (every label but "clean") and the
    clean share before and after. `labels` holds codes into `vocabulary`, -1 for a pair without a label."""
    below = status == BELOW
    dropped_by_score = int(below.sum())
    figures = {}
    groups = {name: labels == code for code, name in enumerate(vocabulary)}
    noisy = np.zeros(len(labels), dtype=bool)
    for name, members in groups.items():
        if name != CLEAN_LABEL:
            noisy |= members
    if any(name != CLEAN_LABEL for name in vocabulary):
        groups[ANY_NOISE] = noisy
    for name, members in groups.items():
        caught = int((members & below).sum())
        figures[name] = {
            "pairs": int(members.sum()), "kept": int((members & (status == KEPT)).sum()),
            "dropped_by_score": caught, "dropped_as_duplicate": int((members & (status == DUPLICATE)).sum()),
            "mean_score": round(float(scores[members].mean()), 6) if members.any() else None,
            "precision": None if name == CLEAN_LABEL else _ratio(caught, dropped_by_score),
            "recall": None if name == CLEAN_LABEL else _ratio(caught, int(members.sum())),
        }
    clean = groups.get(CLEAN_LABEL, np.zeros(len(labels), dtype=bool))
    kept = status == KEPT
    return {"by_label": figures,
            "clean_share": {"scored": _ratio(int(clean.sum()), len(labels)),
                            "kept": _ratio(int((clean & kept).sum()), int(kept.sum()))}}


def plot_scores(path: str | Path, scores: np.ndarray, labels: np.ndarray, vocabulary: list[str],
                lowest_kept: float | None = None, bins: int = 60, shuffled: np.ndarray | None = None) -> Path:
    """Histogram of the scores, one outline per label when there are labels, the kept side shaded from the
    lowest kept score up, and the scores of the same images with shuffled captions dashed (what a scorer that
    has learnt nothing gives the real pairs too); written through openalign.figures."""
    from openalign.figures import pyplot, save_figure

    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7, 4))
    edges = np.histogram_bin_edges(scores, bins=bins) if len(scores) else np.linspace(-1, 1, bins + 1)
    groups = [(name, labels == code) for code, name in enumerate(vocabulary)]
    unlabelled = labels < 0
    if unlabelled.any() or not groups:
        groups.append(("all pairs" if not groups else "no label", unlabelled))
    for name, members in groups:
        if members.any():
            axes.hist(scores[members], bins=edges, histtype="step", linewidth=1.5, label=f"{name} ({members.sum()})")
    if shuffled is not None and not np.isnan(shuffled).all():
        axes.hist(shuffled[~np.isnan(shuffled)], bins=edges, histtype="step", linewidth=1, linestyle="--",
                  color="grey", label="same images, shuffled captions")
    if lowest_kept is not None:
        right = max(float(edges[-1]), lowest_kept)
        axes.axvspan(lowest_kept, right, color="tab:green", alpha=0.12, label=f"kept: score >= {lowest_kept:.3f}")
        axes.axvline(lowest_kept, color="black", linestyle="--", linewidth=1)
        for text, offset, alignment in (("<- dropped", -4, "right"), ("kept ->", 4, "left")):
            axes.annotate(text, xy=(lowest_kept, 0.0), xycoords=("data", "axes fraction"), xytext=(offset, 4),
                          textcoords="offset points", ha=alignment, fontsize=8)
    axes.set_xlabel("image-text cosine")
    axes.set_ylabel("pairs")
    axes.set_title("similarity scores")
    axes.legend(fontsize=8)
    return save_figure(figure, path)


def format_similarity_report(report: dict) -> str:
    """The report as a table: the rules and what each keeps, the totals, the quantiles, and per label."""
    scored = max(report["scored"], 1)
    selection = report["selection"]
    rules = []
    if selection["keep_fraction"] is not None:
        rules.append(("keep_fraction", f"in the top {selection['keep_fraction']:g} by score",
                      selection["kept_by_fraction"], ""))
    if selection["min_similarity"] is not None:
        rules.append(("min_similarity", f"score >= {selection['min_similarity']:g}",
                      selection["kept_by_threshold"], ""))
    dedup = report["dedup"]
    if dedup is not None:
        rules.append(("dedup", f"image cosine < {dedup['threshold']:g} to every kept pair",
                      dedup["candidates"] - dedup["dropped"], f"  ({dedup['method']}, {dedup['clusters']} cluster(s))"))
    lines = [f"similarity filter of {report['source']} with {report['model'] or report['scores_from']}",
             f"{'rule':<16} {'keeps a pair when':<42} {'keeps':>9}"]
    lines += [f"{rule:<16} {condition:<42} {count:>9}{note}" for rule, condition, count, note in rules]
    lowest = selection["lowest_kept_score"]
    lines.append(f"binding rule: {selection['rule']}; lowest kept score "
                 f"{'none' if lowest is None else format(lowest, '.4f')}")
    for name, count in (("kept", report["kept"]), ("dropped by score", report["dropped_by_score"]),
                        ("dropped as dup.", report["dropped_as_duplicate"]), ("scored", report["scored"])):
        lines.append(f"{name:<59} {count:>9} {100 * count / scored:>6.1f}%")
    lines.append(f"{'unreadable (skipped)':<59} {report['unscored']:>9}")
    for skipped in report["unscored_pairs"][:5]:
        lines.append(f"  {skipped['key']}: {skipped['error']}")
    if report["unscored"] > 5:
        lines.append(f"  ... and {report['unscored'] - 5} more in dropped.jsonl")
    quantiles = report["score_quantiles"]
    if quantiles:
        lines.append("score quantiles: " + "  ".join(f"{name} {value:.3f}" for name, value in quantiles.items()))
    if report.get("scorer_check") is not None:
        lines.append(describe_check(report["scorer_check"]))
    labels = report.get("labels")
    if labels:
        lines.append(f"{'label':<16} {'pairs':>8} {'kept':>8} {'by score':>9} {'dup.':>6} {'mean':>7} "
                     f"{'precision':>9} {'recall':>7}")
        for name, row in labels["by_label"].items():
            precision = "" if row["precision"] is None else f"{row['precision']:.3f}"
            recall = "" if row["recall"] is None else f"{row['recall']:.3f}"
            mean = "" if row["mean_score"] is None else f"{row['mean_score']:.3f}"
            lines.append(f"{name:<16} {row['pairs']:>8} {row['kept']:>8} {row['dropped_by_score']:>9} "
                         f"{row['dropped_as_duplicate']:>6} {mean:>7} {precision:>9} {recall:>7}")
        share = labels["clean_share"]
        if share["scored"] is not None:
            lines.append(f"clean share: {share['scored']:.3f} of the scored pairs, "
                         f"{share['kept'] if share['kept'] is None else format(share['kept'], '.3f')} of the kept")
    return "\n".join(lines) + "\n"
