"""Two CPU processes under torchrun (gloo): DDP and FSDP2 runs resumed from a checkpoint continue exactly like
the uninterrupted run (per-rank RNG states, data positions, sharded optimiser state), and both strategies
compute the same losses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from openalign.pretrained import read_state_dict
from openalign.train.run_log import read_metrics
from tests.train_data import make_data, tiny_config

TOTAL_STEPS = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"), num_pairs=96)


def _torchrun(config_path, *extra):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "openalign", "train", "--config", str(config_path), *extra]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stderr[-4000:]


def _losses(run_dir):
    return {record["step"]: (record["loss"], record["lr"], record["temperature"])
            for record in read_metrics(run_dir) if "loss" in record}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_rank_resume_equals_uninterrupted(data, tmp_path, strategy):
    def config_for(run_dir):
        config = tiny_config(data, run_dir, **{
            "optim.total_steps": TOTAL_STEPS, "optim.batch_size": 8, "run.checkpoint_every": 3,
            "distributed.strategy": strategy, "data.val": data["val"], "run.val_every": 3,
        })
        run_dir.mkdir(parents=True)
        return config.save(run_dir.parent / f"{run_dir.name}.yaml")

    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    _torchrun(config_for(reference))
    # The run as a kill after step 3 leaves it: the checkpoint, and the log up to it.
    resumed_config = config_for(resumed)
    shutil.copytree(reference / "checkpoint-00000003", resumed / "checkpoint-00000003")
    _torchrun(resumed_config, "--resume", "latest")

    expected, got = _losses(reference), _losses(resumed)
    assert sorted(expected) == list(range(1, TOTAL_STEPS + 1)) and sorted(got) == [4, 5, 6]
    for step in (4, 5, 6):
        assert got[step] == expected[step], step
    final_expected, final_got = read_state_dict(reference / "model"), read_state_dict(resumed / "model")
    assert all(torch.equal(final_expected[key], final_got[key]) for key in final_expected)
    validation = [record for record in read_metrics(resumed) if "val_loss" in record]
    assert [record["step"] for record in validation] == [6] and validation[0]["val_num_pairs"] == 64
