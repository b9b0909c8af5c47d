"""Training end to end on generated pairs: the tiny model learns, corrupt shard samples are counted, the time
budget stops a run with a checkpoint, plots come out of `openalign plot`."""

from __future__ import annotations

import dataclasses
import json
import math
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from openalign import losses
from openalign.cli import main as cli_main
from openalign.data.sources import Record, iter_records, write_shards
from openalign.models.align import AlignModel
from openalign.train.checkpointing import list_checkpoints, load_trainer_state, verify_checkpoint
from openalign.train.run_log import read_metrics
from openalign.train.trainer import train
from tests.train_data import make_data, tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"), num_pairs=320)


@pytest.fixture(scope="module")
def learned_run(data, tmp_path_factory):
    """70 steps of batch 32 (7 epochs of 320 pairs), validated on 128 training pairs at steps 35 and 70."""
    run_dir = tmp_path_factory.mktemp("learn") / "run"
    config = tiny_config(data, run_dir, **{
        "optim.total_steps": 70, "optim.batch_size": 32, "optim.warmup_steps": 3, "optim.lr": 4e-3,
        "run.checkpoint_every": 30, "run.log_every": 10, "run.plots": True,
        "model.batch_norm_momentum": 0.9,  # evaluation uses running statistics: let them follow 70 steps
        "data.val": data["train"], "data.val_max_samples": 128, "run.val_every": 35,
    })
    return train(config)


def test_tiny_model_loss_falls_and_retrieval_beats_chance(learned_run):
    records = read_metrics(learned_run.run_dir)
    losses = [record["loss"] for record in records if "loss" in record]
    assert len(losses) == 7  # every 10 steps
    # Measured: about 3.55 over the first 20 steps, 2.7 over the last 20 (ln 32 = 3.47).
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.5, losses
    final = learned_run.metrics
    assert final["step"] == 70 and final["val_num_pairs"] == 128
    # Measured: R@10 about 40-48% in both directions; chance is 7.8%.
    chance_at_10 = 10 / 128
    for direction in ("image_to_text", "text_to_image"):
        assert final[f"val_{direction}_r10"] > 3 * chance_at_10, final
    # The saved model is a transformers-layout checkpoint that loads.
    model = AlignModel.from_pretrained(learned_run.run_dir / "model")
    assert float(model.temperature.detach()) == pytest.approx(final["temperature"])


def test_plot_command_writes_pngs(learned_run, tmp_path):
    assert (learned_run.run_dir / "plots" / "loss.png").stat().st_size > 0  # written at the end of the run
    assert cli_main(["plot", str(learned_run.run_dir), "--out", str(tmp_path)]) == 0
    names = sorted(path.name for path in tmp_path.glob("*.png"))
    assert names == ["learning_rate.png", "loss.png", "temperature.png", "val_recall.png"]


def test_plots_draw_temperature_on_a_linear_axis_and_chance_as_a_dashed_line(learned_run, tmp_path, monkeypatch):
    from openalign.train import plots

    figures = {}
    monkeypatch.setattr(plots, "save_figure", lambda figure, path: figures.setdefault(path.stem, figure) and path)
    plots.plot_run(learned_run.run_dir, tmp_path)
    assert figures["temperature"].axes[0].get_yscale() == "linear"
    recall = figures["val_recall"].axes[0]
    assert recall.get_ylim() == (0.0, 1.0) and "fraction" in recall.get_ylabel()
    [chance] = [line for line in recall.get_lines() if line.get_label().startswith("chance")]
    assert chance.get_linestyle() == "--" and set(chance.get_ydata()) == {1 / 128}  # a constant, not a series
    assert all(line.get_linestyle() == "-" for line in recall.get_lines() if line is not chance)


