"""Build align-base (or any preset) with the same re-initialised random weights in openalign and transformers."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from openalign.model_config import get_preset
from openalign.models.align import AlignModel
from openalign.models.utils import trainable_init

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for the tests package
from tests.parity import randomise_batchnorm  # noqa: E402  (the tests' parity helpers: the same random weights)


def build_openalign(preset: str = "align-base", seed: int = 0) -> AlignModel:
    """An eval-mode AlignModel (bert-base-uncased vocabulary) with trainable_init weights, randomised BatchNorm."""
    torch.manual_seed(seed)
    config = get_preset(preset)
    # The benchmark tokenizes with bert-base-uncased; small presets get its vocabulary size.
    config.text_config = config.text_config.replace(vocab_size=30522)
    model = AlignModel(config)
    trainable_init(model)
    randomise_batchnorm(model, torch.Generator().manual_seed(seed), spread=0.25)  # near 1: a deep trunk
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
