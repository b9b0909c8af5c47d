"""Starting towers from checkpoints (an ALIGN checkpoint, a plain transformers BERT folder) and freezing one
tower LiT-style during training."""

from __future__ import annotations

import pytest
import torch
import transformers

from openalign.model_config import get_preset
from openalign.models.align import AlignModel
from openalign.pretrained import read_state_dict
from openalign.processing.tokenizer import AlignTokenizer
from openalign.train.builders import build_model
from openalign.train.trainer import train
from tests.train_data import make_data, tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"), num_pairs=64)


def test_text_tower_from_a_plain_bert_folder(data, tmp_path):
    text = get_preset("tiny").text_config
    bert_config = transformers.BertConfig(
        vocab_size=100, hidden_size=text.hidden_size, num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads, intermediate_size=text.intermediate_size,
        max_position_embeddings=text.max_position_embeddings,
    )
    torch.manual_seed(3)
    bert = transformers.BertModel(bert_config)
    bert.save_pretrained(tmp_path / "bert")
    model = build_model(tiny_config(data, tmp_path / "run", **{"model.text_init": tmp_path / "bert"}), 100)
    theirs = bert.state_dict()
    ours = model.text_model.state_dict()
    for key in ("embeddings.word_embeddings.weight", "encoder.layer.1.output.dense.weight"):
        assert torch.equal(ours[key], theirs[key]), key


def test_towers_from_an_align_checkpoint(data, tmp_path):
    torch.manual_seed(4)
    source = AlignModel(get_preset("tiny").replace(text_config=get_preset("tiny").text_config.replace(vocab_size=100)))
    source.save_pretrained(tmp_path / "align")
    config = tiny_config(data, tmp_path / "run", **{"model.text_init": tmp_path / "align",
                                                    "model.vision_init": tmp_path / "align"})
    model = build_model(config, 100)
    expected = source.state_dict()
    for key, value in model.state_dict().items():
        if key != "temperature":  # the run's temperature_init wins
            assert torch.equal(value, expected[key]), key


@pytest.mark.parametrize("frozen", ["vision", "text"])
def test_frozen_tower_does_not_change(data, tmp_path, frozen):
    config = tiny_config(data, tmp_path / "run", **{f"model.freeze_{frozen}": True, "optim.total_steps": 2,
                                                    "run.checkpoint_every": 2})
    torch.manual_seed(config.run.seed)  # as train() seeds before building: the run's initial weights
    vocab_size = AlignTokenizer.from_pretrained(data["tokenizer"]).vocab_size
    start = build_model(config, vocab_size).state_dict()
    train(config)
    end = read_state_dict(tmp_path / "run" / "model")
    prefix = "vision_model." if frozen == "vision" else "text_model."
    other = "text_model.encoder" if frozen == "vision" else "vision_model.encoder"
    frozen_keys = [key for key in start if key.startswith(prefix)]
    changed = [key for key in frozen_keys if not torch.equal(start[key], end[key])]
    assert not changed, changed  # BatchNorm statistics included
    assert any(not torch.equal(start[key], end[key]) for key in start if key.startswith(other))
