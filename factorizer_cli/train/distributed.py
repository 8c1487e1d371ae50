"""Training in several processes and machines, started by ``torchrun``: the process group, and the few
collective operations the loop needs.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in every process it starts; without them
(a plain ``factorizer train``) the run is one process and every operation here is the identity. The
backend follows the device: NCCL between GPUs (each process on GPU ``LOCAL_RANK``), gloo on CPUs.
Process 0 is the one writer of checkpoints, packages and logs; every process reads the saved state
on ``--resume``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import ConfigError

# Preparing a large dataset's cache can take hours before the first step; the barrier that waits for it
# gets its own group with this timeout, the training collectives keep the backend's default (a hang
# there should fail fast).
PREPARATION_TIMEOUT = timedelta(hours=24)


def launched_processes() -> int:
    """How many processes ``torchrun`` started for this run (1 without ``torchrun``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def threads_per_process() -> int | None:
    """CPU threads for each of the processes torchrun started on this machine: its cores shared out
    (torchrun itself sets one thread per process); None outside torchrun (PyTorch's default)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local == 1:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // local)


def is_writer() -> bool:
    """Whether this process writes (process 0, or the only one): the others show no progress either."""
    return os.environ.get("RANK", "0") == "0"


class _SummedOverProcesses(torch.autograd.Function):
    """All-reduce (sum) whose backward all-reduces the gradient: the gradient of a sum over processes
    with respect to one process's term is the sum of every process's gradient of it."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, gradient: Tensor) -> Tensor:  # type: ignore[override]
        total = gradient.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total


@dataclass(frozen=True)
class Processes:
    """This process's place in the run (``rank`` of ``count``) and the collectives between them."""

    rank: int = 0
    count: int = 1
    local_rank: int = 0
    _preparation: object | None = None  # the long-timeout group for ``wait_for_preparation``

    @property
    def writer(self) -> bool:
        return self.rank == 0

    def sum(self, tensor: Tensor) -> Tensor:
        """The sum of ``tensor`` over the processes, differentiable: its backward sums the gradients of
        every process's copy, so a loss computed from global statistics on every process gets, after
        DistributedDataParallel averages the gradients, exactly the gradient of one process."""
        if self.count == 1:
            return tensor
        return _SummedOverProcesses.apply(tensor)

    def mean(self, value: float) -> float:
        """The mean of a number over the processes (a logged loss, the same on every process after)."""
        return value if self.count == 1 else self.sum_numbers([value])[0] / self.count

    def sum_numbers(self, values: list[float]) -> list[float]:
        """Element-wise sums of ``values`` over the processes (validation scores of each one's cases)."""
        if self.count == 1:
            return values
        total = torch.tensor(values, dtype=torch.float64, device=self._device())
        dist.all_reduce(total)
        return total.tolist()

    def share_buffers(self, module: torch.nn.Module) -> None:
        """Process 0's buffers (BatchNorm running statistics) in every process: on CPUs each process
        updates its own, so before validating they are made one model again (on GPUs SyncBatchNorm
        keeps them equal; this is then a no-op copy)."""
        if self.count > 1:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)

    def wait_for_preparation(self) -> None:
        """Wait until every process has prepared its share of the cases (hours, for a large dataset)."""
        if self.count > 1:
            dist.barrier(group=self._preparation)

    def wait(self) -> None:
        """Wait until every process reaches this point (the writer's files are then complete)."""
        if self.count > 1:
            dist.barrier()

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
            else torch.device("cpu")


@contextmanager
def process_group(device: torch.device) -> Iterator[tuple[Processes, torch.device]]:
    """This process's ``Processes`` and the device it trains on; the group is joined for the block and
    left after it. Under ``torchrun`` with CUDA, process ``LOCAL_RANK`` takes GPU ``LOCAL_RANK``."""
    count = launched_processes()
    if count == 1:
        yield Processes(), device
        return
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"training in several processes runs on CPUs or CUDA GPUs, not {device.type}; "
                          "use --device cpu or cuda")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"process {local_rank} of this machine has no GPU of its own ({torch.cuda.device_count()} "
                              "GPUs); start at most that many processes per machine (--nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    joined_here = not dist.is_initialized()
    if joined_here:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    preparation = dist.new_group(backend="gloo", timeout=PREPARATION_TIMEOUT)
    try:
        yield Processes(rank, count, local_rank, preparation), device
    finally:
        if joined_here:
            dist.destroy_process_group()
