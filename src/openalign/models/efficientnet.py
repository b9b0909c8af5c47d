"""The image tower: an EfficientNet trunk (no top conv) and a global pool.

The architecture is data: `block_specs(config)` expands the stage table of `AlignVisionConfig` into one
`BlockSpec` per MBConv block, and `AlignVisionEncoder` builds one block per spec. Module names follow the
transformers checkpoint layout, so state dicts load without renaming.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from openalign.model_config import AlignVisionConfig, round_filters
from openalign.models.depthwise import depthwise_conv2d
from openalign.models.fused import squeeze_excite
from openalign.models.outputs import AlignVisionOutput
from openalign.models.pointwise import pointwise_conv2d
from openalign.models.utils import CheckpointingTower, activation, no_batchnorm_update, normal_init
from openalign.pretrained import PretrainedMixin


@dataclass(frozen=True)
class BlockSpec:
    """One MBConv block, after width and depth scaling."""

    index: int
    in_channels: int
    out_channels: int
    expand_ratio: int
    kernel_size: int
    stride: int
    residual: bool  # stride 1 and not the first block of its stage
    adjust_padding: bool  # stride-2 padding (k//2-1, k//2) rather than k//2 on every side
    drop_path_rate: float


def block_specs(config: AlignVisionConfig) -> list[BlockSpec]:
    """Expand the stage table into blocks: the first block of a stage changes width and stride, the repeats
    keep both. The drop-path rate grows linearly with the block index."""
    width, divisor = config.width_coefficient, config.depth_divisor
    repeats = [math.ceil(config.depth_coefficient * n) for n in config.num_block_repeats]
    num_blocks = sum(repeats)
    specs = []
    for stage, stage_repeats in enumerate(repeats):
        stage_in = round_filters(config.in_channels[stage], width, divisor)
        stage_out = round_filters(config.out_channels[stage], width, divisor)
        for repeat in range(stage_repeats):
            index = len(specs)
            first = repeat == 0
            stride = config.strides[stage] if first else 1
            specs.append(
                BlockSpec(
                    index=index,
                    in_channels=stage_in if first else stage_out,
                    out_channels=stage_out,
                    expand_ratio=config.expand_ratios[stage],
                    kernel_size=config.kernel_sizes[stage],
                    stride=stride,
                    residual=stride == 1 and not first,
                    adjust_padding=index not in config.depthwise_padding,
                    drop_path_rate=config.drop_connect_rate * index / num_blocks,
                )
            )
    return specs


def batch_norm(channels: int, config: AlignVisionConfig) -> nn.BatchNorm2d:
    # Keras momentum is the decay of the running average; PyTorch's is the weight of the new batch.
    return nn.BatchNorm2d(channels, eps=config.batch_norm_eps, momentum=1.0 - config.batch_norm_momentum)


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch per sample (EfficientNet's drop_connect)."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


class VisionStem(nn.Module):
    """3x3 stride-2 conv with TF 'SAME'-style asymmetric padding (right and bottom only), BN, activation."""

    def __init__(self, config: AlignVisionConfig):
        super().__init__()
        out_channels = round_filters(32, config.width_coefficient, config.depth_divisor)
        self.convolution = nn.Conv2d(config.num_channels, out_channels, 3, stride=2, bias=False)
        self.batchnorm = batch_norm(out_channels, config)
        self.activation = activation(config.hidden_act)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = F.pad(pixel_values, (0, 1, 0, 1))  # (B, 3, H+1, W+1)
        return self.activation(self.batchnorm(self.convolution(x)))  # (B, C, ceil(H/2), ceil(W/2))


class Expansion(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, config: AlignVisionConfig):
        super().__init__()
        self.expand_conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.expand_bn = batch_norm(out_channels, config)
        self.expand_act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand_act(self.expand_bn(pointwise_conv2d(x, self.expand_conv.weight)))


class Depthwise(nn.Module):
    """Depthwise kxk conv. Stride 2 pads explicitly (asymmetric unless the block is in depthwise_padding);
    stride 1 pads k//2 all round ('same')."""

    def __init__(self, channels: int, spec: BlockSpec, config: AlignVisionConfig):
        super().__init__()
        half = spec.kernel_size // 2
        if spec.stride == 2:
            low = half - 1 if spec.adjust_padding else half
            self.padding = (low, half, low, half)  # (left, right, top, bottom)
            conv_padding = 0
        else:
            self.padding = None
            conv_padding = half
        self.depthwise_conv = nn.Conv2d(
            channels, channels, spec.kernel_size, stride=spec.stride, padding=conv_padding, groups=channels,
            bias=False,
        )
        self.depthwise_norm = batch_norm(channels, config)
        self.depthwise_act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.depthwise_conv
        padding = self.padding or (conv.padding[0],) * 4
        x = depthwise_conv2d(x, conv.weight, conv.stride[0], padding)  # the convolution, with a faster backward
        return self.depthwise_act(self.depthwise_norm(x))


