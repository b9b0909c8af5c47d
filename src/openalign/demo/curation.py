"""The demo's curation stage: which of the generated pairs the demo trains on (`DemoConfig.curation`).

- "none": every generated pair.
- "rules": the paper's rules (`pipeline.prepare_data`, with the thresholds the generator suggests).
- "similarity" (the default): the rules, then bootstrap similarity curation through `openalign.curation`: a
  short run on the rules' pairs trains a scorer (`curation/train-1/`), which scores every one of them and keeps
  those its selection rule keeps (`curation/score-1/`, with the per-label report); with `curation_rounds` > 1 the
  next scorer continues from the last on what it kept and scores the rules' pairs again. The demo's training
  then continues from the last scorer's weights on the kept pairs, so the bootstrap's steps are not lost.
- "robust": the rules, then one run that learns through the mismatched captions that pass them: a robust loss
  (`DemoConfig.robust_loss`, RINCE by default) with each pair's loss weighted by the run's own estimate that it
  is clean (`DemoConfig.pair_weighting`, openalign.train.pair_estimates), in one schedule. The run is the
  curation pass: its estimates (run/pair-scores/) say which pairs it believes mismatched, measured here against
  the generator's labels (`detection_figures`).
- "oracle": exactly the generator's clean pairs (its noise labels): the perfect filter, the yardstick of the
  curation experiment, not a curation method (a real corpus has no labels).

Every mode keeps per-pair estimates during training (`loss.pair_estimates`), so each run reports how well its
own estimates separate the mismatched captions from the clean ones.

The bootstrap's training and scoring are inside the demo's time budget: the number of bootstrap steps is planned
from a step probe of the bootstrap's own configuration before it runs, and the demo's training is planned from
the time that is left after it.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

CURATIONS = ("none", "rules", "similarity", "robust", "oracle")
CLEAN_LABEL = "clean"


def oracle_manifest(manifest: Path, folder: Path) -> tuple[Path, dict]:
    """The perfect filter: the pairs of `manifest` whose generator label (`noise`) is "clean", written to
    folder/manifest.jsonl; returns it and a report of the counts."""
    from openalign.data.filter_outputs import write_kept
    from openalign.data.sources import iter_records

    counts: dict[str, int] = {}

    def clean_records():
        for record in iter_records(manifest):
            label = str(record.extra.get("noise"))
            counts[label] = counts.get(label, 0) + 1
            if label == CLEAN_LABEL:
                yield record

    folder.mkdir(parents=True, exist_ok=True)
    kept = Path(write_kept(clean_records(), folder, "manifest")["manifest"])
    total = sum(counts.values())
    return kept, {"total": total, "kept": counts.get(CLEAN_LABEL, 0), "dropped_by_label": {
        label: count for label, count in sorted(counts.items()) if label != CLEAN_LABEL}}


def scoring_seconds(pairs: int, step: dict, batch_size: int) -> float:
    """What scoring `pairs` pairs is expected to take, from a training step's times (`measure_step_seconds`):
    decoding as in training, and a forward of both towers, which SCORING_FORWARD_SHARE of a training step's
    model time stands for."""
    batches = pairs / batch_size
    return batches * (step["decode"] + SCORING_FORWARD_SHARE * step["model"])


# A scoring forward (both towers, no gradients, BatchNorm folded) against a training step of the same batch
# (forward, backward, AdamW): measured on 2 cores (docs/demo.md, "Curation in the demo").
SCORING_FORWARD_SHARE = 0.25


def bootstrap_steps_for(config, step: dict | None, seconds: float, pairs: int) -> int:
    """Steps of one bootstrap round: `config.bootstrap_share` of the demo's training, split over
    `config.curation_rounds`: of `config.steps` when the run is sized in steps, else of `seconds` (the training
    time left once scoring is paid for) at the probed step times `step`."""
    from openalign.demo.training import planned_steps

    rounds = config.curation_rounds
    if step is None:
        return max(1, round(config.bootstrap_share * config.steps / rounds))
    seconds = max(0.0, config.bootstrap_share * seconds / rounds)
    return max(1, planned_steps(seconds, step, max(1, pairs // config.batch_size), cached=True))


def similarity_curation(config, rules_manifest: Path, pairs: int, tokenizer, model_config, model_config_path: Path,
                        out: Path, seconds_left, timings: dict) -> dict:
    """Rules' pairs (`pairs` of them in `rules_manifest`) -> bootstrap run(s) -> scores -> kept pairs, as the
    module docstring says. `seconds_left()` is the training time the demo has left. Returns {"manifest": the
    kept pairs, "model": the last scorer (the demo's training starts from it), "bootstrap_steps": steps trained,
    "rounds": each round's figures, "similarity": the selection settings}."""
    from openalign.curation.bootstrap import score_and_keep, train_scorer
    from openalign.curation.similarity_filter import SimilarityConfig
    from openalign.demo.training import measure_step_seconds, training_config

    folder = out / "curation"
    bootstrap = dataclasses.replace(config, image_ssl_weight=0.0,
                                    train_overrides={**config.train_overrides, "run.plots": False})
    started = time.monotonic()
    step = None
    if config.steps is None:  # a run sized by time: fit the bootstrap into it
        probe_config = training_config(bootstrap, rules_manifest, out / "tokenizer", model_config_path,
                                       folder / "probe", 1, 1.0)
        step = measure_step_seconds(model_config, probe_config, tokenizer)
    timings["curation_probe"] = time.monotonic() - started
    similarity = SimilarityConfig(keep_fraction=config.keep_fraction, min_similarity=config.min_similarity,
                                  batch_size=256)
    # Every round's steps, planned once: the time left for training once every round's scoring is paid for.
    scoring = 0.0 if step is None else scoring_seconds(pairs, step, config.batch_size)
    steps = bootstrap_steps_for(config, step, seconds_left() - config.curation_rounds * scoring, pairs)
    source, previous_model, rounds, trained = rules_manifest, None, [], 0
    for number in range(1, config.curation_rounds + 1):
        run_config = training_config(dataclasses.replace(bootstrap, steps=steps), source, out / "tokenizer",
                                     model_config_path, folder / f"train-{number}", steps,
                                     max(seconds_left(), 1.0) / 60)
        run_config.model.init_from = previous_model
        started = time.monotonic()
        trained_round = train_scorer(run_config, str(out / "tokenizer"))
        timings[f"bootstrap_{number}"] = time.monotonic() - started
        started = time.monotonic()
        scored = score_and_keep(rules_manifest, trained_round["model"], folder / f"score-{number}", similarity,
                                run_config.data.max_length, device="cpu")
        timings[f"scoring_{number}"] = time.monotonic() - started
        trained += trained_round["steps"]
        rounds.append({"steps": trained_round["steps"], "stop_reason": trained_round["stop_reason"],
                       "trained_on": str(source), **{key: scored[key] for key in (
                           "scored", "kept", "dropped_by_score", "rule", "lowest_kept_score", "score_quantiles",
                           "scorer_check", "labels")},
                       "seconds": {"train": round(timings[f"bootstrap_{number}"], 1),
                                   "score": round(timings[f"scoring_{number}"], 1)}})
        source, previous_model = Path(scored["kept_source"]), trained_round["model"]
    return {"manifest": source, "model": previous_model, "bootstrap_steps": trained, "rounds": rounds,
            "probe_seconds_per_step": step, "similarity": dataclasses.asdict(similarity)}


def curation_summary(mode: str, curation: dict | None) -> dict:
    """metrics.json's `curation`: the mode and, for "similarity", the bootstrap's steps and every round's
    counts, score quantiles and per-label figures; `mismatch_precision` / `mismatch_recall` are how well the last
    round's scores dropped the mismatched captions, `clean_share` the clean share of the scored and kept pairs."""
    if curation is None:
        return {"mode": mode}
    last = curation["rounds"][-1]
    labels = last["labels"] or {}
    mismatch = labels.get("by_label", {}).get("mismatch", {})
    return {"mode": mode, "bootstrap_steps": curation["bootstrap_steps"], "rounds": curation["rounds"],
            "similarity": curation["similarity"], "probe_seconds_per_step": curation["probe_seconds_per_step"],
            "mismatch_precision": mismatch.get("precision"), "mismatch_recall": mismatch.get("recall"),
            "clean_share": labels.get("clean_share")}


def detection_figures(scores_folder: Path, manifest: Path) -> dict | None:
    """How well per-pair scores (a scoring folder's scores.parquet: the run's estimates) separate the generator's
    mismatched captions from its clean pairs: ROC AUC (ties count half), and the precision and recall at
    dropping as many of the lowest-scored pairs as there are mismatched ones among the scored (equal to each
    other by construction). Pairs of other noise kinds are left out. None without scores or without both kinds."""
    import numpy as np

    from openalign.curation.scorer_check import mann_whitney_auc
    from openalign.curation.scores import read_scores
    from openalign.data.sources import iter_records

    if not (scores_folder / "scores.parquet").is_file():
        return None
    columns = read_scores(scores_folder, columns=("key", "score"))
    labels = {record.key: str(record.extra.get("noise")) for record in iter_records(manifest)}
    kinds = np.array([labels.get(key) for key in columns["key"]], dtype=object)
    mismatched, clean = kinds == "mismatch", kinds == CLEAN_LABEL
    scores = columns["score"].astype(np.float64)
    if not mismatched.any() or not clean.any():
        return None
    both = mismatched | clean
    positives = clean[both]  # clean pairs should score higher
    n_mismatched = int((~positives).sum())
    auc = mann_whitney_auc(scores[clean], scores[mismatched])
    dropped = np.argsort(scores[both], kind="stable")[:n_mismatched]
    caught = int((~positives[dropped]).sum())
    return {"pairs": int(both.sum()), "mismatched": n_mismatched, "roc_auc": float(auc),
            "precision": caught / n_mismatched, "recall": caught / n_mismatched}

