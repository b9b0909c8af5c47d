"""The full align-base architecture (the one slow model test): parameter count and outputs against transformers."""

from __future__ import annotations

import pytest
import torch

from openalign.model_config import AlignConfig, get_preset
from openalign.models.align import AlignModel
from tests.parity import assert_close, randomize

transformers = pytest.importorskip("transformers")

ALIGN_BASE_PARAMETERS = 172_117_841  # transformers' AlignModel for kakaobrain/align-base, text pooler included


@pytest.mark.slow
def test_align_base_matches_transformers():
    torch.manual_seed(0)
    config = get_preset("align-base")
    theirs_config = transformers.AlignConfig.from_dict(config.to_dict())
    from_theirs = AlignConfig.from_dict(theirs_config.to_dict())
    assert from_theirs.vision_config.replace(extra={}) == config.vision_config
    assert from_theirs.text_config.replace(extra={}) == config.text_config
    ours = randomize(AlignModel(config), seed=0).eval()
    assert sum(p.numel() for p in ours.parameters()) == ALIGN_BASE_PARAMETERS
    from_their_config = AlignModel(AlignConfig.from_dict(theirs_config.to_dict()))
    assert sum(p.numel() for p in from_their_config.parameters()) == ALIGN_BASE_PARAMETERS
    del from_their_config

    theirs = transformers.AlignModel(theirs_config).eval()
    assert sum(p.numel() for p in theirs.parameters()) == ALIGN_BASE_PARAMETERS
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not missing and not unexpected

    pixel_values = torch.randn(1, 3, 289, 289, generator=torch.Generator().manual_seed(1))
    input_ids = torch.tensor([[101, 1037, 6302, 1997, 1037, 4937, 102, 0, 0]])
    attention_mask = (input_ids != 0).long()
    with torch.no_grad():
        a = ours(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
        b = theirs(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask)
    assert a.vision_model_output.last_hidden_state.shape == (1, 640, 9, 9)
    assert a.vision_model_output.pooler_output.abs().max() > 0.05
    assert_close(a.vision_model_output.pooler_output, b.vision_model_output.pooler_output, name="image features")
    assert_close(a.image_embeds, b.image_embeds, name="image embeds")
    assert_close(a.text_embeds, b.text_embeds, name="text embeds")
    assert_close(a.logits_per_text, b.logits_per_text, name="logits")