def test_a_single_validation_is_a_point_at_its_step_on_an_axis_spanning_the_run(tmp_path, monkeypatch):
    from openalign.train import plots

    records = [{"step": step, "loss": 4 - step / 100, "temperature": 0.07, "lr": 1e-3} for step in range(10, 251, 10)]
    records.append({"step": 250, "val_loss": 3.9, "val_image_to_text_r1": 0.05, "val_image_to_text_r5": 0.2,
                    "val_text_to_image_r1": 0.04, "val_text_to_image_r5": 0.18, "val_chance_r1": 1 / 60})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    figures = {}
    monkeypatch.setattr(plots, "save_figure", lambda figure, path: figures.setdefault(path.stem, figure) and path)
    plots.plot_run(tmp_path)
    recall = figures["val_recall"].axes[0]
    points = [line for line in recall.get_lines() if not line.get_label().startswith("chance")]
    assert len(points) == 4 and all(line.get_linestyle() == "None" and line.get_marker() == "o" for line in points)
    assert "(0.05)" in points[0].get_label()  # the value, since there is no curve to read it from
    left, right = recall.get_xlim()
    assert left == 0 and right >= 250  # the point sits at the end of the run, not alone in an empty axis
    loss_lines = figures["loss"].axes[0].get_lines()
    assert [line.get_linestyle() for line in loss_lines if line.get_label().startswith("validation")] == ["None"]


def test_the_end_of_a_run_says_how_far_it_got_and_what_a_usable_model_takes(learned_run):
    from openalign.train.config import load_config
    from openalign.train.outcome import describe_run

    config = load_config(learned_run.run_dir / "config.yaml")
    said = describe_run(learned_run, config)
    metrics = learned_run.metrics
    times = (metrics["val_image_to_text_r1"] + metrics["val_text_to_image_r1"]) / 2 / metrics["val_chance_r1"]
    assert f"mean R@1 is {times:.1f} times chance: it has learnt something" in said
    assert "this run: 70 steps of 32 over 320 pairs; the demo's usable model took about 1,000 steps of 256" in said
    at_chance = dataclasses.replace(learned_run, metrics={**metrics, "val_image_to_text_r1": 1 / 128,
                                                          "val_text_to_image_r1": 1 / 128})
    assert "1.0 times chance: hardly above it" in describe_run(at_chance, config)


