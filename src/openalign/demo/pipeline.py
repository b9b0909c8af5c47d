"""`run_demo(DemoConfig)`: the whole ALIGN story on a laptop CPU in one call.

Steps, each timed: generate the synthetic noisy dataset, apply the paper's filters (with the thresholds the
generator suggests for its scale), train a WordPiece vocabulary on the kept captions, train a small ALIGN from
scratch for whatever is left of the time budget, then evaluate on the held-out split (colour-shape pairs never
seen in training) and write the report. Everything lands in one output folder.

The time budget covers the whole command. Training gets what the other steps leave: the number of steps is
first set from a step time measured on this machine just before training (real batches: loading and model
step), then re-planned by the trainer from the steps' own times early in training (`run.fit_steps_to_time`),
so that the cosine schedule ends when the time does (a run cut short by `run.max_minutes` stops before its
learning rate has come down; one planned too short leaves time unused).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from openalign.data.synth import SynthConfig
from openalign.demo.training import (  # noqa: F401  (imported from here by benchmarks, experiments and tests)
    IMAGE_SSL_MIN_STEPS,
    IMAGE_SSL_WEIGHT,
    image_ssl_weight_for,
    measure_step_seconds,
    planned_steps,
    probe_stepper,
    resolve_precision,
    training_config,
)
from openalign.errors import ConfigError
from openalign.model_config import AlignConfig, AlignTextConfig, AlignVisionConfig

# What the steps after training take (loading, embedding the held-out and seen images, the checkpoint copy,
# plots and the heat-map), reserved out of the training budget so that the command ends within its own; measured
# on 2 cores (docs/demo.md, "The time budget").
EVALUATION_SECONDS_PER_IMAGE = 0.003
EVALUATION_FIXED_SECONDS = 12.0

@dataclass
class DemoConfig:
    """What the demo generates, how long it may take and how the model is trained.

    `minutes` bounds the whole command (training takes what the other steps leave). `noise_rate` scales every
    noise kind of the generator to sum to this fraction of the training pairs (keeping their default
    proportions); `mismatch_rate` then sets the share of captions that describe another colour-shape pair.
    Model sizes follow the reference's fast CPU recipe: a half-width, half-depth EfficientNet-B0 at 64 px and a
    2-layer, 128-wide BERT.
    """

    out_dir: str = "demo-output"
    # The whole command's budget. 9, not 10: the training fits its steps to the time (run.fit_steps_to_time), so
    # the command takes all of it, and the README's line installs first (docs/demo.md, "The time budget").
    minutes: float = 9.0
    n: int = 20_000
    heldout_n: int | None = 2_000
    seen_n: int = 1_000  # clean images of training combinations: the same figures on familiar pairs
    seed: int = 0
    # Which pairs the demo trains on and how: "none", "rules" (the paper's), "similarity" (the rules, then
    # bootstrap similarity curation), "robust" (the rules, then one run with per-pair weights in one schedule)
    # or "oracle" (the generator's clean pairs: the perfect filter); demo/curation.py. "robust" measured best at
    # fixed steps on 0% and 20% mismatched captions (shape, pair and retrieval; colour a little lower), and the
    # split schedule of "similarity" cost 0.20 shape at the default noise (docs/demo.md, "Learning through
    # mismatched captions in one run").
    curation: str = "robust"
    # Curation "robust": the loss (openalign.losses: align, rcl or rince; RINCE collapsed in the demo's runs, the
    # complementary loss learnt less) and the per-pair weighting (loss.pair_weighting: mixture, or off), its
    # warm-up as a fraction of the steps.
    robust_loss: str = "align"
    pair_weighting: str = "mixture"
    pair_weighting_warmup: float = 0.2
    # The bootstrap scorer (curation "similarity"): the share of the training (steps, or time once scoring is
    # paid for) its rounds take together, the rounds, and how its scores keep pairs
    # (openalign.curation.similarity_filter): by default the best-scoring 90% of what the rules kept (the
    # generator's default corpus has 5% mismatched captions, which pass every rule).
    bootstrap_share: float = 0.5
    curation_rounds: int = 1
    keep_fraction: float | None = 0.9
    min_similarity: float | None = None
    noise_rate: float | None = None
    mismatch_rate: float | None = None
    partial_caption_rate: float = 0.0
    # Half the clean training images in grey with colourless captions, where colour cannot stand in for shape:
    # more held-out shape and retrieval than a quarter or none, and 70% is too many (docs/demo.md, "Half the
    # clean images grey, and a label-free image term").
    grayscale_rate: float = 0.5
    colour_background_rate: float = 0.0
    image_size: int = 64
    width_coefficient: float = 0.5
    depth_coefficient: float = 0.5
    text_layers: int = 2
    text_width: int = 128
    # Width of the image embedding, which is the image tower's last block (ALIGN has no image projection);
    # None: EfficientNet's 320 channels scaled by width_coefficient (160 at half width).
    embed_dim: int | None = None
    vocab_size: int = 1000  # at most: the generated captions hold about 320 distinct tokens
    max_length: int = 32
    batch_size: int = 256
    # "auto": bfloat16 autocast where the CPU has native bfloat16 kernels and a training step measured faster
    # in it (demo/training.py, resolve_precision), else float32; or "fp32" / "bf16".
    precision: str = "auto"
    steps: int | None = None  # a fixed number of training steps (still capped by `minutes`); default: from time
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    temperature_init: float = 0.07
    label_smoothing: float = 0.1
    # The label-free image term beside the contrastive loss (TrainConfig loss.image_ssl_*, docs/demo.md). None:
    # IMAGE_SSL_WEIGHT in runs of at least IMAGE_SSL_MIN_STEPS steps, off in shorter ones; a number: that weight.
    image_ssl_weight: float | None = None
    image_ssl_images: int | None = None  # images of a batch that get a second view; None: half the batch
    # The term's weight rises from 0 over this fraction of the steps. Off: with the term off in short runs a
    # warm-up has nothing left to protect, and 10-minute runs read less held-out shape with it (docs/demo.md,
    # "Three seeds a configuration, on a GPU").
    image_ssl_warmup: float = 0.0
    batch_norm_momentum: float = 0.9
    workers: int = 2
    loader_workers: int = 0  # processes decoding training batches beside the training loop
    # Dotted TrainConfig keys applied after the demo's own, e.g. {"data.group_by": "colour"} (docs/training.md).
    train_overrides: dict = field(default_factory=dict)
    progress: bool = True
    synth_overrides: dict = field(default_factory=dict)

    def synth_config(self) -> SynthConfig:
        """The generator's settings for this demo."""
        config = SynthConfig(image_size=self.image_size, partial_caption_rate=self.partial_caption_rate,
                             grayscale_rate=self.grayscale_rate,
                             colour_background_rate=self.colour_background_rate, **self.synth_overrides)
        if self.noise_rate is not None:
            rates = config.noise_rates()
            total = sum(rates.values())
            for kind, rate in rates.items():
                setattr(config, f"{kind}_rate", self.noise_rate * rate / total if total else 0.0)
        if self.mismatch_rate is not None:
            config.mismatch_rate = self.mismatch_rate
        config.validate()
        return config

    def model_config(self, vocab_size: int) -> AlignConfig:
        """The small ALIGN trained from scratch: its embedding width is the image tower's last block."""
        vision = AlignVisionConfig(
            image_size=self.image_size, width_coefficient=self.width_coefficient,
            depth_coefficient=self.depth_coefficient, drop_connect_rate=0.0,
            batch_norm_momentum=self.batch_norm_momentum,
        )
        if self.embed_dim is not None:
            # The stage table holds unscaled widths: the last stage's, before width scaling and rounding.
            vision = vision.replace(out_channels=[*vision.out_channels[:-1],
                                                  round(self.embed_dim / self.width_coefficient)])
            if vision.output_channels != self.embed_dim:
                raise ConfigError(f"embed_dim={self.embed_dim} is not reachable at width_coefficient="
                                  f"{self.width_coefficient} (the last block gets {vision.output_channels} "
                                  f"channels); use a multiple of {vision.depth_divisor}")
        vision = vision.replace(hidden_dim=vision.output_channels)
        text = AlignTextConfig(
            vocab_size=vocab_size, hidden_size=self.text_width, num_hidden_layers=self.text_layers,
            num_attention_heads=max(1, self.text_width // 64), intermediate_size=4 * self.text_width,
            max_position_embeddings=max(64, self.max_length),
        )
        return AlignConfig(text_config=text, vision_config=vision, projection_dim=vision.output_channels,
                           temperature_init_value=self.temperature_init)


@dataclass
class DemoResult:
    """Where the demo wrote its outputs, its held-out figures and how long each step took (seconds)."""

    out_dir: Path
    metrics: dict
    timings: dict
    files: dict


def _log(enabled: bool, message: str) -> None:
    if enabled:
        print(f"[demo] {message}", flush=True)


def prepare_data(config: DemoConfig, out: Path, timings: dict) -> tuple[Path, dict, dict | None]:
    """Generate the dataset and apply the paper's rules (curation "rules" and "similarity") or keep exactly its
    clean pairs (curation "oracle"); returns (training manifest, dataset summary, filter report or None)."""
    from openalign.data.filters import FilterConfig, run_filter
    from openalign.data.synth import generate
    from openalign.demo.curation import oracle_manifest

    started = time.monotonic()
    summary = generate(out / "data", config.n, config.synth_config(), seed=config.seed,
                       heldout_n=config.heldout_n, workers=config.workers, progress=config.progress,
                       seen_n=config.seen_n)
    timings["generate"] = time.monotonic() - started
    manifest = out / "data" / "train" / "manifest.jsonl"
    report = None
    if config.curation == "oracle":
        started = time.monotonic()
        manifest, report = oracle_manifest(manifest, out / "oracle")
        timings["filter"] = time.monotonic() - started
    elif config.curation in ("rules", "similarity", "robust"):
        started = time.monotonic()
        # The generator's thresholds fit its 64 px images and corpus size; the near-duplicate rule is off
        # because the held-out split is rendered by the same generator (every image is "near" another).
        filter_config = FilterConfig(**summary["suggested_filter"], workers=config.workers,
                                     disabled=("near_duplicate",))
        report = run_filter(manifest, out / "filtered", filter_config, output="manifest")
        manifest = Path(report["outputs"]["manifest"])
        timings["filter"] = time.monotonic() - started
    return manifest, summary, report


def train_tokenizer(config: DemoConfig, manifest: Path, folder: Path, timings: dict):
    """A WordPiece vocabulary trained on the training captions, as the paper trains its own."""
    from openalign.data import sources
    from openalign.processing.tokenizer import train_wordpiece

    started = time.monotonic()
    captions = [record.caption for record in sources.iter_records(manifest) if record.caption]
    tokenizer = train_wordpiece(captions, config.vocab_size, folder, cap=True)
    timings["tokenizer"] = time.monotonic() - started
    return tokenizer


PRECISIONS = ("auto", "fp32", "bf16")

# Other processes keeping at least this many cores busy on average make a run "busy" in the report.
BUSY_CORES = 0.25


def machine_sharing(sharing: dict, busy_at_start: float | None, steps: int) -> dict:
    """metrics.json's `machine`: how busy other processes kept the cores when the demo started and while it
    trained (curation included), the share of its threads' CPU time the demo got, and the steps it would have
    trained at its full share in the same time (an upper estimate: steps / share; with passive OpenMP waiting a
    quiet machine does not give the whole share either)."""
    share = min(1.0, sharing["share"])
    others = sharing["others_cores"]
    busy = (others is not None and others >= BUSY_CORES) or (busy_at_start or 0.0) >= BUSY_CORES
    return {"busy": busy, "busy_cores_at_start": busy_at_start, "others_cores_while_training": others,
            "cpu_share": share, "training_wall_seconds": sharing["wall_seconds"], "steps": steps,
            "steps_at_full_share": round(steps / share) if busy and share > 0 else steps}


def _validate(config: DemoConfig) -> None:
    """Raise ConfigError naming the first setting run_demo cannot work with."""
    from openalign.demo.curation import CURATIONS

    if config.minutes <= 0:
        raise ConfigError(f"minutes must be positive, got {config.minutes}")
    if not 0.0 <= config.image_ssl_warmup <= 1.0:
        raise ConfigError(f"image_ssl_warmup is a fraction of the training steps in [0, 1], got "
                          f"{config.image_ssl_warmup}")
    if config.curation not in CURATIONS:
        raise ConfigError(f"curation {config.curation!r} is not one of {', '.join(CURATIONS)}")
    if config.precision not in PRECISIONS:
        raise ConfigError(f"precision {config.precision!r} is not one of {', '.join(PRECISIONS)}")


def plan_training(config: DemoConfig, manifest: Path, kept: int, bootstrap_steps: int, model_config,
                  model_config_path: Path, tokenizer, out: Path, seconds_left, timings: dict):
    """(config with the image term's weight decided, training steps, the probe's step times or None). With
    `config.steps` the steps are what the bootstrap scorer left of them; else a probe of real batches times a
    step and the steps that fit in `seconds_left()` are planned, the image term on only when the whole run
    (the scorer's steps counted) is long enough for it."""
    if config.steps is not None:
        total_steps = max(1, config.steps - bootstrap_steps)  # --steps counts the scorer's steps too
        return (dataclasses.replace(config, image_ssl_weight=image_ssl_weight_for(config, config.steps)),
                total_steps, None)
    measure_started = time.monotonic()

    def probe_and_plan(weight: float) -> tuple[dict, int]:
        probe_config = training_config(dataclasses.replace(config, image_ssl_weight=weight), manifest,
                                       out / "tokenizer", model_config_path, out / "run", 1, 1.0)
        seconds = measure_step_seconds(model_config, probe_config, tokenizer)
        return seconds, planned_steps(seconds_left(), seconds, kept // config.batch_size,
                                      cached=probe_config.data.cache_images)

    weight = image_ssl_weight_for(config, IMAGE_SSL_MIN_STEPS)  # the weight of a run long enough for the term
    step_seconds, total_steps = probe_and_plan(weight)
    if image_ssl_weight_for(config, bootstrap_steps + total_steps) != weight:  # too short for the term
        weight = image_ssl_weight_for(config, bootstrap_steps + total_steps)
        step_seconds, total_steps = probe_and_plan(weight)
    timings["throughput_probe"] = time.monotonic() - measure_started
    return dataclasses.replace(config, image_ssl_weight=weight), total_steps, step_seconds


def evaluate_model(model_dir: Path, out: Path, heldout_rows: list, seen_rows: list, summary: dict):
    """(the held-out figures, with the seen pairs' and the composition figures when there are seen rows; the
    encoders of the model, for the heat-map)."""
    from openalign.demo import evaluate
    from openalign.inference.encoders import load_encoders

    encoders = load_encoders(model_dir, device="cpu", batch_size=64, optimize=False)
    held_embeds = evaluate.encode_split(encoders, heldout_rows, out / "data" / "heldout")
    held = evaluate.evaluate_split(encoders, heldout_rows, out / "data" / "heldout", summary, held_embeds)
    if seen_rows:  # how much of the held-out error is composition, and which tower fails to compose
        seen_embeds = evaluate.encode_split(encoders, seen_rows, out / "data" / "seen")
        held["seen_pairs"] = evaluate.evaluate_split(encoders, seen_rows, out / "data" / "seen", summary, seen_embeds)
        held["composition"] = evaluate.composition_figures(seen_embeds, seen_rows, held_embeds, heldout_rows,
                                                           summary, encoders.encode_texts)
    return held, encoders


def run_demo(config: DemoConfig) -> DemoResult:
    """Generate, filter, train and evaluate as `config` says; returns the held-out figures and file paths.

    The output folder holds model/ (checkpoint and processor, loadable by AlignModel.from_pretrained, by
    transformers and by AlignProcessor.from_pretrained), plots/, heatmap.png, report.md and metrics.json, next
    to the working folders data/, filtered/, tokenizer/ and run/.
    """
    import torch

    from openalign.demo import evaluate, report
    from openalign.demo.curation import curation_summary, detection_figures, similarity_curation
    from openalign.runtime import CpuWatch, busy_cores_at_start
    from openalign.train.trainer import train

    _validate(config)
    torch.set_num_threads(config.workers)
    started = time.monotonic()
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("data", "filtered", "oracle", "curation", "tokenizer", "run", "model", "plots"):  # start clean
        shutil.rmtree(out / stale, ignore_errors=True)
    timings: dict[str, float] = {}

    _log(config.progress, f"generating {config.n} training and {config.heldout_n} held-out pairs")
    manifest, summary, filter_report = prepare_data(config, out, timings)
    if filter_report is not None:
        _log(config.progress, f"{'the generator' if config.curation == 'oracle' else 'filters'} kept "
                              f"{filter_report['kept']} of {filter_report['total']} pairs")
    tokenizer = train_tokenizer(config, manifest, out / "tokenizer", timings)
    model_config = config.model_config(tokenizer.vocab_size)
    model_config_path = out / "model_config.json"
    model_config.to_json_file(model_config_path)
    started_precision = time.monotonic()
    config, precision = resolve_precision(config, manifest, model_config, model_config_path, tokenizer, out)
    timings["precision_probe"] = time.monotonic() - started_precision
    _log(config.progress, f"training in {config.precision} ({precision['chosen_by']}"
                          + "".join(f", {name} {seconds:.2f} s/step" for name, seconds in
                                    precision.get("seconds", {}).items()) + ")")

    heldout_rows = evaluate.read_rows(out / "data" / "heldout" / "manifest.jsonl")
    seen_rows = evaluate.read_rows(out / "data" / "seen" / "manifest.jsonl") if config.seen_n else []
    evaluation_reserve = EVALUATION_FIXED_SECONDS + EVALUATION_SECONDS_PER_IMAGE * (len(heldout_rows) + len(seen_rows))

    def seconds_left() -> float:
        return config.minutes * 60 - (time.monotonic() - started) - evaluation_reserve

    watch = CpuWatch(torch.get_num_threads()).start()  # how the machine was shared while the demo trained
    curation = None
    if config.curation == "similarity":
        _log(config.progress, "bootstrap curation: a scorer trained on the filtered pairs scores each of them")
        curation = similarity_curation(config, manifest, filter_report["kept"], tokenizer, model_config,
                                       model_config_path, out, seconds_left, timings)
        manifest = curation["manifest"]
        last = curation["rounds"][-1]
        _log(config.progress, f"the scorer ({curation['bootstrap_steps']} steps) kept {last['kept']} of "
                              f"{last['scored']} pairs")
    # The pairs trained on, as the stage that wrote the manifest counted them.
    kept = curation["rounds"][-1]["kept"] if curation else filter_report["kept"] if filter_report else summary["n"]
    bootstrap_steps = curation["bootstrap_steps"] if curation else 0

    config, total_steps, step_seconds = plan_training(config, manifest, kept, bootstrap_steps, model_config,
                                                      model_config_path, tokenizer, out, seconds_left, timings)
    train_seconds = seconds_left()
    if train_seconds < 10:
        raise ConfigError(f"--minutes {config.minutes} leaves {train_seconds:.0f} s for training after data "
                          f"preparation{', curation' if curation else ''} and evaluation; give it more time or "
                          "fewer images")
    _log(config.progress, f"training {total_steps} steps of {config.batch_size} in at most {train_seconds:.0f} s"
                          + (f" (measured a step: model {step_seconds['model']:.2f} s, loading "
                             f"{step_seconds['load']:.2f} s, {step_seconds['decode']:.2f} s of it decoding; "
                             "the count is re-planned from the steps' own times early in training)"
                             if step_seconds else ""))
    train_config = training_config(config, manifest, out / "tokenizer", model_config_path, out / "run",
                                   total_steps, train_seconds / 60)
    if curation:  # go on from the scorer's weights: its steps are part of the training
        train_config.model.init_from = curation["model"]
    training_started = time.monotonic()
    result = train(train_config)
    timings["train"] = time.monotonic() - training_started
    sharing = watch.stop()

    evaluation_started = time.monotonic()
    model_dir = out / "model"
    shutil.copytree(out / "run" / "model", model_dir)  # weights and processor: the trainer saved both
    if (out / "run" / "plots").is_dir():
        shutil.copytree(out / "run" / "plots", out / "plots")
    held, encoders = evaluate_model(model_dir, out, heldout_rows, seen_rows, summary)
    # The run's own per-pair estimates against the generator's labels, on the pairs it trained on.
    detection = detection_figures(out / "run" / "pair-scores", manifest)
    timings["evaluate"] = time.monotonic() - evaluation_started
    timings["total"] = time.monotonic() - started
    metrics = {
        **held, "minutes": timings["total"] / 60,
        "training": {"steps": result.step, "planned_steps": total_steps, "bootstrap_steps": bootstrap_steps,
                     "steps_with_bootstrap": bootstrap_steps + result.step,
                     "replanned_steps": result.metrics.get("total_steps"), "stop_reason": result.stop_reason,
                     "probe_seconds_per_step": step_seconds, "precision": precision,
                     "samples_per_s": result.step * config.batch_size / timings["train"],
                     "samples_seen": result.step * config.batch_size,
                     "final_loss": result.metrics.get("loss"), "temperature": result.metrics.get("temperature")},
        "data": {"train_pairs": summary["n"], "heldout_pairs": len(heldout_rows), "seen_pairs": len(seen_rows),
                 "kept_after_rules": filter_report["kept"] if filter_report and config.curation != "oracle" else None,
                 "kept_after_filter": kept,
                 "noise_counts": summary["noise_counts"], "clean_renderings": summary.get("clean_renderings", {}),
                 "heldout_colour_shape_pairs": summary["heldout_pairs"]},
        "curation": {**curation_summary(config.curation, curation), "detection": detection},
        "config": dataclasses.asdict(config),
        "seconds": {name: round(value, 1) for name, value in timings.items()},
        "threads": {"torch": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
        "machine": machine_sharing(sharing, busy_cores_at_start(), bootstrap_steps + result.step),
    }
    heatmap = report.write_heatmap(out / "heatmap.png", encoders, heldout_rows, out / "data" / "heldout",
                                   summary["heldout_pairs"])
    timings["total"] = time.monotonic() - started
    metrics["minutes"] = timings["total"] / 60
    metrics["seconds"]["total"] = round(timings["total"], 1)
    files = report.write_report(out, metrics, filter_report)
    files.update(model=model_dir, heatmap=heatmap, plots=out / "plots")
    return DemoResult(out, metrics, timings, files)
