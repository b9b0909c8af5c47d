"""An inference copy of AlignModel: BatchNorm folded into the convolutions, channels-last, fused QKV, SDPA,
`torch.inference_mode`, optional bfloat16 weights and optional `torch.compile`.

`optimize_for_inference(model)` never modifies `model`: it deep-copies the towers into an
`InferenceAlignModel`, which is eval-only (`.train()` raises) because folded BatchNorm has no running
statistics left to train. The original model keeps training as before. Callers pass the processor's float32
tensors and get float32 embeddings back whatever the internal dtype.

Every rewrite here is exact in real arithmetic; in float32 they move results by float rounding only (tests
check 1e-5 relative against the plain path, per optimisation and combined).
"""

from __future__ import annotations

import copy
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from openalign.inference.linear import pack_linears
from openalign.models.bert import AlignTextModel, TextLayer, attention_bias
from openalign.models.efficientnet import AlignVisionModel, MBConvBlock
from openalign.models.fused import spatial_mean
from openalign.runtime import configure_allocator, native_reduced_precision, warn_slow_precision

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ALLOCATOR_OPT_OUT = "OPENALIGN_ALLOCATOR"  # "0": optimize_for_inference leaves glibc's allocator alone


def fold_conv_batchnorm(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv with bias equal to conv followed by eval-mode BatchNorm: w' = w * g / sqrt(var + eps),
    b' = (b - mean) * g / sqrt(var + eps) + beta. Computed in float64 so folding adds no rounding of its own."""
    scale = norm.weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)  # (C_out,)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    folded = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, bias=True, device=conv.weight.device,
    )
    with torch.no_grad():
        folded.weight.copy_(conv.weight.double() * scale[:, None, None, None])
        folded.bias.copy_((bias - norm.running_mean.double()) * scale + norm.bias.double())
    return folded


def _fused_swish_available(dtype: torch.dtype) -> bool:
    """Whether oneDNN's fused convolution + SiLU runs in `dtype` on this CPU: its reduced-precision kernels need
    native support (see `openalign.runtime.native_reduced_precision`), and raise on an AVX2-only CPU rather
    than falling back."""
    if not (hasattr(torch.ops, "mkldnn") and hasattr(torch.ops.mkldnn, "_convolution_pointwise")):
        return False
    return native_reduced_precision(dtype)


def conv_silu(conv: nn.Conv2d, activation: nn.Module, x: torch.Tensor, fuse: bool) -> torch.Tensor:
    """activation(conv(x)); with `fuse`, a single oneDNN convolution with SiLU as a post-op, which saves one
    read and one write of the activation (measured 17% faster on a bf16 depthwise layer; no gain in fp32)."""
    if fuse and isinstance(activation, nn.SiLU) and x.device.type == "cpu":
        return torch.ops.mkldnn._convolution_pointwise(
            x, conv.weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
            "swish", [], "",
        )
    return _activate(activation, conv(x))


