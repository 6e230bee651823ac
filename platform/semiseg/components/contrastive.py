"""Global contrastive learning pieces (SimCLR / Chaitanya et al. 2020).

- :func:`nt_xent_loss`: the normalised temperature-scaled cross-entropy of SimCLR (Chen
  et al. 2020), the "global loss" of Chaitanya et al. (NeurIPS 2020).
- :func:`unet_bottleneck`: the U-Net encoder run alone, up to its deepest block.
- :class:`ProjectionHead`: the small MLP g that maps pooled encoder features to the
  space where the loss is computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent between two views: row i of ``z1`` and row i of ``z2`` are a positive pair.

    For each of the 2N anchors i with positive j: −log(exp(s_ij/τ) / Σ_{k≠i} exp(s_ik/τ)),
    s the cosine similarity; averaged over the 2N anchors.

    Args:
        z1: ``[N, D]`` projections of the first views.
        z2: ``[N, D]`` projections of the second views.
        temperature: τ > 0.

    Returns:
        Scalar loss.

    Raises:
        ValueError: shapes differ or τ ≤ 0.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"views must both be [N, D], got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = z1.shape[0]
    similarity = (z @ z.t()) / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    similarity = similarity.masked_fill(self_mask, float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(similarity, positives)


def unet_bottleneck(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run only the encoder of a :class:`semiseg.models.unet.UNet` (as in its ``forward``).

    Args:
        network: a U-Net, possibly wrapped in ``DistributedDataParallel``.
        x: ``[B, C, *spatial]`` images.

    Returns:
        ``[B, F, *spatial / 2**depth]`` output of the deepest encoder block.

    Raises:
        TypeError: the network has no ``encoders``/``pool``/``depth`` (not a U-Net).
    """
    unet = network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network
    if not all(hasattr(unet, name) for name in ("encoders", "pool", "depth")):
        raise TypeError(f"{type(unet).__name__} is not a U-Net with encoders, pool and depth")
    return network(x, encode_only=True)


class ProjectionHead(nn.Module):
    """g: global average pooling, then Linear → ReLU → Linear.

    Args:
        in_channels: channels of the bottleneck features.
        projection_dim: output dimension.
        hidden: hidden width (default: ``in_channels``).
    """

    def __init__(self, in_channels: int, projection_dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or in_channels
        self.mlp = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, projection_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Project ``[B, F, *spatial]`` feature maps to ``[B, projection_dim]``."""
        return self.mlp(features.flatten(2).mean(dim=2))
