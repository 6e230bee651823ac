"""Pretext pretraining (Taleb 2020; Gidaris 2018; Noroozi & Favaro 2016): rotations, permutations, tiles, the method."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from semiseg.augment import AugmentSettings
from semiseg.components import pretext
from semiseg.components.pretext import (ROTATIONS_3D, centre_cube, extract_tiles, fit_to_encoder,
                                        hamming_distances, maximal_hamming_permutations, normalise_tiles,
                                        permute_tiles, rotate, rotate_each, rotation_classes, tile_layout)
from semiseg.methods import Progress, build_method

SPATIAL = {2: (16, 16), 3: (8, 16, 16)}
NO_INTENSITY = AugmentSettings(noise_std=0.0, intensity=0.0)


def _batch(dims: int, spatial: tuple[int, ...] | None = None) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    spatial = spatial or SPATIAL[dims]
    labels = torch.zeros((2, *spatial), dtype=torch.long)
    labels[(slice(None), *(slice(s // 4, 3 * s // 4) for s in spatial))] = 1
    return {"image_l": labels[:, None].float() + 0.3 * torch.randn((2, 1, *spatial), generator=generator),
            "label_l": labels,
            "image_u": torch.randn((2, 1, *spatial), generator=generator)}


def _pretrain(stage: str = "pretrain") -> Progress:
    return Progress(step=0, epoch=0.0, max_epochs=20, stage=stage)


def _min_off_diagonal(permutations: torch.Tensor) -> int:
    distances = hamming_distances(permutations, permutations)
    distances.fill_diagonal_(permutations.shape[1] + 1)
    return int(distances.min())


# Rotations -----------------------------------------------------------------------------------------------------


def test_2d_rotation_classes_are_quarter_turns():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    assert rotation_classes(2) == 4
    assert rotate(x, 0, 2).flatten().tolist() == [1, 2, 3, 4]
    assert rotate(x, 1, 2).flatten().tolist() == [2, 4, 1, 3]
    assert rotate(x, 2, 2).flatten().tolist() == [4, 3, 2, 1]
    assert rotate(x, 3, 2).flatten().tolist() == [3, 1, 4, 2]
    image = torch.randn(2, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    for k in range(4):
        torch.testing.assert_close(rotate(image, k, 2), torch.rot90(image, k, dims=(2, 3)))


def _rotation_matrix(label: int) -> torch.Tensor:
    """The linear map a 3D rotation class applies to centred voxel coordinates, measured on coordinate fields."""
    side = 5
    centred = torch.arange(side, dtype=torch.float64) - (side - 1) / 2
    fields = torch.stack(torch.meshgrid(centred, centred, centred, indexing="ij"))
    rotated = rotate(fields.unsqueeze(1), label, 3).squeeze(1)
    norm = float((fields[0] ** 2).sum())
    return torch.stack([torch.stack([(rotated[a] * fields[b]).sum() / norm for b in range(3)]) for a in range(3)])


def test_3d_rotation_classes_are_ten_distinct_proper_rotations():
    assert rotation_classes(3) == 10 == len(ROTATIONS_3D)
    volume = torch.randn(1, 1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    outputs = [rotate(volume, label, 3) for label in range(10)]
    assert len({tuple(o.flatten().tolist()) for o in outputs}) == 10
    torch.testing.assert_close(outputs[0], volume)
    matrices = [_rotation_matrix(label) for label in range(10)]
    for matrix in matrices:
        torch.testing.assert_close(matrix, matrix.round())
        torch.testing.assert_close(matrix @ matrix.T, torch.eye(3, dtype=torch.float64))
        assert float(torch.linalg.det(matrix)) == pytest.approx(1.0)
    assert len({tuple(m.round().flatten().tolist()) for m in matrices}) == 10
    # identity, then 90/180/270 degrees around each axis: the rotation angle is 0, 90, 180, 270 per axis
    angles = [round(math.degrees(math.acos((float(torch.trace(m)) - 1) / 2))) for m in matrices]
    assert angles == [0] + [90, 180, 90] * 3
    fixed_axes = [int(torch.argmax((torch.diagonal(m) == 1).int())) for m in matrices[1:]]
    assert fixed_axes == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_rotate_each_applies_each_images_class():
    images = torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([3, 0, 1, 3])
    rotated = rotate_each(images, labels, 2)
    for image, label, out in zip(images, labels, rotated):
        torch.testing.assert_close(out, torch.rot90(image, int(label), dims=(1, 2)))


def test_rotation_rejects_unknown_classes():
    with pytest.raises(ValueError, match="rotation class"):
        rotate(torch.zeros(1, 1, 2, 2, 2), 10, 3)
    with pytest.raises(ValueError, match="rotation class"):
        rotate(torch.zeros(1, 1, 2, 2), 4, 2)


def test_centre_cube_and_fit_to_encoder():
    x = torch.arange(8.0).view(1, 1, 2, 4)
    assert centre_cube(x).flatten().tolist() == [1, 2, 5, 6]
    volume = torch.zeros(1, 1, 4, 6, 9)
    assert centre_cube(volume).shape == (1, 1, 4, 4, 4)
    assert fit_to_encoder(torch.ones(2, 1, 2, 5), 4).shape == (2, 1, 4, 5)
    assert fit_to_encoder(torch.ones(2, 1, 1, 4, 4), 4).shape == (2, 1, 4, 4, 4)
    torch.testing.assert_close(fit_to_encoder(torch.ones(2, 1, 1, 4, 4), 4), torch.ones(2, 1, 4, 4, 4))
    big = torch.randn(1, 1, 4, 8)
    assert fit_to_encoder(big, 4) is big


@pytest.mark.parametrize("dims,spatial", [(2, (12, 16)), (3, (8, 12, 10))])
def test_rotation_task_feeds_the_encoder_the_rotated_centre_with_its_label(dims, spatial, tiny_context):
    method = build_method("pretext_pretrain", tiny_context(dims, augment=NO_INTENSITY), {"task": "rotation"})
    method.train()
    seen = []
    method.trained["student"].encoders[0].register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    images = torch.randn(6, 1, *spatial, generator=torch.Generator().manual_seed(2))
    logits, classes = method.rotation_logits(images)
    assert logits.shape == (6, rotation_classes(dims))
    side = min(spatial)
    assert seen[0].shape == (6, 1, *(side,) * dims)
    for image, label, fed in zip(images, classes, seen[0]):
        torch.testing.assert_close(fed[None], rotate(centre_cube(image[None]), int(label), dims))


def test_rotation_classes_are_drawn_from_the_method_generator(tiny_context):
    method = build_method("pretext_pretrain", tiny_context(2), {})
    state = method.generator.get_state()
    _, first = method.rotation_logits(torch.randn(64, 1, 8, 8))
    method.generator.set_state(state)
    _, again = method.rotation_logits(torch.randn(64, 1, 8, 8))
    assert first.tolist() == again.tolist()
    assert set(first.tolist()) == {0, 1, 2, 3}


# Permutations --------------------------------------------------------------------------------------------------


def _direct_greedy(num_tiles: int, count: int) -> list[tuple[int, ...]]:
    """Max-min greedy over all permutations, ties by the largest sum, then the first (lexicographic)."""
    pool = list(itertools.permutations(range(num_tiles)))
    chosen = [pool[0]]
    for _ in range(count - 1):
        def key(candidate):
            distances = [sum(a != b for a, b in zip(candidate, c)) for c in chosen]
            return min(distances), sum(distances)
        best = max(key(candidate) for candidate in pool)
        chosen.append(next(candidate for candidate in pool if key(candidate) == best))
    return chosen


def test_permutation_set_matches_a_direct_greedy_selection():
    assert [tuple(p) for p in maximal_hamming_permutations(4, 6).tolist()] == _direct_greedy(4, 6)


@pytest.mark.parametrize("num_tiles,count", [(9, 100), (27, 100)])
def test_permutation_set_is_distinct_deterministic_and_far_apart(num_tiles, count):
    permutations = maximal_hamming_permutations(num_tiles, count)
    assert permutations.shape == (count, num_tiles) and permutations.dtype == torch.int64
    assert all(sorted(row) == list(range(num_tiles)) for row in permutations.tolist())
    assert len({tuple(row) for row in permutations.tolist()}) == count
    assert permutations[0].tolist() == list(range(num_tiles))
    pretext._maximal_hamming_permutations.cache_clear()
    torch.testing.assert_close(maximal_hamming_permutations(num_tiles, count), permutations)
    random_set = torch.rand(count, num_tiles, generator=torch.Generator().manual_seed(0)).argsort(dim=1)
    greedy_minimum, random_minimum = _min_off_diagonal(permutations), _min_off_diagonal(random_set)
    # measured: 9 tiles 6 vs 3, 27 tiles 24 vs 20
    assert greedy_minimum > random_minimum
    assert greedy_minimum >= {9: 6, 27: 24}[num_tiles]


def test_permutation_set_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="pool"):
        maximal_hamming_permutations(3, 7)
    with pytest.raises(ValueError, match="count"):
        maximal_hamming_permutations(9, 0)


# Tiles ---------------------------------------------------------------------------------------------------------


def test_tile_layout():
    assert tile_layout((16, 16), 3) == ((5, 5), (4, 4))
    assert tile_layout((225, 225), 3) == ((75, 75), (64, 64))
    assert tile_layout((8, 16, 16), 3) == ((2, 5, 5), (2, 4, 4))
    with pytest.raises(ValueError, match="tiles per axis"):
        tile_layout((2, 16), 3)


def _assemble(tiles: torch.Tensor, grid: int, cells: tuple[int, ...]) -> torch.Tensor:
    """Put gapless tiles ``[N, T, C, *cells]`` back in their cells (row-major, last axis fastest)."""
    dims = len(cells)
    out = torch.zeros(tiles.shape[0], tiles.shape[2], *(grid * c for c in cells))
    for t, position in enumerate(itertools.product(range(grid), repeat=dims)):
        region = tuple(slice(p * c, (p + 1) * c) for p, c in zip(position, cells))
        out[(slice(None), slice(None)) + region] = tiles[:, t]
    return out


@pytest.mark.parametrize("shape", [(6, 9), (3, 6, 3)])
def test_tiling_and_unpermuting_recovers_the_image(shape):
    dims = len(shape)
    images = torch.randn(2, 1, *shape, generator=torch.Generator().manual_seed(0))
    cells = tuple(s // 3 for s in shape)
    num_tiles = 3 ** dims
    tiles = extract_tiles(images, 3, cells, cells, torch.zeros(2, num_tiles, dims, dtype=torch.long))
    assert tiles.shape == (2, num_tiles, 1, *cells)
    torch.testing.assert_close(_assemble(tiles, 3, cells), images)
    permutations = torch.stack([torch.randperm(num_tiles, generator=torch.Generator().manual_seed(s))
                                for s in (1, 2)])
    shuffled = permute_tiles(tiles, permutations)
    for n in range(2):
        for i in range(num_tiles):
            torch.testing.assert_close(shuffled[n, i], tiles[n, permutations[n, i]])
    restored = permute_tiles(shuffled, permutations.argsort(dim=1))
    torch.testing.assert_close(_assemble(restored, 3, cells), images)
    assert not torch.equal(_assemble(shuffled, 3, cells), images)


def test_extract_tiles_starts_each_tile_at_its_cell_plus_offset():
    image = torch.arange(81.0).view(1, 1, 9, 9)
    offsets = torch.zeros(1, 9, 2, dtype=torch.long)
    offsets[0, 4] = torch.tensor([1, 0])
    offsets[0, 8] = torch.tensor([1, 1])
    tiles = extract_tiles(image, 3, (3, 3), (2, 2), offsets)
    assert tiles[0, 0, 0].tolist() == [[0, 1], [9, 10]]
    assert tiles[0, 4, 0].tolist() == [[39, 40], [48, 49]]
    assert tiles[0, 8, 0].tolist() == [[70, 71], [79, 80]]


def test_tiles_are_normalised_each_on_its_own():
    tiles = torch.randn(2, 9, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 3 + 5
    normalised = normalise_tiles(tiles)
    torch.testing.assert_close(normalised.mean(dim=(3, 4)), torch.zeros(2, 9, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(normalised.std(dim=(3, 4), unbiased=False), torch.ones(2, 9, 1), atol=1e-4, rtol=0)
    assert torch.isfinite(normalise_tiles(torch.ones(1, 1, 1, 2, 2))).all()


def test_jigsaw_task_feeds_the_encoder_the_shuffled_tiles_with_their_permutation(tiny_context):
    method = build_method("pretext_pretrain", tiny_context(2, augment=NO_INTENSITY), {"task": "jigsaw"})
    method.train()
    seen = []
    method.trained["student"].encoders[0].register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    images = torch.randn(3, 1, 24, 24, generator=torch.Generator().manual_seed(3))
    logits, indices = method.jigsaw_logits(images)
    assert logits.shape == (3, 100)
    fed = seen[0].view(3, 9, 1, 7, 7)  # cells 8, tiles round(8 * 64 / 75) = 7, no enlargement (7 >= 4)
    for n in range(3):
        permutation = method.permutations[indices[n]].tolist()
        for slot, tile_index in enumerate(permutation):
            row, col = divmod(tile_index, 3)
            crops = [images[n, :, 8 * row + dy:8 * row + dy + 7, 8 * col + dx:8 * col + dx + 7]
                     for dy in (0, 1) for dx in (0, 1)]
            normalised = [normalise_tiles(crop[None, None])[0, 0] for crop in crops]
            assert any(torch.allclose(fed[n, slot], crop, atol=1e-5) for crop in normalised), (n, slot)


def test_jigsaw_enlarges_tiles_too_small_for_the_encoder(tiny_context):
    method = build_method("pretext_pretrain", tiny_context(3), {"task": "jigsaw"})
    method.train()
    seen = []
    method.trained["student"].encoders[0].register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    logits, _ = method.jigsaw_logits(torch.randn(2, 1, 6, 16, 16))
    assert logits.shape == (2, 100)
    assert seen[0].shape == (2 * 27, 1, 4, 4, 4)  # tiles (2, 4, 4) enlarged to the depth-2 minimum 4


# The method ----------------------------------------------------------------------------------------------------


def test_defaults_and_checks(tiny_context):
    method = build_method("pretext_pretrain", tiny_context(2), {})
    assert method.params.task == "rotation"
    assert method.params.pretrain_epochs == 10
    assert method.params.num_permutations == 100
    assert method.progress(0, 9.5, 30).stage == "pretrain" and method.progress(0, 10.0, 30).stage == "semi"
    assert method.uses_unlabelled and method.ddp_find_unused_parameters
    with pytest.raises(ValueError, match="exceeds"):
        build_method("pretext_pretrain", tiny_context(2), {"task": "jigsaw", "num_permutations": 362881})
    with pytest.raises(ValueError, match="not allowed"):
        build_method("pretext_pretrain", tiny_context(2), {"num_permutations": 1})


@pytest.mark.parametrize("task", ["rotation", "jigsaw"])
def test_pretext_loss_is_the_cross_entropy_of_the_produced_logits(task, tiny_context):
    method = build_method("pretext_pretrain", tiny_context(2), {"task": task})
    method.train()
    produced = {}
    task_logits = method.rotation_logits if task == "rotation" else method.jigsaw_logits

    def capture(images):
        produced["logits"], produced["targets"] = task_logits(images)
        return produced["logits"], produced["targets"]

    setattr(method, f"{task}_logits", capture)
    output = method.pretrain_step(_batch(2), _pretrain())
    logits, targets = produced["logits"].detach(), produced["targets"]
    assert logits.shape[0] == targets.shape[0] == 4
    loss = float(output.objectives["main"].detach())
    direct = sum(-row[t] + math.log(sum(math.exp(v) for v in row))
                 for row, t in zip(logits.double().tolist(), targets.tolist())) / len(targets)
    assert loss == pytest.approx(direct, rel=1e-5)
    assert loss == pytest.approx(float(F.cross_entropy(logits, targets)), rel=1e-6)
    assert float(output.logs["loss_pretext"]) == pytest.approx(loss)
    assert float(output.logs["pretext_accuracy"]) == pytest.approx(
        sum(int(row.argmax()) == t for row, t in zip(logits, targets.tolist())) / 4)
    assert output.unsupervised is output.objectives["main"]


@pytest.mark.parametrize("task,dims", [("rotation", 2), ("rotation", 3), ("jigsaw", 2), ("jigsaw", 3)])
def test_pretraining_trains_the_encoder_and_head_but_not_the_decoder(task, dims, tiny_context):
    method = build_method("pretext_pretrain", tiny_context(dims), {"task": task})
    method.train()
    output = method.pretrain_step(_batch(dims), _pretrain())
    output.objectives["main"].backward()
    student = method.trained["student"]
    assert all(p.grad is not None for p in student.encoders.parameters())
    assert any(float(p.grad.abs().sum()) > 0 for p in student.encoders[0].parameters())
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0
               for p in method.trained["pretext_head"].parameters())
    untouched = [*student.decoders.parameters(), *student.ups.parameters(), *student.head.parameters()]
    assert all(p.grad is None for p in untouched)


def test_fine_tuning_trains_the_whole_student_and_not_the_head(tiny_context):
    method = build_method("pretext_pretrain", tiny_context(2), {})
    method.train()
    output = method.training_step(_batch(2), _pretrain("semi"))
    assert torch.isfinite(output.objectives["main"]) and "loss_sup" in output.logs
    output.objectives["main"].backward()
    student = method.trained["student"]
    assert all(p.grad is not None for p in student.parameters())
    assert any(float(p.grad.abs().sum()) > 0 for p in student.decoders.parameters())
    assert all(p.grad is None for p in method.trained["pretext_head"].parameters())


def test_pretraining_learns_the_rotation_task(tiny_context):
    torch.manual_seed(0)
    method = build_method("pretext_pretrain", tiny_context(2, dropout=0.0), {})
    method.train()
    parameters = [p for group in method.optimizer_groups().values() for p in group]
    optimiser = torch.optim.Adam(parameters, lr=1e-2)
    ramp = torch.linspace(0, 1, 8)
    images = (ramp.view(1, 8) * ramp.view(8, 1) ** 2).expand(4, 1, 8, 8).contiguous()
    batch = {"image_l": images[:2], "label_l": torch.zeros(2, 8, 8, dtype=torch.long), "image_u": images[2:]}
    losses = []
    for _ in range(40):
        output = method.pretrain_step(batch, _pretrain())
        optimiser.zero_grad()
        output.objectives["main"].backward()
        optimiser.step()
        losses.append(float(output.objectives["main"].detach()))
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


# The registry contract for the jigsaw task (the registry test covers the default, rotation) ----------------------


@pytest.mark.parametrize("dims", [2, 3])
def test_jigsaw_step_state_and_unsupervised_term(dims, tiny_context):
    method = build_method("pretext_pretrain", tiny_context(dims), {"task": "jigsaw"})
    method.train()
    output = method.pretrain_step(_batch(dims), _pretrain())
    assert set(output.objectives) <= set(method.optimizer_groups())
    assert math.isfinite(float(output.objectives["main"].detach()))
    term = output.unsupervised
    assert abs(float(term.detach())) > 1e-8
    trained = [p for module in method.trained.values() for p in module.parameters()]
    grads = torch.autograd.grad(term, trained, allow_unused=True)
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)
    target = build_method("pretext_pretrain", tiny_context(dims, seed=7), {"task": "jigsaw"})
    target.load_state_dict(method.state_dict())
    x = _batch(dims)["image_l"]
    with torch.no_grad():
        torch.testing.assert_close(method.eval_model().eval()(x), target.eval_model().eval()(x))
    for a, b in zip(method.trained["pretext_head"].state_dict().values(),
                    target.trained["pretext_head"].state_dict().values()):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(method.permutations, target.permutations)
