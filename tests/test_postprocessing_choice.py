"""The trial side of post-processing: chosen on the validation cases at the end of training, stored in
the checkpoint's model spec, and the test cases scored with and without it."""

import contextlib
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from semiseg.data.prepared import EvalCase
from semiseg.methods.registry import experiment_config
from semiseg.train.loop import run_training
from semiseg.train.session import LocalSession
from semiseg.train.validation import evaluate_with_postprocessing


class _ImageIsThePrediction(nn.Module):
    """A fake 2D network: the logits are the one-hot of the image's (integer) intensity, so a case's
    prediction is exactly the label map written into its image."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        labels = slices[:, 0].round().long().clamp(0, self.num_classes - 1)
        return nn.functional.one_hot(labels, self.num_classes).permute(0, 3, 1, 2).float()


def _reference() -> np.ndarray:
    """Class 1 (liver): one block. Class 2 (tumour): two true, separate blocks."""
    reference = np.zeros((24, 24, 6), dtype=np.int64)
    reference[1:7, 1:7, 1:5] = 1
    reference[9:15, 1:7, 1:5] = 2
    reference[10:13, 10:13, 1:4] = 2
    return reference


def _case(case_id: str, shift: int) -> EvalCase:
    """A case whose prediction (by the fake network) is the reference plus a distant liver island
    of 3x3x3 voxels."""
    reference = np.roll(_reference(), shift, axis=1)
    prediction = reference.copy()
    prediction[20:23, 20:23, 2:5] = 1
    return EvalCase(case_id, prediction[None].astype(np.float32), reference, (1.0, 1.0, 2.5))


def test_the_choice_made_on_validation_islands_raises_the_test_dice():
    data = SimpleNamespace(class_ids=(0, 1, 2), label_names={0: "background", 1: "liver", 2: "tumour"},
                           validation=[_case("val_a", 0), _case("val_b", 1)],
                           test=[_case("test_a", 0), _case("test_b", 1), _case("test_c", 0)])
    cfg = experiment_config({"data.dims": 2})
    result = evaluate_with_postprocessing(_ImageIsThePrediction(3), data, cfg, LocalSession(), torch.device("cpu"))

    assert result.postprocessing == {1: True, 2: False}
    assert result.spec_entry() == {"1": True, "2": False}
    metrics = result.metrics
    assert metrics["postprocessing/liver"] == 1.0 and metrics["postprocessing/tumour"] == 0.0
    liver_raw = 2 * 144 / (144 + 171)
    assert metrics["test/dice/liver"] == pytest.approx(liver_raw)
    assert metrics["test_postprocessed/dice/liver"] == pytest.approx(1.0)
    assert metrics["test/dice/tumour"] == metrics["test_postprocessed/dice/tumour"] == pytest.approx(1.0)
    assert metrics["test_postprocessed/dice"] > metrics["test/dice"]
    assert metrics["test/dice"] == pytest.approx((liver_raw + 1.0) / 2)
    assert metrics["test/hd95/liver"] > 10.0, "the distant island sets the raw HD95"
    assert metrics["test_postprocessed/hd95/liver"] == 0.0
    assert metrics["val_postprocessed/dice"] == pytest.approx(1.0)
    assert metrics["val_postprocessed/dice/liver"] == pytest.approx(1.0)


def _clean_case(case_id: str) -> EvalCase:
    """A case predicted exactly (no island)."""
    return EvalCase(case_id, _reference()[None].astype(np.float32), _reference(), (1.0, 1.0, 1.0))


class _RankSession:
    """Rank ``rank`` of a gloo process group started by the test."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    @contextlib.contextmanager
    def restored_checkpoint(self):
        yield None