def test_model_and_checkpoints_hold_the_processor_the_run_validated_with(learned_run, data):
    """model/ and every checkpoint carry the tokenizer (cutting where training cut) and the image settings; the
    pixels they give are the validation transform's (the oracle: what the run's recall was measured on)."""
    import warnings

    from openalign.processing.processor import AlignProcessor
    from openalign.train.builders import eval_transform
    from openalign.train.outcome import describe_run
    from tests.train_data import IMAGE_SIZE

    folders = [learned_run.run_dir / "model", *(folder for _, folder in list_checkpoints(learned_run.run_dir))]
    assert len(folders) == 4  # model/ and the checkpoints at steps 30, 60 and 70
    [record] = list(iter_records(data["train"]))[:1]
    image = Image.open(record.image_path).convert("RGB")
    for folder in folders:
        assert (folder / "preprocessor_config.json").is_file() and (folder / "processor_config.json").is_file()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing missing, nothing guessed
            processor = AlignProcessor.from_pretrained(folder)
        assert processor.image_processor.crop_size == {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        assert processor.tokenizer.max_length == 16  # tiny_config's data.max_length, not 64
        pixels = processor(images=[image])["pixel_values"][0]
        assert torch.equal(pixels, eval_transform(image, resize=36, crop=IMAGE_SIZE))
    config = tiny_config(data, learned_run.run_dir)
    text = describe_run(learned_run, config)
    assert f"R@10 {learned_run.metrics['val_image_to_text_r10']:.3f}" in text
    assert str(learned_run.run_dir / "model") in text and "openalign zero-shot -m" in text
    cut = dataclasses.replace(learned_run, step=1, stop_reason="time_budget")  # a budget shorter than the warm-up
    config.run.max_minutes = 0.1
    assert f"within the warm-up of optim.warmup_steps = {config.optim.warmup_steps}:" in describe_run(cut, config)


def test_a_run_without_pairs_or_tokenizer_says_how_to_get_them(data, tmp_path):
    from openalign.errors import ConfigError

    config = tiny_config(data, tmp_path / "run", **{"data.train": "", "data.tokenizer": ""})
    with pytest.raises(ConfigError, match="data.train and data.tokenizer are empty.*openalign data synth"):
        train(config)


def test_shard_folder_with_a_corrupt_sample_is_counted(data, tmp_path):
    records = list(iter_records(data["train"]))[:64]
    records[5] = Record(key="broken", caption="a red circle", image_bytes=b"\x89PNG not really a png",
                        image_ext="png")
    shard_dir = tmp_path / "shards"
    write_shards(records, shard_dir, samples_per_shard=20)
    config = tiny_config(data, tmp_path / "run", **{
        "data.train": shard_dir, "optim.total_steps": 3, "run.checkpoint_every": 3,
        "optim.accumulation": 2,  # exact accumulation through the feature cache, in the real loop
        "loss.name": "clip", "loss.label_smoothing": 0.0,  # a loss that owns its scale
    })
    result = train(config)
    assert result.step == 3 and result.skipped_samples == 1
    assert read_metrics(result.run_dir)[-1]["skipped_samples"] == 1
    state_records = json.loads((result.run_dir / "checkpoint-00000003" / "files.json").read_text())
    assert state_records["step"] == 3


def test_time_budget_stops_with_a_checkpoint(data, tmp_path):
    config = tiny_config(data, tmp_path / "run", **{"run.max_minutes": 1e-6, "optim.total_steps": 50,
                                                    "run.dtype": "bf16", "loss.name": "siglip"})
    result = train(config)
    assert (result.step, result.stop_reason) == (1, "time_budget")
    # SigLIP's scale starts at 10, i.e. temperature 1/10, and moved one step.
    assert result.metrics["loss"] > 0 and result.metrics["temperature"] == pytest.approx(0.1, rel=0.05)
    [(step, folder)] = list_checkpoints(result.run_dir)
    assert step == 1
    verify_checkpoint(folder)


def test_hard_negative_beta_reaches_the_loss(data, tmp_path):
    """The same first batch and initialisation: the weighted loss is higher (close negatives count more)."""
    first_losses = {}
    for beta in (0.0, 3.0):
        config = tiny_config(data, tmp_path / f"beta{beta}", **{
            "optim.total_steps": 1, "optim.warmup_steps": 0, "run.log_every": 1, "loss.hard_negative_beta": beta})
        train(config)
        first_losses[beta] = [record["loss"] for record in read_metrics(tmp_path / f"beta{beta}")][0]
    assert first_losses[3.0] > first_losses[0.0] + 1e-4, first_losses


class _OwnTemperatureLoss(losses.ContrastiveLoss):
    """A loss the trainer has never heard of, registered in losses.LOSSES alone: ALIGN's softmax at a temperature
    of its own (twice the model's to start), which it keeps as a log-scale; it counts the steps it is told of."""

    name = "own-temperature"
    instances: list = []

    def __init__(self, temperature: float):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(-math.log(temperature)))
        self.after_steps = 0
        self.instances.append(self)

    @classmethod
    def from_config(cls, settings, temperature):
        return cls(2 * temperature)

    def forward(self, image_embeds, text_embeds):
        return losses.AlignLoss(label_smoothing=0.0)(image_embeds, text_embeds, torch.exp(-self.logit_scale))

    def after_step(self):
        self.after_steps += 1


