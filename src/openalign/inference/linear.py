"""The text tower's linear layers in the inference copy, through oneDNN with their weights packed once.

On a CPU `F.linear` runs float32 through MKL's sgemm and bfloat16 through oneDNN, which reorders the weight
into its blocked layout on every call. oneDNN's own linear (`torch.ops.mkldnn._linear_pointwise`, what
Inductor's weight freezing uses) takes a weight packed once and can apply GELU as a post-op of the product,
which saves a pass over the feed-forward's widest activation. On the AMD EPYC of docs/inference.md MKL's
float32 sgemm reached a third of oneDNN's rate. `PackedLinear` takes that path where it exists (a CPU build with
oneDNN, an input in the layer's dtype, no autograd, no tracing or compiling) and is `F.linear` everywhere else,
so export, compile and other devices see a plain linear layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from openalign.models.bert import Intermediate

# GELU as a oneDNN post-op: (attribute, algorithm) for the erf and the tanh forms.
POST_OPS = {None: ("none", ""), "gelu": ("gelu", "none"), "gelu_tanh": ("gelu", "tanh")}


def onednn_linear_available() -> bool:
    """Whether this build of torch has oneDNN's linear with packed weights."""
    mkldnn = getattr(torch.ops, "mkldnn", None)
    return bool(torch.backends.mkldnn.is_available() and mkldnn is not None
                and hasattr(mkldnn, "_linear_pointwise") and hasattr(mkldnn, "_reorder_linear_weight"))


def gelu_kind(module: nn.Module) -> str | None:
    """"gelu" or "gelu_tanh" for a GELU module oneDNN can apply as a post-op, None otherwise."""
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    return None


def pack_linears(module: nn.Module) -> None:
    """Every linear layer under `module` as a PackedLinear, in place; a BERT feed-forward's first layer takes
    its GELU along as a post-op."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Intermediate) and gelu_kind(child.intermediate_act_fn) is not None:
                setattr(parent, name, PackedLinear(child.dense, gelu_kind(child.intermediate_act_fn)))
            elif isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear(child))


class PackedLinear(nn.Module):
    """activation(x @ weight.T + bias) with `linear`'s own parameters (activation: None, "gelu" or "gelu_tanh"),
    in the weight's dtype whatever the input's. The packed copy of the weight is made on first use for each
    dtype and device, and dropped when the module is copied or pickled (an opaque oneDNN tensor has no storage
    to copy)."""

    def __init__(self, linear: nn.Linear, activation: str | None = None):
        super().__init__()
        if activation not in POST_OPS:
            raise ValueError(f"activation must be one of {list(POST_OPS)}, got {activation!r}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.activation = activation
        self._packed: tuple | None = None  # (what it was packed from, the packed weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight.dtype)  # a float32 residual stream into reduced-precision weights, as autocast does
        if self._onednn_applies(x):
            attribute, algorithm = POST_OPS[self.activation]
            return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(), self.bias, attribute, [], algorithm)
        y = F.linear(x, self.weight, self.bias)
        if self.activation is None:
            return y
        return F.gelu(y, approximate="tanh" if self.activation == "gelu_tanh" else "none")

    def _onednn_applies(self, x: torch.Tensor) -> bool:
        return (x.device.type == "cpu" and x.dtype == self.weight.dtype
                and x.dtype in (torch.float32, torch.bfloat16) and not torch.is_grad_enabled()
                and not torch.jit.is_tracing() and not torch.compiler.is_compiling()
                and onednn_linear_available())

    def _packed_weight(self) -> torch.Tensor:
        weight = self.weight
        # Inference tensors keep no version counter (nor can they change outside inference mode).
        source = (weight.dtype, weight.data_ptr(), 0 if weight.is_inference() else weight._version)
        if self._packed is None or self._packed[0] != source:
            self._packed = (source, torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None))
        return self._packed[1]

    def __getstate__(self) -> dict:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        return {**state, "_packed": None}

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, activation={self.activation}"
