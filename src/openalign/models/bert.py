"""The text tower: a post-LayerNorm BERT encoder.

Attention runs through `scaled_dot_product_attention`; the explicit softmax path is used only when attention
weights or a head mask are asked for. Module names follow the BERT checkpoint layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from openalign.model_config import AlignTextConfig
from openalign.models.outputs import AlignTextOutput
from openalign.models.utils import CheckpointingTower, activation, normal_init
from openalign.pretrained import PretrainedMixin


class TextEmbeddings(nn.Module):
    def __init__(self, config: AlignTextConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids=None, position_ids=None) -> torch.Tensor:
        _, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).unsqueeze(0)  # (1, T)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(position_ids)  # (B, T, H)
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    def __init__(self, config: AlignTextConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_size = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_prob = config.attention_probs_dropout_prob

    def forward(self, x, attention_bias, head_mask=None, output_attentions=False, first_token_only=False):
        """Context vectors (B, T, H), or (B, 1, H) of [CLS] alone with `first_token_only` (its query attends to
        every token as usual), and the attention weights when asked for."""
        B, T, H = x.shape

        def heads(t):
            return t.view(B, t.shape[1], self.num_heads, self.head_size).transpose(1, 2)  # (B, nh, T, hs)

        q = heads(self.query(x[:, :1] if first_token_only else x))
        k, v = heads(self.key(x)), heads(self.value(x))
        dropout = self.dropout_prob if self.training else 0.0
        weights = None
        if output_attentions or head_mask is not None:
            scores = q @ k.transpose(-1, -2) * self.head_size**-0.5  # (B, nh, T, T)
            if attention_bias is not None:
                scores = scores + attention_bias
            weights = F.dropout(scores.softmax(dim=-1), dropout, self.training)
            if head_mask is not None:
                weights = weights * head_mask
            context = weights @ v
        else:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_bias, dropout_p=dropout)
        context = context.transpose(1, 2).reshape(B, q.shape[2], H)  # (B, T or 1, H)
        return context, weights


class AttentionOutput(nn.Module):
    """Dense + dropout + residual + LayerNorm (post-LN), the shape shared by both sub-layers."""

    def __init__(self, in_features: int, config: AlignTextConfig):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    def __init__(self, config: AlignTextConfig):
        super().__init__()
        self.self = SelfAttention(config)
        self.output = AttentionOutput(config.hidden_size, config)

    def forward(self, x, attention_bias, head_mask=None, output_attentions=False, first_token_only=False):
        context, weights = self.self(x, attention_bias, head_mask, output_attentions, first_token_only)
        return self.output(context, x[:, :1] if first_token_only else x), weights


class Intermediate(nn.Module):
    def __init__(self, config: AlignTextConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(x))


class TextLayer(nn.Module):
    def __init__(self, config: AlignTextConfig):
        super().__init__()
        self.attention = Attention(config)
        self.intermediate = Intermediate(config)
        self.output = AttentionOutput(config.intermediate_size, config)

    def forward(self, x, attention_bias, head_mask=None, output_attentions=False, first_token_only=False):
        """(B, T, H) -> (B, T, H), or the (B, 1, H) output of [CLS] alone with `first_token_only`."""
        x, weights = self.attention(x, attention_bias, head_mask, output_attentions, first_token_only)
        return self.output(self.intermediate(x), x), weights


class TextEncoder(nn.Module):
    def __init__(self, config: AlignTextConfig):
        super().__init__()
        self.layer = nn.ModuleList(TextLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False

    def forward(self, x, attention_bias, head_mask=None, output_attentions=False, output_hidden_states=False,
                first_token_only=False):
        """`first_token_only`: the last layer computes [CLS] alone (its output is then (B, 1, H))."""
        hidden_states = [x] if output_hidden_states else None
        attentions = [] if output_attentions else None
        for i, layer in enumerate(self.layer):
            layer_head_mask = head_mask[i] if head_mask is not None else None
            first_only = first_token_only and i == len(self.layer) - 1
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, weights = checkpoint(
                    layer, x, attention_bias, layer_head_mask, output_attentions, first_only, use_reentrant=False
                )
            else:
                x, weights = layer(x, attention_bias, layer_head_mask, output_attentions, first_only)
            if output_hidden_states:
                hidden_states.append(x)
            if output_attentions:
                attentions.append(weights)
        return x, hidden_states, attentions


class Pooler(nn.Module):
    """tanh(dense([CLS])): kept for checkpoint compatibility and `pooler_output`; AlignModel does not use it."""

    def __init__(self, config: AlignTextConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))


def attention_bias(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(B, T) mask of 1 = keep, 0 = padding -> additive (B, 1, 1, T) bias, or None when nothing is masked."""
    if attention_mask is None:
        return None
    bias = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    bias = bias.masked_fill(attention_mask == 0, torch.finfo(dtype).min)
    return bias[:, None, None, :]  # (B, 1, 1, T)