def test_a_loss_registered_in_losses_alone_trains_as_it_declares(data, tmp_path, monkeypatch):
    monkeypatch.setitem(losses.LOSSES, _OwnTemperatureLoss.name, _OwnTemperatureLoss)
    _OwnTemperatureLoss.instances.clear()
    config = tiny_config(data, tmp_path / "run", **{"loss.name": "own-temperature", "optim.total_steps": 3,
                                                    "run.checkpoint_every": 3, "optim.warmup_steps": 0})
    result = train(config)
    [loss] = _OwnTemperatureLoss.instances
    assert result.step == 3 and loss.after_steps == 3
    temperature = math.exp(-loss.logit_scale.item())
    assert temperature != pytest.approx(0.2, abs=1e-5)  # it trained its own temperature...
    assert result.metrics["temperature"] == pytest.approx(temperature)  # ...and the logs report that one
    model = AlignModel.from_pretrained(result.run_dir / "model")
    assert model.temperature.item() == pytest.approx(0.1)  # the model's stayed where it started
    saved = load_trainer_state(result.run_dir / "checkpoint-00000003")["loss"]
    assert saved["logit_scale"].item() == loss.logit_scale.item()


def test_time_fit_plans_as_many_steps_as_the_budget_holds():
    from openalign.train.schedule import TimeFit

    def plans(step_seconds, every=1):
        now = [0.0]
        fit = TimeFit(100.0, warmup_steps=5, clock=lambda: now[0], every=every)
        total, out = 1000, {}
        for step in range(1, 151):
            now[0] += step_seconds(step)
            total = fit.replan(step, total, elapsed=now[0])
            out[step] = total
        return out

    steady = plans(lambda step: 0.5)
    assert steady[5] == 1000  # steps 2-5 timed (the first is left out): too few for a plan
    assert set(steady[step] for step in range(6, 151)) == {196}  # 0.98 x 100 s / 0.5 s: ends with the budget
    slow_start = plans(lambda step: 1.0 if step <= 20 else 0.5)  # a first epoch slowed by decoding
    # step + (0.98 x 100 s - elapsed) / mean of the last 30 step times (steps 2-31: 19 slow, 11 fast)
    assert slow_start[31] == 31 + math.floor((98.0 - 25.5) / ((19 * 1.0 + 11 * 0.5) / 30)) == 119
    changes = [step for step in range(7, 151) if slow_start[step] != slow_start[step - 1]]
    assert changes and all(slow_start[step] > slow_start[step - 1] for step in changes[14:])  # faster steps, more
    # Re-planned at every window (here every 10 steps) and only then, to the end.
    windowed = plans(lambda step: 1.0 if step <= 20 else 0.5, every=10)
    assert all(windowed[step] == windowed[step - 1] for step in range(11, 151) if step % 10)
    assert windowed[150] == slow_start[150]


def test_time_fit_follows_a_load_change_mid_run_and_ends_the_schedule_with_the_time():
    """The machine becomes 3x slower half-way (another job starts): a plan made at the start would overrun by
    half; re-planned at every window, the run still takes its last step near the budget with the rate near 0,
    and the rate never jumps."""
    from openalign.train.schedule import TimeFit, build_scheduler, set_total_steps

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, warmup_steps=10, total_steps=10**6, kind="cosine")
    now = [0.0]
    fit = TimeFit(100.0, warmup_steps=10, clock=lambda: now[0], every=10)
    total, step, rates = 10**6, 0, []
    while step < total and now[0] < 100.0:
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        step += 1
        now[0] += 0.1 if now[0] < 50.0 else 0.3
        planned = fit.replan(step, total, elapsed=now[0])
        if planned != total:
            total = planned
            set_total_steps(scheduler, planned, from_step=step)
    assert step == total, "the time ran out before the schedule ended"
    assert 0.95 * 100.0 <= now[0] <= 100.0
    assert rates[-1] < 0.01
    jumps = [abs(b - a) for a, b in zip(rates[10:], rates[11:])]
    assert max(jumps) < 0.02  # the decay is smooth through every re-plan


