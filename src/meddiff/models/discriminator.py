"""A small patch discriminator for the adversarial losses of the autoencoder and of few-step distillation (diffusers
has none).

Each output pixel judges one receptive-field patch as real or generated; hinge losses as in VQGAN. With
`condition_dim` > 0 it is a projection discriminator (Miyato & Koyama 2018): each patch's logit adds the inner product
of its features with an embedding of the image's condition vector, so that it judges "a real image *of this
finding*", not only "a real image"."""

from __future__ import annotations

import torch
from torch import nn


class PatchDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 1, width: int = 32, layers: int = 3, condition_dim: int = 0):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = width
        for i in range(1, layers):
            nxt = min(width * 2**i, 256)
            blocks += [nn.Conv2d(ch, nxt, 4, 2, 1), nn.GroupNorm(8, nxt), nn.LeakyReLU(0.2)]
            ch = nxt
        blocks += [nn.Conv2d(ch, ch, 3, 1, 1), nn.GroupNorm(8, ch), nn.LeakyReLU(0.2), nn.Conv2d(ch, 1, 3, 1, 1)]
        self.net = nn.Sequential(*blocks)
        # the projection of the condition onto each patch's features (no bias: an absent condition adds nothing)
        self.embed = nn.Linear(condition_dim, ch, bias=False) if condition_dim > 0 else None

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is None:
            return self.net(x)
        if condition is None:
            raise ValueError("this discriminator is conditional: pass the condition vectors")
        features = self.net[:-1](x)
        projection = (features * self.embed(condition.to(features.dtype))[:, :, None, None]).sum(1, keepdim=True)
        return self.net[-1](features) + projection


def patch_layers(size: int, most: int = 3) -> int:
    """Strided layers for `size`-pixel inputs that leave a grid of at least 4 x 4 patches (at least one layer)."""
    layers = 1
    while layers < most and size // 2 ** (layers + 1) >= 4:
        layers += 1
    return layers


def discriminator_hinge_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (torch.relu(1 - real_logits).mean() + torch.relu(1 + fake_logits).mean())


def generator_adversarial_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()
