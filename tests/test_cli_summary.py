"""`openalign summary`: counts equal the instantiated model's, FLOPs equal a hand count for the text tower."""

from __future__ import annotations

import json

import torch

from openalign.cli import main
from openalign.model_config import get_preset
from openalign.models.align import AlignModel
from openalign.summary import model_summary


def test_summary_counts_match_the_model():
    config = get_preset("tiny")
    summary = model_summary(config, text_length=16)
    model = AlignModel(config)
    assert summary["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    assert summary["parameters"]["vision"] == sum(p.numel() for p in model.vision_model.parameters())
    with torch.no_grad():
        features = model.vision_model(torch.zeros(1, 3, 64, 64)).last_hidden_state
    assert summary["vision"]["feature_map"] == list(features.shape[1:])
    # Text tower by hand: per layer 4 H^2 T (q, k, v, out) + 2 T^2 H (scores, context) + 2 H F T (FFN), x2 FLOPs.
    t = config.text_config
    T, H, F = 16, t.hidden_size, t.intermediate_size
    per_layer = 2 * (4 * H * H * T + 2 * T * T * H + 2 * H * F * T)
    expected = t.num_hidden_layers * per_layer + 2 * H * config.projection_dim
    assert abs(summary["text"]["gflops_per_text"] * 1e9 - expected) < 1e-6 * expected


def test_summary_cli_json(capsys):
    assert main(["summary", "tiny", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["parameters"]["total"] == sum(p.numel() for p in AlignModel(get_preset("tiny")).parameters())