def test_set_total_steps_during_the_decay_keeps_the_rate_and_ends_at_the_new_total():
    from openalign.train.schedule import build_scheduler, set_total_steps

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, warmup_steps=2, total_steps=100, kind="cosine")
    for _ in range(50):
        optimizer.step()
        scheduler.step()
    before = scheduler.lr_lambdas[0](50)
    set_total_steps(scheduler, 70, from_step=50)
    assert scheduler.lr_lambdas[0](50) == pytest.approx(before)  # the same rate where it was re-pointed
    assert scheduler.lr_lambdas[0](70) == pytest.approx(0.0)  # and the decay ends at the new total
    rates = [scheduler.lr_lambdas[0](step) for step in range(50, 71)]
    assert all(b < a for a, b in zip(rates, rates[1:]))


def test_time_fit_plans_during_a_long_warm_up():
    """The warm-up's rates do not depend on the total, so the plan (and the progress bar's total) need not wait
    for it: with 50 warm-up steps the first plan comes at step 6, once five steps after the first are timed."""
    from openalign.train.schedule import TimeFit

    now = [0.0]
    fit = TimeFit(100.0, warmup_steps=50, clock=lambda: now[0])
    total, plans = 1000, {}
    for step in range(1, 41):
        now[0] += 0.5
        total = fit.replan(step, total, elapsed=now[0])
        plans[step] = total
    assert plans[5] == 1000 and plans[6] == 196  # 0.98 x 100 s / 0.5 s


def test_fit_steps_to_time_ends_the_schedule_with_the_budget_when_the_machine_slows_mid_run(data, tmp_path,
                                                                                           monkeypatch):
    """5,000 steps asked for, 12 seconds given, and from the sixth second on every step takes 30 ms more (another
    job takes the cores): the run re-plans at every log window and still ends its cosine near the budget, as
    planned (a time budget fits the steps to itself unless run.fit_steps_to_time says false)."""
    from openalign.train.loop import Stepper

    started = time.monotonic()
    step = Stepper.step

    def slower_after_six_seconds(self, batch, step_number):
        if time.monotonic() - started > 6.0:
            time.sleep(0.03)
        return step(self, batch, step_number)

    monkeypatch.setattr(Stepper, "step", slower_after_six_seconds)
    config = tiny_config(data, tmp_path / "fit", **{
        "optim.total_steps": 5000, "optim.warmup_steps": 2, "run.log_every": 5, "run.checkpoint_every": 10**6,
        "run.max_minutes": 0.2})
    assert config.run.fit_steps_to_time
    result = train(config)
    planned = result.metrics["total_steps"]
    assert planned < 5000
    assert result.stop_reason == "finished" and result.step == planned  # the schedule ended as re-planned
    from openalign.train.outcome import describe_run

    assert "the schedule ended as planned" in describe_run(result, config).splitlines()[0]
    records = [record for record in read_metrics(result.run_dir) if "lr" in record]
    assert len({record["total_steps"] for record in records}) > 1  # the plan moved with the machine
    assert records[-1]["lr"] <= 0.15 * config.optim.lr  # near the end of the cosine, not cut off at full rate
    assert records[-1]["elapsed_s"] >= 0.6 * 12


@pytest.mark.parametrize("resize, crop", [(36, 32), (346, 289), (32, 32), (37, 32)])
def test_validation_pixels_are_the_square_resize_centre_crop_and_rescale(resize, crop):
    """Validation goes through the evaluation processor; the result is, to the bit, the steps written out here:
    PIL bilinear square resize, centre crop box, x / 127.5 - 1 in float32."""
    from openalign.train.builders import eval_transform

    generator = np.random.default_rng(0)
    for height, width in [(40, 50), (300, 200), (32, 32)]:
        image = Image.fromarray(generator.integers(0, 256, (height, width, 3), dtype=np.uint8))
        resized = image.resize((resize, resize), Image.BILINEAR)
        offset = (resize - crop) // 2
        cropped = np.asarray(resized.crop((offset, offset, offset + crop, offset + crop)), dtype=np.float32)
        expected = torch.from_numpy(cropped).permute(2, 0, 1) / 127.5 - 1.0  # (3, crop, crop)
        assert torch.equal(eval_transform(image, resize=resize, crop=crop), expected)
