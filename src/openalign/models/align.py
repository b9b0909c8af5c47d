"""The ALIGN dual encoder: image tower, text tower, text projection of [CLS], and a raw temperature."""

from __future__ import annotations

import torch
from torch import nn

from openalign.losses import align_loss
from openalign.model_config import AlignConfig
from openalign.models.bert import AlignTextModel
from openalign.models.efficientnet import AlignVisionModel
from openalign.models.outputs import AlignOutput
from openalign.pretrained import PretrainedMixin


class AlignModel(PretrainedMixin, nn.Module):
    """ALIGN. `get_image_features` / `get_text_features` return unnormalised embeddings (B, D); `forward`
    returns normalised embeddings, both logits matrices and optionally the label-smoothed symmetric loss."""

    config_class = AlignConfig

    def __init__(self, config: AlignConfig):
        super().__init__()
        self.config = config
        self.text_model = AlignTextModel(config.text_config)
        self.vision_model = AlignVisionModel(config.vision_config)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim)
        self.temperature = nn.Parameter(torch.tensor(float(config.temperature_init_value)))
        self._init_head()

    def init_weights(self) -> None:
        """transformers' initialisation: normal(0, initializer_range) in the towers, xavier for the projection."""
        self.text_model.init_weights()
        self.vision_model.init_weights()
        self._init_head()

    def _init_head(self) -> None:
        nn.init.xavier_uniform_(self.text_projection.weight)
        nn.init.zeros_(self.text_projection.bias)
        with torch.no_grad():
            self.temperature.fill_(self.config.temperature_init_value)

    def gradient_checkpointing_enable(
        self, gradient_checkpointing_kwargs: dict | None = None, *, text: bool = True, vision: bool = True
    ) -> None:
        """Recompute activations in the backward pass, per BERT layer and per MBConv block, on either tower."""
        self.text_model.encoder.gradient_checkpointing = text
        self.vision_model.encoder.gradient_checkpointing = vision

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing_enable(text=False, vision=False)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.text_model.is_gradient_checkpointing or self.vision_model.is_gradient_checkpointing

    def get_text_features(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None):
        """Projected [CLS] state of the last layer, (B, D), not normalised; the last layer computes [CLS] alone."""
        hidden = self.text_model(input_ids, attention_mask, token_type_ids, position_ids,
                                 first_token_only=True).last_hidden_state  # (B, 1, H)
        return self.text_projection(hidden[:, 0])

    def get_image_features(self, pixel_values):
        """Global pool of the last EfficientNet block, (B, D), not normalised."""
        return self.vision_model(pixel_values).pooler_output

    def optimize_for_inference(self, dtype: torch.dtype = torch.float32, compile: bool = False, **options):
        """An eval-only copy ready to embed (folded BatchNorm, channels-last, SDPA, optional bf16 / compile);
        this model is left untouched. See `openalign.inference.optimize.optimize_for_inference`."""
        from openalign.inference.optimize import optimize_for_inference

        return optimize_for_inference(self, dtype=dtype, compile=compile, **options)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        return_loss: bool = False,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        head_mask: torch.Tensor | None = None,
    ) -> AlignOutput | tuple:
        vision_output = self.vision_model(pixel_values, output_hidden_states=output_hidden_states)
        text_output = self.text_model(
            input_ids, attention_mask, token_type_ids, position_ids, head_mask=head_mask,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states,
        )
        image_embeds = vision_output.pooler_output
        text_embeds = self.text_projection(text_output.last_hidden_state[:, 0])
        # No epsilon, as the reference: a zero embedding is a bug upstream, not something to hide.
        image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)  # (B_i, D)
        text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)  # (B_t, D)
        logits_per_text = text_embeds @ image_embeds.t() / self.temperature  # (B_t, B_i)
        output = AlignOutput(
            loss=align_loss(logits_per_text) if return_loss else None,
            logits_per_image=logits_per_text.t(),
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_output,
            vision_model_output=vision_output,
        )
        return output if return_dict else output.to_tuple()
