"""A run killed with SIGKILL mid-epoch and resumed with `--resume latest` equals one never interrupted: the
same losses, temperatures and learning rates at every step and the same final weights, bit for bit (CPU,
num_workers=0, same thread count)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from openalign.pretrained import read_state_dict
from openalign.train.run_log import read_metrics
from tests.train_data import make_data, tiny_config

TOTAL_STEPS, CHECKPOINT_EVERY = 10, 4
COMPARED = ("loss", "temperature", "lr", "grad_norm", "epoch", "skipped_samples")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 96 pairs, batch 16: 6 steps an epoch, so the kill (after step 4) is mid-epoch and the run crosses an epoch.
    return make_data(tmp_path_factory.mktemp("data"), num_pairs=96)


def _write_config(data, run_dir: Path, extra: dict) -> Path:
    config = tiny_config(data, run_dir, **{
        "optim.total_steps": TOTAL_STEPS, "run.checkpoint_every": CHECKPOINT_EVERY, "run.keep_last": 2,
        "data.flip": True,  # augmentation randomness must replay too
        "run.ema_decay": 0.8,  # the weight average resumes too
        **extra,
    })
    run_dir.mkdir(parents=True)
    return config.save(run_dir.parent / f"{run_dir.name}.yaml")


def _command(config_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "openalign", "train", "--config", str(config_path), *extra]


def _environment() -> dict[str, str]:
    # One thread in every run: the same reduction order, hence bit-identical floats.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _train_steps(records):
    return {record["step"]: record for record in records if "loss" in record}


# The image term adds a head (trainer state), second views (RNG) and a logged share of the loss; per-pair
# weighting adds the per-pair estimates (trainer state) that weigh the loss from the warm-up's end on.
PAIR_WEIGHTING = {"loss.name": "rince", "loss.pair_weighting": "mixture", "loss.pair_weighting_warmup": 0.2,
                  "loss.pair_mixture_every": 2, "loss.pair_ema_momentum": 0.3}


@pytest.mark.parametrize("extra", [{}, {"loss.image_ssl_weight": 0.5, "loss.image_ssl_images": 8}, PAIR_WEIGHTING],
                         ids=["contrastive", "with-image-ssl", "pair-weighting"])
def test_sigkill_then_resume_matches_uninterrupted_run(data, tmp_path, extra):
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(_command(_write_config(data, reference_dir, extra)), check=True, env=_environment(),
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)

    config_path = _write_config(data, killed_dir, extra)
    process = subprocess.Popen(_command(config_path), env=_environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    # Kill once a step past the first checkpoint is logged: the run is mid-epoch, between checkpoints.
    while time.monotonic() < deadline and process.poll() is None:
        if any(record.get("step", 0) > CHECKPOINT_EVERY for record in read_metrics(killed_dir)):
            os.kill(process.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed; make it longer"
    killed_steps = max(record["step"] for record in read_metrics(killed_dir))
    assert CHECKPOINT_EVERY < killed_steps < TOTAL_STEPS
    assert not (killed_dir / "model").exists()

    resumed = subprocess.run(_command(config_path, "--resume", "latest"), env=_environment(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr

    reference, resumed_records = read_metrics(reference_dir), read_metrics(killed_dir)
    reference_steps, resumed_steps = _train_steps(reference), _train_steps(resumed_records)
    assert sorted(resumed_steps) == list(range(1, TOTAL_STEPS + 1)) == sorted(reference_steps)
    for step in reference_steps:
        for key in COMPARED + (("image_ssl_loss",) if "loss.image_ssl_weight" in extra else ()):
            assert resumed_steps[step][key] == reference_steps[step][key], (step, key)
    # The loss did move: equal curves are not two constant ones.
    assert len({record["loss"] for record in reference_steps.values()}) > 1

    for folder in ("model", "model-ema"):
        final_reference, final_resumed = read_state_dict(reference_dir / folder), read_state_dict(killed_dir / folder)
        assert final_reference.keys() == final_resumed.keys()
        differing = [key for key in final_reference if not torch.equal(final_reference[key], final_resumed[key])]
        assert not differing, f"{folder}: {len(differing)} tensors differ, e.g. {differing[:3]}"
    if extra is PAIR_WEIGHTING:  # the estimates themselves, as the run writes them, and the weighting was on
        scores = [pq.read_table(folder / "pair-scores" / "scores.parquet") for folder in (reference_dir, killed_dir)]
        assert scores[0].num_rows == 96 and scores[0].equals(scores[1])
        assert any(record.get("pairs_mixture_separated") for record in reference_steps.values())
    # keep_last=2: only the two newest checkpoints remain.
    assert sorted(path.name for path in killed_dir.glob("checkpoint-*")) == ["checkpoint-00000008",
                                                                              "checkpoint-00000010"]


def test_sigint_saves_a_checkpoint_and_the_printed_resume_matches_an_uninterrupted_run(data, tmp_path):
    """Ctrl-C long before the first checkpoint (every 1000 steps), sent as a terminal sends it, to the process
    group, data-loader workers included: the run saves a checkpoint at the end of the step in progress, exits 130
    naming it and `--resume latest`, and the printed command continues it bit for bit."""
    extra = {"run.checkpoint_every": 1000, "optim.total_steps": 12, "data.num_workers": 2}
    reference_dir, interrupted_dir = tmp_path / "reference", tmp_path / "interrupted"
    subprocess.run(_command(_write_config(data, reference_dir, extra)), check=True, env=_environment(),
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)

    process = subprocess.Popen(_command(_write_config(data, interrupted_dir, extra)), env=_environment(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if any(record.get("step", 0) >= 3 for record in read_metrics(interrupted_dir)):
            os.killpg(process.pid, signal.SIGINT)
            break
        time.sleep(0.02)
    printed, errors = process.communicate(timeout=120)
    assert process.returncode == 130, errors[-3000:]
    checkpoints = sorted(interrupted_dir.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and not (interrupted_dir / "model").exists()
    stopped_at = int(checkpoints[0].name.split("-")[1])
    assert 3 <= stopped_at < 12, "the run ended before it could be interrupted; make it longer"
    assert max(record["step"] for record in read_metrics(interrupted_dir)) == stopped_at  # the step in progress
    assert f"saved {checkpoints[0]}" in printed and "Traceback" not in errors
    assert errors.count("finishing the step in progress") == 1  # said by the training process, not its workers
    resume = printed.strip().splitlines()[-1].split()
    assert resume[:2] == ["openalign", "train"] and resume[-2:] == ["--resume", "latest"]

    resumed = subprocess.run([sys.executable, "-m", "openalign", *resume[1:]], env=_environment(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference_steps = _train_steps(read_metrics(reference_dir))
    resumed_steps = _train_steps(read_metrics(interrupted_dir))
    assert sorted(resumed_steps) == sorted(reference_steps) == list(range(1, 13))
    for step, record in reference_steps.items():
        assert {key: resumed_steps[step][key] for key in COMPARED} == {key: record[key] for key in COMPARED}, step
    final_reference = read_state_dict(reference_dir / "model")
    final_resumed = read_state_dict(interrupted_dir / "model")
    assert final_reference.keys() == final_resumed.keys()
    assert all(torch.equal(final_reference[key], final_resumed[key]) for key in final_reference)


def _vote_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    from tests.dist_worker import setup

    setup(rank, world_size, port)
    from openalign.distributed import destroy_distributed
    from openalign.train.trainer import _stop_votes

    # (out of time here, interrupted here): only rank 1 got the signal, only rank 0 ran out of time, both, neither.
    votes = [_stop_votes(False, rank == 1), _stop_votes(rank == 0, False), _stop_votes(rank == 0, rank == 1),
             _stop_votes(False, False)]
    Path(out_dir, f"rank-{rank}.json").write_text(json.dumps(votes))
    destroy_distributed()


def test_every_rank_stops_at_the_step_any_rank_was_signalled_at(tmp_path):
    """The trainer's per-step vote: a signal that reached one rank stops all of them, and outranks the budget
    (a rank that stopped alone would leave the others waiting in the next collective)."""
    from tests.dist_worker import spawn

    spawn(_vote_worker, 2, (str(tmp_path),), timeout_s=120)
    expected = [[False, True], [True, False], [False, True], [False, False]]
    assert [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)] == [expected, expected]


def test_a_second_signal_interrupts_at_once():
    from openalign.train.interrupt import StopRequest

    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # Python runs the handler between bytecodes
        assert stop.requested and stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):  # the first signal put the usual handler back
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
