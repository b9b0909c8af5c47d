"""`curate(CurateConfig)`: curation with a scorer the corpus trains itself, for corpora no pretrained model fits.

Stages, each in its own folder under `out_dir`:

    rules/        the paper's rules (openalign.data.filters), unless switched off
    tokenizer/    a WordPiece vocabulary trained on what the rules keep (unless one is given)
    train-1/      a short training run on the rules' pairs: the bootstrap scorer (run folder; model/ holds the
                  weights and the processor, so the scorer loads like any checkpoint)
    score-1/      the similarity filter of the rules' pairs with that scorer (openalign.curation.similarity_filter)
    train-2/ score-2/ ...  with `rounds` > 1: the next scorer trained on what the last one kept, scoring the
                  rules' pairs again (a better scorer can take back a pair an earlier one dropped)
    final/        the last training run, on what the last round kept; final/model is the curated model
                  (refused after a scorer the scorer check finds no better than chance, unless
                  `allow_weak_scorer`: its kept pairs are a random draw, openalign.curation.scorer_check)
    report.json, report.txt   every stage's figures and seconds
    curate.json   the configuration; a rerun must ask for the same

Each training run after the first starts from the previous run's weights (`start_from="bootstrap"`, with a
fresh optimiser and schedule) or from scratch (`start_from="scratch"`). A stage writes `stage.json` last, and
a rerun after a kill skips every stage that has one: a training run cut short resumes from its newest
checkpoint, a scoring run from its finished parts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from openalign.curation.scorer_check import ADVICE
from openalign.curation.scores import CurationError
from openalign.curation.similarity_filter import SimilarityConfig, run_similarity_filter
from openalign.data.filters import FilterConfig
from openalign.errors import ConfigError

STAGE_FILE = "stage.json"
START_FROM = ("bootstrap", "scratch")


@dataclass
class CurateConfig:
    """What `curate` runs. Training: `train_config` (a YAML/TOML file) over `recipe`, then `train_overrides`
    (dotted keys) for every run; the bootstrap runs take `bootstrap_steps` steps (and at most
    `bootstrap_minutes`), the final run `steps` (at most `minutes`). `rules`: None skips them. `tokenizer`: a
    folder, or None to train one of `vocab_size` on the rules' captions. `similarity`: how each round keeps
    pairs (it needs keep_fraction, min_similarity or dedup_similarity). Scoring runs on `device`.
    `allow_weak_scorer`: train on what a scorer kept even when the scorer check finds it no better than chance."""

    source: str
    out_dir: str
    similarity: SimilarityConfig = field(default_factory=SimilarityConfig)
    rules: FilterConfig | None = field(default_factory=FilterConfig)
    train_config: str | None = None
    recipe: str | None = None
    train_overrides: dict = field(default_factory=dict)
    tokenizer: str | None = None
    vocab_size: int = 1000
    bootstrap_steps: int = 500
    bootstrap_minutes: float | None = None
    steps: int = 1000
    minutes: float | None = None
    rounds: int = 1
    start_from: str = "bootstrap"
    device: str = "auto"
    progress: bool = False
    allow_weak_scorer: bool = False

    def validate(self) -> CurateConfig:
        """Raise ConfigError naming the first value that cannot work; return self."""
        self.similarity.validate()
        if (self.similarity.keep_fraction, self.similarity.min_similarity, self.similarity.dedup_similarity) == (
                None, None, None):
            raise ConfigError("curation needs a way to keep pairs: keep_fraction, min_similarity or "
                              "dedup_similarity")
        if self.rules is not None:
            self.rules.validate()
        if self.start_from not in START_FROM:
            raise ConfigError(f"start_from {self.start_from!r} is not one of {list(START_FROM)}")
        if self.rounds < 1 or self.bootstrap_steps < 1 or self.steps < 1:
            raise ConfigError(f"rounds ({self.rounds}), bootstrap_steps ({self.bootstrap_steps}) and steps "
                              f"({self.steps}) must be at least 1")
        for name in ("bootstrap_minutes", "minutes"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        return self

    def to_dict(self) -> dict:
        """The settings a resumed run must share (everything but `progress` and `allow_weak_scorer`, which a
        rerun adds to go on past a weak scorer), as plain JSON values."""
        values = dataclasses.asdict(self)
        values.pop("progress")
        values.pop("allow_weak_scorer")
        return json.loads(json.dumps(values))


def curate(config: CurateConfig) -> dict:
    """Run (or resume) the stages of the module docstring; returns the report also written as report.json."""
    config.validate()
    out = Path(config.out_dir)
    _check_curate_folder(out, config)
    stages: dict[str, dict] = {}
    source = config.source
    if config.rules is not None:
        stages["rules"] = _stage(out / "rules", _rules_stage, config)
        source = stages["rules"]["kept_source"]
    tokenizer = config.tokenizer
    if tokenizer is None:
        stages["tokenizer"] = _stage(out / "tokenizer", _tokenizer_stage, config, source)
        tokenizer = stages["tokenizer"]["tokenizer"]
    training_source, previous_model = source, None
    for round_number in range(1, config.rounds + 2):
        final = round_number == config.rounds + 1
        name = "final" if final else f"train-{round_number}"
        stages[name] = _stage(out / name, _training_stage, config, training_source, tokenizer, previous_model, final)
        previous_model = stages[name]["model"]
        if final:
            break
        score_name = f"score-{round_number}"
        stages[score_name] = _stage(out / score_name, _scoring_stage, config, source, previous_model,
                                    stages[name]["max_length"])
        if stages[score_name]["scorer_check"]["weak"] and not config.allow_weak_scorer:
            raise CurationError(weak_scorer_message(stages[score_name]["scorer_check"], out / score_name))
        training_source = stages[score_name]["kept_source"]
    report = {"source": config.source, "out_dir": str(out), "model": stages["final"]["model"],
              "start_from": config.start_from, "rounds": config.rounds, "stages": stages,
              "seconds": round(sum(stage["seconds"] for stage in stages.values()), 3)}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.txt").write_text(format_curate_report(report))
    return report


def weak_scorer_message(check: dict, folder: Path) -> str:
    """Why curate stops after a weak scorer, and the ways on."""
    return (f"the scorer of {folder} tells its pairs from the same images with shuffled captions no better than "
            f"chance ({'; '.join(check['reasons'])}; see {folder / 'report.txt'}), so what it kept is about a random "
            f"draw of the pairs: {ADVICE}, then rerun the same command (finished stages are kept); or rerun with "
            "--allow-weak-scorer to train on its pairs anyway")


def _check_curate_folder(out: Path, config: CurateConfig) -> None:
    """Write curate.json, or check that a rerun in the same folder asks for the same settings (until a stage
    has finished, a rerun may change them: e.g. looser rules after the rules kept nothing)."""
    path = out / "curate.json"
    settings = config.to_dict()
    if path.exists() and any(out.glob(f"*/{STAGE_FILE}")):
        existing = json.loads(path.read_text())
        changed = sorted(key for key in set(existing) | set(settings) if existing.get(key) != settings.get(key))
        if changed:
            raise ConfigError(f"{path} was written for other settings ({', '.join(changed)} differ): resume with "
                              "the same settings, or use a fresh output folder")
        return
    out.mkdir(parents=True, exist_ok=True)
    _write_json(path, settings)


def _write_json(path: Path, value: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(temporary, path)


def _stage(folder: Path, run, *arguments) -> dict:
    """The stage's stage.json if it finished, else run(*arguments, folder) and write it (with its seconds)
    last."""
    marker = folder / STAGE_FILE
    if marker.is_file():
        return json.loads(marker.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    result = {**run(*arguments, folder), "seconds": 0.0}
    result["seconds"] = round(time.monotonic() - started, 3)
    _write_json(marker, result)
    return result


def _kept_source(outputs: dict, folder: Path) -> str:
    """The kept pairs of a filter's outputs as a source: the manifest, or the folder of shards."""
    return outputs["manifest"] if "manifest" in outputs else str(folder / "shards")


