"""Random feature embedding (Baur et al. 2017): sampling, distances and the margin loss.

Pure functions on flattened per-pixel features ``[N, F]`` and per-pixel classes ``[N]``
(``-1`` marks a pixel that takes no part: outside the field of view, or unlabelled
without a prior). Pixels are sampled as foreground (class > 0) or background (class 0)
according to one of the paper's three strategies (§2.2):

- ``uniform50``: half of the samples from the foreground, half from the background
  ("50/50 RFE"; oversamples the rarer group);
- ``distribution``: in proportion to the pixel frequencies ("distribution-aware RFE";
  may undersample a rare group);
- ``80_20``: 80 % background, 20 % foreground ("80/20 RFE", the paper's best).

Within each group pixels are drawn uniformly with replacement. The embedding loss is
Eq. 2 of the paper, averaged over the ``n_E (n_E − 1)`` ordered pairs of distinct
samples instead of summed, so that its weight does not scale with ``n_E²``.
"""

from __future__ import annotations

import torch

SAMPLING_STRATEGIES = ("uniform50", "distribution", "80_20")
DISTANCES = ("acd", "l2")


def foreground_fraction(strategy: str, classes: torch.Tensor) -> float:
    """Share of the samples to draw from the foreground under ``strategy``.

    Args:
        strategy: one of :data:`SAMPLING_STRATEGIES`.
        classes: ``[N]`` integer classes, ``-1`` for pixels that are not used.

    Returns:
        A fraction in [0, 1]; 0 when there is no foreground pixel, 1 when there is no
        background pixel.

    Raises:
        ValueError: unknown strategy.
    """
    if strategy not in SAMPLING_STRATEGIES:
        raise ValueError(f"unknown sampling strategy {strategy!r}; use one of {SAMPLING_STRATEGIES}")
    n_foreground = int((classes > 0).sum())
    n_background = int((classes == 0).sum())
    if n_foreground == 0 or n_background == 0:
        return float(n_foreground > 0)
    if strategy == "uniform50":
        return 0.5
    if strategy == "80_20":
        return 0.2
    return n_foreground / (n_foreground + n_background)