class SqueezeExcite(nn.Module):
    """Channel gating; the bottleneck width comes from the block's unexpanded input width."""

    def __init__(self, channels: int, block_in_channels: int, config: AlignVisionConfig):
        super().__init__()
        squeezed = max(1, int(block_in_channels * config.squeeze_expansion_ratio))
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, channels, 1)
        self.act_reduce = activation(config.hidden_act)

    def gate(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, C) channel means -> (B, C) gates in (0, 1): the two 1x1 convolutions as matrix products."""
        squeezed = self.act_reduce(F.linear(pooled, self.reduce.weight.flatten(1), self.reduce.bias))
        return torch.sigmoid(F.linear(squeezed, self.expand.weight.flatten(1), self.expand.bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return squeeze_excite(x, self.gate, [*self.reduce.parameters(), *self.expand.parameters()])


class Projection(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, config: AlignVisionConfig):
        super().__init__()
        self.project_conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.project_bn = batch_norm(out_channels, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project_bn(pointwise_conv2d(x, self.project_conv.weight))


class MBConvBlock(nn.Module):
    """Inverted residual: [1x1 expand] -> depthwise -> squeeze-excite -> 1x1 project [+ residual]."""

    def __init__(self, spec: BlockSpec, config: AlignVisionConfig):
        super().__init__()
        self.spec = spec
        hidden = spec.in_channels * spec.expand_ratio
        self.expansion = Expansion(spec.in_channels, hidden, config) if spec.expand_ratio != 1 else None
        self.depthwise_conv = Depthwise(hidden, spec, config)
        self.squeeze_excite = SqueezeExcite(hidden, spec.in_channels, config)
        self.projection = Projection(hidden, spec.out_channels, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.expansion(x) if self.expansion is not None else x
        h = self.projection(self.squeeze_excite(self.depthwise_conv(h)))
        if self.spec.residual:
            h = drop_path(h, self.spec.drop_path_rate, self.training) + x
        return h


class AlignVisionEncoder(nn.Module):
    def __init__(self, config: AlignVisionConfig):
        super().__init__()
        self.blocks = nn.ModuleList(MBConvBlock(spec, config) for spec in block_specs(config))
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, output_hidden_states: bool = False):
        hidden_states = [x] if output_hidden_states else None
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Recomputation must not count a batch twice in the BatchNorm running statistics.
                x = checkpoint(block, x, use_reentrant=False, context_fn=_checkpoint_contexts(block))
            else:
                x = block(x)
            if output_hidden_states:
                hidden_states.append(x)
        return x, hidden_states


def _checkpoint_contexts(module: nn.Module):
    return lambda: (contextlib.nullcontext(), no_batchnorm_update(module))


class AlignVisionModel(PretrainedMixin, CheckpointingTower, nn.Module):
    """EfficientNet image tower: `pooler_output` (B, C) is the global mean (or max) of the last block."""

    config_class = AlignVisionConfig
    main_input_name = "pixel_values"

    def __init__(self, config: AlignVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = VisionStem(config)
        self.encoder = AlignVisionEncoder(config)
        self.init_weights()

    def init_weights(self) -> None:
        """transformers' initialisation: normal(0, initializer_range) convs, unit BatchNorm, fresh statistics."""
        normal_init(self, self.config.initializer_range)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        # transformers uses AvgPool2d(hidden_dim, ceil_mode=True): the same global mean while hidden_dim is at
        # least the feature map size, and very slow under torch.compile.
        if self.config.pooling_type == "max":
            return features.amax(dim=(2, 3))
        return features.mean(dim=(2, 3))  # (B, C)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
    ) -> AlignVisionOutput | tuple:
        if pixel_values is None:
            raise ValueError("AlignVisionModel needs pixel_values")
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values must have shape (B, {self.config.num_channels}, H, W), got {tuple(pixel_values.shape)}"
            )
        features = self.embeddings(pixel_values)
        last_hidden_state, hidden_states = self.encoder(features, output_hidden_states)
        pooled = self.pool(last_hidden_state)
        output = AlignVisionOutput(
            last_hidden_state=last_hidden_state,
            pooler_output=pooled,
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
        )
        return output if return_dict else output.to_tuple()
