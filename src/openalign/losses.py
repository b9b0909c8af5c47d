"""Contrastive losses for dual encoders: ALIGN (default), CLIP-style and SigLIP.

Every loss takes the *local* batch of image and text embeddings (B, D), unnormalised or not, and the
learnable scalars as arguments, so the model can own them (``AlignModel.temperature``). A loss built with
``*_init`` values owns its scalars instead; with several processes their gradients then have to be averaged
by hand (``openalign.distributed.average_gradients``), since they live outside the DDP-wrapped model.

Each loss is a ``ContrastiveLoss``: it says itself how it is built from a training config, whether it uses the
model's temperature or owns its scalars, what temperature it applies and what it does after an optimiser step,
so the trainer never asks which loss it holds. ``LOSSES`` names them for TrainConfig's ``loss.name``.

Noisy pairs: the complementary contrastive loss (``rcl``) and robust InfoNCE (``rince``) bound what a wrong
positive can pull, and every softmax loss takes per-pair weights (``pair_weights``, e.g. the clean estimates of
``openalign.train.pair_estimates``) and leaves each local pair's in-batch match probability in
``last_match_probability`` for such estimates.

Under ``torch.distributed`` the negatives come from the global batch (N = world_size * B). With
``local_loss=True`` each rank scores its B rows against the N gathered columns (memory B x N): the mean of the
ranks' losses is the single-process loss over the global batch, and with ``gather_with_grad=True`` the DDP
average of the ranks' gradients is its gradient (see ``openalign.distributed.all_gather_with_grad``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from openalign.distributed import all_gather_with_grad, gather_features, world_info
from openalign.errors import ConfigError


def normalize(embeds: torch.Tensor) -> torch.Tensor:
    """L2-normalise the last dimension without an epsilon, as ALIGN does (a zero vector gives NaN)."""
    return embeds / embeds.norm(dim=-1, keepdim=True)


def _owned_scalar(init: float | None) -> nn.Parameter | None:
    return None if init is None else nn.Parameter(torch.tensor(float(init)))


def _pick(argument: torch.Tensor | None, owned: nn.Parameter | None, name: str) -> torch.Tensor:
    if argument is not None:
        return argument
    if owned is None:
        raise ValueError(f"no {name} given: pass it to forward() or build the loss with {name}_init")
    return owned


def symmetric_cross_entropy(logits_per_image: torch.Tensor, logits_per_text: torch.Tensor, labels: torch.Tensor,
                            label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean of the image->text and text->image cross-entropies; row i of each logits matrix targets labels[i]."""
    loss_image = F.cross_entropy(logits_per_image, labels, label_smoothing=label_smoothing)
    loss_text = F.cross_entropy(logits_per_text, labels, label_smoothing=label_smoothing)
    return (loss_image + loss_text) / 2


def align_loss(logits_per_text: torch.Tensor, label_smoothing: float = 0.1) -> torch.Tensor:
    """ALIGN's loss of one batch's square logits (B, B) (texts along rows, targets on the diagonal): what
    ``AlignModel.forward(return_loss=True)`` returns, as transformers computes it."""
    targets = torch.arange(logits_per_text.shape[0], device=logits_per_text.device)
    return symmetric_cross_entropy(logits_per_text.t(), logits_per_text, targets, label_smoothing)


def weighted_mean(pair_losses: torch.Tensor, pair_weights: torch.Tensor, local_rows: bool = True) -> torch.Tensor:
    """sum_i w_i l_i / sum_i w_i over the global batch. `pair_weights` (B,) weigh this rank's pairs and carry no
    gradient. With `local_rows` each rank holds its own pairs' losses and the ranks' results average (as DDP
    averages their gradients) to the global weighted mean; otherwise `pair_losses` already covers every rank's
    pairs (N,) and the weights are gathered to match."""
    weights = pair_weights.detach().to(pair_losses.dtype)
    world_size = world_info().world_size
    if world_size == 1:
        return (weights * pair_losses).sum() / weights.sum().clamp_min(1e-12)
    if not local_rows:
        weights = gather_features(weights[:, None], weights[:, None], gather_with_grad=False)[0][:, 0]  # (N,)
        return (weights * pair_losses).sum() / weights.sum().clamp_min(1e-12)
    total = weights.sum()
    torch.distributed.all_reduce(total)
    return world_size * (weights * pair_losses).sum() / total.clamp_min(1e-12)