def _activate(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # In place where the activation allows it: one large activation fewer to allocate per layer.
    if isinstance(module, nn.SiLU):
        return F.silu(x, inplace=True)
    if isinstance(module, nn.ReLU):
        return F.relu(x, inplace=True)
    return module(x)


class FoldedStem(nn.Module):
    """Stem with its BatchNorm folded: pad right/bottom, 3x3 stride-2 conv (+bias), activation."""

    def __init__(self, stem: nn.Module, fold: bool):
        super().__init__()
        self.fuse = False  # set by optimize_for_inference
        self.convolution = fold_conv_batchnorm(stem.convolution, stem.batchnorm) if fold else stem.convolution
        self.batchnorm = nn.Identity() if fold else stem.batchnorm
        self.activation = stem.activation

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = F.pad(pixel_values, (0, 1, 0, 1))  # (B, 3, H+1, W+1)
        if self.fuse:
            return conv_silu(self.convolution, self.activation, x, fuse=True)
        return _activate(self.activation, self.batchnorm(self.convolution(x)))


class FoldedMBConv(nn.Module):
    """MBConvBlock for inference: BatchNorm folded (when asked), activations, gate and residual in place."""

    def __init__(self, block: MBConvBlock, fold: bool):
        super().__init__()

        def convert(conv, norm):
            return (fold_conv_batchnorm(conv, norm), nn.Identity()) if fold else (conv, norm)

        self.residual = block.spec.residual
        self.fuse = False  # set by optimize_for_inference, only with folded BatchNorm
        if block.expansion is not None:
            self.expand_conv, self.expand_norm = convert(block.expansion.expand_conv, block.expansion.expand_bn)
            self.expand_act = block.expansion.expand_act
        else:
            self.expand_conv = None
        depthwise = block.depthwise_conv
        self.padding = depthwise.padding
        self.depthwise_conv, self.depthwise_norm = convert(depthwise.depthwise_conv, depthwise.depthwise_norm)
        self.depthwise_act = depthwise.depthwise_act
        self.gate_reduce = block.squeeze_excite.reduce
        self.gate_expand = block.squeeze_excite.expand
        self.gate_act = block.squeeze_excite.act_reduce
        self.project_conv, self.project_norm = convert(block.projection.project_conv, block.projection.project_bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.expand_conv is not None:
            if self.fuse:
                h = conv_silu(self.expand_conv, self.expand_act, h, fuse=True)
            else:
                h = _activate(self.expand_act, self.expand_norm(self.expand_conv(h)))
        if self.padding is not None:
            h = F.pad(h, self.padding)
        if self.fuse:
            h = conv_silu(self.depthwise_conv, self.depthwise_act, h, fuse=True)
        else:
            h = _activate(self.depthwise_act, self.depthwise_norm(self.depthwise_conv(h)))
        gate = spatial_mean(h)  # (B, C, 1, 1)
        gate = torch.sigmoid(self.gate_expand(self.gate_act(self.gate_reduce(gate))))
        h = self.project_norm(self.project_conv(h.mul_(gate)))
        if self.residual:
            h += x  # eval mode: drop-path is the identity
        return h


class InferenceVision(nn.Module):
    """pixel_values (B, 3, H, W) -> pooled features (B, C), in the tower's dtype and memory format."""

    def __init__(self, vision_model: AlignVisionModel, fold: bool, channels_last: bool):
        super().__init__()
        self.pooling_type = vision_model.config.pooling_type
        self.channels_last = channels_last
        self.stem = FoldedStem(vision_model.embeddings, fold)
        self.blocks = nn.ModuleList(FoldedMBConv(block, fold) for block in vision_model.encoder.blocks)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        x = self.stem(pixel_values)
        for block in self.blocks:
            x = block(x)
        return x.amax(dim=(2, 3)) if self.pooling_type == "max" else spatial_mean(x).flatten(1)  # (B, C)


class InferenceTextLayer(nn.Module):
    """A post-LN BERT layer with query, key and value in one matmul. With `first_token_only` the queries,
    the attention output and the feed-forward run on [CLS] alone: keys and values still see every token,
    so [CLS]'s output is unchanged while the last layer does about 1/T of its work."""

    def __init__(self, layer: TextLayer):
        super().__init__()
        attention = layer.attention.self
        self.num_heads, self.head_size = attention.num_heads, attention.head_size
        hidden = self.num_heads * self.head_size
        self.qkv = nn.Linear(hidden, 3 * hidden, device=attention.query.weight.device)
        with torch.no_grad():
            self.qkv.weight.copy_(torch.cat([attention.query.weight, attention.key.weight, attention.value.weight]))
            self.qkv.bias.copy_(torch.cat([attention.query.bias, attention.key.bias, attention.value.bias]))
        self.attention_output = layer.attention.output
        self.intermediate = layer.intermediate
        self.output = layer.output

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, first_token_only: bool = False) -> torch.Tensor:
        B, T, H = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, self.head_size)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, nh, T, hs)
        residual = x
        if first_token_only:
            q, residual = q[:, :, :1], x[:, :1]  # (B, nh, 1, hs), (B, 1, H)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, nh, Tq, hs)
        context = context.transpose(1, 2).reshape(B, q.shape[2], H)  # (B, Tq, H)
        x = self.attention_output(context, residual)
        return self.output(self.intermediate(x), x)


