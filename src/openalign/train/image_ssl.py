"""Image self-supervision beside the contrastive loss (the idea of SLIP, Mu et al. 2022): an optional second term.

Some of each batch's images are seen a second time, made unrecognisable by colour (channels permuted at
random, some turned grey, brightness and contrast jittered) and moved a little (scaled, shifted, mirrored).
A small MLP head maps the image tower's features of both views to a space where an InfoNCE loss asks each image
to find its own second view among the others. Nothing in the second view says which colour the image had, so
the features that solve it are colour-free: shape, count, size, layout. A contrastive image-text loss alone
learns those slowly when colour already separates most captions, and ties them to the colours they were seen
with; the extra term is label-free and needs nothing but the images the step already has.

The second views go through the image tower in the same forward as the first (one batch, so DDP sees one
forward per step); the head is a training-only module, saved with the trainer's state and not in the model.
Negatives are the local batch's images: under torch.distributed each rank scores its own views.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from openalign.errors import ConfigError

if TYPE_CHECKING:
    from openalign.train.config import LossSection

# The six orders of three channels; one is drawn per image.
CHANNEL_ORDERS = torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]])


def second_view(pixels: torch.Tensor, grey_rate: float = 0.5, brightness: float = 0.3, contrast: float = 0.3,
                scale: tuple[float, float] = (0.8, 1.2), shift: float = 0.15,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 3, H, W) normalised pixels -> a colour-scrambled, slightly moved copy of the same shape.

    Per image: a random channel order, grey (the mean of the channels) with probability `grey_rate`, contrast
    times U(1 +- contrast) and brightness + U(+- brightness) (in the normalised units, where [-1, 1] is the
    range), a zoom by U(scale), a shift by up to `shift` of the half-width each way, and a mirror half the time.
    Draws come from `generator` (default: torch's global one), so a seeded run repeats them."""
    if pixels.dim() != 4 or pixels.shape[1] != 3:
        raise ValueError(f"second_view wants (B, 3, H, W) pixels, got {tuple(pixels.shape)}")
    b, device = pixels.shape[0], pixels.device

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator).mul_(high - low).add_(low).to(device)

    orders = CHANNEL_ORDERS[torch.randint(0, len(CHANNEL_ORDERS), (b,), generator=generator)].to(device)
    view = torch.gather(pixels, 1, orders[:, :, None, None].expand(-1, -1, *pixels.shape[2:]))  # (B, 3, H, W)
    grey = (torch.rand(b, generator=generator) < grey_rate).to(device, pixels.dtype)[:, None, None, None]
    view = grey * view.mean(1, keepdim=True) + (1 - grey) * view
    view = view * uniform(1 - contrast, 1 + contrast, b, 1, 1, 1) + uniform(-brightness, brightness, b, 1, 1, 1)

    zoom = uniform(scale[0], scale[1], b)
    mirror = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0).to(device)
    theta = torch.zeros(b, 2, 3, device=device, dtype=pixels.dtype)  # output -> input sampling coordinates
    theta[:, 0, 0] = zoom * mirror
    theta[:, 1, 1] = zoom
    theta[:, :, 2] = uniform(-shift, shift, b, 2)
    grid = F.affine_grid(theta, list(view.shape), align_corners=False)
    return F.grid_sample(view.contiguous(), grid, padding_mode="border", align_corners=False)  # (B, 3, H, W)


def build_image_ssl(loss: LossSection, embed_dim: int) -> ImageSelfSupervision | None:
    """The term a TrainConfig's loss section asks for (None when `image_ssl_weight` is 0), for an image
    embedding of `embed_dim`."""
    if loss.image_ssl_weight == 0:
        return None
    return ImageSelfSupervision(embed_dim, loss.image_ssl_weight, loss.image_ssl_images, loss.image_ssl_temperature,
                                warmup_steps=loss.image_ssl_warmup_steps)


class ImageSelfSupervision(nn.Module):
    """The head and the loss of the second term: `weight * InfoNCE(head(first), head(second))`.

    `images`: how many of each (local) batch's images get a second view (0: all); each costs one more image
    through the tower. `temperature`: of the InfoNCE (SimCLR's 0.1). `warmup_steps`: the weight rises linearly
    from 0 at step 0 to `weight` at this step (0: full weight from the start), so that the contrastive loss
    learns colour before the term, which rewards colour-free features, pulls at the same features."""

    def __init__(self, embed_dim: int, weight: float = 1.0, images: int = 0, temperature: float = 0.1,
                 hidden_dim: int = 512, out_dim: int = 128, warmup_steps: int = 0):
        super().__init__()
        if weight <= 0:
            raise ConfigError(f"loss.image_ssl_weight must be positive to build the term, got {weight}")
        if images < 0:
            raise ConfigError(f"loss.image_ssl_images must be 0 (all) or positive, got {images}")
        if temperature <= 0:
            raise ConfigError(f"loss.image_ssl_temperature must be positive, got {temperature}")
        if warmup_steps < 0:
            raise ConfigError(f"loss.image_ssl_warmup_steps must not be negative, got {warmup_steps}")
        self.weight, self.images, self.temperature, self.warmup_steps = weight, images, temperature, warmup_steps
        self.head = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(),
                                  nn.Linear(hidden_dim, out_dim))

    def second_views(self, pixels: torch.Tensor) -> torch.Tensor:
        """Second views of the first `images` images of the batch (all when 0 or more than the batch)."""
        count = len(pixels) if self.images == 0 else min(self.images, len(pixels))
        return second_view(pixels[:count])

    def weight_at(self, step: int | None) -> float:
        """The term's weight at optimiser step `step` (1-based; None: the full weight)."""
        if step is None or self.warmup_steps == 0:
            return self.weight
        return self.weight * min(1.0, step / self.warmup_steps)

    def forward(self, first: torch.Tensor, second: torch.Tensor, step: int | None = None) -> torch.Tensor:
        """(n, D) features of n images and (n, D) of their second views -> the 0-d loss, weighted as at `step`."""
        if first.shape != second.shape or len(first) < 2:
            raise ValueError(f"need matching features of at least 2 images, got {tuple(first.shape)} and "
                             f"{tuple(second.shape)}")
        a = F.normalize(self.head(first.float()), dim=-1)
        b = F.normalize(self.head(second.float()), dim=-1)
        logits = a @ b.T / self.temperature  # (n, n): image i against every second view
        target = torch.arange(len(a), device=a.device)
        return self.weight_at(step) * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
