"""Build align-base (or any preset) with the same re-initialised random weights in openalign and transformers."""

from __future__ import annotations

import torch

from openalign.model_config import get_preset
from openalign.models.align import AlignModel
from openalign.models.utils import trainable_init


def randomise_batchnorm(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Random running statistics and affine parameters, so that folding them into the convolutions is tested
    on something other than the identity (trainable_init leaves them at 0 / 1)."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            channels = module.num_features
            with torch.no_grad():
                module.running_mean.copy_(torch.randn(channels, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(channels, generator=generator) * 0.5 + 0.75)
                module.weight.mul_(torch.rand(channels, generator=generator) * 0.4 + 0.8)
                module.bias.copy_(torch.randn(channels, generator=generator) * 0.05)


def build_openalign(preset: str = "align-base", seed: int = 0) -> AlignModel:
    """An eval-mode AlignModel (bert-base-uncased vocabulary) with trainable_init weights, randomised BatchNorm."""
    torch.manual_seed(seed)
    config = get_preset(preset)
    # The benchmark tokenizes with bert-base-uncased; small presets get its vocabulary size.
    config.text_config = config.text_config.replace(vocab_size=30522)
    model = AlignModel(config)
    trainable_init(model)
    randomise_batchnorm(model, torch.Generator().manual_seed(seed))
    return model.eval()


def build_transformers_twin(model: AlignModel):
    """transformers' AlignModel holding exactly `model`'s weights (same parameter names, checked strictly)."""
    import transformers

    config = transformers.AlignConfig.from_dict(model.config.to_dict())
    twin = transformers.AlignModel(config).eval()
    state = model.state_dict()
    result = twin.load_state_dict(state, strict=False)
    unexpected = [key for key in result.unexpected_keys]
    missing = [key for key in result.missing_keys if not key.endswith(("position_ids", "token_type_ids"))]
    if unexpected or missing:
        raise RuntimeError(f"weights do not map onto transformers: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return twin