def _rules_stage(config: CurateConfig, folder: Path) -> dict:
    from openalign.data.filters import run_filter

    report = run_filter(config.source, folder, config.rules, progress=config.progress)
    if report["kept"] == 0:
        raise CurationError(f"the rules kept none of the {report['total']} pairs of {config.source} (see "
                            f"{folder / 'report.txt'}): loosen them (the paper's --min-side 200 drops every image of "
                            "a small-image corpus) or pass --no-rules")
    return {"total": report["total"], "kept": report["kept"], "dropped_by_rule": report["dropped_by_rule"],
            "kept_source": _kept_source(report["outputs"], folder)}


def _tokenizer_stage(config: CurateConfig, source: str, folder: Path) -> dict:
    from openalign.data.vocabulary import train_tokenizer

    tokenizer = train_tokenizer(source, config.vocab_size, folder / "wordpiece")
    return {"tokenizer": str(folder / "wordpiece"), "vocab_size": tokenizer.vocab_size}


def training_config(config: CurateConfig, source: str, tokenizer: str, run_dir: Path, previous_model: str | None,
                    final: bool):
    """The TrainConfig of one training stage: the user's settings, then the stage's data, tokenizer, folder,
    steps and time limit, and its starting weights: the previous run's model (`start_from="bootstrap"`) or none."""
    from openalign.train.config import load_config
    from openalign.train.recipes import get_recipe

    init_from = previous_model if config.start_from == "bootstrap" else None
    minutes = config.minutes if final else config.bootstrap_minutes
    quiet = {} if config.progress else {"run.progress": False}  # curate --quiet: no training bars either
    overrides = {**quiet, **config.train_overrides, "data.train": source, "data.tokenizer": tokenizer,
                 "run.out_dir": str(run_dir), "optim.total_steps": config.steps if final else config.bootstrap_steps,
                 "model.init_from": init_from}
    if minutes is not None:  # a limit on a run of the steps asked for, not a budget to fit the steps to
        overrides.update({"run.max_minutes": minutes, "run.fit_steps_to_time": False})
    return load_config(config.train_config, overrides, base=get_recipe(config.recipe) if config.recipe else None)


