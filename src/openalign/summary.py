"""Architecture summary of a config: parameters per tower, feature sizes and FLOPs per image and per text.

FLOPs are counted by running the model on the meta device under `torch.utils.flop_counter`, so even the
largest preset is summarised without allocating its weights. A multiply-add counts as two FLOPs.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from openalign.model_config import AlignConfig
from openalign.models.align import AlignModel
from openalign.models.efficientnet import block_specs
from openalign.models.utils import count_parameters


def read_model_config(name: str) -> AlignConfig:
    """The AlignConfig a name gives: a config.json file, a model folder or hub id (its config.json), or a
    preset name such as "align-base" or "efficientnet-b0+bert-mini"."""
    from openalign.model_config import get_preset
    from openalign.pretrained import resolve_folder

    path = Path(name)
    if path.suffix == ".json":
        return AlignConfig.from_json_file(path)
    if path.is_dir() or (name.count("/") == 1 and not path.exists()):
        return AlignConfig.from_json_file(resolve_folder(name, allow_patterns=["config.json"]) / "config.json")
    return get_preset(name)


def model_summary(config: AlignConfig, text_length: int = 64) -> dict:
    """Parameter counts, feature sizes and GFLOPs (one image at the config's size, one text of `text_length`)."""
    with torch.device("meta"):
        model = AlignModel(config).eval()
        size = config.vision_config.image_size
        pixels = torch.zeros(1, config.vision_config.num_channels, size, size)
        input_ids = torch.zeros(1, text_length, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        features = model.vision_model(pixels).last_hidden_state
    image_flops = counter.get_total_flops()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        hidden = model.text_model.encoder(model.text_model.embeddings(input_ids), None)[0]  # (1, T, H)
        model.text_projection(hidden[:, 0])
    text_flops = counter.get_total_flops()
    vision, text = config.vision_config, config.text_config
    return {
        "parameters": {
            "vision": count_parameters(model.vision_model),
            "text": count_parameters(model.text_model),
            "text_pooler_unused": count_parameters(model.text_model.pooler or torch.nn.Module()),
            "projection_and_temperature": count_parameters(model.text_projection) + 1,
            "total": count_parameters(model),
        },
        "vision": {
            "image_size": size,
            "blocks": len(block_specs(vision)),
            "feature_map": list(features.shape[1:]),
            "embedding_dim": vision.output_channels,
            "gflops_per_image": image_flops / 1e9,
        },
        "text": {
            "layers": text.num_hidden_layers,
            "hidden_size": text.hidden_size,
            "heads": text.num_attention_heads,
            "vocab_size": text.vocab_size,
            "text_length": text_length,
            "embedding_dim": config.projection_dim,
            "gflops_per_text": text_flops / 1e9,
        },
    }


def format_summary(name: str, summary: dict) -> str:
    """A readable block of text for the terminal."""
    p, v, t = summary["parameters"], summary["vision"], summary["text"]
    lines = [
        f"{name}",
        f"  parameters      total {p['total']:,}  (vision {p['vision']:,}, text {p['text']:,} of which unused "
        f"pooler {p['text_pooler_unused']:,}, projection + temperature {p['projection_and_temperature']:,})",
        f"  image tower     {v['blocks']} MBConv blocks at {v['image_size']} px -> feature map "
        f"{'x'.join(map(str, v['feature_map']))} -> {v['embedding_dim']}-d embedding; "
        f"{v['gflops_per_image']:.3g} GFLOP per image",
        f"  text tower      {t['layers']} layers x {t['hidden_size']} wide, {t['heads']} heads, "
        f"vocab {t['vocab_size']:,} -> {t['embedding_dim']}-d embedding; "
        f"{t['gflops_per_text']:.3g} GFLOP per text of {t['text_length']} tokens",
    ]
    return "\n".join(lines)
