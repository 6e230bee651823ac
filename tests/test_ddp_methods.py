"""Every method trains under data parallelism (gloo, 2 processes) and the ranks stay identical."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from semiseg.methods import method_names

WORLD = 2


class _DistributedSession:
    """A session for a process group started by the test (what Ray Train does for a trial)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.reports: list[dict] = []

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        self.reports.append(metrics)

    @contextlib.contextmanager
    def restored_checkpoint(self):
        yield None


def _checksums(state) -> dict[str, float]:
    """Sum of every floating weight and buffer per network (BatchNorm statistics included)."""
    return {key: float(sum(float(p.double().sum()) for p in state_dict.values()
                           if isinstance(p, torch.Tensor) and p.is_floating_point()))
            for key, state_dict in state["method"].items() if key.startswith(("trained.", "frozen."))}


def _pretraining_override(name: str) -> dict:
    """One epoch of the method's pretraining stage, then one of its semi-supervised stage, for a
    method whose default pretrains (both stages are then checked on two ranks)."""
    from semiseg.methods.registry import method_defaults

    return {"method.pretrain_epochs": 1} if method_defaults(name)["pretrain_epochs"] > 0 else {}


def _worker(rank: int, folder: str, config: dict, names: list[str]) -> None:
    from semiseg.train import loop

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=WORLD)
    captured = {}
    original = loop._report

    def capture(session, metrics, method, *rest):
        captured["method"] = method.state_dict()
        captured["epoch"] = metrics["epoch"]
        captured["val"] = metrics.get("val/dice")
        original(session, metrics, method, *rest)

    loop._report = capture
    results = {}
    for name in names:
        captured.clear()
        try:
            loop.run_training({**config, "method.name": name, **_pretraining_override(name)},
                              _DistributedSession(rank, WORLD))
        except Exception as error:  # recorded per method so that one broken method fails only its own test
            results[name] = {"error": f"{type(error).__name__}: {error}"}
            dist.barrier()
            continue
        results[name] = {"checksums": _checksums(captured), "epoch": captured["epoch"], "val": captured["val"]}
    Path(folder, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()
    # Skip the interpreter's teardown: a gloo thread still joinable there has aborted a rank after its
    # results were written ("terminate called without an active exception", rarely, under load).
    os._exit(0)


def _selected_methods(request) -> list[str]:
    """The methods whose test this session runs (after ``-k``), so one pair of processes trains them all."""
    return sorted({item.callspec.params["name"] for item in request.session.items
                   if getattr(item, "originalname", "") == "test_method_trains_identically_on_two_ranks"})


@pytest.fixture(scope="module")
def two_rank_results(request, tmp_path_factory, cache_dir) -> tuple[dict, dict]:
    """Every selected method trained for 2 epochs on 2 gloo ranks: each rank's results by method."""
    from tests.conftest import TINY

    folder = tmp_path_factory.mktemp("ddp")
    config = {**TINY, "train.max_epochs": 2, "train.evaluate_test": False}
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(str(folder), config, _selected_methods(request)), nprocs=WORLD, join=True)
    return (json.loads((folder / "rank0.json").read_text()), json.loads((folder / "rank1.json").read_text()))


@pytest.mark.parametrize("name", method_names())
def test_method_trains_identically_on_two_ranks(name, two_rank_results):
    rank0, rank1 = (results[name] for results in two_rank_results)
    assert "error" not in rank0 and "error" not in rank1, (rank0.get("error"), rank1.get("error"))
    assert rank0["epoch"] == 2.0
    assert rank0["val"] == pytest.approx(rank1["val"], abs=1e-12), name
    assert rank0["checksums"] and rank0["checksums"].keys() == rank1["checksums"].keys()
    for key, value in rank0["checksums"].items():
        assert value == pytest.approx(rank1["checksums"][key], rel=1e-9, abs=1e-9), key
