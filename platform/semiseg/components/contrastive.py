"""Contrastive learning pieces of Chaitanya et al., "Contrastive learning of global and local
features for medical image segmentation with limited annotations" (NeurIPS 2020).

- :func:`nt_xent_loss`: the normalised temperature-scaled cross-entropy of SimCLR (Chen
  et al. 2020), the paper's global loss with random positives (G^R).
- :func:`slice_partitions`, :func:`grouped_contrastive_loss`, :func:`domain_contrastive_loss`:
  the global loss whose positives are the images of the same partition of their volumes (G^D).
- :func:`region_features`, :func:`local_contrastive_loss`: the local loss (L) between the
  decoder feature maps of two intensity-augmented views.
- :func:`unet_bottleneck`, :func:`unet_decoder_features`: the U-Net run up to its bottleneck,
  or up to a decoder block on a frozen encoder.
- :class:`ProjectionHead` (g_1, global) and :class:`LocalProjectionHead` (g_2, local): the
  small heads that map features to the space where the losses are computed.
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
    n = z1.shape[0]
    similarity = _similarity_logits(torch.cat([z1, z2]), temperature)
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=similarity.device)
    similarity = similarity.masked_fill(self_mask, float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(similarity.device)
    return F.cross_entropy(similarity, positives)


def _similarity_logits(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """``[M, M]`` cosine similarities of the rows of ``z`` over τ, in float32 even under autocast."""
    with torch.autocast(device_type=z.device.type, enabled=False):
        unit = F.normalize(z.float(), dim=1)
        return (unit @ unit.t()) / temperature


def slice_partitions(positions: torch.Tensor, partitions: int) -> torch.Tensor:
    """The partition of each slice: its volume split into ``partitions`` equal parts along the slice axis.

    ``min(S - 1, floor(position * S))``: position 0.25 with S = 4 is partition 1, position 1.0
    (the last slice) partition 3.

    Args:
        positions: ``[B]`` relative positions of the slices in their volumes, in [0, 1].
        partitions: S ≥ 1.

    Returns:
        ``[B]`` int64 partition indices in 0 … S − 1.

    Raises:
        ValueError: S < 1 or a position outside [0, 1].
    """
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    positions = positions.detach().reshape(-1).double()
    if positions.numel() and (float(positions.min()) < 0.0 or float(positions.max()) > 1.0):
        raise ValueError(f"slice positions must lie in [0, 1], got {positions.tolist()}")
    return torch.floor(positions * partitions).long().clamp(max=partitions - 1)


def grouped_contrastive_loss(z: torch.Tensor, groups: torch.Tensor, temperature: float) -> torch.Tensor:
    """Contrastive loss whose positives are the other rows of the same group, its negatives those of other groups.

    Eq. (1) of Chaitanya et al. for every ordered positive pair (i, p), p ≠ i in i's group:
    l(i, p) = −log(e^{s_ip/τ} / (e^{s_ip/τ} + Σ_{n ∉ group(i)} e^{s_in/τ})), s the cosine
    similarity; the other positives of i are in neither the numerator nor the denominator.
    Averaged over each anchor's positives, then over the anchors that have one. With one
    group per image (its two views) this is :func:`nt_xent_loss`; an anchor without
    negatives contributes 0.

    Args:
        z: ``[M, D]`` projections.
        groups: ``[M]`` integer group of each row.
        temperature: τ > 0.

    Returns:
        Scalar loss (0 when no row has a positive).

    Raises:
        ValueError: shapes disagree or τ ≤ 0.
    """
    if z.ndim != 2 or groups.shape != (z.shape[0],):
        raise ValueError(f"need z [M, D] and groups [M], got {tuple(z.shape)} and {tuple(groups.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    similarity = _similarity_logits(z, temperature)
    groups = groups.to(z.device)
    same = groups[:, None] == groups[None, :]
    positive = same & ~torch.eye(len(groups), dtype=torch.bool, device=z.device)
    negatives = similarity.masked_fill(same, float("-inf")).logsumexp(dim=1, keepdim=True)
    pair_losses = torch.logaddexp(similarity, negatives) - similarity
    counts = positive.sum(dim=1)
    anchors = counts > 0
    if not bool(anchors.any()):
        return similarity.sum() * 0.0
    per_anchor = (pair_losses * positive).sum(dim=1)[anchors] / counts[anchors]
    return per_anchor.mean()


def domain_contrastive_loss(z1: torch.Tensor, z2: torch.Tensor, partitions: torch.Tensor,
                            temperature: float) -> torch.Tensor:
    """Global loss G^D: an image's positives are its other view and every image (both views) of the same partition.

    Negatives are the images of the other partitions, so the images of the same partition
    in other volumes are pulled together, never pushed apart (Chaitanya et al., Sec. 3.1,
    strategy G^D; reference code ``global_loss_exp_no=2``).

    Args:
        z1, z2: ``[N, D]`` projections of the two views; row i of both is image i.
        partitions: ``[N]`` partition of each image (:func:`slice_partitions`).
        temperature: τ > 0.

    Raises:
        ValueError: shapes disagree or τ ≤ 0.
    """
    if z1.shape != z2.shape or partitions.shape != (z1.shape[0],):
        raise ValueError(f"views must both be [N, D] with [N] partitions, got {tuple(z1.shape)}, "
                         f"{tuple(z2.shape)} and {tuple(partitions.shape)}")
    return grouped_contrastive_loss(torch.cat([z1, z2]), torch.cat([partitions, partitions]), temperature)


def region_starts(length: int, region_size: int, regions: int) -> list[int]:
    """First indices of up to ``regions`` regions of ``region_size`` evenly spread along an axis of ``length``.

    The first region touches the start, the last the end (as the corner regions of the
    reference code); positions that coincide on a short axis are kept once, and an axis
    shorter than ``region_size`` has one region covering it (see :func:`region_features`).
    """
    size = min(region_size, length)
    if regions == 1:
        return [(length - size) // 2]
    return sorted({round(i * (length - size) / (regions - 1)) for i in range(regions)})


def region_features(features: torch.Tensor, region_size: int, regions_per_axis: int) -> torch.Tensor:
    """Mean feature vector of each local region of a feature map.

    Regions are cubes of ``region_size`` pixels per axis (fewer on an axis shorter than that),
    ``regions_per_axis`` of them evenly spread along each spatial axis (:func:`region_starts`),
    so a 2D map has up to ``regions_per_axis**2`` regions, a 3D one ``regions_per_axis**3``.

    Args:
        features: ``[B, C, *spatial]`` (2 or 3 spatial axes).
        region_size: pixels per axis of a region (≥ 1).
        regions_per_axis: regions along each axis (≥ 1).

    Returns:
        ``[B, R, C]``, regions in row-major order of their grid positions.

    Raises:
        ValueError: a size or count below 1.
    """
    if region_size < 1 or regions_per_axis < 1:
        raise ValueError(f"region_size and regions_per_axis must be >= 1, got {region_size}, {regions_per_axis}")
    pooled = features
    for axis, length in enumerate(features.shape[2:]):
        size = min(region_size, length)
        starts = region_starts(length, region_size, regions_per_axis)
        weights = torch.zeros(len(starts), length, dtype=features.dtype, device=features.device)
        for row, start in enumerate(starts):
            weights[row, start:start + size] = 1.0 / size
        pooled = torch.movedim(torch.movedim(pooled, 2 + axis, -1) @ weights.t(), -1, 2 + axis)
    return pooled.flatten(2).transpose(1, 2)


def local_contrastive_loss(f1: torch.Tensor, f2: torch.Tensor, region_size: int, regions_per_axis: int,
                           temperature: float) -> torch.Tensor:
    """Local loss L between the feature maps of two views of the same images (spatially aligned).

    For each image and local region u (:func:`region_features`): the positive of u in one
    view is u in the other view; the negatives are the other regions of both views of the
    same image (Chaitanya et al., Sec. 3.2). The loss of an anchor is Eq. (1) with these
    sets, i.e. NT-Xent over the 2R region vectors of each image, averaged over anchors and images.

    Args:
        f1, f2: ``[B, C, *spatial]`` projected feature maps of the two views.
        region_size, regions_per_axis: as in :func:`region_features`.
        temperature: τ > 0.

    Returns:
        Scalar loss.

    Raises:
        ValueError: shapes differ, fewer than 2 regions or τ ≤ 0.
    """
    if f1.shape != f2.shape:
        raise ValueError(f"feature maps must have the same shape, got {tuple(f1.shape)} and {tuple(f2.shape)}")
    r1 = region_features(f1, region_size, regions_per_axis)
    r2 = region_features(f2, region_size, regions_per_axis)
    if r1.shape[1] < 2:
        raise ValueError(f"the local loss needs at least 2 regions per feature map, got {r1.shape[1]} "
                         f"(feature map {tuple(f1.shape[2:])})")
    losses = [nt_xent_loss(a, b, temperature) for a, b in zip(r1, r2)]
    return torch.stack(losses).mean()


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


def unet_decoder_features(network: nn.Module, x: torch.Tensor, blocks: int, frozen_encoder: bool) -> torch.Tensor:
    """Output of the ``blocks``-th decoder block of a :class:`semiseg.models.unet.UNet`.

    Only the decoder blocks up to that one run (going through ``forward``, so DDP sees the
    later blocks and the head as unused).

    Args:
        network: a U-Net, possibly wrapped in ``DistributedDataParallel``.
        x: ``[B, C, *spatial]`` images.
        blocks: 1 … depth (1: the coarsest decoder block).
        frozen_encoder: the encoder runs without gradient.

    Returns:
        ``[B, width * 2**(depth - blocks), *spatial / 2**(depth - blocks)]``.

    Raises:
        TypeError: not a U-Net.
    """
    unet = network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network
    if not all(hasattr(unet, name) for name in ("encoders", "decoders", "depth")):
        raise TypeError(f"{type(unet).__name__} is not a U-Net with encoders, decoders and depth")
    return network(x, decoder_features=True, decoder_blocks=blocks, frozen_encoder=frozen_encoder)[-1]


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


class LocalProjectionHead(nn.Module):
    """g_2: two 1×1 convolutions (ReLU between) on a decoder feature map, as in the reference code.

    Args:
        dims: 2 or 3.
        channels: channels of the decoder feature map (kept at the output).
    """

    def __init__(self, dims: int, channels: int) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.net = nn.Sequential(conv(channels, channels, 1), nn.ReLU(inplace=True), conv(channels, channels, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Project ``[B, C, *spatial]`` per position; same shape out."""
        return self.net(features)