def _training_stage(config: CurateConfig, source: str, tokenizer: str, previous_model: str | None, final: bool,
                    folder: Path) -> dict:
    return train_scorer(training_config(config, source, tokenizer, folder, previous_model, final), tokenizer)


def train_scorer(train_config, tokenizer: str) -> dict:
    """Train (or resume, when its run folder holds checkpoints) as `train_config` says (the trainer saves the
    processor beside the final weights, so run_dir/model loads as a checkpoint that can score pairs); returns the
    model folder, what it trained on and from, the text length it was trained at, its steps and stop reason."""
    from openalign.train.checkpointing import list_checkpoints
    from openalign.train.trainer import train

    folder = Path(train_config.run.out_dir)
    result = train(train_config, resume="latest" if list_checkpoints(folder) else None)
    model = folder / "model"  # weights, tokenizer and image settings: the trainer saves them all
    return {"model": str(model), "trained_on": train_config.data.train, "init_from": train_config.model.init_from,
            "max_length": train_config.data.max_length, "steps": result.step,
            "stop_reason": result.stop_reason, "final_loss": result.metrics.get("loss")}


def _scoring_stage(config: CurateConfig, source: str, model: str, max_length: int, folder: Path) -> dict:
    return score_and_keep(source, model, folder, config.similarity, max_length, device=config.device,
                          progress=config.progress)


def score_and_keep(source, model: str, folder: Path, similarity: SimilarityConfig, max_length: int,
                   device: str = "auto", progress: bool = False) -> dict:
    """Score every pair of `source` with the checkpoint `model` into `folder` and keep as `similarity` says
    (openalign.curation.similarity_filter); captions are cut at `max_length`, where the scorer's training cut
    them. Returns the counts, the binding rule, the score quantiles, the per-label figures and `kept_source`."""
    from openalign.curation.similarity_filter import load_scoring_encoders

    encoders = load_scoring_encoders(model, device=device, batch_size=similarity.batch_size)
    # Captions are cut where training cut them: the run never trained the positions beyond.
    encoders.processor.tokenizer.max_length = max_length
    report = run_similarity_filter(source, folder, config=similarity, encoders=encoders, progress=progress)
    labels = report["labels"]
    return {"model": model, "scored": report["scored"], "kept": report["kept"],
            "dropped_by_score": report["dropped_by_score"], "dropped_as_duplicate": report["dropped_as_duplicate"],
            "unscored": report["unscored"], "rule": report["selection"]["rule"],
            "lowest_kept_score": report["selection"]["lowest_kept_score"],
            "score_quantiles": report["score_quantiles"], "scorer_check": report["scorer_check"], "labels": labels,
            "kept_source": _kept_source(report["outputs"], folder)}


def format_curate_report(report: dict) -> str:
    """One line per stage: what it kept or trained, the clean share where the source has labels, seconds."""
    lines = [f"curation of {report['source']} ({report['rounds']} round(s), each run after the first from "
             f"{report['start_from']}); model: {report['model']}"]
    for name, stage in report["stages"].items():
        if name == "rules":
            text = f"kept {stage['kept']} of {stage['total']}"
        elif name == "tokenizer":
            text = f"vocabulary of {stage['vocab_size']}"
        elif name.startswith("score-"):
            text = f"kept {stage['kept']} of {stage['scored']} scored ({stage['rule']})"
            share = (stage["labels"] or {}).get("clean_share", {})
            if share.get("scored") is not None and share.get("kept") is not None:
                text += f"; clean share {share['scored']:.3f} -> {share['kept']:.3f}"
            noise = (stage["labels"] or {}).get("by_label", {}).get("any noise")
            if noise and noise["precision"] is not None:
                text += f"; noise dropped at precision {noise['precision']:.3f}, recall {noise['recall']:.3f}"
            check = stage["scorer_check"]
            text += f"; {'WEAK scorer' if check['weak'] else 'scorer'}: given vs shuffled captions AUC {check['auc']}"
        else:
            text = f"{stage['steps']} steps ({stage['stop_reason']}) from {stage['init_from'] or 'scratch'}"
        lines.append(f"{name:<10} {text}  [{stage['seconds']:.1f} s]")
    return "\n".join(lines) + "\n"