def _rank_worker(rank: int, folder: str) -> None:
    """Evaluate on rank ``rank`` of 2: rank 0's validation share has the island, rank 1's has none."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    data = SimpleNamespace(class_ids=(0, 1, 2), label_names={0: "background", 1: "liver", 2: "tumour"},
                           validation=[_case("val_island", 0), _clean_case("val_clean")],
                           test=[_case("test_a", 0), _clean_case("test_b"), _case("test_c", 1)])
    result = evaluate_with_postprocessing(_ImageIsThePrediction(3), data, experiment_config({"data.dims": 2}),
                                          _RankSession(rank, 2), torch.device("cpu"))
    Path(folder, f"rank{rank}.json").write_text(json.dumps({"choice": result.spec_entry(), "metrics": result.metrics}))
    dist.destroy_process_group()
    os._exit(0)


def test_every_rank_decides_the_same_choice_from_the_gathered_validation_cases(tmp_path, cache_dir):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_rank_worker, args=(str(tmp_path),), nprocs=2, join=True)
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["choice"] == rank1["choice"] == {"1": True, "2": False}, "rank 1 alone saw no island"
    assert rank0["metrics"] == rank1["metrics"]
    liver_raw = 2 * 144 / (144 + 171)
    assert rank0["metrics"]["test/dice/liver"] == pytest.approx((2 * liver_raw + 1.0) / 3), "all 3 test cases"
    assert rank0["metrics"]["test_postprocessed/dice/liver"] == pytest.approx(1.0)
    assert rank0["metrics"]["val_postprocessed/dice/liver"] == pytest.approx(1.0)


def test_without_islands_nothing_is_chosen_and_both_scores_agree():
    clean = [_clean_case(f"c{i}") for i in range(2)]
    data = SimpleNamespace(class_ids=(0, 1, 2), label_names={0: "background", 1: "liver", 2: "tumour"},
                           validation=clean, test=clean)
    result = evaluate_with_postprocessing(_ImageIsThePrediction(3), data, experiment_config({"data.dims": 2}),
                                          LocalSession(), torch.device("cpu"))
    assert result.postprocessing == {1: False, 2: False}
    assert {k: v for k, v in result.metrics.items() if k.startswith("postprocessing/")} == {
        "postprocessing/liver": 0.0, "postprocessing/tumour": 0.0}
    for key, value in result.metrics.items():
        if key.startswith("test/"):
            twin = result.metrics["test_postprocessed/" + key.removeprefix("test/")]
            assert value == twin or (math.isnan(value) and math.isnan(twin)), key


def test_a_trial_reports_post_processed_test_metrics_and_stores_the_choice(tiny_config, tmp_path):
    session = LocalSession(tmp_path / "ckpt")
    state = run_training({**tiny_config, "method.name": "supervised"}, session)
    last = state.history[-1]
    assert 0.0 <= last["test_postprocessed/dice"] <= 1.0
    assert 0.0 <= last["test/dice"] <= 1.0
    assert 0.0 <= last["val_postprocessed/dice"] <= 1.0
    assert "test_postprocessed/dice" not in state.history[0], "only the last epoch evaluates the test set"
    chosen = {k: v for k, v in last.items() if k.startswith("postprocessing/")}
    assert len(chosen) == 1 and set(chosen.values()) <= {0.0, 1.0}
    name = next(iter(chosen)).removeprefix("postprocessing/")
    assert {f"val/dice/{name}", f"test/dice/{name}", f"test_postprocessed/dice/{name}"} <= set(last)
    assert session.reports[-1]["test_postprocessed/dice"] == last["test_postprocessed/dice"]

    spec = torch.load(session.latest / "state.pt", weights_only=True)["model_spec"]
    foreground = [c for c in spec["class_ids"] if c != 0]
    assert set(spec["postprocessing"]) == {str(c) for c in foreground}
    assert all(type(v) is bool for v in spec["postprocessing"].values())
    assert sorted(float(v) for v in spec["postprocessing"].values()) == sorted(chosen.values())
    if not any(spec["postprocessing"].values()):
        assert last["test_postprocessed/dice"] == last["test/dice"]
