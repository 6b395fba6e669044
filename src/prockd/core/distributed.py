"""torch.distributed (DDP) support: launched by ``torchrun``, one process per GPU (or CPU worker).

``torchrun --nproc_per_node N -m prockd.cli train --config ...`` sets ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE``; :func:`setup` then initialises the process group (NCCL on GPUs, gloo on CPU) and
picks ``cuda:LOCAL_RANK``. ``train.batch_size`` stays the *global* batch: every global batch of the
single-process run is split across the ranks by rank-strided shards (rank ``r`` takes items
``r, r + W, ...``), the sharding torch's ``DistributedSampler`` applies to one shared permutation,
and each rank's loss is weighted by its share of the batch, so the averaged gradient is the
single-process one.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True under a multi-process launch."""
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the only one that logs and writes checkpoints."""
        return self.rank == 0


def env_info() -> DistInfo:
    """The launch environment (``torchrun`` variables), without initialising anything."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return DistInfo()
    return DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def setup(device_type: str) -> DistInfo:
    """Initialise the default process group once (gloo on CPU, NCCL on CUDA) if launched by torchrun."""
    info = env_info()
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend, rank=info.rank, world_size=info.world,
                                timeout=timedelta(seconds=int(os.environ.get("PROCKD_DIST_TIMEOUT", "1800"))))
    return info


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op in a single process)."""
    if info.enabled and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of ``t`` over the ranks (``t`` itself in a single process)."""
    if info.enabled and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def replicas_identical(module: torch.nn.Module, info: DistInfo) -> bool:
    """Whether every rank holds exactly the same parameters (True in a single process): each rank's float64
    fingerprint (sums of the tensors and of their squares) is compared with rank 0's. Buffers are left out:
    BatchNorm statistics in training mode follow each rank's own last batch (DDP broadcasts rank 0's at the
    start of every forward; rank 0's are the ones saved)."""
    if not (info.enabled and dist.is_initialized()):
        return True
    parts = [t.detach().double() for t in module.parameters() if t.is_floating_point()]
    fp = torch.stack([torch.stack([p.sum(), (p * p).sum()]) for p in parts]).flatten()
    ref = fp.clone()
    dist.broadcast(ref, src=0)
    diff = (fp - ref).abs().max().reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return bool(diff.item() == 0.0)


def shard(idx: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Rank ``r``'s part of a global batch: items ``r, r + W, ...`` (every rank gets at least one item)."""
    if not info.enabled:
        return idx
    if len(idx) < info.world:  # a short last batch: repeat items so that no rank is idle (DDP needs all)
        idx = idx.repeat((info.world + len(idx) - 1) // len(idx))[: info.world]
    return idx[info.rank::info.world]


def cleanup() -> None:
    """Destroy the process group if one was initialised."""
    if dist.is_initialized():
        dist.destroy_process_group()


def loader_context(workers: int):
    """The start method of ``DataLoader`` workers: ``fork`` on Linux, also inside processes that were themselves
    spawned (the benchmark's parallel runs), where the inherited default would spawn every epoch's workers
    afresh, re-importing torch each time (measured: 3.8 -> 8 s per epoch of the embedded detection student);
    the platform's default elsewhere."""
    if workers > 0 and sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods():
        return mp.get_context("fork")
    return None
