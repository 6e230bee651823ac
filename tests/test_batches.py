"""Mixed labelled/unlabelled batches: composition, rank-disjointness, determinism, 3D patches."""

import numpy as np
import pytest
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


def test_batches_name_their_samples_by_their_index_in_the_whole_pool():
    images_l, labels_l, images_u = _pools()
    seen_u = []
    for rank in range(2):
        sampler = MixedBatchSampler(images_l, labels_l, images_u, labelled_per_batch=2, unlabelled_per_batch=3,
                                    rank=rank, world_size=2, seed=1)
        batches = list(sampler.epoch(3, 6))
        for batch in batches:
            assert batch["index_u"].dtype == torch.int64 and batch["index_l"].dtype == torch.int64
            assert torch.equal(batch["image_u"], torch.from_numpy(images_u[batch["index_u"].numpy()]))
            assert torch.equal(batch["image_l"], torch.from_numpy(images_l[batch["index_l"].numpy()]))
            assert torch.equal(batch["label_l"], torch.from_numpy(labels_l[batch["index_l"].numpy()]))
        resumed = MixedBatchSampler(images_l, labels_l, images_u, labelled_per_batch=2, unlabelled_per_batch=3,
                                    rank=rank, world_size=2, seed=1)
        again = list(resumed.epoch(3, 6))
        assert all(torch.equal(a[k], b[k]) for a, b in zip(batches, again) for k in ("index_u", "index_l"))
        seen_u.append({int(i) for b in batches for i in b["index_u"]})
    assert seen_u[0] and seen_u[1] and not (seen_u[0] & seen_u[1]), "ranks name disjoint samples"
    assert seen_u[0] <= set(range(0, 10, 2)) and seen_u[1] <= set(range(1, 10, 2))


def test_batches_carry_the_samples_positions():
    from semiseg.data.prepared import sample_positions

    volumes = [np.zeros((1, 8, 8, 5), np.float32), np.zeros((1, 8, 8, 1), np.float32), np.zeros((1, 8, 8, 3))]
    positions = sample_positions(volumes, dims=2)
    np.testing.assert_allclose(positions, [0, 0.25, 0.5, 0.75, 1, 0, 0, 0.5, 1])
    np.testing.assert_array_equal(sample_positions(volumes, dims=3), [0.5, 0.5, 0.5])
    images_l, labels_l, images_u = _pools(n_l=3, n_u=9)
    sampler = MixedBatchSampler(images_l, labels_l, images_u, labelled_per_batch=2, unlabelled_per_batch=4,
                                unlabelled_positions=positions, labelled_positions=np.array([0.0, 0.5, 1.0]))
    for batch in sampler.epoch(0, 4):
        assert batch["position_u"].dtype == torch.float32
        np.testing.assert_allclose(batch["position_u"].numpy(), positions[batch["index_u"].numpy()])
        np.testing.assert_allclose(batch["position_l"].numpy(), batch["index_l"].numpy() / 2)
    plain = next(MixedBatchSampler(images_l, labels_l, images_u, 2, 4).epoch(0, 1))
    assert not plain["position_u"].any(), "no positions given: zeros"


def test_3d_patches_carry_their_volume_and_origin():
    rng = np.random.default_rng(0)
    images_l = rng.normal(size=(3, 1, 12, 12, 10)).astype(np.float32)
    labels_l = (rng.random((3, 12, 12, 10)) > 0.5).astype(np.int64)
    images_u = rng.normal(size=(5, 1, 12, 12, 10)).astype(np.float32)
    sampler = MixedBatchSampler(images_l, labels_l, images_u, labelled_per_batch=2, unlabelled_per_batch=3,
                                patch_size=(8, 8, 4), rank=1, world_size=2)
    for batch in sampler.epoch(0, 5):
        for part, pool in (("u", images_u), ("l", images_l)):
            assert batch[f"origin_{part}"].shape == (batch[f"index_{part}"].shape[0], 3)
            assert all(int(i) % 2 == 1 for i in batch[f"index_{part}"])
            for image, index, origin, position in zip(batch[f"image_{part}"], batch[f"index_{part}"],
                                                      batch[f"origin_{part}"], batch[f"position_{part}"]):
                x, y, z = (int(o) for o in origin)
                np.testing.assert_array_equal(image.numpy(), pool[int(index)][:, x:x + 8, y:y + 8, z:z + 4])
                assert float(position) == pytest.approx((z + 1.5) / 9)
        x, y, z = (int(o) for o in batch["origin_l"][0])
        np.testing.assert_array_equal(batch["label_l"][0].numpy(),
                                      labels_l[int(batch["index_l"][0])][x:x + 8, y:y + 8, z:z + 4])


def test_streamed_unlabelled_samples_are_named_as_in_memory(tmp_path):
    from semiseg.data import read_layout, write_case, write_dataset_json
    from semiseg.data.prepared import prepare_split

    root = tmp_path / "Dataset011_Named"
    write_dataset_json(root, "Named", {"0": "MRI"}, {"background": 0, "fg": 1}, num_training=3)
    for k, depth in enumerate((4, 3, 2, 5, 1, 3, 4)):
        image = (np.arange(depth, dtype=np.float32) * 10 + k * 100)[None, None, None] + np.zeros((1, 6, 6, depth),
                                                                                                  np.float32)
        image += np.random.default_rng(k).normal(0, 0.1, image.shape).astype(np.float32)
        write_case(root, f"case_{k}", image, (image[0] > k * 100 + 5).astype(np.int16) if k < 3 else None,
                   (1.0, 1.0, 2.0))
    split = {"num_labelled": 1, "num_validation": 1, "num_test": 1, "split_seed": 0, "dims": 2}
    memory = prepare_split(read_layout(root), cache_root=tmp_path / "cache", loader="memory", **split)
    streamed = prepare_split(read_layout(root), cache_root=tmp_path / "cache", loader="stream",
                             stream_buffer_rows=4, **split)
    assert memory.unlabelled_positions is not None and len(memory.unlabelled_positions) == memory.num_unlabelled
    sampler = MixedBatchSampler(streamed.labelled_images, streamed.labelled_labels, streamed.unlabelled_images, 1, 3,
                                unlabelled_stream=streamed.unlabelled_stream)
    named = 0
    for batch in sampler.epoch(0, 6):
        indices = batch["index_u"].numpy()
        np.testing.assert_array_equal(batch["image_u"].numpy(), memory.unlabelled_images[indices])
        np.testing.assert_allclose(batch["position_u"].numpy(), memory.unlabelled_positions[indices])
        named += len(indices)
    assert named == 18