class LossSettings(Protocol):
    """What ``from_config`` reads: the loss section of a TrainConfig (``openalign.train.config.LossSection``)."""

    name: str
    label_smoothing: float
    local_loss: bool
    gather_with_grad: bool
    hard_negative_beta: float
    fixed_temperature: bool
    robust_q: float
    robust_lambda: float


class ContrastiveLoss(nn.Module):
    """A loss as the trainer uses it. Each subclass declares:

    - ``name``: its value of TrainConfig's ``loss.name`` (its key in ``LOSSES``);
    - ``from_config(settings, temperature)``: the loss a config's loss section describes, for a model whose
      temperature starts at ``temperature``;
    - ``uses_model_temperature``: True when the scalar its forward takes is the model's temperature (ALIGN),
      trained with the model; False when it owns its scalars (CLIP's log-scale, SigLIP's scale and bias),
      trained beside the model, and the model's temperature stays where it is;
    - ``hard_negatives``: whether ``hard_negative_beta`` applies to it;
    - ``temperature_in_use(model)``: the softmax temperature it applies, for the logs;
    - ``after_step()``: what it does after each optimiser step that updated the weights.

    As in open_clip, the scalars are forward arguments: ``loss(image_embeds, text_embeds, *scalars)``.
    """

    name: ClassVar[str] = ""
    hard_negatives: ClassVar[bool] = False
    # Whether forward takes `pair_weights` (one weight per local pair) and leaves `last_match_probability`.
    pair_weights: ClassVar[bool] = False
    uses_model_temperature: bool = False
    # (B,), no gradient: each local pair's probability of its own partner in the last forward (mean of the two
    # directions), what per-pair clean estimates are made of; None before a forward or for a loss without it.
    last_match_probability: torch.Tensor | None = None

    @classmethod
    def from_config(cls, settings: LossSettings, temperature: float) -> ContrastiveLoss:
        """The loss a TrainConfig's loss section describes, for a model starting at ``temperature``."""
        raise NotImplementedError(f"{cls.__name__} does not say how a TrainConfig builds it")

    def attach(self, model: nn.Module) -> None:
        """Stop the model's temperature from training when this loss does not use it. Call it before the
        optimiser and the DDP/FSDP wrapper are built: both look at ``requires_grad``."""
        if not self.uses_model_temperature:
            model.temperature.requires_grad_(False)

    def bind(self, model: nn.Module) -> Callable[..., torch.Tensor]:
        """``loss_fn(image_embeds, text_embeds, **options)`` for a training step of ``model`` (options such as
        ``pair_weights`` go to forward)."""
        if not self.uses_model_temperature:
            return self
        return lambda image_embeds, text_embeds, **options: self(image_embeds, text_embeds, model.temperature,
                                                                 **options)

    def own_parameters(self) -> list[nn.Parameter]:
        """The loss's own trainable scalars: no DDP/FSDP wrapper of the model averages their gradients."""
        return [parameter for parameter in self.parameters() if parameter.requires_grad]

    def trained_scalars(self, model: nn.Module) -> list[torch.Tensor]:
        """The trainable scalars the loss's value depends on besides the embeddings (the model's temperature or
        the loss's own), which exact gradient accumulation differentiates too."""
        if self.uses_model_temperature:
            return [model.temperature] if model.temperature.requires_grad else []
        return self.own_parameters()

    def temperature_in_use(self, model: nn.Module) -> float:
        """The softmax temperature the loss applies, for the logs; here 1 / exp(logit_scale) of a log-scale."""
        return math.exp(-float(self.logit_scale.detach()))

    def after_step(self) -> None:
        """Called after each optimiser step that updated the weights; nothing by default."""