def sample_pixels(classes: torch.Tensor, num_samples: int, strategy: str,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices of ``num_samples`` pixels drawn by a random-feature-embedding strategy.

    Args:
        classes: ``[N]`` integer classes, ``-1`` for pixels that must not be drawn.
        num_samples: n_E, the number of embeddings to draw.
        strategy: one of :data:`SAMPLING_STRATEGIES`.
        generator: random generator (CPU).

    Returns:
        ``[num_samples]`` long indices into ``classes`` (on its device), foreground
        first; empty when no pixel is usable.

    Raises:
        ValueError: unknown strategy or a negative ``num_samples``.
    """
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}")
    fraction = foreground_fraction(strategy, classes)
    flat = classes.reshape(-1).cpu()
    foreground = torch.nonzero(flat > 0).squeeze(1)
    background = torch.nonzero(flat == 0).squeeze(1)
    if foreground.numel() + background.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=classes.device)
    n_foreground = int(round(num_samples * fraction))
    picked = [_draw(foreground, n_foreground, generator), _draw(background, num_samples - n_foreground, generator)]
    return torch.cat(picked).to(classes.device)


def _draw(pool: torch.Tensor, count: int, generator: torch.Generator | None) -> torch.Tensor:
    """``count`` elements of ``pool`` drawn uniformly with replacement."""
    if count == 0 or pool.numel() == 0:
        return pool[:0]
    return pool[torch.randint(pool.numel(), (count,), generator=generator)]


def angular_cosine_distance(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pairwise cosine distance ``1 − cos(h_i, h_j)`` of the rows of ``features``.

    0 for vectors pointing the same way, 1 for orthogonal ones (the paper's margin m = 1
    makes embeddings of different classes orthogonal), 2 for opposite ones; within
    [0, 1] for the non-negative features of a ReLU layer, as the paper notes.

    Args:
        features: ``[n, F]``.
        eps: lower bound of the norms (a zero vector has distance 1 to every vector).

    Returns:
        ``[n, n]`` distances in [0, 2].
    """
    unit = features.float() / features.float().norm(dim=1, keepdim=True).clamp_min(eps)
    return (1.0 - unit @ unit.t()).clamp(0.0, 2.0)


def l2_distance(features: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distance ``‖h_i − h_j‖₂`` of the rows of ``features``.

    Identical rows get distance 0 and a zero (not NaN) gradient.

    Args:
        features: ``[n, F]``.

    Returns:
        ``[n, n]`` non-negative distances.
    """
    x = features.float()
    squared = (x.unsqueeze(1) - x.unsqueeze(0)).pow(2).sum(dim=-1)
    positive = squared > 0
    safe = torch.where(positive, squared, torch.ones_like(squared))
    return torch.where(positive, safe.sqrt(), torch.zeros_like(squared))


def pairwise_distance(name: str, features: torch.Tensor) -> torch.Tensor:
    """Pairwise distances by name: ``acd`` (:func:`angular_cosine_distance`) or ``l2``.

    Raises:
        ValueError: unknown name.
    """
    if name == "acd":
        return angular_cosine_distance(features)
    if name == "l2":
        return l2_distance(features)
    raise ValueError(f"unknown embedding distance {name!r}; use one of {DISTANCES}")


def margin_embedding_loss(distances: torch.Tensor, adjacency: torch.Tensor, margin: float) -> torch.Tensor:
    """Eq. 2 of Baur et al.: d for adjacent pairs, max(0, m − d) for the others.

    The diagonal (a sample with itself) is left out; the result is the mean over the
    remaining ordered pairs.

    Args:
        distances: ``[n, n]`` pairwise distances.
        adjacency: ``[n, n]`` boolean (or 0/1) adjacency, 1 = similar.
        margin: m, the distance beyond which dissimilar pairs cost nothing.

    Returns:
        Scalar loss; zero (still connected to ``distances``) when ``n < 2``.
    """
    n = distances.shape[0]
    if n < 2:
        return distances.sum() * 0.0
    similar = adjacency.bool()
    per_pair = torch.where(similar, distances, (margin - distances).clamp_min(0.0))
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=distances.device)
    return per_pair[off_diagonal].mean()


def random_feature_embedding_loss(features: torch.Tensor, classes: torch.Tensor, *, num_samples: int,
                                  strategy: str, distance: str, margin: float,
                                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Embedding loss on ``num_samples`` pixels sampled from a batch's feature maps.

    Args:
        features: ``[B, F, *spatial]`` per-pixel features.
        classes: ``[B, *spatial]`` integer classes (labels or a prior), ``-1`` = unused.
        num_samples: n_E.
        strategy: one of :data:`SAMPLING_STRATEGIES`.
        distance: one of :data:`DISTANCES`.
        margin: m of :func:`margin_embedding_loss`.
        generator: random generator for the sampling.

    Returns:
        Scalar loss (adjacency 1 for pixels of the same class).

    Raises:
        ValueError: unknown strategy or distance, or mismatched shapes.
    """
    if features.shape[0] != classes.shape[0] or features.shape[2:] != classes.shape[1:]:
        raise ValueError(f"features {tuple(features.shape)} and classes {tuple(classes.shape)} do not match")
    flat_features = features.movedim(1, -1).reshape(-1, features.shape[1])
    flat_classes = classes.reshape(-1)
    index = sample_pixels(flat_classes, num_samples, strategy, generator)
    sampled_classes = flat_classes[index]
    adjacency = sampled_classes.unsqueeze(0) == sampled_classes.unsqueeze(1)
    return margin_embedding_loss(pairwise_distance(distance, flat_features[index]), adjacency, margin)
