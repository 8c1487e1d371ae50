"""The batches of a run, step by step, made in DataLoader workers or in the training process.

Each crop of a step is a pure function of ``(seed, step, item)``: its case, position and augmentation
are drawn from ``np.random.default_rng([seed, step, item])`` and nothing else, where ``item`` numbers
the crops of the step's global batch (all micro-batches of all processes). A process makes only its
own items: with ``P`` processes, ``A`` micro-batches per step and ``B`` crops per micro-batch, process
``p`` makes items ``(a·P + p)·B .. (a·P + p + 1)·B - 1`` of micro-batch ``a``. So one process with
batch 4 and two processes with batch 2 see the same crops, and a run resumed with other workers or
another number of processes (same global batch) repeats the uninterrupted run.

The loader is a map-style dataset over micro-batches (from the step a run starts or resumes at), read
in order; PyTorch hands item ``i`` to worker ``i mod N`` and returns the items in order, so any number
of workers (0: in this process) yields the same batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import FactorizerError, InputError
from .data import TrainingCase, augment, sample_batch


@dataclass(frozen=True)
class Share:
    """This process's part of every step: ``batch_size`` crops in each of ``accumulate`` micro-batches,
    as process ``rank`` of ``processes``."""

    batch_size: int
    accumulate: int = 1
    rank: int = 0
    processes: int = 1

    def items(self, micro_batch: int) -> range:
        """The global item numbers of this process's crops in ``micro_batch`` of a step."""
        first = (micro_batch * self.processes + self.rank) * self.batch_size
        return range(first, first + self.batch_size)


class StepBatches(Dataset):
    """Item ``i``: the augmented ``(image, target)`` of micro-batch ``i mod A`` of step ``start + i // A``."""

    def __init__(self, cases: Sequence[TrainingCase], roi: Sequence[int], share: Share,
                 foreground_fraction: float, seed: int, start: int, stop: int):
        self.cases, self.roi, self.share = list(cases), tuple(roi), share
        self.foreground_fraction, self.seed, self.start, self.stop = foreground_fraction, seed, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start) * self.share.accumulate

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        step, micro_batch = divmod(index, self.share.accumulate)
        return batch_of_step(self.cases, self.roi, self.share.items(micro_batch), self.foreground_fraction,
                             self.seed, self.start + step)


def batch_of_step(cases: Sequence[TrainingCase], roi: Sequence[int], items: Iterable[int],
                  foreground_fraction: float, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The crops ``items`` of ``step``, augmented (each the same wherever and whenever it is made)."""
    crops = []
    for item in items:
        rng = np.random.default_rng([seed, step, item])
        crops.append(augment(*sample_batch(cases, roi, 1, foreground_fraction, rng), rng))
    images, targets = zip(*crops)
    return torch.cat(images), torch.cat(targets)


def step_batches(cases: Sequence[TrainingCase], roi: Sequence[int], share: Share, foreground_fraction: float,
                 seed: int, start: int, stop: int, workers: int = 0,
                 pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This process's micro-batches of steps ``start .. stop - 1`` in order, made by ``workers``
    processes (0: here).

    The loader gets its own generator, so creating it leaves the global torch RNG (the one the loop
    seeds per step) untouched.
    """
    dataset = StepBatches(cases, roi, share, foreground_fraction, seed, start, stop)
    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin_memory,
                        generator=torch.Generator().manual_seed(seed), persistent_workers=False,
                        prefetch_factor=2 if workers else None)
    return _one_line_errors(iter(loader))


def _one_line_errors(batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches; a worker's failure as the one-line error the command shows (PyTorch re-raises a
    worker's exception with the worker's traceback folded into its message)."""
    try:
        yield from batches
    except FactorizerError as err:
        raise type(err)(_original_message(err)) from None
    except FileNotFoundError as err:
        raise InputError(f"a file of the training cache vanished while the run read it ({_original_message(err)}); "
                         "check that nothing deletes the cache during a run, then rerun with --resume") from None


def _original_message(err: BaseException) -> str:
    """The message raised in the worker: the last line of the traceback PyTorch folded in, if any."""
    lines = str(err).strip().splitlines()
    if not lines:
        return type(err).__name__
    last = lines[-1].strip()
    return last.partition(f"{type(err).__name__}: ")[2] or last

