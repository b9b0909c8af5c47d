"""Run checkpoints: atomic folders, keep-last pruning, damaged checkpoints refused with the previous one used,
RNG states restored; and the step guard that keeps non-finite losses away from the weights."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from openalign.errors import CheckpointError
from openalign.model_config import get_preset
from openalign.models.align import AlignModel
from openalign.train import checkpointing
from openalign.train.loop import NonFiniteLossError, Stepper


@pytest.fixture(scope="module")
def model():
    return AlignModel(get_preset("tiny"))


def _state(step: int) -> dict:
    return {"step": step, "rng": [checkpointing.rng_state()], "values": torch.arange(step)}


def test_save_keep_last_and_load(model, tmp_path):
    for step in (2, 4, 6):
        checkpointing.save_checkpoint(tmp_path, step, model, _state(step), keep_last=2)
    assert [step for step, _ in checkpointing.list_checkpoints(tmp_path)] == [4, 6]
    assert not list(tmp_path.glob(".checkpoint-*"))  # no temporary folder left behind
    latest = checkpointing.resolve_checkpoint(tmp_path, "latest")
    assert latest.name == "checkpoint-00000006"
    state = checkpointing.load_trainer_state(latest)
    assert state["step"] == 6 and torch.equal(state["values"], torch.arange(6))
    loaded = AlignModel.from_pretrained(latest)  # a transformers-layout model folder
    assert torch.equal(loaded.text_projection.weight, model.text_projection.weight)


@pytest.mark.parametrize("damage", ["truncate", "delete", "unfinished"])
def test_damaged_latest_falls_back_to_previous(model, tmp_path, damage):
    for step in (1, 2):
        checkpointing.save_checkpoint(tmp_path, step, model, _state(step))
    newest = tmp_path / "checkpoint-00000002"
    if damage == "truncate":
        weights = newest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "delete":
        (newest / "trainer_state.pt").unlink()
    else:
        (newest / "files.json").unlink()  # as if the process died before finishing the folder
    with pytest.raises(CheckpointError, match="checkpoint-00000002"):
        checkpointing.verify_checkpoint(newest)
    with pytest.raises(CheckpointError, match="checkpoint-00000002"):
        checkpointing.resolve_checkpoint(tmp_path, str(newest))
    assert checkpointing.resolve_checkpoint(tmp_path, "latest").name == "checkpoint-00000001"


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        checkpointing.resolve_checkpoint(tmp_path, "latest")


def test_rng_state_roundtrip_through_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    torch.save({"rng": checkpointing.rng_state()}, tmp_path / "state.pt")
    expected = random.random(), np.random.rand(), torch.rand(3)
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    checkpointing.set_rng_state(torch.load(tmp_path / "state.pt", weights_only=True)["rng"])
    got = random.random(), np.random.rand(), torch.rand(3)
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.image = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
        self.text = nn.Linear(4, 3)

    def forward(self, pixel_values, input_ids, attention_mask, token_type_ids):
        return self.image(pixel_values), self.text(input_ids)


def _stepper(policy: str, poison: bool):
    torch.manual_seed(0)
    toy = _Toy()
    optimizer = torch.optim.SGD(toy.parameters(), lr=0.1)

    def loss_fn(image, text):
        loss = (image - text).pow(2).mean()
        return loss * float("nan") if poison else loss

    norm = toy.image[1]
    stepper = Stepper(
        features=toy, loss_fn=loss_fn, optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
        scaler=torch.amp.GradScaler("cpu", enabled=False), parameters=list(toy.parameters()), nan_policy=policy,
        norm_buffers=[norm.running_mean, norm.running_var, norm.num_batches_tracked],
    )
    batch = {"pixel_values": torch.randn(8, 4), "input_ids": torch.randn(8, 4),
             "attention_mask": torch.ones(8), "token_type_ids": torch.zeros(8)}
    return toy, stepper, batch


def test_nan_loss_halts_without_touching_weights():
    toy, stepper, batch = _stepper("halt", poison=True)
    before = {key: value.clone() for key, value in toy.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match=r"step 7: non-finite loss .*nan"):
        stepper.step(batch, 7)
    for key, value in toy.state_dict().items():
        if "running" not in key and "num_batches" not in key:  # halting leaves the run; statistics may move
            assert torch.equal(value, before[key]), key


def test_nan_loss_skipped_keeps_weights_and_batchnorm_statistics():
    toy, stepper, batch = _stepper("skip", poison=True)
    before = {key: value.clone() for key, value in toy.state_dict().items()}
    result = stepper.step(batch, 1)
    assert result.skipped and not np.isfinite(result.loss)
    for key, value in toy.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(parameter.grad is None for parameter in toy.parameters())
    # The same batch without the poison does update: the check above can fail.
    toy, stepper, batch = _stepper("skip", poison=False)
    weight = toy.text.weight.clone()
    assert not stepper.step(batch, 1).skipped
    assert not torch.equal(toy.text.weight, weight)
