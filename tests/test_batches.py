"""Mixed labelled/unlabelled batches: composition, rank-disjointness, determinism, 3D patches."""

import numpy as np
import torch

from semiseg.data.batches import MixedBatchSampler, rank_indices


def _pools(n_l=6, n_u=10, shape=(8, 8)):
    rng = np.random.default_rng(0)
    ones = np.ones((1, 1, *shape), np.float32)
    images_l = np.arange(n_l, dtype=np.float32).reshape(n_l, *[1] * (len(shape) + 1)) * ones
    labels_l = (rng.random((n_l, *shape)) > 0.5).astype(np.int64)
    images_u = 100 + np.arange(n_u, dtype=np.float32).reshape(n_u, *[1] * (len(shape) + 1)) * ones
    return images_l, labels_l, images_u


def test_batches_mix_in_the_configured_ratio_and_are_deterministic():
    sampler = MixedBatchSampler(*_pools(), labelled_per_batch=2, unlabelled_per_batch=3, seed=4)
    first = list(sampler.epoch(0, 5))
    again = list(sampler.epoch(0, 5))
    other = list(sampler.epoch(1, 5))
    assert len(first) == 5
    assert first[0]["image_l"].shape == (2, 1, 8, 8) and first[0]["image_u"].shape == (3, 1, 8, 8)
    assert first[0]["label_l"].dtype == torch.int64
    assert all(torch.equal(a["image_u"], b["image_u"]) for a, b in zip(first, again))
    assert not all(torch.equal(a["image_u"], b["image_u"]) for a, b in zip(first, other))
    assert all(float(b["image_u"].min()) >= 100 for b in first), "unlabelled samples come from the unlabelled pool"


def test_ranks_draw_from_disjoint_parts():
    parts = [set(rank_indices(10, rank, 3)) for rank in range(3)]
    assert set().union(*parts) == set(range(10))
    assert all(not (a & b) for i, a in enumerate(parts) for b in parts[i + 1:])
    seen = []
    for rank in range(2):
        sampler = MixedBatchSampler(*_pools(), labelled_per_batch=2, unlabelled_per_batch=2, rank=rank, world_size=2)
        seen.append({int(b["image_u"][k, 0, 0, 0]) for b in sampler.epoch(0, 20) for k in range(2)})
    assert not (seen[0] & seen[1])


def test_supervised_batches_have_no_unlabelled_part():
    sampler = MixedBatchSampler(*_pools(), labelled_per_batch=4, unlabelled_per_batch=0)
    assert "image_u" not in next(sampler.epoch(0, 1))


def test_3d_patches():
    images_l, labels_l, images_u = _pools(shape=(12, 12, 10))
    sampler = MixedBatchSampler(images_l, labels_l, images_u, labelled_per_batch=2, unlabelled_per_batch=2,
                                patch_size=(8, 8, 4))
    batch = next(sampler.epoch(0, 1))
    assert batch["image_l"].shape == (2, 1, 8, 8, 4) and batch["label_l"].shape == (2, 8, 8, 4)
    assert batch["image_u"].shape == (2, 1, 8, 8, 4)
