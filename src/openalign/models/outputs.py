"""Output dataclasses. Fields are read by name (`out.pooler_output`) or position (`out[1]`), and `to_tuple()`
drops the `None` fields, as transformers' outputs do."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


class ModelOutput:
    def to_tuple(self) -> tuple:
        values = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            values.append(value.to_tuple() if isinstance(value, ModelOutput) else value)
        return tuple(values)

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return tuple(getattr(self, name) for name in self.keys())[key]


@dataclass
class AlignTextOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None  # (B, T, H)
    pooler_output: torch.Tensor | None = None  # (B, H): tanh(dense([CLS])), unused by AlignModel
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings + each layer
    attentions: tuple[torch.Tensor, ...] | None = None  # (B, heads, T, T) per layer


@dataclass
class AlignVisionOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None  # (B, C, h, w)
    pooler_output: torch.Tensor | None = None  # (B, C): the image embedding before normalisation
    hidden_states: tuple[torch.Tensor, ...] | None = None  # stem + each block


@dataclass
class AlignOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None  # (B_image, B_text)
    logits_per_text: torch.Tensor | None = None  # (B_text, B_image)
    text_embeds: torch.Tensor | None = None  # (B_text, D), L2-normalised
    image_embeds: torch.Tensor | None = None  # (B_image, D), L2-normalised
    text_model_output: AlignTextOutput | None = None
    vision_model_output: AlignVisionOutput | None = None