class _SoftmaxContrastiveLoss(ContrastiveLoss):
    """Symmetric cross-entropy over scaled cosine similarities; subclasses say how the scale is made."""

    hard_negatives = True
    pair_weights = True

    def __init__(self, label_smoothing: float, gather_with_grad: bool, local_loss: bool, normalize: bool,
                 hard_negative_beta: float = 0.0):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if hard_negative_beta < 0:
            raise ConfigError(f"hard_negative_beta must not be negative, got {hard_negative_beta}")
        self.label_smoothing = label_smoothing
        self.hard_negative_beta = hard_negative_beta
        self.gather_with_grad = gather_with_grad
        self.local_loss = local_loss
        self.normalize = normalize
        self._labels: dict[tuple[torch.device, int, int], torch.Tensor] = {}

    def labels(self, num_rows: int, device: torch.device) -> torch.Tensor:
        """Targets: row i of the local batch matches column rank * B + i of the gathered batch."""
        info = world_info()
        world_size, rank = info.world_size, info.rank
        offset = rank * num_rows if (world_size > 1 and self.local_loss) else 0
        key = (device, num_rows, offset)
        if key not in self._labels:  # one small tensor per shape, not one per step
            self._labels[key] = torch.arange(num_rows, device=device) + offset
        return self._labels[key]

    def logits(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (logits_per_image, logits_per_text), each (B, N) with local loss or (N, N) without."""
        if self.normalize:
            image_embeds, text_embeds = normalize(image_embeds), normalize(text_embeds)
        if world_info().world_size == 1:
            logits_per_text = scale * text_embeds @ image_embeds.T  # (B, B)
            return logits_per_text.T, logits_per_text
        all_image, all_text = gather_features(
            image_embeds, text_embeds, gather_with_grad=self.gather_with_grad, local_loss=self.local_loss
        )  # (N, D) each
        if self.local_loss:
            return scale * image_embeds @ all_text.T, scale * text_embeds @ all_image.T  # (B, N) each
        logits_per_text = scale * all_text @ all_image.T  # (N, N)
        return logits_per_text.T, logits_per_text

    def loss_from_scale(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, scale: torch.Tensor,
        pair_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The mean over pairs of each pair's loss (the mean of its image->text and text->image rows), targets
        on the (offset) diagonal; with `pair_weights` (B,) for the local pairs, the weighted mean over the global
        batch, sum_i w_i l_i / sum_i w_i, whichever rank holds pair i."""
        logits_per_image, logits_per_text = self.logits(image_embeds, text_embeds, scale)
        labels = self.labels(logits_per_image.shape[0], logits_per_image.device)
        if self.hard_negative_beta > 0:
            logits_per_image = self.weight_hard_negatives(logits_per_image, labels, scale)
            logits_per_text = self.weight_hard_negatives(logits_per_text, labels, scale)
        pair_losses = (self.row_losses(logits_per_image, labels) + self.row_losses(logits_per_text, labels)) / 2
        local = self._local_rows(len(image_embeds), len(labels))
        with torch.no_grad():
            rows = torch.arange(len(labels), device=labels.device)
            match = (logits_per_image.softmax(-1)[rows, labels] + logits_per_text.softmax(-1)[rows, labels]) / 2
            self.last_match_probability = match[local]  # (B,)
        if pair_weights is None:
            return pair_losses.mean()
        return weighted_mean(pair_losses, pair_weights, local_rows=len(labels) == len(image_embeds))

    def _local_rows(self, local_size: int, num_rows: int) -> slice:
        """Which rows of the logits are this rank's pairs: all of them, or its slice of the full matrix."""
        if num_rows == local_size:
            return slice(None)
        rank = world_info().rank
        return slice(rank * local_size, (rank + 1) * local_size)

    def row_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Each row's cross-entropy against its label, label-smoothed: (rows,)."""
        return F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing, reduction="none")

    @staticmethod
    def settings_options(settings: LossSettings) -> dict:
        """The constructor arguments a config's loss section sets for a softmax loss."""
        return {"label_smoothing": settings.label_smoothing, "gather_with_grad": settings.gather_with_grad,
                "local_loss": settings.local_loss, "hard_negative_beta": settings.hard_negative_beta}

    def weight_hard_negatives(self, logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Importance-weight each row's negatives by their similarity (hard-negative NCE, Radenovic et al. 2023):
        negative j of row i counts w_ij = (N - 1) * softmax_j(beta * cos_ij) times in the softmax's denominator,
        i.e. log w_ij is added to its logit; the weights average 1 and carry no gradient, the positive is left
        alone. beta = 0 is the plain loss; larger beta stresses the negatives the model already confuses."""
        rows = torch.arange(logits.shape[0], device=logits.device)
        is_positive = torch.zeros_like(logits, dtype=torch.bool)
        is_positive[rows, labels] = True
        with torch.no_grad():
            cosines = logits / scale
            weights = (self.hard_negative_beta * cosines).masked_fill(is_positive, float("-inf"))
            log_weights = weights.log_softmax(dim=-1) + math.log(logits.shape[1] - 1)
        return logits + log_weights.masked_fill(is_positive, 0.0)


class AlignLoss(_SoftmaxContrastiveLoss):
    """ALIGN's loss: similarities divided by a raw (unclamped) temperature, label smoothing 0.1.

    Call as ``loss(image_embeds, text_embeds, model.temperature)``; ``temperature_init`` (ALIGN: 1.0) makes the
    loss own the temperature instead. Built from a config it uses the model's temperature.
    """

    name = "align"

    def __init__(
        self,
        label_smoothing: float = 0.1,
        gather_with_grad: bool = True,
        local_loss: bool = True,
        normalize: bool = True,
        temperature_init: float | None = None,
        hard_negative_beta: float = 0.0,
        fixed_temperature: bool = False,
    ):
        super().__init__(label_smoothing, gather_with_grad, local_loss, normalize, hard_negative_beta)
        self.temperature = _owned_scalar(temperature_init)
        self.fixed_temperature = fixed_temperature
        if fixed_temperature and self.temperature is not None:
            self.temperature.requires_grad_(False)

    @classmethod
    def from_config(cls, settings: LossSettings, temperature: float) -> AlignLoss:
        """The model's temperature at every call (``temperature`` is not needed), trained unless
        ``fixed_temperature``."""
        return cls(**cls.settings_options(settings), fixed_temperature=settings.fixed_temperature)

    @property
    def uses_model_temperature(self) -> bool:
        return self.temperature is None

    def attach(self, model: nn.Module) -> None:
        """Keep the model's temperature where it starts when the loss fixes it."""
        if self.fixed_temperature:
            model.temperature.requires_grad_(False)

    def temperature_in_use(self, model: nn.Module) -> float:
        """The raw temperature that divides the similarities: the model's, or the loss's own."""
        return float((model.temperature if self.temperature is None else self.temperature).detach())

    def forward(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, temperature: torch.Tensor | None = None,
        pair_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of the local batch (B, D) against the global one; a 0-d tensor. `pair_weights` (B,): see
        `loss_from_scale`."""
        temperature = _pick(temperature, self.temperature, "temperature")
        return self.loss_from_scale(image_embeds, text_embeds, 1.0 / temperature, pair_weights)


class ComplementaryContrastiveLoss(AlignLoss):
    """The complementary contrastive loss (RCL, Hu et al., TPAMI 2023): each row pushes its negatives away,
    l_i = -sum_{j != i} log(1 - p_ij) with p_i = softmax of row i, in both directions. It never pulls the
    labelled positive, whose probability only rises as the negatives' fall, so a wrong positive pulls at most
    as hard as it is unlikely: a mismatched caption's damage is bounded. The model's temperature, as ALIGN;
    label smoothing does not apply."""

    name = "rcl"
    hard_negatives = False

    def row_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """-sum over each row's negatives of log(1 - p_ij): (rows,)."""
        probabilities = logits.softmax(dim=-1)
        # A negative with all the row's mass (p = 1 in float32) would give -log(0); its gradient is cut there.
        complement = torch.log1p(-probabilities.clamp(max=1.0 - 1e-6))
        complement = complement.scatter(1, labels[:, None], 0.0)  # the positive is not a negative
        return -complement.sum(dim=-1)


class RobustInfoNCELoss(AlignLoss):
    """Robust InfoNCE (RINCE, Chuang et al., CVPR 2022) in both directions:
    l_i = -exp(q z_ii) / q + (lam * sum_j exp(z_ij))^q / q, z the scaled similarities. Its gradient is
    InfoNCE's times exp(q z_ii)-like factors: positives the model finds unlikely (mismatched captions, once it
    has learnt something) count less. q -> 0 is InfoNCE; q = 1 is symmetric and most robust. Settings
    `loss.robust_q` and `loss.robust_lambda`; the model's temperature, as ALIGN; label smoothing does not
    apply."""

    name = "rince"
    hard_negatives = False

    def __init__(self, q: float = 0.5, lam: float = 0.01, **options):
        super().__init__(**options)
        if not 0.0 < q <= 1.0:
            raise ConfigError(f"loss.robust_q must lie in (0, 1], got {q}")
        if lam <= 0:
            raise ConfigError(f"loss.robust_lambda must be positive, got {lam}")
        self.q, self.lam = q, lam

    @classmethod
    def from_config(cls, settings: LossSettings, temperature: float) -> RobustInfoNCELoss:
        """The model's temperature, q and lambda from the loss section."""
        return cls(q=settings.robust_q, lam=settings.robust_lambda, **cls.settings_options(settings),
                   fixed_temperature=settings.fixed_temperature)

    def row_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """-exp(q z_pos) / q + exp(q (log lam + logsumexp z)) / q per row: (rows,)."""
        positive = logits.gather(1, labels[:, None])[:, 0]
        everything = math.log(self.lam) + logits.logsumexp(dim=-1)
        return (torch.exp(self.q * everything) - torch.exp(self.q * positive)) / self.q


class ClipLoss(_SoftmaxContrastiveLoss):
    """CLIP's loss: scale = exp(logit_scale), capped at ``max_scale`` (100), no label smoothing by default.

    The cap is applied in the forward, so the logits never exceed it; a parameter that an optimiser step pushed
    past the cap gets no gradient, so call ``clamp_()`` after each step, as CLIP does, to keep it learnable
    (``after_step`` does). Built from a config it owns its log-scale, started at the model's temperature.
    """

    name = "clip"

    def __init__(
        self,
        label_smoothing: float = 0.0,
        gather_with_grad: bool = True,
        local_loss: bool = True,
        normalize: bool = True,
        logit_scale_init: float | None = None,
        max_scale: float = 100.0,
        hard_negative_beta: float = 0.0,
    ):
        super().__init__(label_smoothing, gather_with_grad, local_loss, normalize, hard_negative_beta)
        if max_scale <= 0:
            raise ConfigError(f"max_scale must be positive, got {max_scale}")
        self.max_log_scale = math.log(max_scale)
        self.logit_scale = _owned_scalar(logit_scale_init)

    @classmethod
    def from_config(cls, settings: LossSettings, temperature: float) -> ClipLoss:
        """Its own log-scale, starting at -log(temperature): the same softmax the model's temperature gave."""
        return cls(**cls.settings_options(settings), logit_scale_init=-math.log(temperature))

    def forward(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | None = None,
        pair_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of the local batch (B, D) against the global one; a 0-d tensor. `pair_weights` (B,): see
        `loss_from_scale`."""
        logit_scale = _pick(logit_scale, self.logit_scale, "logit_scale")
        return self.loss_from_scale(image_embeds, text_embeds, logit_scale.clamp(max=self.max_log_scale).exp(),
                                    pair_weights)

    @torch.no_grad()
    def clamp_(self, logit_scale: torch.Tensor | None = None) -> None:
        """Clamp the log-scale parameter in place to [0, log(max_scale)]."""
        _pick(logit_scale, self.logit_scale, "logit_scale").clamp_(0.0, self.max_log_scale)

    def after_step(self) -> None:
        """Clamp the owned log-scale back into [0, log(max_scale)], where it gets gradients."""
        if self.logit_scale is not None:
            self.clamp_()


class SigLipLoss(ContrastiveLoss):
    """SigLIP: a sigmoid loss on every (image, text) pair, positives on the diagonal.

    loss = -1/N * sum_ij log sigmoid(z_ij * (exp(logit_scale) * <x_i, y_j> + logit_bias)), z = +1 on the
    diagonal, -1 elsewhere; N the global batch. By default the loss owns logit_scale (init log 10) and
    logit_bias (init -10), as in the SigLIP paper; pass ``None`` inits to take them as forward arguments.
    Distributed: each rank scores its B images against all N texts gathered with gradient, so the ranks'
    losses average to the global value (each pair is counted on exactly one rank). Built from a config it owns
    both, at the paper's values; label smoothing and hard negatives do not apply.
    """

    name = "siglip"

    def __init__(
        self,
        logit_scale_init: float | None = math.log(10.0),
        logit_bias_init: float | None = -10.0,
        normalize: bool = True,
    ):
        super().__init__()
        self.normalize = normalize
        self.logit_scale = _owned_scalar(logit_scale_init)
        self.logit_bias = _owned_scalar(logit_bias_init)

    @classmethod
    def from_config(cls, settings: LossSettings, temperature: float) -> SigLipLoss:
        """Its own scale and bias at SigLIP's starting values (``temperature`` is not used)."""
        return cls()

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor | None = None,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of the local images (B, D) against all texts; a 0-d tensor."""
        logit_scale = _pick(logit_scale, self.logit_scale, "logit_scale")
        logit_bias = _pick(logit_bias, self.logit_bias, "logit_bias")
        if self.normalize:
            image_embeds, text_embeds = normalize(image_embeds), normalize(text_embeds)
        info = world_info()
        world_size, rank = info.world_size, info.rank
        batch_size = image_embeds.shape[0]
        if world_size > 1:
            # Images stay local: the pairs (local image, any text) partition the N x N grid across ranks.
            text_embeds = all_gather_with_grad(text_embeds)  # (N, D)
        logits = logit_scale.exp() * image_embeds @ text_embeds.T + logit_bias  # (B, N)
        signs = -torch.ones_like(logits)
        signs.diagonal(offset=rank * batch_size if world_size > 1 else 0).fill_(1.0)
        return -F.logsigmoid(signs * logits).sum() / batch_size


LOSSES: dict[str, type[ContrastiveLoss]] = {
    loss.name: loss for loss in (AlignLoss, ClipLoss, SigLipLoss, ComplementaryContrastiveLoss, RobustInfoNCELoss)
}


def loss_class(name: str) -> type[ContrastiveLoss]:
    """The loss registered under ``name`` in ``LOSSES``; a ConfigError naming the choices otherwise."""
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[name]


def build_loss(kind: str = "align", **kwargs) -> ContrastiveLoss:
    """Build a loss by name ("align" by default; see LOSSES); kwargs go to its constructor."""
    return loss_class(kind)(**kwargs)
