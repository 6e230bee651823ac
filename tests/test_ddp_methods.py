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
        params = {"method.pretrain_epochs": 1} if name == "contrastive_pretrain" else {}
        loop.run_training({**config, "method.name": name, **params}, _DistributedSession(rank, WORLD))
        results[name] = {"checksums": _checksums(captured), "epoch": captured["epoch"], "val": captured["val"]}
    Path(folder, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def test_every_method_trains_identically_on_two_ranks(tiny_config, tmp_path):
    config = {**tiny_config, "train.max_epochs": 2, "train.evaluate_test": False}
    names = method_names()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(str(tmp_path), config, names), nprocs=WORLD, join=True)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert sorted(rank0) == sorted(names)
    for name in names:
        assert rank0[name]["epoch"] == 2.0
        assert rank0[name]["val"] == pytest.approx(rank1[name]["val"], abs=1e-12), name
        for key, value in rank0[name]["checksums"].items():
            assert value == pytest.approx(rank1[name]["checksums"][key], rel=1e-9, abs=1e-9), (name, key)