def expand_head_mask(head_mask: torch.Tensor | None, num_layers: int, dtype: torch.dtype):
    """A head mask of shape (heads,) or (layers, heads) -> (layers, 1, heads, 1, 1), as BERT accepts it."""
    if head_mask is None:
        return None
    if head_mask.ndim == 1:
        head_mask = head_mask.expand(num_layers, -1)
    if head_mask.ndim != 2 or head_mask.shape[0] != num_layers:
        raise ValueError(f"head_mask must have shape (heads,) or ({num_layers}, heads), got {tuple(head_mask.shape)}")
    return head_mask[:, None, :, None, None].to(dtype)


class AlignTextModel(PretrainedMixin, CheckpointingTower, nn.Module):
    """BERT text tower. `last_hidden_state[:, 0]` ([CLS]) feeds AlignModel's text projection."""

    config_class = AlignTextConfig
    main_input_name = "input_ids"

    def __init__(self, config: AlignTextConfig, add_pooling_layer: bool = True):
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(config)
        self.encoder = TextEncoder(config)
        self.pooler = Pooler(config) if add_pooling_layer else None
        self.init_weights()

    def init_weights(self) -> None:
        """transformers' initialisation: normal(0, initializer_range), zero biases and padding row."""
        normal_init(self, self.config.initializer_range)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        first_token_only: bool = False,
    ) -> AlignTextOutput | tuple:
        """transformers' arguments, plus `first_token_only` (openalign's): the last layer computes [CLS] alone,
        all AlignModel uses, so `last_hidden_state` is (B, 1, H), the same [CLS] row for less work."""
        self._check_inputs(input_ids, attention_mask, token_type_ids)
        x = self.embeddings(input_ids, token_type_ids, position_ids)  # (B, T, H)
        bias = attention_bias(attention_mask, x.dtype)
        head_mask = expand_head_mask(head_mask, self.config.num_hidden_layers, x.dtype)
        x, hidden_states, attentions = self.encoder(x, bias, head_mask, output_attentions, output_hidden_states,
                                                    first_token_only)
        output = AlignTextOutput(
            last_hidden_state=x,
            pooler_output=self.pooler(x) if self.pooler is not None else None,
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
            attentions=tuple(attentions) if attentions is not None else None,
        )
        return output if return_dict else output.to_tuple()

    def _check_inputs(self, input_ids, attention_mask, token_type_ids) -> None:
        if input_ids is None:
            raise ValueError("AlignTextModel needs input_ids")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
        T = input_ids.shape[1]
        if T > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {T} exceeds max_position_embeddings={self.config.max_position_embeddings}; "
                "truncate the text (the processor does by default)"
            )
        if input_ids.numel() and (int(input_ids.max()) >= self.config.vocab_size or int(input_ids.min()) < 0):
            raise ValueError(
                f"input_ids hold token id {int(input_ids.max())} outside the vocabulary "
                f"(vocab_size={self.config.vocab_size}): tokenizer and model do not match"
            )
        for name, tensor in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if tensor is not None and tensor.shape != input_ids.shape:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, input_ids {tuple(input_ids.shape)}")