class InferenceText(nn.Module):
    """(input_ids, attention_mask, token_type_ids) -> projected [CLS] (B, D). No pooler: ALIGN does not use it."""

    def __init__(self, text_model: AlignTextModel, projection: nn.Linear):
        super().__init__()
        self.embeddings = text_model.embeddings
        self.layers = nn.ModuleList(InferenceTextLayer(layer) for layer in text_model.encoder.layer)
        self.projection = projection

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        x = self.embeddings(input_ids, token_type_ids)  # (B, T, H), float32 with reduced-precision matmuls
        bias = attention_bias(attention_mask, self.projection.weight.dtype)  # the dtype attention runs in
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            x = layer(x, bias, first_token_only=index == last)
        return self.projection(x[:, 0])  # (B, D)


class InferenceAlignModel(nn.Module):
    """AlignModel for embedding only. `get_image_features` / `get_text_features` take what the processor
    returns (float32 pixels, int64 ids) and return float32 (B, D), unnormalised, as AlignModel's do."""

    def __init__(self, vision: InferenceVision, text: InferenceText, temperature: torch.Tensor, config,
                 dtype: torch.dtype):
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.vision = vision
        self.text = text
        self.register_buffer("temperature", temperature.detach().clone().float())
        self.compiled = False
        super().train(False)

    def train(self, mode: bool = True) -> InferenceAlignModel:
        """Only `train(False)` / `eval()` are allowed: BatchNorm is folded away, there is nothing to train."""
        if mode:
            raise RuntimeError(
                "an InferenceAlignModel cannot train (BatchNorm is folded into the convolutions): "
                "train the AlignModel it was made from"
            )
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.text.projection.weight.device

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Unnormalised image embeddings (B, D) float32 from float32 pixel_values (B, 3, H, W)."""
        with torch.inference_mode():
            pixel_values = pixel_values.to(self.device, self.dtype, non_blocking=True)
            return self.vision(pixel_values).float()

    def get_text_features(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """Unnormalised text embeddings (B, D) float32 (projected [CLS] of the last layer)."""
        with torch.inference_mode():
            device = self.device
            input_ids = input_ids.to(device, non_blocking=True)
            attention_mask = None if attention_mask is None else attention_mask.to(device, non_blocking=True)
            token_type_ids = None if token_type_ids is None else token_type_ids.to(device, non_blocking=True)
            return self.text(input_ids, attention_mask, token_type_ids).float()

    def forward(self, input_ids, pixel_values, attention_mask=None, token_type_ids=None) -> dict:
        """Normalised embeddings and logits_per_text (B_t, B_i), as AlignModel.forward without loss."""
        image_embeds = self.get_image_features(pixel_values)
        text_embeds = self.get_text_features(input_ids, attention_mask, token_type_ids)
        image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
        logits_per_text = text_embeds @ image_embeds.t() / self.temperature
        return {"image_embeds": image_embeds, "text_embeds": text_embeds, "logits_per_text": logits_per_text}


def optimize_for_inference(
    model,
    dtype: torch.dtype = torch.float32,
    compile: bool = False,
    channels_last: bool | None = None,
    fold_batchnorm: bool = True,
    device: torch.device | str | None = None,
    fuse_activation: bool | None = None,
    allocator: bool | None = None,
) -> InferenceAlignModel:
    """An eval-only `InferenceAlignModel` built from a copy of `model` (an AlignModel; `model` is untouched).

    dtype: float32, or bfloat16 / float16 weights and activations (inputs are cast in, outputs back to
    float32). compile: `torch.compile` each tower; the first call for each new input shape pays the
    compilation (minutes on CPU for align-base, see docs/inference.md), so use it for long streams with a fixed
    batch shape. channels_last / fold_batchnorm switch the image-tower rewrites off one by one (for tests and
    benchmarks); channels_last None (default): on, except for bfloat16 / float16 on a CPU without native kernels for
    them, where that dtype is slow whatever the layout (a warning says so, see
    `openalign.runtime.warn_slow_precision`) and the contiguous layout was 1.3x less slow (docs/inference.md).
    fuse_activation: conv + SiLU as one oneDNN call; default on for reduced precision on CPU with folded BatchNorm and
    channels-last, where it measured faster. The text tower always gets fused QKV, SDPA and the [CLS]-only last layer,
    and on a CPU without compile its linear layers run through oneDNN with packed weights and the feed-forward's
    GELU fused (`openalign.inference.linear`).

    allocator: on a CPU, asking for an inference-optimised model also asks for the process-wide glibc settings
    that keep freed activations in the heap (`openalign.runtime.configure_allocator`): without
    them every large activation is a fresh mmap, page-faulted and zeroed on each forward, a quarter of the fp32
    image tower's time (docs/inference.md). None (default): on for CPU models unless the environment sets
    OPENALIGN_ALLOCATOR=0; False: leave the process as it is. A process that never calls this is not touched.
    """
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if allocator is None:
        allocator = device.type == "cpu" and os.environ.get(ALLOCATOR_OPT_OUT, "1") != "0"
    if allocator:
        configure_allocator()
    emulated = dtype != torch.float32 and warn_slow_precision(dtype, device.type, "optimize_for_inference")
    if channels_last is None:
        channels_last = not emulated
    source = copy.deepcopy(model).eval().to(device)
    vision = InferenceVision(source.vision_model, fold_batchnorm, channels_last)
    text = InferenceText(source.text_model, source.text_projection)
    optimized = InferenceAlignModel(vision, text, source.temperature, model.config, dtype)
    del source
    optimized.to(dtype=dtype)
    if channels_last:
        optimized.vision.to(memory_format=torch.channels_last)
    if fuse_activation is None:
        fuse_activation = dtype != torch.float32 and channels_last and device.type == "cpu" and not compile
    if fuse_activation and fold_batchnorm and _fused_swish_available(dtype):
        for module in optimized.vision.modules():
            if isinstance(module, (FoldedStem, FoldedMBConv)):
                module.fuse = True
    if device.type == "cpu" and not compile:
        pack_linears(optimized.text)  # oneDNN with packed weights (inference/linear.py); compile fuses its own
        if dtype != torch.float32:
            # As autocast runs it: the matrix products in `dtype` (PackedLinear casts its input), the residual
            # stream, embeddings and LayerNorms in float32; in bfloat16 all through, align-base's text
            # embeddings fell below a 0.9999 cosine to float32 (docs/inference.md).
            for module in optimized.text.modules():
                if isinstance(module, (nn.LayerNorm, nn.Embedding)):
                    module.float()
    if compile:
        # dynamic=False: a static graph per input shape is what inductor optimises best; a new batch or
        # sequence length recompiles (bounded by torch._dynamo's cache size limit).
        # On CUDA the image tower (one fixed batch shape in a stream) also replays as a CUDA graph, which
        # removes the launch overhead of its ~800 small kernels.
        vision_mode = "reduce-overhead" if device.type == "cuda" else None
        optimized.vision = torch.compile(optimized.vision, dynamic=False, mode=vision_mode)
        optimized.text = torch.compile(optimized.text, dynamic=None)
        optimized.compiled = True
    for parameter in optimized.parameters():
        parameter.requires_grad_(False)
    return optimized


def default_batch_size(kind: str, device: torch.device | str = "cpu") -> int:
    """A batch size for embedding on `device`; kind is "image" or "text".

    CPU: 8 images / 64 texts per 8 threads (at least one unit): enough rows for every thread's share of the
    matmuls, small enough that an image batch's largest activation (8 x 192 x 145 x 145 floats, 129 MB for
    align-base) stays modest. These are chosen, not the result of a sweep (the shared benchmark machine was
    too noisy to resolve one). GPU: 128 / 512, where larger batches are needed to fill the device.
    """
    if kind not in ("image", "text"):
        raise ValueError(f"kind must be 'image' or 'text', got {kind!r}")
    device = torch.device(device)
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return (8 if kind == "image" else 64) * max(1, math.ceil(threads / 8))
    return 128 if kind == "image" else 512
