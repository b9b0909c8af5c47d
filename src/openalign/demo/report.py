"""What the demo leaves behind besides the checkpoint: a similarity heat-map, report.md and metrics.json."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

# The figures metrics.json promises, in the order the report lists them: (key, label).
HEADLINE = (
    ("colour_accuracy", "zero-shot colour accuracy (pair prompts)"),
    ("shape_accuracy", "zero-shot shape accuracy (pair prompts)"),
    ("shape_only_prompt_accuracy", "zero-shot shape accuracy (shape-only prompts)"),
    ("pair_accuracy", "zero-shot colour-shape pair accuracy"),
    ("image_to_text_r1", "image -> text R@1"),
    ("image_to_text_r5", "image -> text R@5"),
    ("text_to_image_r1", "text -> image R@1"),
    ("text_to_image_r5", "text -> image R@5"),
)
FULL_GALLERY = (("full_gallery_image_to_text_r5", "image -> text R@5"), ("full_gallery_text_to_image_r5",
                                                                         "text -> image R@5"))


def heatmap_examples(rows: Sequence[dict], pairs: Sequence[Sequence[str]], limit: int = 6) -> list[int]:
    """Row indices of up to `limit` held-out images, one per held-out pair, single-object images first."""
    chosen, seen = [], set()
    for single_first in (True, False):
        for index, row in enumerate(rows):
            pair = (row["colour"], row["shape"])
            if pair in seen or (single_first and row.get("count", 1) != 1) or list(pair) not in list(map(list, pairs)):
                continue
            chosen.append(index)
            seen.add(pair)
            if len(chosen) == limit:
                return chosen
    return chosen


def write_heatmap(path: Path, encoders, rows: Sequence[dict], split_dir: Path, pairs: Sequence[Sequence[str]]
                  ) -> Path:
    """Cosine similarities of a few held-out images (one per held-out pair) against the prompts naming those
    pairs, as a PNG: the diagonal is the right answer."""
    from openalign.demo.evaluate import fill
    from openalign.eval.heatmap import plot_similarity_heatmap, similarity_matrix

    indices = heatmap_examples(rows, pairs)
    images = [split_dir / rows[index]["image_path"] for index in indices]
    texts = [fill("{a} {colour} {shape}", rows[index]["colour"], rows[index]["shape"]) for index in indices]
    matrix = similarity_matrix(encoders, images, texts)
    return plot_similarity_heatmap(images, texts, matrix, path)


def _figure_rows(metrics: dict) -> list[str]:
    """The figures table: held-out value, chance, the two ceilings of retrieval (identical captions; the best
    any model can expect, from the generator's caption model), the held-out value as a fraction of the best
    possible, and (when measured) the value on seen pairs with its own fraction of its best possible."""
    gallery = metrics["retrieval_gallery_size"]
    seen = metrics.get("seen_pairs")
    lines = ["| figure | held-out | chance | ceiling (identical captions) | best possible | of best possible |"
             + (" seen pairs |" if seen else ""),
             "|---|---:|---:|---:|---:|---:|" + ("---:|" if seen else "")]
    rows = [*HEADLINE[:4], *((key, f"{label} ({gallery}-pair galleries)") for key, label in HEADLINE[4:]),
            *((key, f"{label} (all {metrics['data']['heldout_pairs']} held-out pairs)") for key, label in FULL_GALLERY)]

    def cell(value: float | None, form: str = ".3f") -> str:
        return "" if value is None else format(value, form)

    for key, label in rows:
        ceiling, best = metrics.get("ceiling", {}).get(key), (metrics.get("bayes_ceiling") or {}).get(key)
        line = (f"| {label} | {metrics[key]:.3f} | {metrics['chance'][key]:.3f} | {cell(ceiling)} | {cell(best)} | "
                f"{cell(metrics.get(f'{key}_of_best'), '.0%')} |")
        if seen:  # the full-gallery figure of the seen split has a gallery of another size: left blank
            fraction = seen.get(f"{key}_of_best")
            line += (f" {seen[key]:.3f}" + (f" ({fraction:.0%} of best)" if fraction is not None else "") + " |"
                     if not key.startswith("full_gallery") else " |")
        lines.append(line)
    return lines


def _composition_lines(figures: dict | None) -> list[str]:
    if not figures:
        return []
    return ["", "Which tower composes (prototypes: mean seen image of a colour + of a shape - of all): shape read "
            f"from the nearest prototype is right for {figures['image_shape_accuracy_heldout']:.3f} of held-out "
            f"images against {figures['image_shape_accuracy_seen']:.3f} of seen ones (image tower); "
            f"{figures['text_pairs_nearest_own_prototype']:.0%} of held-out pair prompts lie nearest their own "
            "pair's prototype (text tower)."]


def markdown_report(metrics: dict, filter_report: dict | None) -> str:
    """A short markdown report: the held-out figures against chance and ceilings, the data, the run."""
    data, training, seconds = metrics["data"], metrics["training"], metrics["seconds"]
    config = metrics["config"]
    pairs = ", ".join(f"{colour} {shape}" for colour, shape in data["heldout_colour_shape_pairs"])
    lines = [
        "# openalign demo", "",
        f"Held-out split: {data['heldout_pairs']} images of colour-shape pairs never seen in training ({pairs}).",
        "",
        *_figure_rows(metrics), "",
        f"How often the predicted pair is a training pair: {metrics.get('predicted_pair_seen_in_training', 0):.3f}.",
        *([f"Seen pairs: {data['seen_pairs']} new images of training combinations, scored the same way; the gap "
           "between the two columns is what composition costs."] if metrics.get("seen_pairs") else []),
        *_composition_lines(metrics.get("composition")),
        *(["", "Best possible: the expected recall of a model that sees each image's true attributes and ranks by "
           "the generator's own caption probabilities. Captions leave out most attributes, so several fit an "
           "image equally well; no model can expect more."] if metrics.get("bayes_ceiling") else []),
        "",
        "## Data", "",
        f"- {data['train_pairs']} training pairs generated; noise: "
        + ", ".join(f"{kind} {count}" for kind, count in data["noise_counts"].items()),
        *(["- clean pairs drawn as: " + ", ".join(f"{kind.replace('_', ' ')} {count}" for kind, count in
                                                   data["clean_renderings"].items())]
          if data.get("clean_renderings") else []),
    ]
    curation = metrics.get("curation", {})
    if curation.get("mode") == "oracle":
        lines.append(f"- the perfect filter (--curation oracle): the generator's {filter_report['kept']} clean pairs "
                     f"of {filter_report['total']}")
    elif filter_report is not None:
        dropped = ", ".join(f"{rule} {count}" for rule, count in filter_report["dropped_by_rule"].items() if count)
        lines.append(f"- filters kept {filter_report['kept']} of {filter_report['total']} (dropped by rule: {dropped})")
        if curation.get("mode") == "robust":
            lines.append(f"- robust training (--curation robust): loss {config['robust_loss']}, per-pair weighting "
                         f"{config['pair_weighting']} after {config['pair_weighting_warmup']:.0%} of the steps")
    else:
        lines.append("- no curation (--curation none): trained on every generated pair")
    lines += _curation_lines(curation)
    lines += [
        "", "## Run", "",
        f"- model: EfficientNet width x{config['width_coefficient']}, depth x{config['depth_coefficient']} at "
        f"{config['image_size']} px; BERT {config['text_layers']} layers x {config['text_width']}",
        "- " + (f"the bootstrap scorer's {training['bootstrap_steps']} steps, then from its weights "
                if training.get("bootstrap_steps") else "")
        + f"{training['steps']} steps of {config['batch_size']} ({training['samples_seen']} samples, "
        f"{training['samples_per_s']:.0f} samples/s), stopped: {training['stop_reason']}; "
        f"final loss {training['final_loss']:.3f}, temperature {training['temperature']:.4f}",
        "- seconds: " + ", ".join(f"{name} {value:.0f}" for name, value in seconds.items()),
        f"- whole command: {metrics['minutes']:.2f} minutes",
        *_machine_lines(metrics.get("machine")),
        "", "Files: model/ (checkpoint + processor), plots/, heatmap.png, metrics.json.", "",
    ]
    return "\n".join(lines)


def _curation_lines(curation: dict) -> list[str]:
    """The similarity stage's line (what the bootstrap scorer kept and, by the generator's labels, how well) and
    the line on the run's own per-pair estimates (how well they tell mismatched captions from clean pairs)."""
    return _similarity_lines(curation) + _detection_lines(curation)


