"""What the loop does differently under several workers (Ray Train DDP): the device, the
gradients DDP does not average, one collective decision on divergence, rank 0's buffers
everywhere, and evaluation results gathered from every rank.

The method wraps its own networks (:meth:`semiseg.methods.Method.wrap_for_ddp`) and returns
the parameters whose gradients :class:`GradientSync` averages here. Under one worker every
function is a no-op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from semiseg.components.parallel import unwrapped
from semiseg.methods import Method
from semiseg.train.session import Session, TrainSession


def training_device(session: Session) -> torch.device:
    """The device this worker trains on: Ray Train's for a DDP worker, else CUDA when there is one."""
    if torch.cuda.is_available():
        if isinstance(session, TrainSession):
            import ray.train.torch

            return ray.train.torch.get_device()
        return torch.device("cuda")
    return torch.device("cpu")


def ddp_device_ids(device: torch.device) -> list[int] | None:
    """``device_ids`` for ``DistributedDataParallel``: this worker's GPU, None on CPU."""
    return [device.index] if device.type == "cuda" else None


def average_gradients(params: list[torch.nn.Parameter], world_size: int) -> None:
    """All-reduce (mean) the gradients of ``params`` in one flattened buffer.

    Parameters without a gradient on this step contribute zeros, so every rank calls the
    same collective with the same buffer size.
    """
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat.div_(world_size)
    for param, synced in zip(params, torch._utils._unflatten_dense_tensors(flat, grads)):
        if param.grad is None:
            param.grad = synced.clone()
        else:
            param.grad.copy_(synced)


def finite_on_every_rank(loss: torch.Tensor, world_size: int) -> bool:
    """Whether the loss is finite on all ranks (a collective decision, so no rank is left waiting)."""
    finite = torch.isfinite(loss).to(torch.float32).reshape(1)
    if world_size > 1 and dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item() > 0)


@dataclass
class GradientSync:
    """The loop's own collectives: called after backward, it averages the gradients of ``params``
    (those :meth:`~semiseg.methods.Method.wrap_for_ddp` returned); it also agrees buffers and logs."""

    params: list[torch.nn.Parameter]
    world_size: int

    def __call__(self) -> None:
        if self.world_size > 1:
            average_gradients(self.params, self.world_size)

    def broadcast_buffers(self, method: Method) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics, EMA teachers' buffers).

        Each rank updates BatchNorm statistics from its own batches; without this, ranks
        would validate and checkpoint slightly different models.
        """
        if self.world_size == 1 or not dist.is_initialized():
            return
        for module in [*method.trained.values(), *method.frozen.values()]:
            for buffer in unwrapped(module).buffers():
                dist.broadcast(buffer, src=0)

    def average_logs(self, means: dict[str, float]) -> dict[str, float]:
        """Epoch means averaged over ranks, so epoch-level method state (ALW) agrees everywhere."""
        if self.world_size == 1 or not dist.is_initialized() or not means:
            return means
        keys = sorted(means)
        values = torch.tensor([means[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(values)
        return {k: float(v) / self.world_size for k, v in zip(keys, values)}


def gather_from_ranks(results: list[dict], world_size: int) -> list[dict]:
    """Every rank's ``results``, concatenated in rank order, on every rank (``results`` itself under one)."""
    if world_size > 1 and dist.is_initialized():
        gathered: list[list[dict]] = [[] for _ in range(world_size)]
        dist.all_gather_object(gathered, results)
        return [case for rank_results in gathered for case in rank_results]
    return results