def _detection_lines(curation: dict) -> list[str]:
    detection = curation.get("detection")
    if not detection:
        return []
    weighted = " (each pair's loss weighted by them)" if curation.get("mode") == "robust" else ""
    return [f"- the run's own per-pair estimates{weighted} against the generator's labels: ROC AUC "
            f"{detection['roc_auc']:.3f} clean vs mismatched over {detection['pairs']} pairs; dropping the "
            f"{detection['mismatched']} lowest would drop mismatched captions at precision "
            f"{detection['precision']:.3f} (= recall); in run/pair-scores/ (`openalign filter --scores-from`)"]


def _similarity_lines(curation: dict) -> list[str]:
    if curation.get("mode") != "similarity" or not curation.get("rounds"):
        return []
    last, share = curation["rounds"][-1], curation.get("clean_share") or {}
    settings = curation.get("similarity") or {}
    rule = (f"the best-scoring {settings['keep_fraction']:.0%}" if last.get("rule") == "keep_fraction"
            and settings.get("keep_fraction") is not None else
            f"cosine >= {settings['min_similarity']}" if settings.get("min_similarity") is not None else "all")
    line = (f"- similarity curation: a scorer trained {curation['bootstrap_steps']} steps on the filtered pairs kept "
            f"{last['kept']} of {last['scored']} ({rule})")
    if share.get("scored") is not None:
        line += f"; clean share {share['scored']:.3f} -> {share['kept']:.3f}"
    if curation.get("mismatch_precision") is not None:
        line += (f"; mismatched captions dropped at precision {curation['mismatch_precision']:.3f}, recall "
                 f"{curation['mismatch_recall']:.3f}")
    return [line]


def _machine_lines(machine: dict | None) -> list[str]:
    """One line saying plainly whether other processes shared the machine and what that cost."""
    if not machine:
        return []
    others = machine.get("others_cores_while_training")
    start = machine.get("busy_cores_at_start")
    seen = ", ".join(part for part in (
        f"{start:.1f} cores busy with other work at the start" if start is not None else "",
        f"{others:.1f} on average while training" if others is not None else "") if part)
    if not machine["busy"]:
        return [f"- machine: quiet ({seen})" if seen else "- machine: quiet"]
    return [f"- machine: BUSY ({seen}): the demo got {machine['cpu_share']:.0%} of its threads' CPU time and "
            f"trained {machine['steps']} steps where its full share would have given about "
            f"{machine['steps_at_full_share']}; figures from a quiet machine are in docs/demo.md"]


def write_report(out: Path, metrics: dict, filter_report: dict | None) -> dict[str, Path]:
    """Write report.md and metrics.json into `out`; returns their paths."""
    report_path, metrics_path = out / "report.md", out / "metrics.json"
    report_path.write_text(markdown_report(metrics, filter_report))
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    return {"report": report_path, "metrics": metrics_path}
